"""Mutations of the bundled specs for fuzzing the loader and the CLI (tests/unit/test_fuzz_input.py,
tools/fuzz_specs.py): delete, duplicate and retype keys, huge numbers, deep nesting, random bytes,
YAML tags, base-60 numbers and control characters. Driven by a ``random.Random``: deterministic."""

from __future__ import annotations

import contextlib
import io
import random
import re
from pathlib import Path
from typing import Any

import yaml

MODELS = Path(__file__).resolve().parent.parent / "specs" / "models"
SPECS = sorted([*MODELS.glob("*.yaml"), *MODELS.glob("paper/*.yaml")])
HUGE = [10**9, 1.6e9, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, 1e308, 1099511627776, -1, 0, -(2**63)]
ODD = [None, True, "x", "", [], {}, [1, 2], {"a": 1}, 1.5, "1e-5", "auto", "none", -0.0, "\x1b[31m", "a\u202eb"]
TAGS = ["!!python/object:os.system", "!!python/name:os.system", "!!set", "!foo", "!!binary", "!!timestamp", "!", "!!str"]


def _paths(data: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _paths(value, (*path, i))
    return out


def _get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


def _structural(rng: random.Random, text: str) -> tuple[str, str]:
    data = yaml.safe_load(text)
    paths = [p for p in _paths(data) if p]
    path = rng.choice(paths)
    parent, key = _get(data, path[:-1]), path[-1]
    kind = rng.choice(["delete", "retype", "huge", "nest", "rename"])
    if kind == "delete":
        del parent[key]
    elif kind == "retype":
        parent[key] = rng.choice(ODD)
    elif kind == "huge":
        parent[key] = rng.choice(HUGE)
    elif kind == "nest":
        value = parent[key]
        for _ in range(rng.choice([1, 2, 5, 40, 200, 600])):
            value = [value] if rng.random() < 0.5 else {"k": value}
        parent[key] = value
    elif isinstance(parent, dict):
        value = parent.pop(key)
        parent[rng.choice([f"{key}x", str(key)[:-1] or "q", "\x07bell", "na\u200bme", "1:20"])] = value
    try:
        return f"{kind} {path}", yaml.safe_dump(data, sort_keys=False, width=10**6)
    except RecursionError:
        return f"{kind} {path}", text


def _textual(rng: random.Random, text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    kind = rng.choice(["duplicate", "bytes", "tag", "sexagesimal", "truncate", "control", "deep"])
    if kind == "duplicate":
        lines.insert(i, lines[i])
    elif kind == "bytes":
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 20]))).decode("latin-1")
        pos = rng.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:pos] + junk + lines[i][pos:]
    elif kind in ("tag", "sexagesimal", "control") and ": " in lines[i]:
        head, _, tail = lines[i].partition(": ")
        extra = {"tag": rng.choice(TAGS) + " ", "sexagesimal": "1:2", "control": "\x1b[2J"}[kind]
        lines[i] = f"{head}: {extra}{tail}" if kind != "sexagesimal" else f"{head}: 1:20\n"
    elif kind == "truncate":
        return kind, text[: rng.randrange(len(text))]
    elif kind == "deep":
        depth = rng.choice([50, 500, 5000])
        lines.insert(i, "x: " + "[" * depth + "]" * depth + "\n")
    return f"{kind} line {i + 1}", "".join(lines)


def mutate(rng: random.Random) -> tuple[str, str, str]:
    """(spec name, what was done, the mutated text) of one case; one to three mutations."""
    source = rng.choice(SPECS)
    text = source.read_text()
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        try:
            label, text = (_structural if rng.random() < 0.6 else _textual)(rng, text)
        except (yaml.YAMLError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            label = "skipped (text no longer parses for a structural edit)"
        done.append(label)
    return source.stem, "; ".join(done)[:300], text


POSITIONED = re.compile(r"^error: .*:\d+:\d+: .+?: ", re.S)


def classify(text: str, path: Path, *, cli: bool) -> tuple[str, str]:
    """("clean" | "success" | "traceback", detail) of loading ``text`` (and, with ``cli``, of
    ``ultraplan stats`` on it in-process). Clean: a SpecError, or exit code 2 with an ``error:``
    line (positioned when the spec is at fault); anything else escaping is a traceback."""
    from ultraplan.compiler.errors import SpecError
    from ultraplan.compiler.validate import load_model_spec

    from ultraplan.cli import main

    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_model_spec(path)
        outcome = ("success", "")
    except SpecError as exc:
        if not str(exc).startswith(f"{path}:"):
            return "traceback", f"unpositioned SpecError: {exc}"
        outcome = ("clean", exc.message)
    except Exception as exc:
        return "traceback", f"{type(exc).__name__}: {exc}"[:300]
    if not cli:
        return outcome
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["stats", str(path)])
    except BaseException as exc:  # SystemExit too: argparse is not involved here
        return "traceback", f"stats: {type(exc).__name__}: {exc}"[:300]
    if code == 0:
        return "success", ""
    if code == 2 and err.getvalue().startswith("error: ") and (outcome[0] == "success" or POSITIONED.match(err.getvalue())):
        return "clean", err.getvalue().splitlines()[0][:200]
    return "traceback", f"stats exit {code}: {err.getvalue()[:300]}"
