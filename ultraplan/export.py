"""``ultraplan export``: a training checkpoint's model as one consolidated safetensors file.

A checkpoint (backends/checkpoint.py) holds each parameter in shards, laid out by the plan it
was saved under. Loading it with DCP and ``no_dist=True`` into full-size tensors gathers every
shard whatever the plan; the keys ``model.NAME`` and ``buffers.NAME`` lose their prefix, leaving
the canonical names, which are the eager model's state_dict keys (compiler/build.py), so
``model.load_state_dict(load_file(path))`` works on the eager reference. The optimizer state is
left out (it is training state, not the model).

The file format is written here (no dependency): 8 bytes little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw little-endian bytes
(huggingface/safetensors, README "Format").
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ultraplan.backends import checkpoint as ckpt

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
EXPORTED = ("model", "buffers")  # the checkpoint's sections that make the model's state_dict


def find_checkpoint(path: Path) -> tuple[Path, dict]:
    """(folder, COMPLETE record): ``path`` itself when it is a complete checkpoint, else the latest
    complete one inside it; a ValueError naming the remedy when there is none."""
    record = ckpt.read_marker(str(path))
    if record is not None:
        return path, record
    found = ckpt.latest(str(path))
    if found is None:
        raise ValueError(f"{path}: no complete checkpoint (a step-N folder holding {ckpt.MARKER}); "
                         "save one with `ultraplan run DIR --checkpoint-dir DIR/checkpoint`")
    return Path(found[0]), found[1]


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """The full parameters and buffers of the checkpoint in ``folder``, under their canonical names."""
    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in metadata.items()
             if key.split(".", 1)[0] in EXPORTED and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # no process group: that is the point here, not worth a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.split(".", 1)[1]: tensor for key, tensor in state.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` in the safetensors format (module docstring), atomically (temp + rename)."""
    assert sys.byteorder == "little", "safetensors stores little-endian bytes; this writer copies native ones"
    header: dict = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer pads
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def export(checkpoint: Path, out: Path) -> tuple[Path, int]:
    """Write the model of the checkpoint ``checkpoint`` names to ``out``; return (its folder, tensors)."""
    folder, record = find_checkpoint(checkpoint)
    tensors = consolidated(folder)
    metadata = {"format": "pt", "spec": str(record.get("spec", "")), "step": str(record["step"])}
    write_safetensors(out, tensors, metadata)
    return folder, len(tensors)
