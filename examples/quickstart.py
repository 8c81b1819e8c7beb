"""Quickstart: the Python API end to end on the bundled dense-tiny spec.

    .venv/bin/python examples/quickstart.py

Loads the spec, prints its accounting, plans it for 1, 2 and 4 CPU ranks and for 8 H200s to
compare predicted step times, then compiles the 2-rank plan into out/quickstart, ready for
`torchrun --nproc_per_node 2 out/quickstart/program.py`.
"""

from __future__ import annotations

from ultraplan import api


def main() -> None:
    spec = api.load("dense-tiny")
    print(f"{spec.name}: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}")
    for hardware, meshes in (("cpu", ("1", "2", "4")), ("h200-8", ("8",))):
        for mesh in meshes:
            plan = api.plan("dense-tiny", mesh, hardware=hardware)
            step = plan.total("step_time")
            comm = plan.total("comm_wire_bytes")
            print(f"  {hardware:7s} mesh {mesh}: step {step.value * 1e3:8.3f} ms predicted, "
                  f"{comm.value / 1e3:7.1f} kB sent per device")
    plan = api.compile("dense-tiny", "2", "out/quickstart")
    print(f"compiled for mesh {plan.mesh}: torchrun --nproc_per_node 2 out/quickstart/program.py")


if __name__ == "__main__":
    main()
