"""Eager ``nn.Module`` -> ``torch.fx.GraphModule`` with ultraplan annotations in ``node.meta``.

The model is traced with every function of ``ops.py`` as a leaf, so each op is one node.
Then each node gets:

- ``ultraplan.op``: the op kind (``linear``, ``rope``, ...; ``input``, ``param``, ``output``);
- ``ultraplan.attrs``: the op's non-tensor arguments by name (``eps``, ``num_heads``, ...);
- ``ultraplan.param``: for parameter nodes, a ``ParamInfo`` (canonical name, shape, init rule);
- ``ultraplan.shape``: a tuple of sympy expressions in ``B`` and ``T``;
- ``ultraplan.dtype``: ``float32`` or ``int64``;
- ``ultraplan.layer``: the module path that produced it (``layers.0.attention``), for grouping;
- ``ultraplan.component``: the sublayer kind it belongs to (``attention``, ``moe``, ``embedding``);
- ``ultraplan.differentiable``: whether a gradient flows back through the value;

and a readable name made of that module path and the label the component gave the value.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from . import ops
from .build import DecoderModel, TrainingGraph, init_rules, optimizer_groups, state_rules
from .shapes import NON_DIFFERENTIABLE, SHAPE_RULES, B, Shape, T, result_dtype

OPS = {name: fn for name, fn in vars(ops).items() if inspect.isfunction(fn) and fn.__module__ == ops.__name__}


@dataclass(frozen=True)
class ParamInfo:
    """A parameter as the plan sees it."""

    name: str
    shape: tuple[int, ...]
    init: str
    std: float
    group: str = "default"  # optimizer group: "default", or "values" for memory value tables


@dataclass(frozen=True)
class BufferInfo:
    """Non-parameter state: ``init`` is ``permutation`` (seeded by name) or ``derived``, recomputed
    as ``op(source)`` from a parameter at start and after every optimizer step."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    init: str
    op: str = ""
    source: str = ""


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_modules=(ops,))


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs of an op node in call order, repeats kept.

    Use this, not ``node.all_input_nodes``: fx de-duplicates that list, so ``ops.add(x, x)``
    would show one input and lose an argument in shapes, costs, SBP and the emitted call.
    Every op in ``ops.py`` takes its tensors positionally, before any attribute.
    """
    return [a for a in node.args if isinstance(a, fx.Node)]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^model\.?", "", path)


MODEL_LEVEL_COMPONENTS = {"embed": "embedding", "lm_head": "lm_head", "final_norm": "norm"}


def _component(node: fx.Node) -> str:
    """The sublayer kind a node belongs to (``attention``, ``moe``, ...), for per-component reports.

    The outermost module on the stack that declares ``component`` wins, so a sublayer's norm
    counts with its sublayer; model-level nodes are named by their module path.
    """
    for _, cls in (node.meta.get("nn_module_stack") or {}).values():
        kind = getattr(cls, "component", None)
        if kind:
            return kind
    path = _module_path(node) or (re.sub(r"^model\.", "", node.target) if node.op == "get_attr" else "")
    return MODEL_LEVEL_COMPONENTS.get(path.split(".")[0], "model")


def _rename(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            base = re.sub(r"^model\.", "", node.target)
        elif node.op == "call_function":
            label = node.meta.get("ultraplan.label", node.target.__name__)
            base = ".".join(p for p in (node.meta["ultraplan.layer"], label) if p)
        else:
            continue
        node._rename(re.sub(r"\W", "_", base))


def lower(model: DecoderModel, *, mode: str = "train") -> fx.GraphModule:
    """Trace ``model`` (with its loss when ``mode == 'train'``) and annotate every node."""
    root: torch.nn.Module = TrainingGraph(model) if mode == "train" else model
    tracer = _Tracer()
    graph = tracer.trace(root)
    graph.eliminate_dead_code()  # e.g. MoE balance losses in an inference graph: nothing reads them
    gm = fx.GraphModule(root, graph, root.__class__.__name__)
    rules = init_rules(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    groups = optimizer_groups(model)
    state = state_rules(model)
    for node in gm.graph.nodes:
        node.meta["ultraplan.layer"] = _module_path(node)
        node.meta["ultraplan.component"] = _component(node)
        if node.op == "placeholder":
            node.meta.update({"ultraplan.op": "input", "ultraplan.attrs": {},
                              "ultraplan.shape": (B, T), "ultraplan.dtype": "int64"})
        elif node.op == "get_attr" and re.sub(r"^model\.", "", node.target) in buffers:
            name = re.sub(r"^model\.", "", node.target)
            buffer = buffers[name]
            shape = tuple(int(s) for s in buffer.shape)
            dtype = str(buffer.dtype).removeprefix("torch.")
            node.meta.update({"ultraplan.op": "buffer", "ultraplan.attrs": {},
                              "ultraplan.buffer": BufferInfo(name, shape, dtype, *state[name]),
                              "ultraplan.shape": tuple(sympy.Integer(s) for s in shape),
                              "ultraplan.dtype": dtype})
        elif node.op == "get_attr":
            name = re.sub(r"^model\.", "", node.target)
            rule = rules[name]
            shape = tuple(int(s) for s in params[name].shape)
            node.meta.update({"ultraplan.op": "param", "ultraplan.attrs": {},
                              "ultraplan.param": ParamInfo(name, shape, rule.kind, rule.std, groups[name]),
                              "ultraplan.shape": tuple(sympy.Integer(s) for s in shape),
                              "ultraplan.dtype": "float32"})
        elif node.op == "call_function":
            op = node.target.__name__
            if OPS.get(op) is not node.target:
                raise NotImplementedError(f"lowering met {node.target} outside ops.py in {node.meta['ultraplan.layer']}")
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            attrs = {k: v for k, v in bound.arguments.items() if not isinstance(v, fx.Node)}
            if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                raise NotImplementedError(f"{op} in {node.meta['ultraplan.layer']}: pass tensors positionally")
            in_shapes: list[Shape] = [a.meta["ultraplan.shape"] for a in tensor_args(node)]
            in_dtypes = [a.meta["ultraplan.dtype"] for a in tensor_args(node)]
            node.meta.update({"ultraplan.op": op, "ultraplan.attrs": attrs,
                              "ultraplan.shape": SHAPE_RULES[op](in_shapes, attrs),
                              "ultraplan.dtype": result_dtype(op, in_dtypes)})
        elif node.op == "output":
            node.meta.update({"ultraplan.op": "output", "ultraplan.attrs": {},
                              "ultraplan.shape": node.args[0].meta["ultraplan.shape"], "ultraplan.dtype": "float32"})
        else:
            raise NotImplementedError(f"unexpected fx node {node.op} {node.target}")
    for node in gm.graph.nodes:  # does a gradient flow through this value (to a parameter)?
        if node.op == "get_attr":
            node.meta["ultraplan.differentiable"] = node.meta["ultraplan.op"] == "param"
        elif node.op == "call_function":
            node.meta["ultraplan.differentiable"] = node.meta["ultraplan.op"] not in NON_DIFFERENTIABLE and any(
                a.meta["ultraplan.differentiable"] for a in tensor_args(node))
        else:
            node.meta["ultraplan.differentiable"] = False
    for node in gm.graph.nodes:  # model-level ops (the embedding lookup, the LM head) go with their weight
        params = [a for a in tensor_args(node) if a.op == "get_attr"] if node.op == "call_function" else []
        if node.meta["ultraplan.component"] == "model" and params:
            node.meta["ultraplan.component"] = params[0].meta["ultraplan.component"]
    _rename(gm)
    gm.recompile()
    return gm
