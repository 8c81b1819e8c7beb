"""Run several compiled programs inside one torchrun process group (one start per rank count).

    torchrun --nproc_per_node N tests/dist/driver.py MANIFEST.json

The manifest lists ``{"dir": ..., "steps": ..., "dump": ..., "dtype": ...}`` cases, optionally with more program
``"args"`` and ``"env"`` (set for that case alone); each program's ``main`` is called in turn with the process group
already up, so it neither starts nor ends it. The neighbour files every program directory carries are copies of
the same few sources: each distinct source is compiled to bytecode once per process (``CachedLoader``), not once
per case (each directory is a new path, so Python's own bytecode cache never hits).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

import torch.distributed as dist

NEIGHBOURS = ("checkpoint", "ops", "progress", "runtime", "seeded", "table_parallel", "train_data", "watchdog")


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


if __name__ == "__main__":
    main()
    # every case's results are written: leave without interpreter teardown, where gloo can abort a
    # finished rank (pytorch/pytorch PR #179291; backends/runtime.py's finish says more)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
