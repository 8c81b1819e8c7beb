"""Eager ``nn.Module`` -> ``torch.fx.GraphModule`` with one ``NodeInfo`` per node in ``node.meta``.

The model is traced with every function of ``ops.py`` as a leaf, so each op is one node. Each node
then gets its record (``node_info.py``): op kind (an op-table key, or ``input``, ``param``,
``buffer``, ``output``), non-tensor arguments, symbolic shape in ``B`` and ``T`` (the op table's
shape rule), dtype, module path, component, the parameter or buffer it reads, whether a gradient
flows through it, and whether it is a value of the residual stream; and a readable name made of
that module path and the label the component gave the value.
"""

from __future__ import annotations

import inspect
import re

import sympy
import torch
from torch import fx

# A GraphModule that writes its Python code only when someone reads or runs it: planning mutates the
# graph in several passes and never runs it, and each eager recompile of an 8B graph's 800 nodes
# costs a tenth of a second (torch/fx/_lazy_graph_module.py, the class inductor uses for the same reason).
from torch.fx._lazy_graph_module import _LazyGraphModule

from . import ops
from .build import DecoderModel, TrainingGraph, init_rules, optimizer_groups, state_rules
from .node_info import BufferInfo, NodeInfo, ParamInfo, info
from .op_table import OP_TABLE
from .shapes import B, Shape, T

__all__ = ["BufferInfo", "ParamInfo", "lower", "tensor_args"]

# labels components give the residual stream's values: the embedding's output, each sublayer's
# residual add, an add delivering a skip-layer's output (strategies pin how the stream is laid out)
STREAM_LABELS = {"x", "residual", "delivered"}


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_modules=(ops,))
        self._names: tuple[dict[int, str], dict[int, str]] | None = None

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx.Tracer.getattr by a name table: torch's scans ``named_parameters()`` on every access,
        quadratic in the parameters (most of lowering a 120B model's 500 of them)."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._names is None:
            self._names = ({id(p): n for n, p in self.root.named_parameters()},
                           {id(b): n for n, b in self.root.named_buffers()})
        params, buffers = self._names
        name = params.get(id(attr_val)) if isinstance(attr_val, torch.nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


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


MODEL_LEVEL_COMPONENTS = {"embed": "embedding", "pos_embed": "position_embedding", "lm_head": "lm_head",
                          "final_norm": "norm"}


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
            base = ".".join(p for p in (info(node).layer, info(node).label or node.target.__name__) if p)
        else:
            continue
        node._rename(re.sub(r"\W", "_", base))


def lower(model: DecoderModel, *, mode: str = "train") -> fx.GraphModule:
    """Trace ``model`` (with its loss when ``mode == 'train'``) and annotate every node."""
    root: torch.nn.Module = TrainingGraph(model) if mode == "train" else model
    tracer = _Tracer()
    graph = tracer.trace(root)
    graph.eliminate_dead_code()  # e.g. MoE balance losses in an inference graph: nothing reads them
    gm = _LazyGraphModule(root, graph, root.__class__.__name__)
    rules = init_rules(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    groups = optimizer_groups(model)
    state = state_rules(model)
    for node in gm.graph.nodes:
        node.meta["ultraplan"] = _record(node, rules, params, buffers, groups, state)
    for node in gm.graph.nodes:  # does a gradient flow through this value (to a parameter)?
        record = info(node)
        if node.op == "get_attr":
            record.differentiable = record.op == "param"
        elif node.op == "call_function":
            record.differentiable = OP_TABLE[record.op].differentiable and any(
                info(a).differentiable for a in tensor_args(node))
    for node in gm.graph.nodes:  # model-level ops (the embedding lookup, the LM head) go with their weight
        weights = [a for a in tensor_args(node) if a.op == "get_attr"] if node.op == "call_function" else []
        if info(node).component == "model" and weights:
            info(node).component = info(weights[0]).component
    _rename(gm)
    gm.recompile()
    return gm


def _record(node: fx.Node, rules, params, buffers, groups, state) -> NodeInfo:
    layer, component = _module_path(node), _component(node)
    label = node.meta.pop("ultraplan.label", "")
    where = {"layer": layer, "component": component, "label": label}
    if node.op == "placeholder":
        return NodeInfo("input", {}, (B, T), "int64", **where)
    if node.op == "get_attr":
        name = re.sub(r"^model\.", "", node.target)
        if name in buffers:
            buffer = buffers[name]
            shape = tuple(int(s) for s in buffer.shape)
            dtype = str(buffer.dtype).removeprefix("torch.")
            return NodeInfo("buffer", {}, tuple(sympy.Integer(s) for s in shape), dtype,
                            buffer=BufferInfo(name, shape, dtype, *state[name]), **where)
        rule = rules[name]
        shape = tuple(int(s) for s in params[name].shape)
        return NodeInfo("param", {}, tuple(sympy.Integer(s) for s in shape), "float32",
                        param=ParamInfo(name, shape, rule.kind, rule.std, groups[name]), **where)
    if node.op == "call_function":
        op = node.target.__name__
        record = OP_TABLE.get(op)
        if record is None or record.fn is not node.target:
            raise NotImplementedError(f"lowering met {node.target} outside the op table in {layer}")
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        attrs = {k: v for k, v in bound.arguments.items() if not isinstance(v, fx.Node)}
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            raise NotImplementedError(f"{op} in {layer}: pass tensors positionally")
        in_shapes: list[Shape] = [info(a).shape for a in tensor_args(node)]
        in_dtypes = [info(a).dtype for a in tensor_args(node)]
        return NodeInfo(op, attrs, record.shape(in_shapes, attrs), record.result_dtype(in_dtypes),
                        stream=label.rsplit(".", 1)[-1] in STREAM_LABELS, **where)
    if node.op == "output":
        return NodeInfo("output", {}, info(node.args[0]).shape, "float32", **where)
    raise NotImplementedError(f"unexpected fx node {node.op} {node.target}")
