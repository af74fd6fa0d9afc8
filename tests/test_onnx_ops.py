"""The model-local ONNX functions, each alone in ONNX Runtime, against the numpy reference."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from tda_export.ops import reference
from tda_export.ops.contract import ACTIVATIONS, PLUGIN_NAMESPACE, SCORE_NORMS, SELECT_ACTIVE, SPARSE_GATED_MLP
from tda_export.ops.onnx_ops import BODY_OPSET, functions_for, make_node, op_schema, opset_imports, tensor_type

from op_cases import bound_cases, masks, mlp_inputs, score_cases

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
