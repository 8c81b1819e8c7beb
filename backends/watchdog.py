"""watchdog.py: how an emitted program stops when something goes wrong, in one line per rank.

Copied verbatim next to every emitted program; it imports nothing but torch and the standard
library. Four jobs, each a few lines in the program's ``main``:

- ``run_rank(main)`` runs the program's main: an exception, SIGINT or SIGTERM ends the rank with
  ONE line on stderr, ``[rank R] ...`` naming the step, instead of a traceback per rank; the full
  traceback goes to the error file torchrun names in ``TORCHELASTIC_ERROR_FILE`` (the format of
  torch/distributed/elastic/multiprocessing/errors/error_handler.py, ``record_exception``), where
  torchrun's failure summary reads it. The rank leaves with ``os._exit``: a dying job must not wait
  in gloo's teardown. A signal is taken by a thread (Python's wakeup fd), so it ends a rank at once
  even while the main thread waits in a collective.
- ``Watchdog``: a thread per rank publishes a heartbeat (a counter and the step this rank is in)
  through a client of the job's TCPStore every ``poll`` seconds. A rank whose own step has not
  advanced for ``--timeout`` seconds looks at the others: one whose heartbeat stopped (SIGSTOP, a
  process frozen with the GIL held) is named stalled; else the ranks behind the others; else all
  are stuck alike (a deadlock). Every stuck rank prints one line naming the culprit and exits; the
  lowest healthy rank SIGKILLs a stalled process on its own host, which no SIGTERM of torchrun's
  would end (a stopped process keeps signals pending; torchrun waits 30 s before SIGKILL). A rank
  whose launcher died (parent process gone) exits too, never left behind as an orphan.
  Collectives time out after ``collective_timeout`` (twice ``--timeout``): the backstop should the
  watchdog itself not run, gloo's default being 30 minutes.
- ``skip_batch``: a NaN or infinite loss stops the run naming the step (and the last checkpoint,
  ``last_checkpoint_note``), or with ``--skip-nonfinite`` skips that batch. The loss is the reduced
  one, equal on every rank, so every rank takes the same branch.
- ``inject_test_fault``: a TEST HOOK, inert unless ``ULTRAPLAN_TEST_FAULT`` is set, that makes one
  rank raise, die, stop or see an infinite loss at a chosen step (tests/dist/test_failures.py).
"""

import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch.distributed as dist

DEFAULT_TIMEOUT = 600.0
CURRENT = {"step": None}  # the step this rank is in, for the one-line messages
_GENERATION = itertools.count()  # one heartbeat key space per Watchdog (tests run programs back to back)
_ENDING = threading.Lock()  # held by whichever path ends this rank first


class JobStopped(Exception):
    """A reason to stop every rank, already said in one line (``agreed``: every rank raises the same one,
    so rank 0 alone prints it)."""

    def __init__(self, message, agreed=False):
        super().__init__(message)
        self.agreed = agreed


def add_arguments(parser):
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="stop the job when a step makes no progress for this many seconds, naming the stalled "
                             f"rank; collectives give up after twice this (default {DEFAULT_TIMEOUT:g}; 0: off)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip a batch whose loss is NaN or infinite (no optimizer step) instead of stopping")


def collective_timeout(args):
    """Process-group timeout: a backstop behind the watchdog (``None``: torch's default)."""
    return timedelta(seconds=2 * args.timeout) if args.timeout > 0 else None


def _rank():
    return int(os.environ.get("RANK", "0"))


def _at_step():
    return "" if CURRENT["step"] is None else f" at step {CURRENT['step']}"


def _say(line):
    """One write to fd 2, past Python's buffers: a signal handler may have cut into a write to sys.stderr, whose
    lock that frame still holds, and nothing lands between the line and its newline."""
    os.write(2, f"[rank {_rank()}] {line}\n".encode(errors="replace"))


def _record(message, details=""):
    """Write torchrun's error file for this rank (when torchrun asked for one)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": details or message,
                                                          "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def _end(message, details="", code=1, say=True):
    """End this rank: the error file, one line (unless ``say`` is False), exit. The first of the three
    ways here (an exception, a signal, the watchdog thread) wins; a later one waits for its exit."""
    if threading.current_thread() is threading.main_thread():  # a signal now would cut the line in two
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if not _ENDING.acquire(blocking=False):
        time.sleep(60)
        os._exit(code)
    try:
        _record(message, details)
        if say:
            _say(message)
    finally:
        _flush_streams()
        os._exit(code)


def _flush_streams(wait=1.0):
    """Flush Python's stdout and stderr, so what the rank printed before its last line is not lost.

    In the main thread a flush that a signal cut into raises "reentrant call" at once. From another thread
    the flush may wait for ever: CPython runs a signal handler inside a buffered write (it checks signals
    there) while that write holds the buffer's lock, and the handler, having lost the race to end the rank,
    waits for this thread's exit. So there the flush runs in a thread of its own, waited for ``wait`` seconds."""
    def flush():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    if threading.current_thread() is threading.main_thread():
        flush()
        return
    flusher = threading.Thread(target=flush, name="ultraplan-flush", daemon=True)
    flusher.start()
    flusher.join(wait)


def describe(exc):
    """One line for an exception: a lost peer (gloo's "Connection closed by peer") said as such."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\] ", "", text.split(" This is typically caused")[0])  # gloo's source line
    if len(text) > 200:
        text = text[:200] + "..."
    if isinstance(exc, JobStopped):
        return text
    lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    if any(s in text for s in lost):
        return f"stopped{_at_step()}: another rank left the job ({type(exc).__name__}: {text})"
    return f"failed{_at_step()}: {type(exc).__name__}: {text}"


def _on_signal(signum, frame):
    _end(f"stopped by {signal.Signals(signum).name}{_at_step()}", code=128 + signum)


def _wait_for_signals(fd):
    signum = os.read(fd, 1)[0]
    _end(f"stopped by {signal.Signals(signum).name}{_at_step()}", code=128 + signum)


def run_rank(main):
    """Run ``main()``; any failure ends this rank with one line on stderr and a non-zero exit.

    A Python signal handler runs only once the main thread is back in Python, never while it waits in a
    collective whose peer is gone (NCCL waits there for good), and torchrun's SIGTERM must end the rank
    then too. So a thread of ours reads the signal's number from Python's wakeup fd (``signal.set_wakeup_fd``,
    written by the C-level handler at once, whichever thread the signal reached) and ends the rank."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)  # a handler of Python's own: what makes the C handler write the fd
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_wait_for_signals, args=(read,), name="ultraplan-signals", daemon=True).start()
    try:
        return main()
    except SystemExit:  # argparse's usage errors, sys.exit: already said
        raise
    except BaseException as exc:  # KeyboardInterrupt included: one line, never a traceback
        _end(describe(exc), traceback.format_exc(), say=not (isinstance(exc, JobStopped) and exc.agreed and _rank() != 0))


# ---- the watchdog -------------------------------------------------------------------------------


def _store(timeout):
    """A client of the job's TCPStore of its own (torchrun's agent hosts it at MASTER_ADDR:MASTER_PORT)."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(timeout, 10)))
    return dist.distributed_c10d._get_default_store()


class Watchdog:
    """Heartbeats of every rank through the TCPStore; see the module docstring. ``beat(step)`` at the
    top of every step (a variable set, no I/O), ``stop()`` after the last."""

    def __init__(self, rank, world_size, timeout):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.poll = min(1.0, max(timeout / 10, 0.05))
        self.alive_limit = max(5 * self.poll, 2.0)  # no heartbeat for this long: the process is not running
        self.prefix = f"ultraplan-watchdog/{next(_GENERATION)}/"
        self.step = None
        self.parent = os.getppid()
        self.host = socket.gethostname()
        self.done = threading.Event()
        self.thread = None
        if timeout > 0 and world_size > 1:
            self.store = _store(timeout)
            # the pid and host are known before the first step: a rank stopped before its thread's first
            # heartbeat can still be named and killed
            self.store.set(self.prefix + str(rank), f"start None {os.getpid()} {self.host}")
            self.thread = threading.Thread(target=self._run, name="ultraplan-watchdog", daemon=True)
            self.thread.start()

    def beat(self, step):
        self.step = step
        CURRENT["step"] = step

    def stop(self):
        if self.thread is not None:
            self.done.set()
            self.thread.join()
            self.store.set(self.prefix + str(self.rank), "done")

    def _run(self):
        start = time.monotonic()
        seen = {r: (None, start, None) for r in range(self.world_size)}  # heartbeat, when it last changed, step
        mine = (self.step, start)  # this rank's step and when it began, on this rank's clock
        for count in itertools.count():
            if self.done.wait(self.poll):
                return
            if os.getppid() != self.parent:
                self._stop(f"the launcher (pid {self.parent}) is gone; stopping{_at_step()}", [])
            now = time.monotonic()
            mine = mine if mine[0] == self.step else (self.step, now)
            try:
                self._exchange(seen, count, now)
            except (RuntimeError, OSError):  # the store slow or gone: the launcher check above ends an orphan
                pass
            if now - mine[1] > self.timeout:
                self._stop(*self.verdict(seen, now))

    def _exchange(self, seen, count, now):
        """Publish this rank's heartbeat, read everyone's, note whose changed."""
        self.store.set(self.prefix + str(self.rank), f"{count} {self.step} {os.getpid()} {self.host}")
        for r in range(self.world_size):
            key = self.prefix + str(r)
            value = self.store.get(key).decode() if self.store.check([key]) else None
            if value != seen[r][0]:
                seen[r] = (value, now, None if value in (None, "done") else value.split()[1])

    def verdict(self, seen, now):
        """This rank has been in one step for longer than --timeout: the line naming the culprit, and the
        ranks this one is to kill. ``seen[r]`` is (heartbeat value, when it last changed on this rank's
        monotonic clock, the step it names)."""
        live = {r: s for r, s in seen.items() if s[0] != "done"}
        stopped = [r for r, (_, alive, _) in live.items() if now - alive > self.alive_limit]
        steps = {r: int(s[2]) for r, s in live.items() if s[2] not in (None, "None")}
        behind = [r for r in steps if steps[r] < max(steps.values())] if steps else []
        limit = f"--timeout {self.timeout:g}"
        if stopped:
            who = ", ".join(f"{r} (pid {live[r][0].split()[2]})" if live[r][0] else str(r) for r in stopped)
            line = (f"watchdog: rank {who} stopped responding (no heartbeat for {now - live[stopped[0]][1]:.1f} s)"
                    f"{_at_step()}; stopping the job ({limit})")
        elif behind:
            stopped = behind
            line = (f"watchdog: rank {', '.join(map(str, behind))} has not finished step {min(steps.values())} in "
                    f"{self.timeout:g} s while others are at step {max(steps.values())}; stopping the job ({limit})")
        else:
            line = (f"watchdog: no rank finished step {self.step} in {self.timeout:g} s (a deadlock, or a step "
                    f"slower than {limit}); stopping the job")
        return line, (stopped if self.rank == min(set(live) - set(stopped), default=None) else [])

    def _stop(self, line, kill):
        for r in kill:  # a stopped process never acts on torchrun's SIGTERM: end it here when it is ours
            value = self.store.get(self.prefix + str(r)).decode() if self.store.check([self.prefix + str(r)]) else ""
            parts = value.split()
            if len(parts) == 4 and parts[3] == self.host:
                try:
                    os.kill(int(parts[2]), signal.SIGKILL)
                except OSError:
                    pass
        _end(line)


# ---- non-finite losses ---------------------------------------------------------------------------


def last_checkpoint_note(args):
    """Where a stopped run can resume from: the checkpoint directory when the program has one."""
    directory = getattr(args, "checkpoint_dir", None)
    return f"; resume from the last checkpoint in {directory} (--resume)" if directory else ""


def skip_batch(step, loss, args, rank):
    """True when ``loss`` is NaN or infinite and ``--skip-nonfinite`` asks to skip the batch; raise
    (on every rank alike) when it is not finite otherwise."""
    if math.isfinite(loss):
        return False
    if not args.skip_nonfinite:
        raise JobStopped(f"stopped at step {step}: the loss is {loss}{last_checkpoint_note(args)} "
                         "(--skip-nonfinite skips such batches)", agreed=True)
    if rank == 0 and not args.quiet:
        print(f"step {step:4d}  loss {loss}: batch skipped (--skip-nonfinite)", flush=True)
    return True


# ---- test hook ----------------------------------------------------------------------------------


def inject_test_fault(loss, step, rank):
    """TEST HOOK (tests/dist/test_failures.py), inert in real runs: ``ULTRAPLAN_TEST_FAULT=KIND:RANK:STEP``
    makes rank RANK at step STEP raise (``raise``), die (``kill``: SIGKILL), stop (``stop``: SIGSTOP) or
    see an infinite loss (``inf``: the loss times inf, so its gradients are not finite either)."""
    fault = os.environ.get("ULTRAPLAN_TEST_FAULT")
    if not fault:
        return loss
    kind, at_rank, at_step = fault.split(":")
    if int(at_step) != step or int(at_rank) not in (rank, -1):
        return loss
    if kind == "raise":
        raise RuntimeError(f"injected failure (ULTRAPLAN_TEST_FAULT={fault})")
    if kind in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        return loss
    if kind == "inf":
        return loss * math.inf
    raise ValueError(f"ULTRAPLAN_TEST_FAULT={fault}: KIND is raise, kill, stop or inf")
