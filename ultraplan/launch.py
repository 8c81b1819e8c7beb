"""Start a torchrun job so that it ends cleanly: signals forwarded, no rank left behind, one line per failure.

Two halves, one per process:

- ``run_job`` (in the ``ultraplan run`` process): starts the launcher below in a session of its own,
  so a terminal's Ctrl-C reaches ``ultraplan run`` alone, which forwards SIGINT/SIGTERM to torchrun
  (torchrun passes it to every rank, torch/distributed/elastic/multiprocessing/api.py,
  ``_terminate_process_handler``). Every process of the job carries ``ULTRAPLAN_JOB=<id>`` in its
  environment; whatever still carries it when the job ends, or ``GRACE`` seconds after a signal, is
  SIGKILLed: torchrun starts each rank in a session of its own (subprocess_handler.py,
  ``start_new_session``), so killing torchrun's process group would miss them.
- ``main`` (``python -m ultraplan.launch TORCHRUN-ARGS``): torchrun itself, with its own log lines
  silenced (each rank already said why it stopped, watchdog.py) and, instead of its traceback and
  failure table, one line naming the rank that failed first. It dies with ``ultraplan run``
  (PR_SET_PDEATHSIG), so even a SIGKILLed ``ultraplan run`` leaves no torchrun behind, and the ranks
  notice their launcher is gone (watchdog.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

GRACE = 5.0  # seconds the ranks get to act on a forwarded signal before SIGKILL
MARKER = "ULTRAPLAN_JOB"
# a rank that stopped because another one did: not the cause of a failure
CONSEQUENCES = ("another rank left the job", "stopped by SIGTERM", "stopped by SIGINT", "watchdog:")


def job_processes(marker: str, variable: str = MARKER) -> list[int]:
    """Pids (other than ours) whose environment holds ``variable=marker`` (a /proc scan)."""
    needle = f"{variable}={marker}".encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read() + b"\0":
                    found.append(int(entry.name))
    return found


def kill_job(marker: str, variable: str = MARKER) -> list[int]:
    """SIGKILL every process of the job; return their pids."""
    pids = job_processes(marker, variable)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids


def run_job(cmd: list[str], env: dict[str, str], cwd: str | os.PathLike) -> int:
    """Run ``cmd`` (a launcher command) to the end; a SIGINT or SIGTERM to this process is forwarded and
    answered with 128 + its number. No process of the job outlives this call."""
    marker = uuid.uuid4().hex
    env = dict(env, **{MARKER: marker, "ULTRAPLAN_PARENT": str(os.getpid())})
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(OSError):
            proc.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, forward) for s in handled}
    except ValueError:  # not the main thread: nothing to forward
        previous = {}
    try:
        while proc.poll() is None and not received:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        deadline = time.monotonic() + GRACE
        while received and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        kill_job(marker)
        proc.wait()
    return 128 + received[0] if received else proc.returncode


# ---- the launcher: torchrun with one line per failure ----------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when ``ultraplan run`` dies (prctl PR_SET_PDEATHSIG = 1), then make sure it
    has not died already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    parent = os.environ.get("ULTRAPLAN_PARENT")
    if parent and os.getppid() != int(parent):
        sys.exit(128 + signal.SIGTERM)


def _reason(failure) -> str:
    """What a torchrun ProcessFailure says: the rank's own line (its error file), else its signal or exit code."""
    message = failure.message
    if isinstance(message, dict):
        return str(message.get("message", message))
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"


def summary(failures: dict) -> str:
    """One line: the rank that failed first and why, its own failure rather than a consequence of another's."""
    def order(item):  # a watchdog's verdict first (it names the culprit), then failures before their consequences
        reason = _reason(item[1])
        return ("watchdog:" not in reason, any(c in reason for c in CONSEQUENCES), item[1].timestamp, item[0])

    ranked = sorted(failures.items(), key=order)
    rank, first = ranked[0]
    others = [r for r, _ in ranked[1:]]
    rest = f"; rank {', '.join(map(str, sorted(others)))} stopped with it" if others else ""
    return f"job failed: rank {rank} {_reason(first)} (exit code {first.exitcode}){rest}"


def main(argv: list[str]) -> int:
    _die_with_parent()
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # what torch.distributed.elastic's get_logger reads on import
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # and the plain logging.getLogger ones
        logging.getLogger(name).setLevel(logging.CRITICAL)

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        print(summary(exc.failures), file=sys.stderr, flush=True)
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the job is over: not seconds more in the interpreter's teardown of torch
