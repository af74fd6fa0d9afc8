"""The TDA ops in ONNX: call nodes, model-local FunctionProtos and schema info, all from contract.py.

A graph calls `tda::SparseGatedMLP` / `tda::SelectActive`; the model carries a
FunctionProto of the same name and domain whose body is the reference
computation in standard ONNX ops, so ONNX Runtime (and TensorRT without our
plugin) runs it with no custom-op library. With the plugin, TensorRT >= 10.15
replaces the function -- but only for nodes that name the plugin namespace,
hence `plugin_namespace`/`plugin_version` on every node. The function declares
those two attributes (and the contract's) so checkers accept them on the call.

ONNX functions cannot branch on a string attribute, so a function body is
specialised to one (activation, score_norm); a model uses one activation
everywhere, and `functions_for()` refuses a graph whose nodes disagree.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .contract import (DOMAIN, NORM_FLOOR, OPS_BY_NAME, OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION,
                       SELECT_ACTIVE, SPARSE_GATED_MLP, OpSpec)

# Gelu(approximate=) needs opset 20.
BODY_OPSET = 23
PLUGIN_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
         "int32": TensorProto.INT32}


def make_node(op: OpSpec, inputs: list[str], outputs: list[str], name: str, **attrs) -> onnx.NodeProto:
    """A call of a TDA op; attribute values are checked against the contract."""
    assert len(inputs) == len(op.inputs) and len(outputs) == len(op.outputs), op.name
    attrs = op.check_attrs(attrs)
    return helper.make_node(op.name, inputs, outputs, name=name, domain=op.domain, **attrs, **PLUGIN_ATTRS)


class _Body:
    """Accumulates function-body nodes; every intermediate gets a unique local name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def __call__(self, op_type, *inputs, outputs=1, out=None, **attrs):
        names = out if out is not None else [f"_{op_type.lower()}{self._n}_{i}" for i in range(outputs)]
        names = [names] if isinstance(names, str) else names
        self._n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype):
        return self("Constant", value=helper.make_tensor(f"_c{self._n}", dtype, np.shape(value),
                                                         np.asarray(value).flatten().tolist()))


def _activation(b: _Body, name: str, x: str) -> str:
    if name == "silu":
        return b("Mul", x, b("Sigmoid", x))
    if name == "gelu_tanh":
        return b("Gelu", x, approximate="tanh")
    if name == "gelu":
        return b("Gelu", x)
    if name == "relu":
        return b("Relu", x)
    raise ValueError(name)


def _sparse_gated_mlp_body(activation: str, score_norm: str) -> list[onnx.NodeProto]:
    hidden, gate_up, down_t, idx, count, valid, scores_in = SPARSE_GATED_MLP.input_names
    output, scores_out = SPARSE_GATED_MLP.output_names
    b = _Body()
    i64 = TensorProto.INT64
    seq = b("Shape", hidden, start=1, end=2)
    width = b("Shape", hidden, start=2, end=3)
    # one fused projection: [I, 2, H] -> [2I, H] keeps gate/up of a neuron adjacent in the output
    w = b("Transpose", b("Reshape", gate_up, b("Concat", b.const([-1], i64), width, axis=0)), perm=[1, 0])
    pairs = b("Reshape", b("MatMul", hidden, w), b.const([0, 0, -1, 2], i64))
    gate, up = b("Split", pairs, axis=3, num_outputs=2, outputs=2)
    axis3 = b.const([3], i64)
    z = b("Mul", _activation(b, activation, b("Squeeze", gate, axis3)), b("Squeeze", up, axis3))  # [B,S,I] T

    # decode mask: entry k < count sets column idx[k]; padding entry k goes to spare column I + k, so the
    # scatter has no duplicate indices (TensorRT has no ScatterElements reduction) and is fully defined
    inter = b("Shape", idx, start=1, end=2)
    k = b("Range", b.const(0, i64), b("Squeeze", inter), b.const(1, i64))
    flag = b("Less", k, b("Unsqueeze", b("Cast", count, to=i64), b.const([1], i64)))
    slot = b("Where", flag, b("Cast", idx, to=i64), b("Add", k, inter))
    wide = b("Concat", b("Shape", idx, start=0, end=1), b("Add", inter, inter), axis=0)
    zeros = b("CastLike", b("ConstantOfShape", wide), hidden)
    ones = b("CastLike", b("ConstantOfShape", b("Shape", idx), value=helper.make_tensor("one", TensorProto.FLOAT,
                                                                                       [1], [1.0])), hidden)
    mask = b("Slice", b("ScatterElements", zeros, slot, ones, axis=1), b.const([0], i64), inter, b.const([1], i64))
    prefill = b("Greater", seq, b.const([1], i64))
    mask = b("Where", prefill, b("CastLike", b.const(1.0, TensorProto.FLOAT), hidden), mask)
    b("MatMul", b("Mul", z, b("Unsqueeze", mask, b.const([1], i64))), down_t, out=output)

    zf = b("Cast", z, to=TensorProto.FLOAT)
    sq = b("Mul", zf, zf)
    if score_norm == "token_l2":
        norm = b("ReduceSum", sq, b.const([-1], i64), keepdims=1)
        sq = b("Div", sq, b("Max", norm, b.const(NORM_FLOOR, TensorProto.FLOAT)))
    contrib = b("ReduceSum", b("Mul", sq, b("Unsqueeze", valid, b.const([-1], i64))), b.const([1], i64), keepdims=0)
    b("Add", scores_in, b("Where", prefill, contrib, b.const(0.0, TensorProto.FLOAT)), out=scores_out)
    return b.nodes


def _select_active_body() -> list[onnx.NodeProto]:
    scores, tau, bounds = SELECT_ACTIVE.input_names
    active_idx, active_count = SELECT_ACTIVE.output_names
    b = _Body()
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    axis1 = b.const([1], i64)
    inter = b("Shape", scores, start=1, end=2)
    m = b("ReduceMax", scores, axis1, keepdims=1)
    passes = b("Or", b("GreaterOrEqual", scores, b("Mul", b("Mul", tau, tau), m)),
               b("LessOrEqual", tau, b.const(0.0, f32)))
    passed = b("Cast", b("ReduceSum", b("Cast", passes, to=i64), axis1, keepdims=1), to=f32)  # [B, 1]
    # the clamp, in float32 like the contract: k = max(n_lo, min(c, n_hi))
    inter_f = b("Cast", inter, to=f32)
    scaled = b("Mul", bounds, inter_f)
    zero_f = b.const(0.0, f32)
    n_lo = b("Min", b("Max", b("Ceil", b("Slice", scaled, b.const([0], i64), b.const([1], i64))), zero_f), inter_f)
    n_hi = b("Min", b("Max", b("Floor", b("Slice", scaled, b.const([1], i64), b.const([2], i64))), zero_f), inter_f)
    k = b("Max", n_lo, b("Min", passed, n_hi))                                               # [B, 1]
    # rank order: TopK's sorted output breaks ties by the lower index, as the contract's rank order does;
    # Add 0 turns -0 into +0 so they tie
    order = b("TopK", b("Add", scores, zero_f), inter, axis=1, largest=1, sorted=1, outputs=2)[1]
    positions = b("Expand", b("Range", b.const(0, i64), b("Squeeze", inter), b.const(1, i64)), b("Shape", scores))
    rank = b("ScatterElements", b("ConstantOfShape", b("Shape", scores), value=helper.make_tensor("z", i64, [1], [0])),
             order, positions, axis=1)
    keep = b("Or", b("Less", b("Cast", rank, to=f32), k), b("Equal", m, zero_f))
    keep64 = b("Cast", keep, to=i64)
    b("Cast", b("ReduceSum", keep64, axis1, keepdims=0), to=TensorProto.INT32, out=active_count)
    # ascending compaction: kept neuron j goes to slot (#kept up to j) - 1, a dropped one to the spare slot
    # I + (#dropped before j) = I + j - #kept up to j; slots are unique, so no scatter reduction is needed
    kept_upto = b("CumSum", keep64, b.const(1, i64))
    slot = b("Where", keep, b("Sub", kept_upto, b.const(1, i64)), b("Add", inter, b("Sub", positions, kept_upto)))
    buf = b("ConstantOfShape", b("Concat", b("Shape", scores, start=0, end=1), b("Add", inter, inter), axis=0),
            value=helper.make_tensor("zero", i64, [1], [0]))
    filled = b("ScatterElements", buf, slot, positions, axis=1)
    b("Cast", b("Slice", filled, b.const([0], i64), inter, axis1), to=TensorProto.INT32, out=active_idx)
    return b.nodes


def function_proto(op: OpSpec, **attrs) -> onnx.FunctionProto:
    """The model-local function of `op`, its body specialised to these attribute values."""
    attrs = op.check_attrs(attrs)
    nodes = _sparse_gated_mlp_body(**attrs) if op is SPARSE_GATED_MLP else _select_active_body()
    return helper.make_function(op.domain, op.name, op.input_names, op.output_names, nodes,
                                opset_imports=[helper.make_opsetid("", BODY_OPSET)],
                                attributes=[a.name for a in op.attributes] + list(PLUGIN_ATTRS))


def functions_for(graph: onnx.GraphProto) -> list[onnx.FunctionProto]:
    """One function per TDA op the graph calls; all calls of an op must agree on their attributes."""
    seen: dict[str, dict] = {}
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        op = OPS_BY_NAME[node.op_type]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in PLUGIN_ATTRS}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        if seen.setdefault(op.name, attrs) != attrs:
            raise ValueError(f"{node.name}: {op.name} attributes {attrs} differ from another call's {seen[op.name]}; "
                             f"a model-local function can only hold one specialisation")
    return [function_proto(OPS_BY_NAME[name], **attrs) for name, attrs in seen.items()]


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid(DOMAIN, OPSET_VERSION)]


def op_schema(op: OpSpec) -> onnx.defs.OpSchema:
    """Schema info (for tools that check or document custom domains); not needed to run a model."""
    S = onnx.defs.OpSchema
    types = {"T": "T", "float32": "tensor(float)", "int32": "tensor(int32)"}

    def param(t):
        return S.FormalParameter(t.name, types[t.dtype], t.doc)

    attrs = [S.Attribute(a.name, helper.make_attribute(a.name, a.default), a.doc) for a in op.attributes]
    attrs += [S.Attribute(k, helper.make_attribute(k, v), "TensorRT plugin lookup") for k, v in PLUGIN_ATTRS.items()]
    return S(op.name, op.domain, op.version, op.doc, inputs=[param(t) for t in op.inputs],
             outputs=[param(t) for t in op.outputs],
             type_constraints=[("T", [f"tensor({_onnx_type_name(d)})" for d in op.type_constraint], "float type")],
             attributes=attrs)


def _onnx_type_name(dtype: str) -> str:
    return {"float32": "float", "float16": "float16", "bfloat16": "bfloat16"}[dtype]


def tensor_type(dtype: str, compute: str) -> int:
    """ONNX element type of a contract dtype ("T" resolves to the compute dtype)."""
    return _ELEM[compute if dtype == "T" else dtype]
