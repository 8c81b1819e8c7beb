"""The three calls most users need: load a spec, plan it, compile it to a program directory."""

from __future__ import annotations

import json
from pathlib import Path

from ultraplan.backends.graphviz import plan_to_dot, render_svg
from ultraplan.backends.program import write_program
from ultraplan.compiler.schema import HardwareSpec, ModelSpec
from ultraplan.compiler.validate import load_hardware_spec, load_model_spec
from ultraplan.compiler.yaml_guard import read_capped
from ultraplan.passes.context import Mesh, PassReport, PlanError
from ultraplan.passes.pipeline import make_plan, prepare_spec
from ultraplan.passes.plan import Plan
from ultraplan.paths import bundled, resolve_spec_path
from ultraplan.program_dir import compiled_directory

__all__ = ["bundled", "compile", "load", "load_hardware", "load_with_reports", "plan", "read_plan", "resolve_spec_path"]

DEFAULT_HARDWARE = "cpu"


def load(path: str | Path, text: str | None = None) -> ModelSpec:
    """The spec at ``path`` (a file or a bundled name), validated and sized: every
    ``ffn: {hidden: auto}`` has its width (passes/size_ffn.py), so it builds as it is."""
    return load_with_reports(path, text)[0]


def load_with_reports(path: str | Path, text: str | None = None) -> tuple[ModelSpec, list[PassReport]]:
    """``load``, with the reports of the spec passes (the widths ``size_ffn`` chose, and why)."""
    return prepare_spec(load_model_spec(resolve_spec_path(path, "models"), text=text))


def load_hardware(path: str | Path | None = None) -> HardwareSpec:
    return load_hardware_spec(resolve_spec_path(path or DEFAULT_HARDWARE, "hardware"))


def parse_strategy(text: str | None, mesh: Mesh) -> tuple[str, ...]:
    """``"fsdp,tp"`` -> one name per mesh axis; a single name applies to every axis; default dp."""
    if not text:
        return ("dp",) * len(mesh.shape)
    names = tuple(part.strip() for part in str(text).split(","))
    return names * len(mesh.shape) if len(names) == 1 else names


def parse_forces(items: list[str] | tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """``["layers_*_q=S(2),B"]`` -> (("layers_*_q", "S(2),B"),); ValueError when a pin has no ``=``."""
    out = []
    for item in items or ():
        pattern, sep, sbp = str(item).partition("=")
        if not sep or not pattern or not sbp:
            raise ValueError(f"--force takes NODE=SBP (a glob over node names and one SBP per mesh axis, "
                             f"e.g. 'layers_*_attention_q=S(2)'), got {item!r}")
        out.append((pattern.strip(), sbp.strip()))
    return tuple(out)


def plan(spec_path: str | Path, mesh: str = "1", *, hardware: str | Path | None = None, batch: int | None = None,
         seq: int | None = None, mode: str = "train", strategy: str | None = None,
         force: list[str] | tuple[str, ...] | None = None, bucket_mb: float | None = None,
         fuse: bool = True) -> Plan:
    """Plan ``spec_path`` for ``mesh`` (``"4"``, ``"2x2"``) with a strategy per axis (``"fsdp,tp"``)
    and hand pins (``["layers_*_q=S(2)"]``); ``bucket_mb`` is the gradient buckets' width (MiB;
    default 50, passes/buckets.py)."""
    path = resolve_spec_path(spec_path, "models")
    spec = load_model_spec(path)
    parsed = Mesh.parse(mesh)
    result, _, _ = make_plan(spec, load_hardware(hardware), parsed, batch=batch, seq=seq, mode=mode,
                             spec_text=read_capped(path), strategies=parse_strategy(strategy, parsed),
                             forces=parse_forces(force), fuse=fuse,
                             bucket_cap_bytes=None if bucket_mb is None else int(bucket_mb * 2**20))
    return result


def read_plan(path: str | Path) -> Plan:
    """A plan.json (or the plan.json of a compiled directory); ValueError saying what to do otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    if not path.exists():
        raise ValueError(f"{path}: not found; make it with `ultraplan compile SPEC --mesh N -o DIR` "
                         "(or `ultraplan plan SPEC -o plan.json`)")
    try:
        return Plan.from_json(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # e.g. a plan of another version
        raise ValueError(f"{path}: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an ultraplan plan (missing or malformed field {exc}); recompile it") from None


def write_plan_files(result: Plan, out_dir: Path) -> list[Path]:
    """plan.json, plan.dot and (when graphviz's ``dot`` is installed) plan.svg."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(result.to_json())
    dot = plan_to_dot(result)
    (out_dir / "plan.dot").write_text(dot)
    written = [out_dir / "plan.json", out_dir / "plan.dot"]
    if render_svg(dot, out_dir / "plan.svg"):
        written.append(out_dir / "plan.svg")
    return written


def memory_warning(result: Plan) -> str:
    """One line saying a plan does not fit its device memory and which term is the largest."""
    totals = dict(result.totals)
    terms = {k: c.value for k, c in totals.items() if k.startswith("memory_") and k != "memory_per_device"}
    largest = max(terms, key=terms.__getitem__)
    return (f"plan needs {totals['memory_per_device'].value / 1e9:.3g} GB per device but {result.hardware} has "
            f"{result.device_memory / 1e9:.3g} GB; the largest term is {largest} "
            f"({terms[largest] / 1e9:.3g} GB)")


def compile(spec_path: str | Path, mesh: str, out_dir: str | Path, *, allow_oversubscribe: bool = False,
            **plan_args) -> Plan:
    """Plan ``spec_path`` for ``mesh`` and write the program directory ``out_dir``; a plan that does
    not fit the device memory is refused (PlanError) unless ``allow_oversubscribe``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose another -o")
    result = plan(spec_path, mesh, **plan_args)
    if not result.fits and not allow_oversubscribe:
        raise PlanError(f"{memory_warning(result)}; use more devices, fsdp, a smaller --batch, or pass "
                        "--allow-oversubscribe to compile it anyway")
    with compiled_directory(out) as new:  # all or nothing; never files of two compiles (program_dir.py)
        write_program(result, new)
        write_plan_files(result, new)
    return result
