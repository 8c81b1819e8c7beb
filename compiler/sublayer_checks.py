"""Cross-field checks of each sublayer kind, after its fields have been read and typed.

Each check points at the field to change: hidden divisible by heads, kv heads dividing heads,
even rotary width, top-k within what can be addressed, value width split over Tucker cores, ...;
and, per block, that an FFN of ``hidden: auto`` and a memory ratio ``memory_to_ffn`` come as a pair.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import PathEntry, SpecError, blame
from .fields import INT64_MAX, Sourced
from .memory_specs import ProductKeySpec, UltraMemSpec, UltraMemV2Spec
from .memory_tables import TableSlot, table_slots
from .schema import MEMORY_KINDS, AttentionSpec, FFNSpec, ModelSpec, MoESpec, SublayerConfig, SublayerSpec
from .yaml_source import Document


def check_sublayer(
    doc: Document, config: SublayerConfig, items: dict[str, Sourced], kind_path: tuple[PathEntry, ...],
    hidden: int | None,
) -> SublayerConfig:
    """Fill defaults that depend on other fields and check the cross-field facts; returns the config."""
    if hidden is not None:  # None: hidden_size itself was wrong, already reported
        check_tensor_fits(doc, items, kind_path, config, hidden)
    if isinstance(config, AttentionSpec):
        config = resolve_attention(doc, config, items, kind_path, hidden)
    elif isinstance(config, MoESpec):
        check_at_most(doc, items, kind_path, "topk", config.topk, "experts", config.experts)
    elif isinstance(config, (UltraMemSpec, UltraMemV2Spec)):
        if isinstance(config, UltraMemSpec) and math.isqrt(config.expansion) ** 2 != config.expansion:
            raise doc.error(items["expansion"].path, f"expansion must be a perfect square (1, 4, 9, ...), "
                            f"got {config.expansion}", hint="the key grid grows by sqrt(E) per half")
        if isinstance(config, UltraMemSpec) and config.share_query and config.heads % 2:
            raise doc.error(items.get("heads", Sourced(None, kind_path)).path,
                            f"share_query pairs heads, so heads must be even, got {config.heads}",
                            hint="use an even number of heads or share_query: false")
        if isinstance(config, UltraMemV2Spec) and config.init == "paper" and not config.pre_value_dim:
            raise doc.error(items["init"].path, "the paper's initialisation sizes values through D_p: it needs "
                            "pre_value_dim > 0", hint="set pre_value_dim, or init: code")
        if isinstance(config, UltraMemV2Spec) and config.share == "none" and config.share_layers != 1:
            raise doc.error(items["share_layers"].path, "share_layers needs share: ring or block")
        if isinstance(config, UltraMemV2Spec) and config.official_query:
            check_official_query(doc, config, items, kind_path)
        check_at_most(doc, items, kind_path, "topk", config.topk, "keys addressed per half", config.effective_keys)
        if config.value_dim % config.cores:
            raise doc.error(items["value_dim"].path, f"value_dim {config.value_dim} must split into {config.cores} "
                            "equal chunks, one per core", hint="choose cores dividing value_dim")
    elif isinstance(config, ProductKeySpec):
        check_at_most(doc, items, kind_path, "topk", config.topk, "num_keys", config.num_keys)
        if config.key_dim % 2:
            raise doc.error(items["key_dim"].path, f"key_dim must be even (two halves), got {config.key_dim}")
    return config


def check_official_query(doc: Document, config: UltraMemV2Spec, items: dict[str, Sourced],
                         kind_path: tuple[PathEntry, ...]) -> None:
    """The official layout runs only where its shapes agree (olmo/ultramem_layer_v2.py:50-55, 305-308):
    the half-query is rank D_k / 2 wide against D_k-wide keys, so rank 2; head h reads group h // 2 of
    two, so at most 4 heads (and 3 would leave one head's pair half read)."""
    where = items.get("official_query", Sourced(None, kind_path)).path
    if config.query_per_rank:
        raise doc.error(where, "official_query and query_per_rank exclude each other: the official layout "
                        "shares one query among the Tucker ranks", hint="drop one of them")
    if config.rank != 2:
        raise doc.error(where, f"official_query needs rank 2 (its half-query is rank * D_k / 2 wide against "
                        f"D_k-wide keys), got rank {config.rank}")
    if config.heads not in (1, 2, 4):
        raise doc.error(where, f"official_query needs 1, 2 or 4 heads (head h reads query group h // 2 of "
                        f"two), got {config.heads}")


def largest_tensor(config: SublayerConfig, hidden: int) -> tuple[str, int]:
    """(the field that drives it, element count) of the sublayer's largest tensor, without building it."""
    if isinstance(config, FFNSpec):
        return "hidden", (0 if config.auto else config.hidden) * hidden
    if isinstance(config, MoESpec):
        return "hidden", config.experts * config.hidden * hidden
    if isinstance(config, (UltraMemSpec, UltraMemV2Spec)):
        width = config.value_dim + getattr(config, "pre_value_dim", 0)
        rows = config.num_keys**2 * getattr(config, "share_layers", 1)
        keys = config.heads * 2 * config.rank * config.effective_keys * config.key_dim
        return "num_keys", max(rows * width, keys)
    if isinstance(config, ProductKeySpec):
        return "num_keys", config.num_keys**2 * max(getattr(config, "value_dim", None) or hidden, hidden)
    return "heads", 0


def check_tensor_fits(doc: Document, items: dict[str, Sourced], path: tuple[PathEntry, ...], config: SublayerConfig,
                      hidden: int) -> None:
    """Each number may be fine while their product overflows torch's int64 element count."""
    name, elements = largest_tensor(config, hidden)
    if elements > INT64_MAX:
        raise doc.error(items.get(name, Sourced(None, path)).path, f"{name} makes a tensor of {elements:.3g} "
                        "elements, more than any tensor can hold (2^63 - 1)", hint=f"choose a smaller {name}")


def resolve_attention(
    doc: Document, cfg: AttentionSpec, items: dict[str, Sourced], path: tuple[PathEntry, ...], hidden: int | None
) -> AttentionSpec:
    """Fill defaults that depend on other fields and check the cross-field facts."""
    where = items.get("heads", Sourced(None, path)).path
    head_dim = cfg.head_dim
    if head_dim is None and hidden is None:
        head_dim = 2  # hidden_size was wrong (reported); check the rest with a stand-in width
    if head_dim is None:
        if hidden % cfg.heads:
            raise doc.error(where, f"hidden_size {hidden} is not divisible by heads {cfg.heads}",
                            hint="choose heads dividing hidden_size, or set head_dim explicitly")
        head_dim = hidden // cfg.heads
    kv_heads = cfg.kv_heads if cfg.kv_heads is not None else cfg.heads
    if cfg.heads % kv_heads:
        raise doc.error(items.get("kv_heads", Sourced(None, path)).path,
                        f"kv_heads {kv_heads} must divide heads {cfg.heads} (each kv head serves a group of query heads)",
                        hint=f"try kv_heads in {[d for d in range(1, cfg.heads + 1) if cfg.heads % d == 0]}")
    if cfg.rotary and head_dim % 2:
        raise doc.error(items.get("head_dim", Sourced(None, where)).path,
                        f"rotary embeddings need an even head_dim, got {head_dim}",
                        hint="use an even head_dim or set rotary: false")
    return dataclasses.replace(cfg, head_dim=head_dim, kv_heads=kv_heads)


def check_at_most(doc: Document, items: dict[str, Sourced], path: tuple[PathEntry, ...], name: str, value: int,
                  limit_name: str, limit: int) -> None:
    if value > limit:
        raise doc.error(items.get(name, Sourced(None, path)).path, f"{name} {value} exceeds {limit_name} {limit}",
                        hint=f"choose {name} <= {limit_name}")


def check_ffn_sizing(layer: int, block: str, sublayers: tuple[SublayerSpec, ...]) -> None:
    """``ffn: {hidden: auto}`` and a memory sublayer's ``memory_to_ffn`` come as a pair, once per block:
    the ratio fixes the FFN's width (passes/size_ffn.py). Every value behind a conflict is a suspect;
    one written by a layer group's override is blamed first (``errors.blame``), since the block
    itself may be fine in its other groups."""
    autos = [s for s in sublayers if s.auto_ffn]
    ffns = [s for s in sublayers if isinstance(s.config, FFNSpec)]
    ratios = [s for s in sublayers if s.sizes_ffn]
    where = f"layer {layer} (block '{block}')"

    def error(suspects: list[tuple[SublayerSpec, str]], message: str, hint: str) -> SpecError:
        origin = blame(sub.origin(name) for sub, name in suspects) or suspects[0][0].origin()
        return origin.error(f"{where}: {message}", hint=hint)

    def overridden(subs: list[SublayerSpec], name: str, default: SublayerSpec) -> SublayerSpec:
        return next((s for s in subs if s.origin(name) and s.origin(name).from_override), default)

    for ffn in ffns:
        if not ffn.config.auto and ffn.config.multiple_of != 1:
            raise error([(ffn, "multiple_of"), (ffn, "hidden")], f"multiple_of rounds an auto width, but "
                        f"{ffn.name}'s hidden is fixed at {ffn.config.hidden}", "drop multiple_of, or write hidden: auto")
    if len(ratios) > 1:
        second = overridden(ratios, "memory_to_ffn", ratios[1])
        first = next(s for s in ratios if s is not second)
        raise error([(second, "memory_to_ffn")], f"{first.name} already sets memory_to_ffn; one memory sublayer "
                    "sizes the block's ffn", "keep memory_to_ffn on one memory sublayer of the block")
    if len(autos) > 1:
        extra = overridden(autos, "hidden", autos[1])
        raise error([(extra, "hidden")], f"two ffns have hidden: auto ({', '.join(s.name for s in autos)}); one "
                    "memory ratio can size only one of them", "give all but one ffn a fixed hidden width")
    if ratios and not autos:
        memory = ratios[0]
        if ffns:
            fixed = overridden(ffns, "hidden", ffns[0])
            raise error([(memory, "memory_to_ffn"), (fixed, "hidden")], f"{memory.name}'s memory_to_ffn sizes the "
                        f"block's ffn, but {fixed.name} has a fixed width ({fixed.config.hidden})",
                        "write the ffn as 'ffn: {hidden: auto}', or drop memory_to_ffn")
        raise error([(memory, "memory_to_ffn")], f"{memory.name}'s memory_to_ffn sizes the block's ffn, but the "
                    "block has no ffn", "add 'ffn: {hidden: auto}' to the block, or drop memory_to_ffn")
    if autos and not ratios:
        memories = [s for s in sublayers if s.kind in MEMORY_KINDS]
        raise error([(autos[0], "hidden"), *((m, "memory_to_ffn") for m in memories)],
                    f"hidden: auto needs a memory sublayer of the block ({', '.join(MEMORY_KINDS)}) that sets "
                    "memory_to_ffn", "add e.g. 'memory_to_ffn: 0.2' to the block's memory sublayer, or give a width")


def check_shared_tables(spec: ModelSpec) -> None:
    """Layers that share a value table agree on its shape and on how it is initialised: the table is
    one tensor, built and filled once (with ``init: paper``, from the whole UltraMemV2 config). The
    first sharer that disagrees with the first one is blamed, a layer group's override first."""
    subs = {(layer.index, s.name): s for layer in spec.layers for s in layer.sublayers}
    first: dict[str, tuple[TableSlot, SublayerSpec]] = {}
    for slot in table_slots(spec):
        sub = subs[slot.layer, slot.sublayer]
        if slot.table not in first:
            first[slot.table] = (slot, sub)
            continue
        slot0, sub0 = first[slot.table]
        shape0, shape = (slot0.rows, slot0.value_dim, slot0.pre_value_dim), (slot.rows, slot.value_dim,
                                                                              slot.pre_value_dim)
        where = f"layers {slot0.layer} and {slot.layer} share the '{slot.table}' value table but"
        fields = ("num_keys", "value_dim", "pre_value_dim", "share_layers")
        if shape != shape0:
            raise _sharers_error(sub0, sub, fields, f"{where} disagree on its (rows, value_dim, pre_value_dim): "
                                 f"{shape0} vs {shape}", "give every sharer the same num_keys, value_dim and "
                                 "pre_value_dim")
        init0, init = getattr(sub0.config, "init", "code"), getattr(sub.config, "init", "code")
        if init != init0 or (init == "paper" and dataclasses.replace(sub.config, memory_to_ffn=None)
                             != dataclasses.replace(sub0.config, memory_to_ffn=None)):
            raise _sharers_error(sub0, sub, ("init", *fields, "topk", "heads", "key_dim", "rank", "cores"),
                                 f"{where} would initialise it differently (init {init0} vs {init}, or different "
                                 "configs under init: paper)", "give every sharer the same init (and, with init: "
                                 "paper, the same config)")


def _sharers_error(sub0: SublayerSpec, sub: SublayerSpec, fields: tuple[str, ...], message: str,
                   hint: str) -> SpecError:
    origin = blame([*(sub.origin(f) for f in fields), *(sub0.origin(f) for f in fields)]) or sub.origin()
    return origin.error(message, hint=hint)
