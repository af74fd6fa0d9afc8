"""The model-local ONNX functions, each alone in ONNX Runtime, against the numpy reference."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tda_export.ops import blocks, onnx_ops, reference
from tda_export.ops.contract import (ACTIVATIONS, BLOCK_FORMATS, PLUGIN_NAMESPACE, QUANTIZED_WEIGHTS, SCORE_NORMS,
                                     SELECT_ACTIVE, SPARSE_GATED_MLP)
from tda_export.ops.onnx_ops import BODY_OPSET, functions_for, make_node, op_schema, opset_imports, tensor_type

from op_cases import (QH, QI, any_blocks, bound_cases, masks, mlp_inputs, poison_x, quant_mlp_inputs, same_floats,
                      score_cases, x_cases)

NP = {"float32": np.float32, "float16": np.float16}


def _model(op, compute, **attrs):
    ins = [helper.make_tensor_value_info(t.name, tensor_type(t.dtype, compute), t.shape) for t in op.inputs]
    outs = [helper.make_tensor_value_info(t.name, tensor_type(t.dtype, compute), t.shape) for t in op.outputs]
    graph = helper.make_graph([make_node(op, op.input_names, op.output_names, "n0", **attrs)], "g", ins, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", BODY_OPSET)] + opset_imports(),
                              functions=functions_for(graph))
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def test_nodes_name_the_plugin_namespace():
    node = _model(SELECT_ACTIVE, "float32").graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and node.domain == SELECT_ACTIVE.domain


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("norm", SCORE_NORMS)
def test_sparse_gated_mlp_prefill(act, norm):
    rng = np.random.default_rng(0)
    hidden, gu, dt, valid, sin = mlp_inputs(rng, 2, 5)
    idx, cnt = masks(rng)[4][1:]
    args = (hidden, gu, dt, idx[:2], cnt[:2], valid, sin)
    out, scores = _session(_model(SPARSE_GATED_MLP, "float32", activation=act, score_norm=norm)).run(
        None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
    ref_out, ref_scores = reference.sparse_gated_mlp(*args, activation=act, score_norm=norm)
    assert _rel(out, ref_out) < 1e-5 and _rel(scores, ref_scores) < 1e-5


@pytest.mark.parametrize("compute,tol", [("float32", 1e-5), ("float16", 5e-3)])
def test_sparse_gated_mlp_decode_masks(compute, tol):
    rng = np.random.default_rng(1)
    sess = _session(_model(SPARSE_GATED_MLP, compute, activation="gelu_tanh"))
    for name, idx, cnt in masks(rng):
        hidden, gu, dt, valid, sin = mlp_inputs(rng, 3, 1, NP[compute])
        args = (hidden, gu, dt, idx, cnt, valid, sin)
        out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
        ref_out, _ = reference.sparse_gated_mlp(*args, activation="gelu_tanh")
        assert out.dtype == NP[compute] and scores.dtype == np.float32
        assert _rel(out.astype(np.float64), ref_out) < tol or (name == "empty" and not out.any()), name
        np.testing.assert_array_equal(scores, sin)


def test_select_active_exact():
    rng = np.random.default_rng(3)
    sess = _session(_model(SELECT_ACTIVE, "float32"))
    for scores, tau in score_cases(rng):
        idx, cnt = sess.run(None, {"scores": scores, "threshold": np.array(tau, np.float32),
                                   "density_bounds": np.array([0.0, 1.0], np.float32)})
        ref_idx, ref_cnt = reference.select_active(scores, tau)
        assert idx.dtype == np.int32 and cnt.dtype == np.int32
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"tau={tau}")
        np.testing.assert_array_equal(cnt, ref_cnt, err_msg=f"tau={tau}")


def test_select_active_clamp_exact():
    sess = _session(_model(SELECT_ACTIVE, "float32"))
    for scores, tau, bounds in bound_cases(np.random.default_rng(5)):
        idx, cnt = sess.run(None, {"scores": scores, "threshold": np.array(tau, np.float32),
                                   "density_bounds": np.array(bounds, np.float32)})
        ref_idx, ref_cnt = reference.select_active(scores, tau, bounds)
        np.testing.assert_array_equal(idx, ref_idx, err_msg=f"tau={tau} bounds={bounds}")
        np.testing.assert_array_equal(cnt, ref_cnt, err_msg=f"tau={tau} bounds={bounds}")


def test_mixed_specialisations_refused():
    a = make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o1", "s1"], "a", activation="silu")
    b = make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o2", "s2"], "b", activation="relu")
    with pytest.raises(ValueError, match="differ"):
        functions_for(helper.make_graph([a, b], "g", [], []))


def test_bad_attribute_named():
    with pytest.raises(ValueError, match="activation"):
        make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o", "s"], "n", activation="tanh")


def test_schema_from_contract():
    for op in (SPARSE_GATED_MLP, SELECT_ACTIVE):
        s = op_schema(op)
        assert [i.name for i in s.inputs] == op.input_names and [o.name for o in s.outputs] == op.output_names
        assert {"plugin_namespace", "plugin_version"} <= set(s.attributes)


# ---- block-quantized weights (weight_format) ----

def _quant_model(fmt, compute="float32", **attrs):
    """A one-node model whose weight inputs are uint8 blocks (contract.QUANTIZED_WEIGHTS)."""
    blocked = {t.name: t for t in QUANTIZED_WEIGHTS}
    ins = [helper.make_tensor_value_info(t.name, TensorProto.UINT8, blocked[t.name].shape) if t.name in blocked
           else helper.make_tensor_value_info(t.name, tensor_type(t.dtype, compute), t.shape)
           for t in SPARSE_GATED_MLP.inputs]
    outs = [helper.make_tensor_value_info(t.name, tensor_type(t.dtype, compute), t.shape)
            for t in SPARSE_GATED_MLP.outputs]
    graph = helper.make_graph([make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names,
                                         SPARSE_GATED_MLP.output_names, "n0", weight_format=fmt, **attrs)],
                              "g", ins, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", BODY_OPSET)] + opset_imports(),
                              functions=functions_for(graph))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_function_dequantizes_bit_for_bit(fmt):
    """The function's dequantization alone (fp16 fields decoded from their bits) on arbitrary blocks, zero, -0,
    subnormal and fp16-max scales among them: the contract's float32 values, bit for bit."""
    raw = any_blocks(np.random.default_rng(6), fmt, 400).reshape(100, 4 * BLOCK_FORMATS[fmt].block_bytes)
    body = onnx_ops._Body()
    width = body.const([128], TensorProto.INT64)
    body("Identity", onnx_ops.dequantize_blocks(body, fmt, "blocks", width), out="w")
    graph = helper.make_graph(body.nodes, "g", [helper.make_tensor_value_info("blocks", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", BODY_OPSET)])
    (got,) = _session(model).run(None, {"blocks": raw})
    want = blocks.dequantize(fmt, raw)
    assert got.shape == (100, 128)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("seq", [5, 1], ids=["prefill", "decode"])
def test_block_weights_match_reference_of_dequantized(fmt, seq):
    """ONNX Runtime runs the quantized op as the fp64 reference on the dequantized weights, for every mask and
    batch 0, 1 and 4."""
    sess = _session(_quant_model(fmt, activation="gelu_tanh"))
    for batch in (0, 1, 4):
        rng = np.random.default_rng(batch * 10 + seq)
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, fmt, batch, seq)
        for name, idx, cnt in masks(rng, batch, QI):
            args = (hidden, gu, dt, idx, cnt, valid, sin)
            out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
            ref_out, ref_scores = reference.sparse_gated_mlp_blocks(hidden, gu, dt, fmt, idx, cnt, valid, sin,
                                                                    activation="gelu_tanh")
            what = f"{fmt} batch {batch} {name}"
            assert out.shape == (batch, seq, QH) and out.dtype == np.float32 and scores.shape == (batch, QI), what
            np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * max(np.abs(ref_out).max(initial=0), 1),
                                       err_msg=what)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7, err_msg=what)
            if batch and not (seq == 1 and name == "empty"):
                assert _rel(out, ref_out) < 1e-5, what
            if seq == 1 and name == "empty":
                assert not out.any(), what


@pytest.mark.parametrize("fmt,down", [("q4_1", "q8_0"), ("q4_0", "q8_0")])
def test_block_weights_with_a_down_format_of_their_own(fmt, down):
    """down_weight_format: the function dequantizes down_weight_t in its own format (prefill and decode)."""
    sess = _session(_quant_model(fmt, down_weight_format=down))
    rng = np.random.default_rng(11)
    for seq in (5, 1):
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, fmt, 3, seq, down_format=down)
        idx, cnt = masks(rng, 3, QI)[4][1:]
        args = (hidden, gu, dt, idx, cnt, valid, sin)
        out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
        ref_out, ref_scores = reference.sparse_gated_mlp_blocks(*args[:3], fmt, *args[3:], down_weight_format=down)
        assert _rel(out, ref_out) < 1e-5 and _rel(scores, ref_scores) < 1e-5, seq
    with pytest.raises(ValueError, match="needs a block weight_format"):
        _quant_model("dtype", down_weight_format=down)


@pytest.mark.parametrize("norm", SCORE_NORMS)
def test_block_weights_float16_activations(norm):
    """T = float16: x widened to float32 against the float32 weights (never the weights rounded to T)."""
    sess = _session(_quant_model("q4_1", "float16", score_norm=norm))
    rng = np.random.default_rng(2)
    for seq in (4, 1):
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q4_1", 3, seq, np.float16)
        idx, cnt = masks(rng, 3, QI)[4][1:]
        args = (hidden, gu, dt, idx, cnt, valid, sin)
        out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
        ref_out, ref_scores = reference.sparse_gated_mlp_blocks(*args[:3], "q4_1", *args[3:], score_norm=norm)
        assert out.dtype == np.float16 and scores.dtype == np.float32
        assert _rel(out.astype(np.float64), ref_out) < 5e-3 and _rel(scores, ref_scores) < 1e-5


def test_schema_takes_uint8_weights():
    s = op_schema(SPARSE_GATED_MLP)
    types = {c.type_param_str: set(c.allowed_type_strs) for c in s.type_constraints}
    assert "tensor(uint8)" in types["W"] and "tensor(uint8)" not in types["T"]
    assert {p.name: p.type_str for p in s.inputs if p.type_str == "W"}.keys() == {t.name for t in QUANTIZED_WEIGHTS}
    assert "weight_format" in s.attributes


def test_mixed_weight_formats_refused():
    a = make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o1", "s1"], "a", weight_format="q4_0")
    b = make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o2", "s2"], "b")
    with pytest.raises(ValueError, match="differ"):
        functions_for(helper.make_graph([a, b], "g", [], []))


# ---- q8_0 activations (x_format) ----

def _quantize_x_session(rank: int, width):
    """A graph made only of quantize_x_nodes (width: an int, or a list for a [1] int64 tensor input of H)."""
    body = onnx_ops._Body()
    w = width if isinstance(width, int) else body.const(width, TensorProto.INT64)
    body("Identity", onnx_ops.quantize_x_nodes(body, "x", w), out="xq")
    graph = helper.make_graph(body.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)],
                              [helper.make_tensor_value_info("xq", TensorProto.FLOAT, [None] * rank)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", BODY_OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return _session(model)


def test_quantize_x_nodes_bit_for_bit():
    """ONNX Runtime's quantize_x_nodes against blocks.quantize_x: random blocks, zero, tiny, huge, halves (Round
    ties to even), 1/d overflow and inf/NaN blocks; ranks 1 to 3, 0 rows; H as an int or a tensor."""
    x = x_cases(np.random.default_rng(20))
    want = blocks.quantize_x(x)
    assert np.isnan(want).any() and np.isinf(want).any() and (want == 0).any()  # the edge blocks are there
    for shape in ((24, 256), (6, 4, 256), (24 * 256,)):
        h = shape[-1]
        for width in (h, [h]):
            (got,) = _quantize_x_session(len(shape), width).run(None, {"x": x.reshape(shape)})
            assert got.dtype == np.float32 and same_floats(got, want.reshape(shape)), (shape, width)
    (got,) = _quantize_x_session(3, 64).run(None, {"x": np.zeros((0, 3, 64), np.float32)})
    assert got.shape == (0, 3, 64)
    with pytest.raises(ValueError, match="multiple of 32 values, got 48"):
        onnx_ops.quantize_x_nodes(onnx_ops._Body(), "x", 48)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("seq", [5, 1], ids=["prefill", "decode"])
def test_x_format_q8_0_matches_reference(fmt, seq):
    """x_format q8_0: the function's gate/up read the fake-quantized x; the fp64 reference of the same xq and
    dequantized weights, every mask kind, batch 0, 1 and 3."""
    sess = _session(_quant_model(fmt, activation="gelu_tanh", x_format="q8_0"))
    for batch in (0, 1, 3):
        rng = np.random.default_rng(batch * 10 + seq + 100)
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, fmt, batch, seq)
        for name, idx, cnt in masks(rng, batch, QI):
            args = (hidden, gu, dt, idx, cnt, valid, sin)
            out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
            ref_out, ref_scores = reference.sparse_gated_mlp_blocks(*args[:3], fmt, *args[3:], activation="gelu_tanh",
                                                                    x_format="q8_0")
            plain, _ = reference.sparse_gated_mlp_blocks(*args[:3], fmt, *args[3:], activation="gelu_tanh")
            what = f"{fmt} batch {batch} {name}"
            assert out.shape == (batch, seq, QH) and out.dtype == np.float32 and scores.shape == (batch, QI), what
            np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * max(np.abs(ref_out).max(initial=0), 1),
                                       err_msg=what)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7, err_msg=what)
            if np.abs(ref_out).max(initial=0) > 0.1:  # x really was quantized: q8_0's error is far above 1e-5
                assert _rel(out, ref_out) < 1e-5 and _rel(out, plain) > 1e-4, what
            if seq == 1 and name == "empty":
                assert not out.any(), what


def test_x_format_q8_0_half_activations():
    """T = float16: x widened to float32, quantized, z and the output cast back to T (bfloat16: ONNX Runtime's
    CPU provider has no bfloat16 Where for the function's decode mask, with or without x_format)."""
    sess = _session(_quant_model("q4_1", "float16", x_format="q8_0"))
    rng = np.random.default_rng(21)
    for seq in (4, 1):
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q4_1", 3, seq, np.float16)
        idx, cnt = masks(rng, 3, QI)[4][1:]
        args = (hidden, gu, dt, idx, cnt, valid, sin)
        out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
        ref_out, ref_scores = reference.sparse_gated_mlp_blocks(*args[:3], "q4_1", *args[3:], x_format="q8_0")
        assert out.dtype == np.float16 and scores.dtype == np.float32
        assert _rel(out.astype(np.float64), ref_out) < 5e-3 and _rel(scores, ref_scores) < 1e-5


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_x_format_q8_0_poisoned_blocks(value):
    """A block of x holding inf/NaN has d = NaN: that token's output row (prefill; decode with active neurons) and
    its sequence's scores are NaN, nothing else is, and the rest matches the reference."""
    sess = _session(_quant_model("q8_0", x_format="q8_0"))
    rng = np.random.default_rng(22)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q8_0", 3, 4)
    x = poison_x(hidden, value, [(0, 1, 5), (2, 3, 63)])
    idx, cnt = masks(rng, 3, QI)[2][1:]  # single
    args = (x, gu, dt, idx, cnt, valid, sin)
    out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, args)))
    ref_out, ref_scores = reference.sparse_gated_mlp_blocks(*args[:3], "q8_0", *args[3:], x_format="q8_0")
    bad = np.zeros((3, 4), bool)
    bad[0, 1] = bad[2, 3] = True
    assert np.isnan(out).all(-1).tolist() == bad.tolist() and np.isfinite(out[~bad]).all()
    assert np.isnan(scores).all(-1).tolist() == [True, False, True] and np.isfinite(scores[1]).all()
    assert np.array_equal(np.isnan(out), np.isnan(ref_out)) and np.array_equal(np.isnan(scores), np.isnan(ref_scores))
    np.testing.assert_allclose(out[~bad], ref_out[~bad], rtol=1e-5, atol=1e-5 * np.abs(ref_out[~bad]).max())
    out, scores = sess.run(None, dict(zip(SPARSE_GATED_MLP.input_names, (x[:, 1:2], *args[1:5], valid[:, :1], sin))))
    assert np.isnan(out).all(-1)[:, 0].tolist() == [True, False, False] and np.isfinite(out[1:]).all()
    np.testing.assert_array_equal(scores, sin)


def test_x_format_refused_outside_the_contract():
    """x_format q8_0 with weight_format dtype is refused naming the attribute; an unknown value too."""
    with pytest.raises(ValueError, match="x_format='q8_0' needs a block weight_format, not 'dtype'"):
        _quant_model("dtype", x_format="q8_0")
    with pytest.raises(ValueError, match="x_format='q8_1' not in"):
        _quant_model("q4_0", x_format="q8_1")
    a = make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o1", "s1"], "a", weight_format="q4_0",
                  x_format="q8_0")
    b = make_node(SPARSE_GATED_MLP, SPARSE_GATED_MLP.input_names, ["o2", "s2"], "b", weight_format="q4_0")
    with pytest.raises(ValueError, match="differ"):
        functions_for(helper.make_graph([a, b], "g", [], []))
    assert "x_format" in op_schema(SPARSE_GATED_MLP).attributes
