"""How fast the emitted program trains next to torch's own data parallelism, on 2 gloo ranks.

    python bench/vs_ddp.py                       # dense-tiny and dense-100m: dp vs DDP, fsdp vs fully_shard
    python bench/vs_ddp.py --specs dense-tiny --steps 4 --warmup 1      # seconds (what the test runs)

For each spec and strategy the spec is compiled for ``--mesh 2``; then one torchrun of 2 gloo
ranks runs every case. Each rank builds both sides of a case:

- the program: the emitted program's own ``Model``, AdamW groups, gradient buckets and
  ``loss_value`` (the module imported as tests/dist/driver.py does), stepped as its ``main()``
  steps (without the first step's counters);
- torch: the eager module of compiler/build.py (the numerical reference of ``run --check``) with
  the same seed, so the same initial weights, wrapped in ``DistributedDataParallel`` (dp) or
  ``fully_shard`` per block and at the root (fsdp: FSDP2,
  torch/distributed/fsdp/_fully_shard/_fully_shard.py), trained by the same AdamW on the same
  batches (each rank its half), its loss averaged over the ranks for logging as the program's is.

Steps alternate between the two sides, the order swapped every step so that neither always runs
second. Each step is timed on rank 0 from a barrier to the end of its optimizer step. Reported:
the median over the steps after the warm-up, per side, and their ratio (program / torch); the
losses of both sides must agree (they train the same model), or the case fails. One thread per
rank (OMP_NUM_THREADS=1 unless set).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_speed import machine

ROOT = Path(__file__).resolve().parents[1]

def _neighbours() -> tuple[str, ...]:
    """The module names every program ships beside itself (backends/program.py's VERBATIM, the one list)."""
    from ultraplan.backends.program import VERBATIM

    return tuple(Path(name).stem for name in VERBATIM)
LOSS_AGREEMENT = 1e-4  # float32, a few AdamW steps: sums in another order (runner.LOSS_TOLERANCE is 1e-5 per loss)


# ---- inside each rank ---------------------------------------------------------------------------


def _load_program(directory: str):
    for name in _neighbours():  # each program imports its own neighbour files
        sys.modules.pop(name, None)
    sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location("program_under_bench", f"{directory}/program.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _program_side(program, seed: int):
    """A step function of the emitted program (its main()'s loop body) and its state."""
    import torch

    mesh, _ = program.runtime.setup(program.MESH_SHAPE)
    model = program.Model(mesh, seed)
    groups = {"default": [], "values": []}
    for name, _, group in program.PARAMS:
        groups[group].append(model.get_parameter(name))
    optimizer = torch.optim.AdamW([{"params": p, "name": n} for n, p in groups.items() if p], lr=program.LR,
                                  betas=program.BETAS, eps=program.EPS, weight_decay=program.WEIGHT_DECAY)
    buckets = program.gradient_buckets(model, mesh)
    compute_dtype = getattr(torch, program.COMPUTE_DTYPE)

    def step(index: int) -> float:
        batch = program.seeded.permutation_walk_batch(seed, index, program.GLOBAL_BATCH, program.SEQ_LEN,
                                                      program.VOCAB_SIZE)
        local = program.runtime.local_slice(batch, mesh, program.BATCH_SBP).to(mesh.device)
        loss = program.runtime.forward_in(compute_dtype, model, local[:, :-1], local[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        buckets.finish()
        value = program.loss_value(loss, mesh)
        optimizer.step()
        return value

    return step


def _torch_side(directory: str, strategy: str, seed: int):
    """A step function of torch's DDP or FSDP2 on compiler/build.py's eager module."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from ultraplan.compiler import seeded
    from ultraplan.compiler.build import TrainingGraph, build_model, make_optimizer
    from ultraplan.compiler.validate import load_model_spec
    from ultraplan.passes.pipeline import prepare_spec

    from ultraplan.api import read_plan

    plan = read_plan(directory)
    spec, _ = prepare_spec(load_model_spec(plan.spec_source, text=plan.spec_text))
    eager = build_model(spec, seed=seed)
    graph = TrainingGraph(eager)
    if strategy == "dp":
        wrapped = torch.nn.parallel.DistributedDataParallel(graph)
    else:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in eager.layers:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(graph, mesh=mesh)
    t = plan.training
    optimizer = make_optimizer(eager, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = dict(plan.model)["vocab_size"]

    def step(index: int) -> float:
        batch = seeded.permutation_walk_batch(seed, index, plan.batch, plan.seq, vocab)
        local = batch.chunk(world)[rank]
        loss = wrapped(local[:, :-1], local[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.detach().clone()
        dist.all_reduce(value)
        optimizer.step()
        return value.item() / world

    return step


def worker(manifest: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    cases = json.loads(Path(manifest).read_text())
    for case in cases:
        program = _load_program(case["dir"])
        sides = {"program": _program_side(program, case["seed"]),
                 "torch": _torch_side(case["dir"], case["strategy"], case["seed"])}
        sys.path.remove(case["dir"])
        times = {name: [] for name in sides}
        losses = {name: [] for name in sides}
        for index in range(case["steps"]):
            order = ("program", "torch") if index % 2 == 0 else ("torch", "program")
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                losses[name].append(sides[name](index))
                times[name].append(time.perf_counter() - start)
        case["times"], case["losses"] = times, losses
        dist.barrier()
    if dist.get_rank() == 0:
        Path(manifest).with_suffix(".out.json").write_text(json.dumps(cases))
    dist.barrier()
    dist.destroy_process_group()


# ---- the driver ---------------------------------------------------------------------------------


def summarise(case: dict) -> dict:
    kept = slice(case["warmup"], None)
    program = statistics.median(case["times"]["program"][kept])
    torch_ = statistics.median(case["times"]["torch"][kept])
    a, b = case["losses"]["program"], case["losses"]["torch"]
    agree = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return {"spec": case["spec"], "strategy": case["strategy"], "baseline": case["baseline"],
            "buckets": case["buckets"], "program_s": program, "torch_s": torch_, "ratio": program / torch_,
            "loss_rel_diff": agree, "steps": case["steps"], "warmup": case["warmup"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default="dense-tiny,dense-100m")
    parser.add_argument("--strategies", default="dp,fsdp")
    parser.add_argument("--steps", type=int, default=12, help="steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return []
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    from ultraplan import api

    baselines = {"dp": "DistributedDataParallel", "fsdp": "fully_shard (FSDP2)"}
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for spec in args.specs.split(","):
            for strategy in args.strategies.split(","):
                out = Path(tmp) / f"{spec}__{strategy}"
                plan = api.compile(spec, "2", out, strategy=strategy)
                cases.append({"spec": spec, "strategy": strategy, "dir": str(out), "seed": plan.training.seed,
                              "steps": args.steps, "warmup": args.warmup, "baseline": baselines[strategy],
                              "buckets": len(plan.grad_buckets)})
        manifest = Path(tmp) / "cases.json"
        manifest.write_text(json.dumps(cases))
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", str(manifest)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"the bench's ranks failed:\n{done.stderr[-4000:]}")
        results = [summarise(c) for c in json.loads(manifest.with_suffix(".out.json").read_text())]
    print(f"machine: {machine()}; 2 gloo ranks, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print(f"median seconds per step over steps {args.warmup + 1}..{args.steps} (rank 0), sides alternating")
    for r in results:
        print(f"{r['spec']:>12} {r['strategy']:>4}: program {r['program_s'] * 1e3:9.2f} ms "
              f"({r['buckets']} gradient buckets)  {r['baseline']} {r['torch_s'] * 1e3:9.2f} ms  "
              f"ratio {r['ratio']:.3f}  losses agree to {r['loss_rel_diff']:.1e}")
        if r["loss_rel_diff"] > LOSS_AGREEMENT:
            raise SystemExit(f"{r['spec']} {r['strategy']}: the two sides' losses differ by {r['loss_rel_diff']:.2e}; "
                             "they are not training the same model")
    return results


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # without interpreter teardown, where gloo can abort a finished rank (runtime.finish)
