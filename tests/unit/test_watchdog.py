"""watchdog.py (copied beside every program) and ultraplan.launch's summary: the one-line messages, the
watchdog's verdict on who stalled, NaN/inf losses, and torchrun's error files read back by torch itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from ultraplan.backends import watchdog

from tests.conftest import ROOT
from ultraplan.launch import summary


def heartbeats(now, *ranks):
    """``seen`` as the watchdog keeps it: per rank (heartbeat, when it last changed, the step it names)."""
    return {r: (f"7 {step} {100 + r} host", now - beat_age, str(step)) for r, (beat_age, step) in enumerate(ranks)}


def verdict(rank, seen, now):
    dog = watchdog.Watchdog(rank, len(seen), 0)  # timeout 0: no thread, no store
    dog.timeout = 5
    return dog.verdict(seen, now)


def test_a_rank_without_heartbeat_is_named_and_killed_by_the_lowest_healthy_rank():
    now = time.monotonic()
    seen = heartbeats(now, (0.1, 3), (4.5, 3), (0.2, 3))  # rank 1 stopped 4.5 s ago
    line, kill = verdict(0, seen, now)
    assert "rank 1 (pid 101) stopped responding (no heartbeat for 4.5 s)" in line and "(--timeout 5)" in line
    assert kill == [1]
    assert verdict(2, seen, now) == (line, [])  # rank 2 says the same and leaves the kill to rank 0
    line, kill = verdict(1, heartbeats(now, (4.5, 3), (0.1, 3)), now)
    assert "rank 0 (pid 100) stopped responding" in line and kill == [0]


def test_a_rank_behind_the_others_or_a_deadlock():
    now = time.monotonic()
    line, kill = verdict(0, heartbeats(now, (0.1, 4), (0.1, 3), (0.1, 4)), now)
    assert "rank 1 has not finished step 3 in 5 s while others are at step 4" in line and kill == [1]
    dog = watchdog.Watchdog(0, 2, 0)
    dog.timeout, dog.step = 5, 3
    line, kill = dog.verdict(heartbeats(now, (0.1, 3), (0.1, 3)), now)
    assert "no rank finished step 3 in 5 s (a deadlock" in line and kill == []
    finished = heartbeats(now, (0.1, 3), (9, 3))
    finished[1] = ("done", now - 9, None, now - 9)  # a rank past its last step is not waited for
    assert "no rank finished step 3" in dog.verdict(finished, now)[0]


def test_a_nonfinite_loss_stops_every_rank_alike_or_skips_the_batch(capsys):
    args = Namespace(skip_nonfinite=False, quiet=False)
    assert watchdog.skip_batch(7, 2.5, args, 0) is False
    with pytest.raises(watchdog.JobStopped, match="stopped at step 7: the loss is nan") as stop:
        watchdog.skip_batch(7, float("nan"), args, 1)
    assert stop.value.agreed  # each rank raises it; rank 0 alone says it
    args.skip_nonfinite = True
    assert watchdog.skip_batch(7, float("-inf"), args, 0) is True
    assert capsys.readouterr().out == "step    7  loss -inf: batch skipped (--skip-nonfinite)\n"


def test_a_lost_peer_is_said_as_such(monkeypatch):
    monkeypatch.setitem(watchdog.CURRENT, "step", 4)
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:1234. This is typically caused by a remote worker crashing. GLHF!")
    assert watchdog.describe(gloo) == ("stopped at step 4: another rank left the job "
                                       "(RuntimeError: Connection closed by peer [127.0.0.1]:1234.)")
    assert watchdog.describe(ValueError("first line\nsecond")) == "failed at step 4: ValueError: first line"


def test_a_failing_rank_says_one_line_and_torch_reads_its_error_file(tmp_path):
    """run_rank in a real process: one stderr line, exit 1, and the error file torchrun's ProcessFailure parses."""
    files = {r: tmp_path / f"error-{r}.json" for r in (0, 1)}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import watchdog; "
            "watchdog.CURRENT['step'] = 2; watchdog.run_rank(lambda: {}['missing'])")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "backends")], capture_output=True, text=True,
                            env={"RANK": "1", "TORCHELASTIC_ERROR_FILE": str(files[1]), "PATH": "/usr/bin:/bin"},
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr == "[rank 1] failed at step 2: KeyError: 'missing'\n"
    assert "Traceback" in json.loads(files[1].read_text())["message"]["extraInfo"]["py_callstack"]
    files[0].write_text(json.dumps({"message": {"message": "stopped at step 2: another rank left the job (...)",
                                                "extraInfo": {"py_callstack": "", "timestamp": "1"}}}))
    failures = {r: ProcessFailure(local_rank=r, pid=10 + r, exitcode=1, error_file=str(files[r])) for r in (0, 1)}
    assert failures[1].message["message"] == "failed at step 2: KeyError: 'missing'"
    # rank 0's line is a consequence, though its file is older: rank 1 is named
    assert summary(failures) == ("job failed: rank 1 failed at step 2: KeyError: 'missing' (exit code 1); "
                                 "rank 0 stopped with it")
    killed = {1: ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file="<N/A>")}
    assert summary(killed) == "job failed: rank 1 killed by SIGKILL (exit code -9)"


def test_an_interrupted_rank_says_one_line():
    """Ctrl-C (torchrun forwards it to every rank): one line naming the step, exit 128 + SIGINT, no traceback."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import watchdog; watchdog.CURRENT['step'] = 5; "
            "watchdog.run_rank(lambda: (print('ready', flush=True), time.sleep(60)))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "backends")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"RANK": "3", "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and err == "[rank 3] stopped by SIGINT at step 5\n"


def test_a_signal_inside_a_print_still_ends_the_rank_at_once():
    """CPython runs a signal handler inside a buffered write, with the buffer's lock held; the handler loses
    the race to the signal thread and waits for its exit, and that thread's flush must not wait for the lock.
    The old code hung there in 4 of 10 tries (until the loser's 60 s were up); six tries catch it."""
    code = ("import itertools, sys; sys.path.insert(0, sys.argv[1]); import watchdog; "
            "watchdog.run_rank(lambda: [print(i, flush=True) for i in itertools.count()])")
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "backends")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"RANK": "2", "PATH": "/usr/bin:/bin"})
        try:
            proc.stdout.readline()
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 128 + signal.SIGINT
            assert proc.stderr.read() == b"[rank 2] stopped by SIGINT\n"
        finally:
            proc.kill()
            proc.wait()
