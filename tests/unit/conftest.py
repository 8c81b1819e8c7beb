"""Unit-test session setup. TRITON_INTERPRET=1 must be set before triton is first imported (its
standard library's jit functions read it when decorated), and torch.utils.flop_counter, which test
modules import at collection, imports triton: so it is set here, before any test module loads.
Generated kernels then run on the CPU through Triton's interpreter (tests/unit/test_triton_gather.py)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
