"""backends/triton_gather.py's kernels under the Triton interpreter (TRITON_INTERPRET=1, on the CPU)
against the unfused ops (gather_rows then weighted_sum), forward and backward, on awkward shapes."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/unit/conftest.py does it first)

import pytest
import torch
from ultraplan.compiler import ops

from tests.conftest import ROOT
from tests.unit.conftest import interpreted_kernels

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels(request):
    return interpreted_kernels(request, "triton_gather.py")


@pytest.mark.parametrize(("b", "t", "h", "k", "rows", "d"), [
    (2, 3, 2, 3, 11, 5),  # non-powers of two
    (1, 2, 1, 1, 3, 2),  # top-k of 1
    (1, 2, 3, 30, 7, 130),  # more selections than one block, a row wider than one block
    (0, 4, 2, 3, 6, 5),  # an empty token set
])
def test_kernel_equals_gather_then_sum(kernels, b, t, h, k, rows, d):
    gen = torch.Generator().manual_seed(rows + d)
    table = torch.randn(rows, d, generator=gen, requires_grad=True)
    indices = torch.randint(0, rows - 1, (b, t, h, k), generator=gen)  # the last row: nobody selects it
    if indices.numel() and k > 1:
        indices[0, 0, 0, :2] = 1  # one token selects the same row twice
    weights = torch.randn(b, t, h, k, generator=gen, requires_grad=True)
    want = ops.weighted_sum(ops.gather_rows(table, indices), weights)
    got = kernels.gather_weighted_sum(table, indices, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(want.shape, generator=gen)
    for a, g in zip(torch.autograd.grad(want, (table, weights), grad), torch.autograd.grad(got, (table, weights), grad)):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("b", "t", "h", "k", "rows", "d"), [
    (2, 3, 2, 3, 11, 5),  # non-powers of two, one token picking a row twice, a row nobody picks
    (1, 2, 1, 1, 3, 2),  # top-k of 1
    (0, 4, 2, 3, 6, 5),  # an empty token set
])
def test_row_dot_kernel_equals_gather_then_dot(kernels, b, t, h, k, rows, d):
    gen = torch.Generator().manual_seed(rows * d)
    table = torch.randn(rows, d, generator=gen, requires_grad=True)
    indices = torch.randint(0, rows - 1, (b, t, h, k), generator=gen)
    if indices.numel() and k > 1:
        indices[0, 0, 0, :2] = 1
    x = torch.randn(b, t, d, generator=gen, requires_grad=True)
    want = ops.row_dot(x, ops.gather_rows(table, indices))
    got = kernels.gather_row_dot(table, indices, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(want.shape, generator=gen)
    for a, g in zip(torch.autograd.grad(want, (table, x), grad), torch.autograd.grad(got, (table, x), grad)):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)


def test_kernel_bench_runs_tiny_on_the_cpu(kernels, capsys):
    """bench/kernels.py's CPU path (the GPU sizes need a device) runs every kernel and path, so it cannot rot."""
    import runpy

    bench = runpy.run_path(str(ROOT / "bench" / "kernels.py"))
    results = bench["main"](["--tiny", "--device", "cpu", "--check"])
    paths = {(r["kernel"], r["path"]) for r in results}
    kernels = ("gather_weighted_sum", "gather_row_dot", "gather_core_pool", "gather_ive_pool", "add_rms_norm", "pk_topk",
               "pk_slot_scores", "tucker_topk")
    assert {k for k, _ in paths} == set(kernels) and all((k, "triton") in paths for k in kernels)
    assert ("gather_weighted_sum", "embedding_bag") in paths
    assert all(r["forward_s"] > 0 and r["forward_fraction"] > 0 for r in results)
    assert all("backward_s" in r for r in results if r["kernel"] not in ("pk_topk", "tucker_topk"))
    compared = [r for r in results if "difference" in r]  # --check: every path but each kernel's first
    assert len(compared) == len(results) - len(kernels) and all(r["difference"] <= 1e-5 for r in compared)
    out = capsys.readouterr().out
    assert "gather_ive_pool      triton vs unfused" in out and "of bandwidth" in out
    assert ("tucker_topk          triton         check: ok, largest difference 0 of the largest unfused value "
            "(tolerance 1e-05), 0 of the slot rows differ") in out


def test_kernel_bench_check_in_bfloat16_measures_every_path_against_float32(capsys):
    """In bfloat16 --check compares every path, the first too, with the first run in float32 on the same
    values (the interpreter runs the pooling and norm kernels in bf16; not the gathers' atomics)."""
    import runpy

    bench = runpy.run_path(str(ROOT / "bench" / "kernels.py"))
    rows = bench["main"](["--tiny", "--device", "cpu", "--check", "--dtype", "bfloat16",
                          "--kernels", "gather_ive_pool,add_rms_norm"])
    assert [(r["kernel"], r["path"]) for r in rows if "difference" in r] == [
        (k, p) for k in ("gather_ive_pool", "add_rms_norm") for p in ("unfused", "torch", "triton")]
    assert all(0 < r["difference"] <= 2e-2 for r in rows)  # bf16 rounding: never exactly the float32 values
    assert "add_rms_norm         triton         check: ok" in capsys.readouterr().out


def test_kernel_bench_check_fails_on_a_wrong_kernel():
    """--check ends the run when a path is off: a Triton kernel that returns a slightly wrong sum."""
    import runpy

    bench = runpy.run_path(str(ROOT / "bench" / "kernels.py"))
    real = bench["cases"]

    def wrong(*args):
        all_cases = real(*args)
        paths = all_cases["add_rms_norm"]["paths"]
        right = paths["triton"]
        paths["triton"] = lambda p, q, g: right(p, q, g) * 1.001
        return all_cases

    bench["main"].__globals__["cases"] = wrong
    with pytest.raises(SystemExit, match="off the reference: add_rms_norm triton"):
        bench["main"](["--tiny", "--device", "cpu", "--check", "--kernels", "add_rms_norm,gather_row_dot"])


@pytest.mark.slow
def test_compiled_program_with_triton_kernels_equals_eager(kernels, tmp_path):
    """pkm-tiny, ultramem-tiny and ultramem-v2-tiny on 2 ranks (tp) with `run --kernels triton` under the
    interpreter: kernels.py is written beside each program, and a training step through it equals the
    eager reference; pkm's step with a broken forward kernel does not (so the comparison can fail),
    and the UltraMem programs' kernels.py record that their kernels ran (so the kernels are what ran)."""

    from ultraplan import api, runner
    from ultraplan.cli import build_parser
    from ultraplan.cli_run import program_flags

    def run(directory):  # as `ultraplan run DIR --check --steps 1 --kernels triton` runs it
        flags = program_flags(build_parser().parse_args(["run", str(directory), "--kernels", "triton"]))
        assert flags == ["--kernels", "triton"]
        return runner.run(directory, nproc=None, steps=1, seed=None, check=True, quiet=True, extra_args=flags)

    pkm, ultramem, v2 = tmp_path / "pkm", tmp_path / "ultramem", tmp_path / "ultramem-v2"
    api.compile("pkm-tiny", "2", pkm, strategy="tp")
    for spec, directory in (("ultramem-tiny", ultramem), ("ultramem-v2-tiny", v2)):  # 16 tokens: the interpreter is slow
        api.compile(spec, "2", directory, strategy="tp", batch=2, seq=8)
    source = (pkm / "kernels.py").read_text()
    assert "KERNELS = {'gather_weighted_sum'" in source and "'pk_topk': pk_topk" in source
    # the product-key top-k kernel under the interpreter costs minutes for pkm-tiny's 256 rows per layer:
    # tests/unit/test_triton_topk.py checks it; here the program runs its torch form
    (pkm / "kernels.py").write_text(source + "\n\nKERNELS.pop('pk_topk')\nKERNELS.pop('pk_slot_scores')\n")
    for directory in (ultramem, v2):  # the Tucker top-k kernel, likewise (tests/unit/test_triton_tucker.py)
        source = (directory / "kernels.py").read_text()
        assert "'tucker_topk': tucker_topk" in source and "def tucker_topk_kernel(" in source
        (directory / "kernels.py").write_text(source + "\n\nKERNELS.pop('tucker_topk')\n")
    spied = {(ultramem, "gather_ive_pool"): "pool_rows", (v2, "gather_core_pool"): "pool_rows",
             (v2, "gather_row_dot"): "gather_row_dot"}
    for (directory, op), kernel in spied.items():  # each call through the kernel leaves an x in its marker file
        source = (directory / "kernels.py").read_text()
        assert f"'{op}': {kernel}" in source
        marker = tmp_path / f"{directory.name}-{op}"
        (directory / "kernels.py").write_text(
            source + f"\n\n_{op} = KERNELS[{op!r}]\n\n\ndef _spy_{op}(*args):\n"
            f"    open({str(marker)!r}, 'a').write('x')\n    return _{op}(*args)\n\n\nKERNELS[{op!r}] = _spy_{op}\n")
    for directory in (pkm, ultramem, v2):
        report = run(directory)
        assert report["ok"], report
    for directory, op in spied:  # both ranks, every memory layer
        assert (tmp_path / f"{directory.name}-{op}").read_text().count("x") >= 2 * 2, (directory.name, op)
    source = (pkm / "kernels.py").read_text()
    broken = source.replace("acc += tl.sum(vals.to(tl.float32) * w[:, None], axis=0)",
                            "acc += 2 * tl.sum(vals.to(tl.float32) * w[:, None], axis=0)")
    assert broken != source
    (pkm / "kernels.py").write_text(broken)
    assert not run(pkm)["ok"]


@pytest.mark.slow  # one rank's job (a few seconds)
def test_triton_kernels_without_a_gpu_or_the_interpreter_stop_with_a_message(tmp_path, monkeypatch, capfd):
    """`run --kernels triton` on a CPU without TRITON_INTERPRET=1: the program says what to do instead
    of Triton's "0 active drivers" traceback."""
    from ultraplan import api, runner

    api.compile("dense-tiny", "1", tmp_path / "p")
    assert (tmp_path / "p" / "kernels.py").exists()  # add_rms_norm is fused
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = runner.run(tmp_path / "p", nproc=None, steps=1, seed=None, check=False, quiet=True,
                        extra_args=["--kernels", "triton"])
    assert not report["ok"] and report["exit_code"] == 1
    err = capfd.readouterr().err
    assert "--kernels triton: Triton compiles its kernels for a CUDA GPU, and none is here" in err
    assert "Traceback" not in err and "active drivers" not in err
