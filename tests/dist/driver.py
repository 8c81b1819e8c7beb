"""Run several compiled programs inside one torchrun process group (one start per rank count).

    torchrun --nproc_per_node N tests/dist/driver.py MANIFEST.json
    python tests/dist/driver.py --nproc N MANIFEST.json
    python tests/dist/driver.py --nproc N --script FILE ARGS...

The second form starts the same job without torchrun: one process imports torch and what the programs import,
then forks the N ranks, which so skip their own imports (about 4 s of CPU each on 2 cores, and torchrun's
agent another 4 s): see ``launch``. With ``--script`` each rank runs FILE as ``__main__`` instead. The ranks
get torchrun's environment and join the TCPStore this process hosts, as torchrun's agent does; when one rank
fails the others are killed, as torchrun does.

The manifest lists ``{"dir": ..., "steps": ..., "dump": ..., "dtype": ...}`` cases, optionally with more program
``"args"`` and ``"env"`` (set for that case alone); each program's ``main`` is called in turn with the process group
already up, so it neither starts nor ends it. The neighbour files every program directory carries are copies of
the same few sources: each distinct source is compiled to bytecode once per process (``CachedLoader``), not once
per case (each directory is a new path, so Python's own bytecode cache never hits).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import runpy
import signal
import socket
import sys
import traceback

import torch.distributed as dist

NEIGHBOURS = ("checkpoint", "collectives", "expert_parallel", "fsdp_groups", "grad_buckets", "ops", "ops_fused", "progress",
              "runtime", "seeded", "table_parallel", "train_data", "vocab_parallel", "watchdog")


CODE: dict[bytes, object] = {}  # sha256 of a source -> its code object


class CachedLoader(importlib.machinery.SourceFileLoader):
    """A source file's module, its bytecode compiled once per distinct source in this process."""

    def source_to_code(self, data, path, *, _optimize=-1):
        key = hashlib.sha256(data).digest()
        if key not in CODE:
            CODE[key] = super().source_to_code(data, path)
        return CODE[key]


class NeighbourFinder(importlib.abc.MetaPathFinder):
    """Finds a program's neighbour files in its own directory, loaded by ``CachedLoader``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        file = os.path.join(self.directory, f"{name}.py")
        if name not in NEIGHBOURS or not os.path.exists(file):
            return None
        return importlib.util.spec_from_file_location(name, file, loader=CachedLoader(name, file))


def run_case(case: dict) -> None:
    for name in NEIGHBOURS:  # each program imports its own neighbour files
        sys.modules.pop(name, None)
    sys.path.insert(0, case["dir"])
    finder = NeighbourFinder(case["dir"])
    sys.meta_path.insert(0, finder)
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    try:
        program = f"{case['dir']}/program.py"
        spec = importlib.util.spec_from_file_location("program_under_test", program,
                                                      loader=CachedLoader("program_under_test", program))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--steps", str(case["steps"]), "--dump", case["dump"], "--dtype", case["dtype"], "--quiet",
                     *case.get("args", [])])
    finally:
        sys.meta_path.remove(finder)
        sys.path.remove(case["dir"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def main() -> None:
    dist.init_process_group("gloo")
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        run_case(case)
        dist.barrier()
    dist.destroy_process_group()


# what the emitted programs and their neighbour files import: imported once, before the ranks are forked
PRELOAD = ("torch", "torch.nn.functional", "torch.distributed.device_mesh", "torch.distributed.tensor",
           "torch.distributed.checkpoint", "torch.utils._python_dispatch", "torch.utils.checkpoint", "numpy")
PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Fork ``nproc`` ranks that each run ``main`` on the manifest ``argv[0]`` (or ``--script FILE ARGS...``:
    FILE as ``__main__``); the exit code torchrun would give."""
    for name in PRELOAD:  # no thread pool is started by an import, so forking after it is safe
        importlib.import_module(name)
    port = _free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_WORLD_SIZE": str(nproc),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "driver"}
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:  # a rank: ends with os._exit, never returns into the launcher
            code = 1
            try:
                ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher killed: so is the rank
                os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
                if argv[0] == "--script":
                    sys.argv = argv[1:]
                    runpy.run_path(argv[1], run_name="__main__")
                else:
                    sys.argv = [sys.argv[0], *argv]
                    main()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks[pid] = rank
    store = dist.TCPStore("127.0.0.1", port, nproc, is_master=True, wait_for_workers=False)  # torchrun's agent's
    code = 0
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid, None)
        if rank is None or status == 0:
            continue
        if not code:  # the first rank to fail: the others are stopped (their own exits are not news)
            code = os.waitstatus_to_exitcode(status)
            print(f"driver: rank {rank} exited with {code}; stopping the others", file=sys.stderr)
            for other in ranks:
                os.kill(other, signal.SIGKILL)
    del store
    return 1 if code else 0


if __name__ == "__main__":
    if sys.argv[1] == "--nproc":
        sys.exit(launch(int(sys.argv[2]), sys.argv[3:]))
    main()
    # every case's results are written: leave without interpreter teardown, where gloo can abort a
    # finished rank (pytorch/pytorch PR #179291; backends/runtime.py's finish says more)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
