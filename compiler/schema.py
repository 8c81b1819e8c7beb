"""The validated, frozen form of a spec: what every later stage reads.

Field metadata carries the documentation and bounds that validation enforces and that
``docs/spec-language.md`` lists, so the schema is written once. Every dataclass here is frozen:
a spec is a value, and passes may hash and compare it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import Origin

NormKind = Literal["rms", "layer"]
Activation = Literal["swiglu", "gelu"]


def doc(text: str, *, minimum: float | None = None, exclusive: bool = False) -> dict:
    """Metadata for a spec field: its help text and an optional lower bound."""
    return {"doc": text, "min": minimum, "exclusive": exclusive}


@dataclass(frozen=True)
class NormSpec:
    """A normalisation: written ``norm: rms`` or ``norm: {kind: layer, eps: 1e-6}`` or ``norm: none``."""

    kind: NormKind = field(default="rms", metadata=doc("rms (RMSNorm) or layer (LayerNorm with bias)"))
    eps: float = field(default=1e-5, metadata=doc("added to the variance", minimum=0, exclusive=True))


@dataclass(frozen=True)
class AttentionSpec:
    """Causal multi-head attention with optional grouped-query heads and rotary positions."""

    heads: int = field(metadata=doc("number of query heads", minimum=1))
    kv_heads: int | None = field(default=None, metadata=doc("key/value heads for GQA; defaults to heads", minimum=1))
    head_dim: int | None = field(default=None, metadata=doc("per-head width; defaults to hidden_size / heads", minimum=1))
    rotary: bool = field(default=True, metadata=doc("apply rotary position embeddings to queries and keys"))
    rope_theta: float = field(default=10000.0, metadata=doc("rotary base frequency", minimum=0, exclusive=True))


@dataclass(frozen=True)
class FFNSpec:
    """A position-wise feed-forward network.

    ``hidden: auto`` leaves the width to ``passes/size_ffn.py``: the memory sublayer of the same
    block that sets ``memory_to_ffn`` fixes the FFN's compute, and the width follows from it.
    """

    hidden: int | Literal["auto"] = field(metadata=doc(
        "inner width, or auto: sized from the block's memory sublayer's memory_to_ffn", minimum=1))
    activation: Activation = field(default="swiglu", metadata=doc("swiglu (gated, three matrices) or gelu (two)"))
    multiple_of: int = field(default=1, metadata=doc("an auto width is rounded to a multiple of this", minimum=1))

    @property
    def auto(self) -> bool:
        return self.hidden == "auto"

    @property
    def width(self) -> int:
        """The inner width; only a sized spec (``passes.pipeline.prepare_spec``) has one."""
        if self.auto:
            raise ValueError("ffn hidden: auto has not been sized: load the spec with ultraplan.load (or run "
                             "ultraplan.passes.pipeline.prepare_spec) before building it")
        return self.hidden


MEMORY_TO_FFN_DOC = doc("memory-to-FFN compute ratio: memory FLOPs / FFN FLOPs per token of this block; sizes "
                        "the block's ffn, which must say hidden: auto (UltraMemV2's rebalancing)",
                        minimum=0, exclusive=True)


@dataclass(frozen=True)
class MoESpec:
    """Routed experts (each a small FFN), top-k per token, dropless; optional shared experts."""

    experts: int = field(metadata=doc("number of routed experts", minimum=1))
    topk: int = field(metadata=doc("experts per token", minimum=1))
    hidden: int = field(metadata=doc("inner width of each expert", minimum=1))
    activation: Activation = field(default="swiglu", metadata=doc("swiglu or gelu, for every expert"))
    router: Literal["softmax", "sigmoid"] = field(default="softmax", metadata=doc("gate function of the router"))
    normalize_topk: bool = field(default=False, metadata=doc("renormalise the k kept gates to sum to 1"))
    shared_experts: int = field(default=0, metadata=doc("always-on experts of the same width", minimum=0))
    aux_loss_weight: float = field(default=0.0, metadata=doc(
        "weight of the Switch load-balancing loss E * sum_i f_i P_i over the whole batch", minimum=0))


@dataclass(frozen=True)
class ProductKeySpec:
    """Product-key retrieval (Lample et al. 2019): N = num_keys^2 slots, two half-key tables per head."""

    num_keys: int = field(metadata=doc("keys per half table (n); slots N = n^2", minimum=1))
    topk: int = field(metadata=doc("slots selected per head (k, also the per-half top-k)", minimum=1))
    key_dim: int = field(metadata=doc("query/key width D_k per head, split into two halves", minimum=2))
    heads: int = field(default=1, metadata=doc("retrieval heads; their outputs are summed", minimum=1))
    query_norm: bool = field(default=False, metadata=doc("LayerNorm each half-query (width key_dim/2) before scoring"))
    memory_to_ffn: float | None = field(default=None, metadata=MEMORY_TO_FFN_DOC)


@dataclass(frozen=True)
class PKMSpec(ProductKeySpec):
    """Product Key Memory: softmax over the k selected scores, weighted sum of value rows."""

    value_dim: int | None = field(default=None, metadata=doc("value width; defaults to hidden (else projected)",
                                                             minimum=1))
    gated: bool = field(default=False, metadata=doc(
        "Memory+ output: W_out (pooled * silu(W_gate x)), two value_dim x hidden projections"))
    shared_values: bool = field(default=False, metadata=doc(
        "one value table for every pkm layer that sets this (Memory+'s shared values)"))


@dataclass(frozen=True)
class PEERSpec(ProductKeySpec):
    """PEER (He 2024): each slot is a one-neuron expert with a down and an up embedding."""

    activation: Literal["gelu", "relu", "silu"] = field(default="gelu", metadata=doc("on the expert's hidden unit"))


@dataclass(frozen=True)
class UltraMemV2Spec:
    """UltraMemV2 (Huang et al. 2025): Tucker-decomposed retrieval (TDQKR), pre-value gates, multi-core
    pooling of value rows, one output projection; value tables may be shared across layers.

    ``share``: ``none`` (each layer owns n^2 rows), ``ring`` (one table of L_m n^2 rows; layer l
    addresses share_layers * n^2 of them starting at l n^2, wrapping) or ``block`` (groups of
    share_layers layers share share_layers * n^2 rows). A sharing layer addresses
    n' = floor(sqrt(share_layers) n) keys per half (research/memory_layers.md §5.1).
    """

    num_keys: int = field(metadata=doc("keys per half of a layer's own share (n); its rows are n^2", minimum=1))
    topk: int = field(metadata=doc("slots kept per head (m), also the per-half top-m", minimum=1))
    key_dim: int = field(metadata=doc("query/key width D_k", minimum=1))
    value_dim: int = field(metadata=doc("value width D_v", minimum=1))
    pre_value_dim: int = field(default=0, metadata=doc("pre-value width D_p; 0 leaves pre-values out", minimum=0))
    rank: int = field(default=2, metadata=doc("Tucker rank r", minimum=1))
    cores: int = field(default=2, metadata=doc("Tucker cores c (multi-core scoring); divides value_dim", minimum=1))
    heads: int = field(default=1, metadata=doc("retrieval heads", minimum=1))
    query_per_rank: bool = field(default=False, metadata=doc("a separate query for each Tucker rank"))
    share: Literal["none", "ring", "block"] = field(default="none", metadata=doc("value-table sharing scheme"))
    share_layers: int = field(default=1, metadata=doc("layers' shares one layer addresses (g)", minimum=1))
    init: Literal["code", "paper"] = field(default="code", metadata=doc(
        "code: the official scripts' init; paper: Appendix A (needs pre-values and an ffn in the block)"))
    memory_to_ffn: float | None = field(default=None, metadata=MEMORY_TO_FFN_DOC)

    @property
    def effective_keys(self) -> int:
        """n' = floor(sqrt(g) n): keys per half a layer addresses when it reads g layers' shares."""
        import math

        return math.isqrt(self.share_layers * self.num_keys**2)


@dataclass(frozen=True)
class UltraMemSpec:
    """UltraMem (Huang et al., ICLR 2025): TDQKR retrieval, implicit value expansion (E virtual
    blocks over one physical table, each with its own slice of the output projection) and
    multi-core scoring; no softmax. Usually placed ``parallel`` to a block's FFN with
    ``deliver_after`` set (the skip-layer arrangement, research/memory_layers.md §4.3)."""

    num_keys: int = field(metadata=doc("physical keys per half (n); the table has n^2 rows", minimum=1))
    topk: int = field(metadata=doc("slots kept per head (m)", minimum=1))
    key_dim: int = field(metadata=doc("query/key width D_k", minimum=1))
    value_dim: int = field(metadata=doc("value width D_v", minimum=1))
    heads: int = field(default=2, metadata=doc("retrieval heads", minimum=1))
    share_query: bool = field(default=True, metadata=doc("one query serves each pair of heads"))
    rank: int = field(default=2, metadata=doc("Tucker rank r", minimum=1))
    cores: int = field(default=2, metadata=doc("Tucker cores c; divides value_dim", minimum=1))
    expansion: int = field(default=4, metadata=doc("IVE factor E, a perfect square: sqrt(E) n keys per half",
                                                   minimum=1))
    memory_to_ffn: float | None = field(default=None, metadata=MEMORY_TO_FFN_DOC)

    @property
    def effective_keys(self) -> int:
        import math

        return math.isqrt(self.expansion) * self.num_keys

    @property
    def query_heads(self) -> int:
        return self.heads // 2 if self.share_query else self.heads


SublayerConfig = AttentionSpec | FFNSpec | MoESpec | PKMSpec | PEERSpec | UltraMemSpec | UltraMemV2Spec
MEMORY_KINDS = ("pkm", "peer", "ultramem", "ultramem_v2")  # the sublayers that may carry memory_to_ffn
SUBLAYER_KINDS: dict[str, type] = {"attention": AttentionSpec, "ffn": FFNSpec, "moe": MoESpec, "pkm": PKMSpec,
                                   "peer": PEERSpec, "ultramem": UltraMemSpec, "ultramem_v2": UltraMemV2Spec}


@dataclass(frozen=True)
class SublayerSpec:
    """One pre-norm residual sublayer of a block: ``x = x + f(norm(x))``.

    ``parallel``: reads the residual stream the previous sublayer read (and, when it gives no
    norm of its own, that sublayer's normed input), so both add to the same stream:
    ``x + f(n(x)) + g(n(x))``, as UltraMemV2's memory beside the FFN. ``deliver_after``: its output
    is added after the block that many layers later instead of now (UltraMem's skip-layer).
    """

    name: str
    kind: str
    config: SublayerConfig
    norm: NormSpec | None
    parallel: bool = False
    deliver_after: int = 0
    origins: tuple[tuple[str, Origin], ...] = field(default=(), compare=False, repr=False)

    def origin(self, name: str = "") -> Origin | None:
        """Where field ``name`` was written (an override's line if one set it); ``""``: the sublayer."""
        return dict(self.origins).get(name) or dict(self.origins).get("")

    @property
    def sizes_ffn(self) -> bool:
        """This memory sublayer sets the compute ratio that sizes its block's ``hidden: auto`` FFN."""
        return getattr(self.config, "memory_to_ffn", None) is not None

    @property
    def auto_ffn(self) -> bool:
        return isinstance(self.config, FFNSpec) and self.config.auto


@dataclass(frozen=True)
class LayerSpec:
    """One block instance: its index in the stack, the block it came from, its sublayers."""

    index: int
    block: str
    sublayers: tuple[SublayerSpec, ...]

    def ffn_sizing(self) -> tuple[SublayerSpec, SublayerSpec] | None:
        """(the ``hidden: auto`` FFN, the memory sublayer whose ratio sizes it), if this block has them
        (validation guarantees they come as one pair)."""
        ffn = next((s for s in self.sublayers if s.auto_ffn), None)
        memory = next((s for s in self.sublayers if s.sizes_ffn), None)
        return (ffn, memory) if ffn and memory else None


@dataclass(frozen=True)
class TrainSpec:
    """Defaults for the emitted training loop; CLI flags override them."""

    batch_size: int = field(default=8, metadata=doc("global batch (sequences per step)", minimum=1))
    steps: int = field(default=20, metadata=doc("optimizer steps", minimum=0))
    lr: float = field(default=3e-3, metadata=doc("AdamW learning rate", minimum=0, exclusive=True))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW decoupled weight decay", minimum=0))
    beta1: float = field(default=0.9, metadata=doc("AdamW beta1", minimum=0))
    beta2: float = field(default=0.95, metadata=doc("AdamW beta2", minimum=0))
    eps: float = field(default=1e-8, metadata=doc("AdamW epsilon", minimum=0, exclusive=True))
    seed: int = field(default=0, metadata=doc("seed for initialisation and data", minimum=0))
    init_std: float = field(default=0.02, metadata=doc("std of normal weight init", minimum=0, exclusive=True))
    value_lr_multiplier: float = field(default=1.0, metadata=doc(
        "learning-rate multiplier of memory value tables (UltraMem's code starts at 4)", minimum=0, exclusive=True))
    value_lr_decay_steps: int = field(default=0, metadata=doc(
        "steps over which that multiplier decays linearly to 1 (0: constant)", minimum=0))


@dataclass(frozen=True)
class ModelSpec:
    """A whole decoder-only model, with layer groups expanded into one LayerSpec per layer."""

    name: str
    vocab_size: int
    hidden_size: int
    seq_len: int
    tie_embeddings: bool
    final_norm: NormSpec
    layers: tuple[LayerSpec, ...]
    train: TrainSpec
    source: str
    sha256: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)


# The top-level fields of a model spec, with their docs (read by validation and the docs).
MODEL_FIELDS: dict[str, str] = {
    "name": "free text; shown in comments and plans (escaped), never pasted as code",
    "vocab_size": "tokens in the vocabulary",
    "hidden_size": "residual stream width",
    "seq_len": "training sequence length (the T at which numbers are reported)",
    "tie_embeddings": "share the token embedding with the LM head (default false)",
    "norm": "default pre-norm for every sublayer (rms, layer or none); default rms",
    "final_norm": "norm before the LM head; default: the value of norm",
    "blocks": "named blocks: each a list of sublayers such as '- attention: {heads: 4}'",
    "layers": "the stack: a list of groups {block: NAME | pattern: [NAMES], repeat: N, override: {...}}",
}


@dataclass(frozen=True)
class LinkSpec:
    """A communication link class: bandwidth per device, per direction, and a per-message latency."""

    bandwidth: float = field(metadata=doc("bytes per second per device", minimum=0, exclusive=True))
    latency: float = field(default=0.0, metadata=doc("seconds per message", minimum=0))


@dataclass(frozen=True)
class HardwareSpec:
    """A machine description for the cost model."""

    name: str
    devices_per_node: int
    nodes: int
    peak_flops: dict[str, float]
    memory_bytes: float
    memory_bandwidth: float
    intra_node: LinkSpec
    inter_node: LinkSpec
    source: str

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes
