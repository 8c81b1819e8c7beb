"""Property-based fuzz of the loader and the CLI: mutated bundled specs (deleted, duplicated and
retyped keys, huge numbers, deep nesting, random bytes, tags, base-60 numbers, control characters)
end in a clean error or a success, never a traceback. Fast by default (a fixed seed, a few hundred
loader cases, a few through `ultraplan stats`); tools/fuzz_specs.py runs 10,000 (docs/fuzz.md)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.spec_mutations import classify, mutate

FAST = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@seed(0)
@settings(FAST, max_examples=300)
@given(st.integers(0, 2**32 - 1))
def test_the_loader_never_raises_a_traceback(tmp_path, case_seed):
    name, what, text = mutate(random.Random(case_seed))
    outcome, detail = classify(text, tmp_path / "case.yaml", cli=False)
    assert outcome != "traceback", f"{name}: {what}: {detail}"


@seed(1)
@settings(FAST, max_examples=8)
@given(st.integers(0, 2**32 - 1))
def test_stats_never_raises_a_traceback(tmp_path, case_seed):
    name, what, text = mutate(random.Random(case_seed))
    outcome, detail = classify(text, tmp_path / "case.yaml", cli=True)
    assert outcome != "traceback", f"{name}: {what}: {detail}"


@pytest.mark.parametrize("text", [
    "model:\n  blocks: " + "[" * 600 + "]" * 600 + "\n",
    "model: !!python/object/apply:os.system ['true']\n",
    "\x00\xff garbage",
    "model:\n  vocab_size: 128\n  hidden_size: 1600000000\n  seq_len: 32\n  blocks: {b: [{attention: {heads: 4}}]}\n"
    "  layers: [{block: b, repeat: 1099511627776}]\n",
])
def test_the_real_binary_ends_with_exit_code_2(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    done = subprocess.run([sys.executable, "-m", "ultraplan", "stats", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {path}:") and "Traceback" not in done.stderr
