"""Byte sizes of the tensors a spec makes, checked before anything is built.

Why bytes and not elements: torch sizes a tensor's storage in int64 *bytes*, so a weight of
2^62 float32 elements (e.g. ``hidden_size: 1.6e9``: hidden x hidden = 2.6e18 elements) already
overflows, though each factor and the element count fit. Every check counts ``ELEMENT_BYTES`` per
element, the widest dtype a program runs in (``ultraplan run --dtype float64``), so a spec that
passes here can be built in any dtype ultraplan uses.

The list covers the products that become tensors: weights (embedding, projections, expert stacks,
value tables, key tables) and the activations of a step at batch B and sequence T (the residual
stream, the logits, attention's B x heads x T x T scores, expert dispatch, memory scores and the
gathered value rows). At load time B and T are the spec's ``train.batch_size`` and ``seq_len``;
planning checks the ``--batch`` / ``--seq`` it is given (``passes/pipeline.make_context``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .memory_specs import ProductKeySpec, UltraMemSpec, UltraMemV2Spec
from .schema import AttentionSpec, FFNSpec, ModelSpec, MoESpec, SublayerSpec
from .yaml_source import Document

ELEMENT_BYTES = 8  # float64: the widest dtype a program runs in
MAX_TENSOR_BYTES = 2**63 - 1  # torch's storage size is an int64 count of bytes


@dataclass(frozen=True)
class Tensor:
    """One tensor a spec makes: what it is, how many elements, and the field to blame."""

    what: str
    elements: int
    field: str  # a field of ``sublayer``, or of the model when ``sublayer`` is None
    sublayer: SublayerSpec | None = None

    @property
    def nbytes(self) -> int:
        return self.elements * ELEMENT_BYTES


def sublayer_tensors(sub: SublayerSpec, hidden: int, batch: int, seq: int) -> Iterator[Tensor]:
    c, tokens = sub.config, batch * seq
    if isinstance(c, AttentionSpec):
        width = c.heads * (c.head_dim or 1)
        yield Tensor("query projection (hidden_size x heads x head_dim)", hidden * width, "hidden_size")
        yield Tensor("queries (B x T x heads x head_dim)", tokens * width, "heads", sub)
        yield Tensor("attention scores (B x heads x T x T)", batch * c.heads * seq * seq, "heads", sub)
    elif isinstance(c, FFNSpec) and not c.auto:
        yield Tensor("ffn weight (hidden_size x hidden)", hidden * c.hidden, "hidden", sub)
        yield Tensor("ffn activations (B x T x hidden)", tokens * c.hidden, "hidden", sub)
    elif isinstance(c, MoESpec):
        yield Tensor("expert weights (experts x hidden x hidden_size)", c.experts * c.hidden * hidden, "experts", sub)
        yield Tensor("router logits (B x T x experts)", tokens * c.experts, "experts", sub)
        yield Tensor("expert activations (B x T x topk x hidden)", tokens * c.topk * c.hidden, "hidden", sub)
    elif isinstance(c, (UltraMemSpec, UltraMemV2Spec)):
        rows = c.num_keys**2 * getattr(c, "share_layers", 1)
        width = c.value_dim + getattr(c, "pre_value_dim", 0)
        yield Tensor("value table (num_keys^2 x value_dim)", rows * width, "num_keys", sub)
        yield Tensor("key tables (heads x 2 x rank x keys x key_dim)",
                     c.heads * 2 * c.rank * c.effective_keys * c.key_dim, "num_keys", sub)
        yield Tensor("key scores (B x T x heads x 2 x rank x keys)", tokens * c.heads * 2 * c.rank * c.effective_keys,
                     "num_keys", sub)
        grow = "key_expand" if getattr(c, "key_expand", 1) > 1 else "num_keys"
        yield Tensor("slot shuffle (keys^2 virtual slots)", c.effective_keys**2, grow, sub)
        yield Tensor("query projection (hidden_size x query rows)", hidden * _query_rows(c), "key_dim", sub)
        yield Tensor("candidate grid (B x T x heads x cores x topk x topk)", tokens * c.heads * c.cores * c.topk**2,
                     "topk", sub)
        yield Tensor("gathered values (B x T x heads x topk x value_dim)", tokens * c.heads * c.topk * width,
                     "value_dim", sub)
    elif isinstance(c, ProductKeySpec):
        width = max(getattr(c, "value_dim", None) or hidden, hidden)
        yield Tensor("value table (num_keys^2 x value_dim)", c.num_keys**2 * width, "num_keys", sub)
        yield Tensor("key scores (B x T x heads x 2 x num_keys)", tokens * c.heads * 2 * c.num_keys, "num_keys", sub)
        yield Tensor("candidate products (B x T x heads x topk x topk)", tokens * c.heads * c.topk**2, "topk", sub)
        yield Tensor("gathered values (B x T x heads x topk x value_dim)", tokens * c.heads * c.topk * width,
                     "topk", sub)


def _query_rows(c: UltraMemSpec | UltraMemV2Spec) -> int:
    """Rows of the TDQKR query projection (components/ultramem.py builds the same)."""
    if isinstance(c, UltraMemSpec):
        return c.query_heads * 2 * c.key_dim
    if c.official_query:
        return 2 * c.rank * c.key_dim
    return c.heads * 2 * (c.rank if c.query_per_rank else 1) * c.key_dim


def spec_tensors(spec: ModelSpec, batch: int, seq: int) -> Iterator[Tensor]:
    """The tensors of ``spec`` at batch ``batch`` and sequence ``seq``; each distinct sublayer once."""
    h, v, tokens = spec.hidden_size, spec.vocab_size, batch * seq
    yield Tensor("token embedding (vocab_size x hidden_size)", v * h, "vocab_size")
    yield Tensor("residual stream (B x T x hidden_size)", tokens * h, "hidden_size")
    yield Tensor("logits (B x T x vocab_size)", tokens * v, "vocab_size")
    seen: set[int] = set()
    for layer in spec.layers:
        if id(layer.sublayers) in seen:  # a group's repeats share one tuple of sublayers
            continue
        seen.add(id(layer.sublayers))
        for sub in layer.sublayers:
            yield from sublayer_tensors(sub, h, batch, seq)


def too_large(spec: ModelSpec, batch: int, seq: int) -> Tensor | None:
    """The first tensor of ``spec`` at (batch, seq) past ``MAX_TENSOR_BYTES``, if any."""
    return next((t for t in spec_tensors(spec, batch, seq) if t.nbytes > MAX_TENSOR_BYTES), None)


def check_spec_sizes(doc: Document, spec: ModelSpec) -> None:
    """A positioned error at the field behind the first tensor too large to exist at the spec's
    own batch and seq_len."""
    big = too_large(spec, spec.train.batch_size, spec.seq_len)
    if big is None:
        return
    message = (f"makes a {big.what} of {big.elements:.3g} elements = {big.nbytes:.3g} bytes at B="
               f"{spec.train.batch_size}, T={spec.seq_len}, more than torch can address (2^63 - 1 bytes)")
    hint = f"choose a smaller {big.field} (or a smaller seq_len / train.batch_size)"
    origin = big.sublayer.origin(big.field) or big.sublayer.origin() if big.sublayer else None
    if origin is not None:
        raise origin.error(message, hint=hint)
    raise doc.error(("model", big.field), message, hint=hint)
