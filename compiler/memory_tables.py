"""Where each UltraMemV2 layer's value rows live: which table, how many rows, at what offset.

Tables are owned by the model, not by a layer, because sharing lets several layers read one
table. PKM layers with ``shared_values`` all read ``pkm_shared`` (Memory+'s one value table).
UltraMemV2 (the official code's ring scheme, Ultra-Sparse-Memory-Network olmo/ultramem_layer_v2.py:124-131):

- ``none``:  layer l owns a table of n^2 rows, offset 0;
- ``ring``:  one table of L_m n^2 rows for all ring layers; layer l (its ordinal among them)
             starts at l n^2 and, addressing n'^2 ~ g n^2 rows, wraps around the end;
- ``block``: groups of g consecutive layers share a table of g n^2 rows; layer l starts at
             (l mod g) n^2 of its group's table and wraps within it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory_specs import PKMSpec, UltraMemV2Spec
from .schema import ModelSpec


@dataclass(frozen=True)
class TableSlot:
    layer: int
    sublayer: str
    table: str  # the table's name under the model's ``memory_tables``
    rows: int  # rows of that table
    offset: int  # where this layer's addresses start
    value_dim: int
    pre_value_dim: int


def table_slots(spec: ModelSpec) -> list[TableSlot]:
    """UltraMemV2 layers (every one reads a model-level table) and PKM layers with shared values."""
    slots = [TableSlot(layer.index, sub.name, "pkm_shared", sub.config.num_keys**2, 0,
                       sub.config.value_dim or spec.hidden_size, 0)
             for layer in spec.layers for sub in layer.sublayers
             if isinstance(sub.config, PKMSpec) and sub.config.shared_values]
    return slots + _ultramem_v2_slots(spec)


def _ultramem_v2_slots(spec: ModelSpec) -> list[TableSlot]:
    memory = [(layer.index, sub) for layer in spec.layers for sub in layer.sublayers
              if isinstance(sub.config, UltraMemV2Spec)]
    ring = [(i, s) for i, s in memory if s.config.share == "ring"]
    slots = []
    block_ordinal = 0
    for index, sub in memory:
        c = sub.config
        own = c.num_keys**2
        dims = (c.value_dim, c.pre_value_dim)
        if c.share == "none":
            slots.append(TableSlot(index, sub.name, f"layer{index}_{sub.name}", own, 0, *dims))
        elif c.share == "ring":
            ordinal = next(k for k, (i, s) in enumerate(ring) if i == index and s.name == sub.name)
            slots.append(TableSlot(index, sub.name, "ring", len(ring) * own, ordinal * own, *dims))
        else:
            group, position = divmod(block_ordinal, c.share_layers)
            block_ordinal += 1
            slots.append(TableSlot(index, sub.name, f"block{group}", c.share_layers * own, position * own, *dims))
    return slots


def table_shapes(slots: list[TableSlot]) -> dict[str, tuple[int, int, int]]:
    """Table name -> (rows, value_dim, pre_value_dim); raises ValueError when sharers disagree."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for slot in slots:
        shape = (slot.rows, slot.value_dim, slot.pre_value_dim)
        if shapes.setdefault(slot.table, shape) != shape:
            raise ValueError(f"layers sharing the '{slot.table}' value table disagree on (rows, value_dim, "
                             f"pre_value_dim): {shapes[slot.table]} vs {shape} at layer {slot.layer}")
    return shapes
