"""Training tokens from a file: memory-mapped token ids, batches drawn by (seed, step), each rank
reading only its own part of each batch.

Copied verbatim beside every emitted ``program.py`` (imports numpy and torch only). Three formats:

- llm.c's: a header of 256 int32 (magic, version, token count; karpathy/llm.c
  dev/data/data_common.py ``write_datafile``: magic 20240520 holds uint16 ids, 20240801 uint32),
  then the ids. ``ultraplan data prepare`` writes this one (uint16 byte values, vocabulary 256).
- nanoGPT's: the raw ids and nothing else (karpathy/nanoGPT data/shakespeare_char/prepare.py
  writes ``np.uint16``); read when the file ends in ``.bin`` without the llm.c magic, or when
  ``--data-dtype`` names the dtype (uint16 unless told).
- plain text, read as bytes: the byte-level tokenizer, token id = byte value (vocabulary 256).

A batch is ``batch`` windows of T + 1 consecutive tokens (inputs are the first T, targets the
last T) starting at offsets drawn uniformly, as nanoGPT's train.py ``get_batch`` does, from a
generator seeded by (seed, step) alone: every rank draws the same offsets, a resumed run draws the
batches it would have seen, and a different mesh sees the same global batch. A rank then reads
only the rows and columns its layout owns (``window``).
"""

import hashlib
import os

import numpy as np
import torch

LLMC_HEADER_INTS = 256  # int32 values before the tokens
LLMC_MAGIC = {20240520: np.dtype("<u2"), 20240801: np.dtype("<u4")}  # data_common.py HEADERS_INFO: gpt-2, llama-3
LLMC_VERSION = {20240520: 1, 20240801: 7}
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian, as numpy writes on x86 and ARM
BINARY_SUFFIXES = (".bin",)
SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a file for its largest id


class DataError(ValueError):
    """A data file that cannot be used as given; the message names the file and a fix."""


def _stable_seed(seed, key):
    """A 63-bit generator seed from (seed, key), stable across processes, ranks and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _llmc_header(path):
    """(magic, count) of an llm.c file's header, or None when the file does not start with one."""
    with open(path, "rb") as f:
        raw = f.read(LLMC_HEADER_INTS * 4)
    if len(raw) < LLMC_HEADER_INTS * 4:
        return None
    head = np.frombuffer(raw, dtype="<i4")
    if int(head[0]) not in LLMC_MAGIC:
        return None
    return int(head[0]), int(head[2])


class TokenFile:
    """A file of token ids, memory-mapped (numpy) so that nothing is read until a window asks for it.

    ``kind`` is "llm.c", "raw" or "text". ``elements_read`` counts the ids ``window`` has read (a
    check that each rank reads its own part and no more).
    """

    def __init__(self, path, dtype=None):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: no such data file; make one with `ultraplan data prepare TEXT -o tokens.bin`")
        size = os.path.getsize(self.path)
        header = _llmc_header(self.path)
        if header is not None:
            magic, count = header
            self.kind, self.dtype = "llm.c", LLMC_MAGIC[magic]
            offset = LLMC_HEADER_INTS * 4
            if dtype is not None and DTYPES[dtype] != self.dtype:
                raise DataError(f"{self.path}: the llm.c header (magic {magic}) says {self.dtype.name}, "
                                f"--data-dtype says {dtype}; drop --data-dtype")
            if offset + count * self.dtype.itemsize != size:
                raise DataError(f"{self.path}: the llm.c header counts {count} tokens of {self.dtype.name}, "
                                f"but the file holds {size - offset} bytes after it (truncated?); rewrite it")
        elif dtype is not None or self.path.endswith(BINARY_SUFFIXES):
            self.kind, self.dtype, offset = "raw", DTYPES[dtype or "uint16"], 0
            if size % self.dtype.itemsize:
                raise DataError(f"{self.path}: {size} bytes is not a whole number of {self.dtype.name} ids; "
                                "give the right --data-dtype (uint16 or uint32)")
            count = size // self.dtype.itemsize
        else:
            self.kind, self.dtype, offset, count = "text", np.dtype(np.uint8), 0, size
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset, shape=(count,)) if count else \
            np.zeros(0, dtype=self.dtype)
        self.elements_read = 0

    def __len__(self):
        return len(self.tokens)

    def max_token(self):
        """The largest id in the file (text: 255, whatever bytes it holds: its vocabulary is all bytes)."""
        if self.kind == "text":
            return 255
        top = 0
        for start in range(0, len(self.tokens), SCAN_CHUNK):
            top = max(top, int(self.tokens[start:start + SCAN_CHUNK].max()))
        return top

    def check(self, vocab, seq):
        """A DataError unless every id fits the model's vocabulary and one window of seq + 1 fits the file."""
        if len(self) < seq + 1:
            raise DataError(f"{self.path}: {len(self)} tokens, fewer than one window of seq_len + 1 = {seq + 1}; "
                            "give a longer file")
        if self.kind == "text" and vocab < 256:
            raise DataError(f"{self.path}: a text file is read as bytes (vocabulary 256), but the model's vocab_size "
                            f"is {vocab}; compile a spec with vocab_size >= 256 (e.g. bytes-tiny)")
        if vocab <= np.iinfo(self.dtype).max:  # ids could exceed the vocabulary: look
            top = self.max_token()
            if top >= vocab:
                raise DataError(f"{self.path}: token id {top} does not fit the model's vocab_size {vocab}; "
                                f"compile a spec with vocab_size > {top}")

    def offsets(self, seed, step, batch, seq, stream="train"):
        """The start of each of the batch's windows: ``batch`` draws in [0, len - seq - 1] from a
        generator seeded by (seed, stream, step) only (nanoGPT train.py: torch.randint(len(data) - block_size))."""
        generator = torch.Generator().manual_seed(_stable_seed(seed, f"data/{stream}/{step}"))
        return torch.randint(len(self) - seq, (batch,), generator=generator).tolist()

    def window(self, seed, step, batch, seq, part, stream="train"):
        """This rank's part of the step's batch as a (rows, columns + 1) int64 tensor.

        ``part`` is ((row0, row1), (col0, col1)): the rows and positions of the (batch, seq) inputs
        this rank holds (runtime.shard_ranges under the plan's BATCH_SBP). Only ids
        [offset + col0, offset + col1 + 1) of the rank's rows are read: its inputs and, one further
        on, its targets. ``window(..., ((0, batch), (0, seq)))`` is the whole global batch.
        """
        (row0, row1), (col0, col1) = part
        starts = self.offsets(seed, step, batch, seq, stream)[row0:row1]
        rows = [np.asarray(self.tokens[s + col0:s + col1 + 1]) for s in starts]
        self.elements_read += sum(len(r) for r in rows)
        if not rows:
            return torch.zeros((0, col1 - col0 + 1), dtype=torch.int64)
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def write_tokens(path, ids, magic=20240520):
    """Write ``ids`` in llm.c's format (data_common.py write_datafile): 256 int32 of header (magic,
    version, token count, zeros), then the ids as the magic's dtype. Returns the bytes written."""
    dtype = LLMC_MAGIC[magic]
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(dtype).max):
        raise DataError(f"{path}: ids from {int(ids.min())} to {int(ids.max())} do not fit {dtype.name}")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = magic, LLMC_VERSION[magic], ids.size
    body = ids.astype(dtype).tobytes()
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(body)
    return header.nbytes + len(body)


def add_arguments(parser):
    """The program's data flags (parse_args)."""
    parser.add_argument("--data", default=None, help="train on token ids from this file (llm.c or nanoGPT .bin, "
                        "or text read as bytes); default: the synthetic permutation-walk task")
    parser.add_argument("--data-dtype", choices=sorted(DTYPES), default=None,
                        help="a header-less binary's id dtype (default uint16; llm.c files say it in their header)")
    parser.add_argument("--val-data", default=None, help="a held-out file: its loss every --val-every steps")
    parser.add_argument("--val-every", type=int, default=10, help="steps between validation losses (default 10)")
    parser.add_argument("--val-batches", type=int, default=2, help="batches each validation loss averages (default 2)")


def open_data(args, vocab, seq):
    """(train, val) TokenFiles from the flags, each checked against the model; None for one not given.
    A bad file exits with its one-line message before any process group starts."""
    try:
        files = []
        for path in (args.data, args.val_data):
            data = None if path is None else TokenFile(path, args.data_dtype)
            if data is not None:
                data.check(vocab, seq)
            files.append(data)
        if args.val_data is not None and (args.val_every < 1 or args.val_batches < 1):
            raise DataError(f"--val-every and --val-batches must be at least 1, got {args.val_every} "
                            f"and {args.val_batches}")
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    return tuple(files)


def validation_due(args, step, steps):
    """Whether the step (0-based) ends with a validation loss: every --val-every steps and the last."""
    return args.val_data is not None and ((step + 1) % args.val_every == 0 or step + 1 == steps)


def validation_loss(val, batches, seed, batch, seq, part, loss_of, counters=()):
    """The mean loss of ``batches`` fixed validation batches (--val-batches), without gradients.

    ``loss_of(local)`` runs the model on this rank's window and returns the global loss. The
    batches are steps 0, 1, ... of the "val" stream, the same at every evaluation, so the curve
    compares like with like. ``counters`` (dicts such as runtime.COMM_BYTES) are restored afterwards: the
    validation's collectives are not the training step's.
    """
    saved = [dict(c) for c in counters]
    losses = []
    with torch.no_grad():
        for i in range(batches):
            losses.append(loss_of(val.window(seed, i, batch, seq, part, stream="val")))
    for counter, before in zip(counters, saved):
        counter.clear()
        counter.update(before)
    return sum(losses) / len(losses)
