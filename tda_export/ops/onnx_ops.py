"""The TDA ops in ONNX: call nodes, model-local FunctionProtos and schema info, all from contract.py.

A graph calls `tda::SparseGatedMLP` / `tda::SelectActive`; the model carries a
FunctionProto of the same name and domain whose body is the reference
computation in standard ONNX ops, so ONNX Runtime (and TensorRT without our
plugin) runs it with no custom-op library. With the plugin, TensorRT >= 10.15
replaces the function -- but only for nodes that name the plugin namespace,
hence `plugin_namespace`/`plugin_version` on every node. The function declares
those two attributes (and the contract's) so checkers accept them on the call.

ONNX functions cannot branch on a string attribute, so a function body is
specialised to one (activation, score_norm, weight_format, down_weight_format, x_format);
a model uses one activation and one pair of weight formats in every MLP, and `functions_for()` refuses a
graph whose nodes disagree. With a block weight_format the body dequantizes the
uint8 blocks (fp16 fields decoded from their bits: opset 23 has no bit cast)
and runs the float computation on float32 weights; x_format q8_0 fake-quantizes
x for gate/up first (quantize_x_nodes, shared with the exporter's dense linears).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .contract import (BLOCK_FORMATS, DOMAIN, DTYPES, NORM_FLOOR, OPS_BY_NAME, OPSET_VERSION, PLUGIN_NAMESPACE,
                       PLUGIN_VERSION, QUANT_BLOCK, QUANTIZED_WEIGHTS, SELECT_ACTIVE, SPARSE_GATED_MLP, OpSpec,
                       down_format, x_format_check)

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


def _fp16_field(b: _Body, flat: str, first: int) -> str:
    """Bytes first, first + 1 of each row of uint8 [n, block_bytes]: a little-endian IEEE binary16, as float32
    [n, 1], exactly (ONNX has no uint8 -> float16 bit cast): sign, exponent and mantissa bits by BitShift and
    BitwiseAnd, then (implicit + mantissa) * 2^(exponent - 25), both factors from 32-entry tables."""
    u8, f32, i64 = TensorProto.UINT8, TensorProto.FLOAT, TensorProto.INT64
    lo = b("Slice", flat, b.const([first], i64), b.const([first + 1], i64), b.const([1], i64))
    hi = b("Slice", flat, b.const([first + 1], i64), b.const([first + 2], i64), b.const([1], i64))
    right = dict(direction="RIGHT")
    exponent = b("Cast", b("BitwiseAnd", b("BitShift", hi, b.const([2], u8), **right), b.const([31], u8)), to=i64)
    mantissa = b("Add", b("Mul", b("Cast", b("BitwiseAnd", hi, b.const([3], u8)), to=f32), b.const([256.0], f32)),
                 b("Cast", lo, to=f32))
    scale = [2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 31)] + [float("inf")]  # e = 31: inf/NaN, excluded
    implicit = b("Gather", b.const([0.0] + [1024.0] * 31, f32), exponent)
    magnitude = b("Mul", b("Add", implicit, mantissa), b("Gather", b.const(scale, f32), exponent))
    sign = b("Cast", b("BitShift", hi, b.const([7], u8), **right), to=f32)
    return b("Mul", magnitude, b("Sub", b.const([1.0], f32), b("Add", sign, sign)))


def dequantize_blocks(b, weight_format: str, blocks: str, width: str) -> str:
    """uint8 [..., H/32*block_bytes] -> float32 [rows, H] (width: [1] int64 H): the contract's dequantize,
    exactly (every step is exact in float32 but the last product or sum, which rounds as the contract's).
    b builds the nodes: a function body's _Body here, or anything with its interface (b(op_type, *inputs,
    **attrs) -> output name, b.const(value, onnx_type) -> name): the exporter's dense linears and embedding
    dequantize with this same builder (export/decoder.py)."""
    u8, f32, i64 = TensorProto.UINT8, TensorProto.FLOAT, TensorProto.INT64
    size = BLOCK_FORMATS[weight_format].block_bytes
    flat = b("Reshape", blocks, b.const([-1, size], i64))
    d = _fp16_field(b, flat, 0)
    qs = b("Slice", flat, b.const([4 if weight_format == "q4_1" else 2], i64), b.const([size], i64),
           b.const([1], i64))
    if weight_format == "q8_0":  # int8 = byte - 256 * sign bit
        q = b("Sub", b("Cast", qs, to=f32),
              b("Mul", b("Cast", b("BitShift", qs, b.const([7], u8), direction="RIGHT"), to=f32),
                b.const([256.0], f32)))
        w = b("Mul", d, q)
    else:  # weight k in the low nibble of byte k, weight k + 16 in its high nibble
        q = b("Cast", b("Concat", b("BitwiseAnd", qs, b.const([15], u8)),
                        b("BitShift", qs, b.const([4], u8), direction="RIGHT"), axis=1), to=f32)
        w = (b("Mul", d, b("Sub", q, b.const([8.0], f32))) if weight_format == "q4_0"
             else b("Add", b("Mul", d, q), _fp16_field(b, flat, 2)))
    return b("Reshape", w, b("Concat", b.const([-1], i64), width, axis=0))


def quantize_x_nodes(b, x: str, width: str | int) -> str:
    """contract X_QUANT_SEMANTICS (x_format q8_0) in standard ONNX ops: x float32 [..., H] (any rank >= 1, any
    leading size, 0 too) -> float32 xq [..., H], equal to ops/blocks.quantize_x bit for bit. width: H, as an
    int or the name of a [1] int64 tensor; a multiple of 32. b builds the nodes, with dequantize_blocks's
    interface (b(op_type, *inputs, **attrs) -> output name, b.const(value, onnx_type) -> name): the function
    body's gate/up input here, every block-format linear's input in the exporter (export/decoder.py).
    Per block of 32: d = max|x| / 127 (0 below the smallest normal float32), q = Round(x * (d == 0 ? 0 : 1 / d)) (Round is half to even),
    xq = q * d, all float32; a block holding inf/NaN gets d = NaN (IsInf/IsNaN, ReduceMax over the block)."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    if isinstance(width, int):
        if width % QUANT_BLOCK:
            raise ValueError(f"x_format q8_0 needs rows of a multiple of {QUANT_BLOCK} values, got {width}")
        n_blocks = b.const([width // QUANT_BLOCK], i64)
    else:
        n_blocks = b("Div", width, b.const([QUANT_BLOCK], i64))
    # [..., H/32, 32] with every size spelled out: Reshape's -1 is undefined when a leading size is 0
    blk = b("Reshape", x, b("Concat", b("Shape", x, end=-1), n_blocks, b.const([QUANT_BLOCK], i64), axis=0))
    axis = b.const([-1], i64)
    bad = b("Cast", b("ReduceMax", b("Cast", b("Or", b("IsInf", blk), b("IsNaN", blk)), to=f32), axis,
                      keepdims=1), to=TensorProto.BOOL)                                 # [..., H/32, 1]
    # a is only used where the block is finite, so ReduceMax's NaN handling does not matter
    d = b("Div", b("ReduceMax", b("Abs", blk), axis, keepdims=1), b.const(127.0, f32))
    zero = b.const(0.0, f32)
    # d below the smallest normal float32 (0 included): a zero block, so 1/d is always finite
    d = b("Where", b("Less", d, b.const(float(np.finfo(np.float32).tiny), f32)), zero, d)
    inv = b("Where", b("Equal", d, zero), zero, b("Div", b.const(1.0, f32), d))  # 1/0 = inf is never taken
    q = b("Round", b("Mul", blk, inv))
    xq = b("Mul", q, b("Where", bad, b.const(float("nan"), f32), d))
    return b("Reshape", xq, b("Shape", x))


def _sparse_gated_mlp_body(activation: str, score_norm: str, weight_format: str,
                           down_weight_format: str = "same", x_format: str = "dtype") -> list[onnx.NodeProto]:
    down = down_format(weight_format, down_weight_format)  # ValueError for a pair outside the contract
    x_format_check(weight_format, x_format)                # q8_0 only under a block weight_format
    hidden, gate_up, down_t, idx, count, valid, scores_in = SPARSE_GATED_MLP.input_names
    output, scores_out = SPARSE_GATED_MLP.output_names
    b = _Body()
    i64 = TensorProto.INT64
    seq = b("Shape", hidden, start=1, end=2)
    width = b("Shape", hidden, start=2, end=3)
    x = hidden
    if weight_format != "dtype":  # the float op on the blocks' float32 values: x widened, z rounded to T below
        x = b("Cast", hidden, to=TensorProto.FLOAT)
        if x_format == "q8_0":  # gate/up read xq; z, down and the scores are unchanged
            x = quantize_x_nodes(b, x, width)
        gate_up = dequantize_blocks(b, weight_format, gate_up, width)
        down_t = dequantize_blocks(b, down, down_t, width)
    # one fused projection: [I, 2, H] -> [2I, H] keeps gate/up of a neuron adjacent in the output
    w = b("Transpose", b("Reshape", gate_up, b("Concat", b.const([-1], i64), width, axis=0)), perm=[1, 0])
    inter = b("Shape", idx, start=1, end=2)
    # [B, S, 2I] -> [B, S, I, 2] with every size spelled out: -1 is undefined when B or S is 0
    pairs = b("Reshape", b("MatMul", x, w), b("Concat", b("Shape", x, start=0, end=2), inter, b.const([2], i64),
                                                   axis=0))
    gate, up = b("Split", pairs, axis=3, num_outputs=2, outputs=2)
    axis3 = b.const([3], i64)
    z = b("Mul", _activation(b, activation, b("Squeeze", gate, axis3)), b("Squeeze", up, axis3))  # [B,S,I] T/f32
    z_t = z if weight_format == "dtype" else b("CastLike", z, hidden)

    # decode mask: entry k < count sets column idx[k]; padding entry k goes to spare column I + k, so the
    # scatter has no duplicate indices (TensorRT has no ScatterElements reduction) and is fully defined
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
    masked = b("Mul", z_t, b("Unsqueeze", mask, b.const([1], i64)))
    if weight_format == "dtype":
        b("MatMul", masked, down_t, out=output)
    else:
        b("CastLike", b("MatMul", b("Cast", masked, to=TensorProto.FLOAT), down_t), hidden, out=output)

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
    # weights that may be blocks (weight_format): T or uint8, type W
    blocked = {t.name for t in QUANTIZED_WEIGHTS} if "weight_format" in {a.name for a in op.attributes} else set()

    def param(t):
        return S.FormalParameter(t.name, "W" if t.name in blocked else types[t.dtype], t.doc)

    attrs = [S.Attribute(a.name, helper.make_attribute(a.name, a.default), a.doc) for a in op.attributes]
    attrs += [S.Attribute(k, helper.make_attribute(k, v), "TensorRT plugin lookup") for k, v in PLUGIN_ATTRS.items()]
    return S(op.name, op.domain, op.version, op.doc, inputs=[param(t) for t in op.inputs],
             outputs=[param(t) for t in op.outputs],
             type_constraints=[("T", [f"tensor({_onnx_type_name(d)})" for d in op.type_constraint], "float type")]
             + ([("W", [f"tensor({_onnx_type_name(d)})" for d in DTYPES] + ["tensor(uint8)"],
                  "weights: T (weight_format dtype) or uint8 blocks")] if blocked else []),
             attributes=attrs)


def _onnx_type_name(dtype: str) -> str:
    return {"float32": "float", "float16": "float16", "bfloat16": "bfloat16"}[dtype]


def tensor_type(dtype: str, compute: str) -> int:
    """ONNX element type of a contract dtype ("T" resolves to the compute dtype)."""
    return _ELEM[compute if dtype == "T" else dtype]
