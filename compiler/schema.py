"""The validated, frozen form of a spec: what every later stage reads.

Field metadata (``fields.doc``) carries the documentation and bounds that validation enforces and
that ``docs/spec-language.md`` lists, so the schema is written once. The memory sublayers' specs
live in memory_specs.py. Every dataclass here is frozen: a spec is a value, and passes may hash
and compare it (field origins, kept for error messages, take no part in that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import Origin
from .fields import doc
from .memory_specs import PEERSpec, PKMSpec, UltraMemSpec, UltraMemV2Spec

NormKind = Literal["rms", "layer"]
Activation = Literal["swiglu", "gelu"]


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
    qk_norm: bool | Literal["full", "head"] = field(default=False, metadata=doc(
        "RMSNorm of queries and keys before rotary: true or full normalises the whole q and k projections "
        "(OLMoE, OLMo-2), head each head with one scale of head_dim (Qwen3)"))
    qk_norm_eps: float = field(default=1e-5, metadata=doc("eps of the qk_norm RMSNorms", minimum=0, exclusive=True))
    bias: bool = field(default=False, metadata=doc("biases on the q, k, v and output projections (GPT-2)"))

    @property
    def qk_norm_mode(self) -> str | None:
        """``full``, ``head`` or None (``qk_norm: true`` is ``full``, as OLMoE and OLMo-2 do)."""
        return "full" if self.qk_norm is True else (self.qk_norm or None)


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
    bias: bool = field(default=False, metadata=doc("biases on the up (and gate) and down projections (GPT-2)"))

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
    bias: bool = field(default=False, metadata=doc(
        "biases on every expert's up (and gate) and down projections, and on the shared experts'"))


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
        """Where field ``name`` was written (an override's line if one set it), None if it was not
        written; ``""``: where the sublayer itself is."""
        return dict(self.origins).get(name)

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
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=doc(
        "fp32, or bf16: mixed precision, the forward and backward on bfloat16 copies of fp32 master weights, "
        "optimizer state fp32, the loss in fp32 (docs/precision.md)"))


# The most layers a spec may have. The deepest published decoders have a few hundred layers; past
# this, a `repeat` is almost surely a typo, and planning would lower a graph of that many blocks
# (validation expands nothing larger). Checked at the `repeat` that passes it (compiler/layers.py).
MAX_LAYERS = 4096


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
    position_embedding: Literal["none", "learned"] = "none"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def position_warning(self) -> str | None:
        """A warning when nothing tells the model where a token is (no rotary attention, no learned
        positions): allowed, but then attention sees its context as an unordered set (only the
        causal mask orders it), which is rarely what a user meant."""
        attentions = [s.config for layer in self.layers for s in layer.sublayers if isinstance(s.config, AttentionSpec)]
        if self.position_embedding != "none" or not attentions or any(a.rotary for a in attentions):
            return None
        return (f"warning: {self.name}: the model has no position information (no attention has rotary: true and "
                "model.position_embedding is none); add one of them unless this is meant")


# The top-level fields of a model spec, with their docs (read by validation and the docs).
MODEL_FIELDS: dict[str, str] = {
    "name": "free text; shown in comments and plans (escaped), never pasted as code",
    "vocab_size": "tokens in the vocabulary",
    "hidden_size": "residual stream width",
    "seq_len": "training sequence length (the T at which numbers are reported)",
    "tie_embeddings": "share the token embedding with the LM head (default false)",
    "position_embedding": "none, or learned: absolute positions, a (seq_len, hidden) table added to the token "
                          "embedding (GPT-2); default none (use attention's rotary)",
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
    # host terms, measured by `ultraplan calibrate` (passes/host_cost.py); 0: not modelled
    op_overhead: float = 0.0  # seconds per plan op, forward and backward
    optimizer_tensor: float = 0.0  # AdamW seconds per parameter tensor
    optimizer_element: float = 0.0  # AdamW seconds per parameter element
    collective_overhead: float = 0.0  # seconds per collective call beyond its link's formula
    loop_pass: float = 0.0  # seconds per pass of an op's Python loop (an expert), forward or backward
    # seconds per call of each collective kind beyond its link's formula; a kind not listed: collective_overhead
    collective_by_kind: dict[str, float] = field(default_factory=dict)
    # the same per group size (kind -> ranks in the group -> seconds): the wait grows with the peers
    collective_by_group: dict[str, dict[int, float]] = field(default_factory=dict)
    # each kind's seconds per wire byte against the link's (1: as the link's fit; gloo's all_gather and
    # reduce_scatter move a byte about 3 times slower than its all_reduce on a CPU host); not listed: 1
    collective_wire_factor: dict[str, float] = field(default_factory=dict)
    host_cores: int = 0  # cores the ranks of one node share (calibrate); 0: not modelled (a core per device)
    # ranks in a group -> seconds per square root of a second: a blocking call waits this times the
    # square root of the ranks' compute since their last sync longer (passes/sync_drift.py); not listed: 0
    collective_drift: dict[int, float] = field(default_factory=dict)

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes
