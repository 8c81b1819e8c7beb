"""Unit-test session setup. TRITON_INTERPRET=1 must be set before triton is first imported (its
standard library's jit functions read it when decorated), and torch.utils.flop_counter, which test
modules import at collection, imports triton: so it is set here, before any test module loads.
Generated kernels then run on the CPU through Triton's interpreter (tests/unit/test_triton_gather.py)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted_kernels(request, filename: str):
    """backends/``filename`` loaded afresh with the interpreter on (triton.jit reads TRITON_INTERPRET
    when it decorates), for a module-scoped fixture of the kernel tests."""
    import importlib.util

    import pytest

    from tests.conftest import ROOT

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location(f"{filename[:-3]}_interp", ROOT / "backends" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    request.addfinalizer(mp.undo)
    return module
