"""Token files for ``ultraplan data prepare`` and the data flags ``ultraplan run`` passes to a program.

The format and the batch sampling are the program's own (backends/train_data.py, copied beside
every program.py); this module only writes such files and hands the flags on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ultraplan.backends.train_data import DataError, TokenFile, write_tokens


def prepare(texts: Sequence[str | Path], output: str | Path, val_fraction: float = 0.0) -> dict:
    """Concatenate the files' bytes and write them as byte-level token ids (id = byte value,
    vocabulary 256) in llm.c's format: ``output``, and with ``val_fraction`` > 0 the last such
    share of the bytes to ``output``'s ``.val`` sibling (tokens.bin -> tokens.val.bin) instead.
    Returns what was written: {path: tokens}."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    raw = b"".join(Path(t).read_bytes() for t in texts)
    if not raw:
        raise ValueError(f"{', '.join(map(str, texts))}: no bytes to prepare; give a non-empty text file")
    ids = np.frombuffer(raw, dtype=np.uint8)
    cut = len(ids) - int(len(ids) * val_fraction)
    output = Path(output)
    written = {output: ids[:cut]}
    if val_fraction > 0:
        written[output.with_suffix(".val" + (output.suffix or ".bin"))] = ids[cut:]
    for path, part in written.items():
        write_tokens(path, part)
    return {str(p): len(part) for p, part in written.items()}


@dataclass(frozen=True)
class DataFlags:
    """The program's data and progress flags as ``ultraplan run`` takes them (None: the program's default)."""

    data: str | None = None
    data_dtype: str | None = None
    val_data: str | None = None
    val_every: int | None = None
    val_batches: int | None = None
    metrics: str | None = None

    def program_args(self) -> list[str]:
        """The flags for program.py, paths made absolute (the program runs in its own directory)."""
        out: list[str] = []
        for name, value in vars(self).items():
            if value is not None:
                absolute = name in ("data", "val_data", "metrics")
                out += ["--" + name.replace("_", "-"), str(Path(value).resolve()) if absolute else str(value)]
        return out

    def reference_batches(self, batch: int, seq: int, vocab: int) -> Callable[[int, int], object] | None:
        """(seed, step) -> the whole global batch the program reads from --data (for the eager
        reference of ``run --check``), or None for the synthetic task. Both files are checked as
        the program checks them, so that a bad one is a one-line ValueError before torchrun starts."""
        try:
            files = [None if p is None else TokenFile(p, self.data_dtype) for p in (self.data, self.val_data)]
            for tokens in files:
                if tokens is not None:
                    tokens.check(vocab, seq)
        except DataError as exc:
            raise ValueError(str(exc)) from None
        tokens = files[0]
        if tokens is None:
            return None
        return lambda seed, step: tokens.window(seed, step, batch, seq, ((0, batch), (0, seq)))


NO_DATA = DataFlags()  # the program's defaults: the synthetic task, DIR/metrics.jsonl
