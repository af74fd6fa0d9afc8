"""TensorRT plan building, up to the GPU boundary, without TensorRT: the Python plugins' bridge to
the C++ plugin logic, profiles, layer accounting, option checks and the missing-module error.
(tests/test_trt_engines.py builds real TensorRT-RTX plans.)"""
import ctypes
import importlib.util
import json
import re

import pytest
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.export.weight_only import int_bits
from tda_export.ops.contract import ACTIVATIONS, PLUGIN_FIELDS, PLUGIN_NAMESPACE, PLUGIN_VERSION, SCORE_NORMS
from tda_export.ops.contract import DOWN_WEIGHT_FORMATS, SELECT_ACTIVE, SPARSE_GATED_MLP, WEIGHT_FORMATS, X_FORMATS
from tda_export.trt import logic as lg
from tda_export.trt.build.layers import Layer, PluginCoverageError, check_coverage, summary
from tda_export.trt.build.plan import PlanError, PlanOptions, build_plan, check_options, compute_capabilities
from tda_export.trt.build.profiles import Limits, ProfileError, profiles


@pytest.fixture(scope="module")
def L():
    return lg.logic()


# ---- the Python plugins decide through the C++ logic ----

def test_identity_and_fields_are_the_contracts(L):
    assert (L.namespace, L.version) == (PLUGIN_NAMESPACE, PLUGIN_VERSION)
    assert (L.mlp_name, L.select_name) == (SPARSE_GATED_MLP.name, SELECT_ACTIVE.name)
    assert L.mlp_fields == PLUGIN_FIELDS["SparseGatedMLP"]
    # Serialized like the C++ plugin: kCHAR, the value and its NUL.
    for a, act in enumerate(ACTIVATIONS):
        for n, norm in enumerate(SCORE_NORMS):
            attrs = lg.MlpAttrs(a, n, 2)
            assert L.mlp_serialized_fields(attrs) == [("activation", act.encode() + b"\0"),
                                                      ("score_norm", norm.encode() + b"\0"),
                                                      ("weight_format", b"dtype\0"),
                                                      ("down_weight_format", b"same\0"),
                                                      ("x_format", b"dtype\0"),
                                                      ("decode_version", b"2\0")]
            # ... and parsed back, with or without the NUL (ONNX parsers pass none).
            assert L.parse_mlp_fields([(k, v, True) for k, v in L.mlp_serialized_fields(attrs)], False) == attrs
            assert L.parse_mlp_fields([("activation", act.encode(), True), ("score_norm", norm.encode(), True)],
                                      False) == (a, n, 1, 0, 0, 0)
    for w, fmt in enumerate(WEIGHT_FORMATS):  # the block formats by their contract index (tda_weight_format_t)
        assert L.parse_mlp_fields([("weight_format", fmt.encode(), True)], False).weight_format == w
    # down_weight_format: its contract index is the ABI's field (0 = same), round-tripped through serialization.
    for d, down in enumerate(DOWN_WEIGHT_FORMATS):
        attrs = L.parse_mlp_fields([("weight_format", b"q4_1", True), ("down_weight_format", down.encode(), True)],
                                   True)
        assert (attrs.weight_format, attrs.down_weight_format) == (3, d)
        assert dict(L.mlp_serialized_fields(attrs))["down_weight_format"] == down.encode() + b"\0"
        assert L.parse_mlp_fields([(k, v, True) for k, v in L.mlp_serialized_fields(attrs)], False) == attrs
    # x_format: its contract index is the ABI's tda_x_format_t, round-tripped through serialization.
    for x, name in enumerate(X_FORMATS):
        attrs = L.parse_mlp_fields([("x_format", name.encode(), True), ("weight_format", b"q4_0", True)], True)
        assert (attrs.weight_format, attrs.x_format) == (2, x)
        assert dict(L.mlp_serialized_fields(attrs))["x_format"] == name.encode() + b"\0"
        assert L.parse_mlp_fields([(k, v, True) for k, v in L.mlp_serialized_fields(attrs)], False) == attrs


def test_bad_fields_name_the_field(L):
    with pytest.raises(lg.LogicError, match="activation 'swish' not in silu"):
        L.parse_mlp_fields([("activation", b"swish", True)], True)
    with pytest.raises(lg.LogicError, match="unknown field activaton"):
        L.parse_mlp_fields([("activaton", b"silu", True)], True)
    with pytest.raises(lg.LogicError, match="must be a char"):
        L.parse_mlp_fields([("activation", b"\x01\x00\x00\x00", False)], True)
    with pytest.raises(lg.LogicError, match="decode_version '3' not in 1, 2"):
        L.parse_mlp_fields([("decode_version", b"3", True)], False)
    assert L.parse_mlp_fields([("plugin_namespace", b"tda", True)], False) == (0, 0, 1, 0, 0, 0)
    with pytest.raises(lg.LogicError, match="down_weight_format 'q4_k' not in same, q8_0, q4_0, q4_1"):
        L.parse_mlp_fields([("weight_format", b"q4_1", True), ("down_weight_format", b"q4_k", True)], True)
    with pytest.raises(lg.LogicError, match="down_weight_format 'q8_0' needs a block weight_format, not 'dtype'"):
        L.parse_mlp_fields([("down_weight_format", b"q8_0", True)], True)
    with pytest.raises(lg.LogicError, match="SelectActive: unknown field activation"):
        L.parse_select_fields([("activation", b"silu", True)])
    with pytest.raises(lg.LogicError, match="x_format 'q8_1' not in dtype, q8_0"):
        L.parse_mlp_fields([("weight_format", b"q8_0", True), ("x_format", b"q8_1", True)], True)
    with pytest.raises(lg.LogicError, match="x_format 'q8_0' needs a block weight_format, not 'dtype'"):
        L.parse_mlp_fields([("x_format", b"q8_0", True), ("weight_format", b"dtype", True)], False)


def test_x_format_q8_0_is_refused_over_the_cuda_library(L):
    """What the Python plugin's creator asks (with the loaded kernel library's tda_backend()) before it makes a
    plugin: x_format q8_0 runs on the CPU library only."""
    q8 = L.parse_mlp_fields([("weight_format", b"q4_1", True), ("x_format", b"q8_0", True)], True)
    with pytest.raises(lg.LogicError, match="x_format 'q8_0' runs on the CPU kernel library only, not the cuda one: "
                                            "rebuild the engine with x_format dtype for TensorRT"):
        L.mlp_check_backend(q8, "cuda")
    L.mlp_check_backend(q8, "cpu")
    L.mlp_check_backend(q8._replace(x_format=0), "cuda")


def _mlp_shapes(B=2, S=64, S_valid=None, H=16, I=24):
    return [(B, S, H), (I, 2, H), (I, H), (B, I), (B,), (B, S if S_valid is None else S_valid), (B, I)]


def test_profile_regression_through_the_bridge(L):
    # Issue 8's profile: token_valid's max S (past + new) is not hidden_states' max S.
    shapes = _mlp_shapes(S=64, S_valid=191)
    with pytest.raises(lg.LogicError, match="token_valid: S = 191 but 64 elsewhere"):
        L.mlp_check_shapes(shapes)  # exact shapes must agree ...
    assert L.mlp_max_sizes(shapes) == (2, 64, 16, 24)  # ... profile bounds need not
    assert L.mlp_check_shapes(_mlp_shapes(B=-1, S=-1, S_valid=-1)) == (-1, -1, 16, 24)


def test_workspace_uses_the_kernel_librarys_queries(L):
    from tda_export.kernels.abi import DecodeArgs, cpu_library

    cpu = cpu_library()
    q = lg.kernel_queries(cpu)
    sizes = L.mlp_max_sizes(_mlp_shapes(B=4, S=1, S_valid=100))
    want = max(cpu.workspace_size("tda_sparse_gated_mlp_decode",
                                  DecodeArgs(dtype=1, activation=0, batch=b, hidden=16, intermediate=24, deterministic=1,
                                             version=1))
               for b in range(1, 5))
    attrs = lg.MlpAttrs(0, 0, 1)
    assert L.mlp_workspace_size(lg.HALF, attrs, sizes, 1, q) == want
    prefill = L.mlp_workspace_size(lg.HALF, attrs, L.mlp_max_sizes(_mlp_shapes(B=2, S=9)), 2, q)
    assert prefill >= 2 * 9 * 24 * 3 * 2 + (32 << 20)  # gate/up + z in fp16, plus cuBLAS's 32 MiB


def test_launch_arguments(L):
    buf = lg.MlpBuffers(*[0x10000 * (i + 1) for i in range(9)])
    sizes = (130, 1, 16, 24)
    chunks = list(L.chunks(130))
    assert chunks == [(0, 64), (64, 64), (128, 2)]
    from tda_export.kernels.abi import cpu_library

    q = lg.kernel_queries(cpu_library())
    a, nbytes = L.decode_call(lg.BF16, lg.MlpAttrs(1, 0, 2), sizes, 64, 64, buf, q)
    assert (a.dtype, a.activation, a.batch, a.hidden, a.intermediate, a.deterministic, a.version) == \
        (2, 1, 64, 16, 24, 1, 2)
    assert nbytes == cpu_library().workspace_size("tda_sparse_gated_mlp_decode", a)
    assert a.hidden_states == buf.hidden + 64 * 16 * 2 and a.active_idx == buf.active_idx + 64 * 24 * 4
    ws = ctypes.create_string_buffer(1 << 26)
    plan = L.prefill_plan(lg.HALF, lg.MlpAttrs(0, 1, 1), (2, 5, 16, 24), buf, ctypes.addressof(ws), q)
    assert plan.tokens == 10 and plan.scores.score_norm == 1 and plan.scores.seq_len == 5
    assert plan.gate_up == ctypes.addressof(ws) and plan.z > plan.gate_up
    assert (plan.gate_up_gemm.m, plan.gate_up_gemm.n, plan.gate_up_gemm.k) == (48, 10, 16)
    s = L.select_args(24, 64, 2, 0x1000, 0x2000, 0x5000, 0x3000, 0x4000)
    assert (s.batch, s.intermediate, s.scores, s.active_idx, s.active_count) == (2, 24, 0x1000 + 64 * 24 * 4,
                                                                                  0x3000 + 64 * 24 * 4, 0x4000 + 64 * 4)
    assert (s.threshold, s.density_bounds) == (0x2000, 0x5000)  # scalars of the layer, not per row


def test_launch_arguments_of_an_own_down_format(L):
    """q4_1 gate/up rows with q8_0 down rows: decode passes both formats to the C ABI, the prefill plan dequantizes
    down_t from its own format, and the shapes take down_weight_t's bytes from that format."""
    from tda_export.kernels.abi import cpu_library

    q = lg.kernel_queries(cpu_library())
    buf = lg.MlpBuffers(*[0x10000 * (i + 1) for i in range(9)])
    H, I = 64, 24
    attrs = lg.MlpAttrs(0, 0, 1, WEIGHT_FORMATS.index("q4_1"), DOWN_WEIGHT_FORMATS.index("q8_0"))
    a, _ = L.decode_call(lg.BF16, attrs, (2, 1, H, I), 0, 2, buf, q)
    assert (a.weight_format, a.down_weight_format) == (3, 1)
    ws = ctypes.create_string_buffer(1 << 26)
    plan = L.prefill_plan(lg.HALF, attrs, (2, 5, H, I), buf, ctypes.addressof(ws), q)
    assert (plan.weight_format, plan.down_weight_format) == (3, 1)
    same = L.prefill_plan(lg.HALF, attrs._replace(down_weight_format=0), (2, 5, H, I), buf, ctypes.addressof(ws), q)
    assert (same.weight_format, same.down_weight_format) == (3, 3)  # "same": down_t in weight_format's blocks
    assert (same.gate_up_t, same.down_t) == (plan.gate_up_t, plan.down_t)
    shapes = [(2, 1, H), (I, 2, H // 32 * 20), (I, H // 32 * 34), (2, I), (2,), (2, 1), (2, I)]
    assert L.mlp_check_shapes(shapes, 3, 1) == (2, 1, H, I)
    with pytest.raises(lg.LogicError, match="down_weight_t: last dimension 68 but weight_format q4_1 .* needs 40"):
        L.mlp_check_shapes(shapes, 3)


def test_launch_arguments_of_quantized_activations(L):
    """x_format q8_0 (on the CPU kernel library): decode passes it to the C ABI; the prefill plan reserves xq [M, H]
    in T after the dequantized weights and points the gate/up GEMM's x at it; x_format dtype reads hidden_states."""
    from tda_export.kernels.abi import X_FORMAT_CODE, cpu_library

    q = lg.kernel_queries(cpu_library())
    buf = lg.MlpBuffers(*[0x10000 * (i + 1) for i in range(9)])
    H, I, M = 64, 24, 10
    attrs = lg.MlpAttrs(0, 0, 1, WEIGHT_FORMATS.index("q4_0"), DOWN_WEIGHT_FORMATS.index("q8_0"),
                        X_FORMAT_CODE["q8_0"])
    a, _ = L.decode_call(lg.HALF, attrs, (2, 1, H, I), 0, 2, buf, q)
    assert (a.weight_format, a.down_weight_format, a.x_format) == (2, 1, 1)
    assert L.decode_call(lg.HALF, attrs._replace(x_format=0), (2, 1, H, I), 0, 2, buf, q)[0].x_format == 0
    ws = ctypes.create_string_buffer(1 << 26)
    plan = L.prefill_plan(lg.HALF, attrs, (2, 5, H, I), buf, ctypes.addressof(ws), q)
    assert plan.x_format == 1 and plan.gate_up_gemm.b == plan.xq
    assert (plan.xq - ctypes.addressof(ws)) % 256 == 0 and plan.xq >= plan.down_t + I * H * 2
    plain = L.prefill_plan(lg.HALF, attrs._replace(x_format=0), (2, 5, H, I), buf, ctypes.addressof(ws), q)
    assert (plain.x_format, plain.xq, plain.gate_up_gemm.b) == (0, None, buf.hidden)
    sizes = L.mlp_max_sizes(_mlp_shapes(B=2, S=5, H=H, I=I), 0)
    need = L.mlp_workspace_size(lg.HALF, attrs, sizes, 2, q)
    assert need == plan.xq - ctypes.addressof(ws) + M * H * 2  # the reservation ends with xq
    assert need > L.mlp_workspace_size(lg.HALF, attrs._replace(x_format=0), sizes, 2, q)


def test_types_formats_and_output_shapes(L):
    assert L.output_types(lg.MLP, [lg.BF16] * 3 + [lg.INT32] * 2 + [lg.FLOAT] * 2) == (lg.BF16, lg.FLOAT)
    with pytest.raises(lg.LogicError, match="scores: must be float32"):
        L.output_types(lg.SELECT, [lg.HALF, lg.FLOAT, lg.FLOAT])
    assert L.supports(lg.MLP, 1, [(lg.HALF, True), (lg.HALF, True)])
    assert not L.supports(lg.MLP, 1, [(lg.HALF, True), (lg.BF16, True)])
    assert not L.supports(lg.SELECT, 0, [(lg.FLOAT, False)])
    assert L.output_shape(lg.MLP, 0) == [(0, 0), (0, 1), (0, 2)]
    assert L.output_shape(lg.MLP, 1) == [(6, 0), (6, 1)]
    assert L.output_shape(lg.SELECT, 1) == [(0, 0)]


# ---- profiles ----

IO = [{"name": "input_ids", "shape": ["batch", "sequence"]}, {"name": "attention_mask", "shape": ["batch", "total_sequence"]},
      {"name": "past_key_values.0.key", "shape": ["batch", 2, "past_sequence", 16]},
      {"name": "past_tda.0.active_count", "shape": ["batch"]}, {"name": "tda_thresholds", "shape": [3]}]


def test_profiles_prefill_then_decode():
    prefill, decode = profiles(IO, Limits.checked(8, 256, 64, 512))
    assert prefill["name"] == "prefill" and decode["name"] == "decode"
    assert "tda_thresholds" not in prefill["shapes"]  # static
    assert prefill["shapes"]["input_ids"] == {"min": [1, 2], "opt": [4, 32], "max": [8, 64]}
    assert prefill["shapes"]["attention_mask"]["max"] == [8, 64]
    assert prefill["shapes"]["past_key_values.0.key"]["max"] == [8, 2, 0, 16]
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [8, 1]}
    assert decode["shapes"]["past_key_values.0.key"]["max"] == [8, 2, 255, 16]
    assert decode["shapes"]["attention_mask"] == {"min": [1, 2], "opt": [4, 129], "max": [8, 256]}
    assert decode["shapes"]["past_tda.0.active_count"]["max"] == [8]


@pytest.mark.parametrize("args, message", [
    ((0, 256, 64, 512), "--max-batch 0"), ((8, 1024, 64, 512), "--max-seq-len 1024: must be in 2..512"),
    ((8, 256, 300, 512), "--max-prompt 300: must be in 2..256"), ((8, 256, 1, 512), "--max-prompt 1"),
])
def test_bad_limits(args, message):
    with pytest.raises(ProfileError, match=message):
        Limits.checked(*args)


def test_defaults_and_unknown_symbol():
    assert Limits.checked(8, None, None, 8192) == Limits(8, 4096, 4096)
    with pytest.raises(ProfileError, match="input x: dimension 'beam' has no profile rule"):
        profiles([{"name": "x", "shape": ["beam"]}], Limits.checked(1, 8, 8, 8))


# ---- layer accounting ----

NODES = [("layers.0.mlp.sparse_gated_mlp", "SparseGatedMLP"), ("layers.0.mlp.select_active", "SelectActive")]


def test_coverage_and_summary():
    layers = [Layer("embed", "GATHER"), Layer(NODES[0][0], "PLUGIN_V3", "tda::SparseGatedMLP/1"),
              Layer(NODES[1][0], "PLUGIN_V3", "tda::SelectActive/1")]
    check_coverage(NODES, layers, "tda", "1")
    s = summary(layers)
    assert s["plugins"] == {"tda::SelectActive/1": 1, "tda::SparseGatedMLP/1": 1}
    assert s["by_type"] == {"GATHER": 1, "PLUGIN_V3": 2} and s["num_layers"] == 3


def test_inlined_node_is_an_error():
    # The parser inlined the reference function: the node's layers are ordinary ones.
    layers = [Layer(NODES[0][0] + "/MatMul", "MATRIX_MULTIPLY"), Layer(NODES[1][0], "PLUGIN_V3", "tda::SelectActive/1")]
    with pytest.raises(PluginCoverageError, match=r"1 of 2 tda nodes did not become plugin layers.*sparse_gated_mlp"):
        check_coverage(NODES, layers, "tda", "1")
    wrong = [Layer(NODES[0][0], "PLUGIN_V3", "tda::SparseGatedMLP/2"), Layer(NODES[1][0], "PLUGIN_V3", "tda::SelectActive/1")]
    with pytest.raises(PluginCoverageError, match="tda::SparseGatedMLP/2"):
        check_coverage(NODES, wrong, "tda", "1")


# ---- options and the missing module ----

def test_compute_capabilities():
    assert compute_capabilities("tensorrt-rtx", ["8.6", "sm89", "SM86", "120"]) == ["SM86", "SM89", "SM120"]
    assert compute_capabilities("tensorrt-rtx", []) == ["SM75", "SM80", "SM86", "SM89", "SM120"]
    with pytest.raises(PlanError,
                       match=r"--compute-capability 9.0: TensorRT-RTX supports 7\.5, 8\.0, 8\.6, 8\.9, 12\.0$"):
        compute_capabilities("tensorrt-rtx", ["9.0"])
    with pytest.raises(PlanError, match="applies to --target tensorrt-rtx only"):
        compute_capabilities("tensorrt", ["8.6"])


def test_int4_plans_leave_sm75_out():
    """TensorRT-RTX 1.7 cannot compile int4 weight-only layers for SM75 (a q4_0 plan for all five targets fails
    in Myelin): a 4-bit engine's default is the other four, and asking for 7.5 is refused before the model loads."""
    assert compute_capabilities("tensorrt-rtx", [], int4=True) == ["SM80", "SM86", "SM89", "SM120"]
    assert compute_capabilities("tensorrt-rtx", ["8.6"], int4=True) == ["SM86"]
    with pytest.raises(PlanError, match=r"--compute-capability 7\.5: TensorRT-RTX cannot compile int4 .*default "
                                        r"then is 8\.0, 8\.6, 8\.9, 12\.0\) or build from a q8_0 engine"):
        compute_capabilities("tensorrt-rtx", ["8.6", "7.5"], int4=True)
    assert [int_bits(f) for f in ("q8_0", "q4_0", "q4_1")] == [8, 4, 4]


def test_build_refuses_sm75_for_a_4bit_plan_before_loading(tmp_path):
    r = CliRunner().invoke(main, ["build", "-m", "smollm2-135m", "--weight-format", "q4_1", "--target", "tensorrt-rtx",
                                  "--dtype", "fp16", "--compute-capability", "7.5", "-o", str(tmp_path / "e")])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert "--compute-capability 7.5: TensorRT-RTX cannot compile int4" in r.output
    assert not (tmp_path / "e").exists()


def test_options_checked_before_building(tmp_path):
    with pytest.raises(PlanError, match="use --dtype fp16 or bf16"):
        check_options(PlanOptions("tensorrt-rtx"), 512, "float32")
    with pytest.raises(PlanError, match="--builder-optimization-level 7"):
        check_options(PlanOptions("tensorrt-rtx", optimization_level=7), 512, "float16")
    with pytest.raises(PlanError, match="--plugin-library .*: no such file"):
        check_options(PlanOptions("tensorrt-rtx", plugin_library=tmp_path / "nope.so"), 512, "float16")


def _tda_graph(path, x_formats):
    """A graph of SparseGatedMLP nodes with these x_format attributes (None: the attribute absent), as the
    exporter writes them (domain tda): all a plan build reads before TensorRT starts."""
    import onnx
    from onnx import TensorProto, helper

    names = SPARSE_GATED_MLP.input_names
    nodes = []
    for i, x in enumerate(x_formats):
        attrs = {"weight_format": "q4_0", **({} if x is None else {"x_format": x})}
        nodes.append(helper.make_node(SPARSE_GATED_MLP.name, names, [f"out{i}", f"scores{i}"],
                                      name=f"layers.{i}.mlp.sparse_gated_mlp", domain="tda", **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None)
                               for i in range(len(x_formats))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("tda", 1)]),
              path)
    return path


def test_quantized_activations_are_refused_before_building(tmp_path):
    """x_format q8_0 runs on the CPU kernel library only: a plan (CUDA kernels and plugins) is refused naming the
    node and the field, from the graph before TensorRT starts, or from the engine's option before the model
    loads; x_format dtype (or none: a graph exported before the attribute) goes on."""
    from tda_export.trt.build.plan import check_graph

    message = ("x_format q8_0 (quantized activations) runs on the CPU kernel library only: a TensorRT plan runs "
               "the CUDA kernels and plugins, which read x as is; rebuild the engine with x_format dtype for TensorRT")
    with pytest.raises(PlanError, match=re.escape("--target tensorrt-rtx: q.onnx: node layers.1.mlp.sparse_gated_mlp "
                                                  "(and 1 more) has " + message)):
        check_graph(_tda_graph(tmp_path / "q.onnx", ["dtype", "q8_0", "q8_0"]), "tensorrt-rtx")
    with pytest.raises(PlanError, match=re.escape("layers.0.mlp.sparse_gated_mlp has x_format q8_0")):
        check_graph(_tda_graph(tmp_path / "one.onnx", ["q8_0"]), "tensorrt")
    check_graph(_tda_graph(tmp_path / "d.onnx", ["dtype", None]), "tensorrt-rtx")
    with pytest.raises(PlanError, match=re.escape("--target tensorrt-rtx: " + message)):
        check_options(PlanOptions("tensorrt-rtx"), None, "float16", x_format="q8_0")


def test_build_plan_of_quantized_activations_writes_nothing(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")  # check_options asks for it
    out = tmp_path / "e"
    out.mkdir()
    with pytest.raises(PlanError, match="node layers.0.mlp.sparse_gated_mlp has x_format q8_0"):
        build_plan(_tda_graph(tmp_path / "q.onnx", ["q8_0"]), out, [], 64, "float16", PlanOptions("tensorrt-rtx"),
                   progress=False)
    assert list(out.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="datacenter TensorRT is installed")
def test_missing_tensorrt_is_one_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["build", "-m", "smollm2-135m", "--target", "tensorrt", "--dtype", "fp16",
                                    "--no-calibrate", "-o", str(tmp_path / "e")])
    assert res.exit_code == 2, res.output
    assert "needs the Python module 'tensorrt', which is not installed: pip install tensorrt" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "e").exists()


def test_bad_target_dtype_fails_before_export(tmp_path):
    res = CliRunner().invoke(main, ["build", "-m", "smollm2-135m", "--target", "tensorrt-rtx", "--no-calibrate",
                                    "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "use --dtype fp16 or bf16 (got float32)" in res.output
    assert not (tmp_path / "e").exists()


# ---- the tensorrt runtime backend's I/O mapping and the goldens, on the CPU ----

@pytest.fixture(scope="module")
def llama_fp16(tmp_path_factory):
    from tda_export.export.build import build
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("trt_io")
    return build(str(save_tiny("llama", root / "m")), root / "e", "float16", progress=False)


def _backends(directory):
    from tda_export.runtime.ort_backend import OrtBackend
    from tda_export.runtime.trt_backend import TensorRTBackend, io_tables

    data = json.loads((directory / "manifest.json").read_text())
    data["tensorrt"] = {"profiles": profiles(data["io"]["inputs"], Limits.checked(2, 32, 16, data["max_context"]))}
    ort = OrtBackend(directory / "model.onnx", data, threads=1)
    trt = object.__new__(TensorRTBackend)  # the I/O half only: no plan is deserialized
    trt.manifest, trt.section = data, data["tensorrt"]
    trt.inputs, trt.presents = io_tables(data)
    return data, ort, trt


def test_backend_io_mapping_matches_onnx_runtime(llama_fp16):
    import numpy as np

    from tda_export.runtime.trt_backend import ProfileBoundsError, select_profile
    from tda_export.trt.goldens import bounds_of, prompt, thresholds_of

    data, ort, trt = _backends(llama_fp16)
    assert trt.presents == ort.presents
    # tda_thresholds and tda_density_bounds are overridable initializers, which ONNX Runtime does not list
    # as inputs.
    assert {n: i.type for n, i in trt.inputs.items() if n not in ("tda_thresholds", "tda_density_bounds")} == \
        {n: i.type for n, i in ort.inputs.items()}
    empty_t, empty_o = trt._empty_past(2), ort._empty_past(2)
    assert {k: (v.shape, v.dtype) for k, v in empty_t.items()} == {k: (v.shape, v.dtype) for k, v in empty_o.items()}
    # Prefill feeds pick profile 0, decode feeds profile 1, from the state ORT's own steps produce.
    ids, mask = prompt(data["vocab_size"])
    assert bounds_of(data) is None  # built without a calibration: no clamp recorded
    bounds = np.asarray([[0.0, 1.0]] * data["num_layers"], np.float32)
    state = {"mask": mask, "thresholds": thresholds_of(data), "bounds": bounds, "past": empty_o}
    from tda_export.runtime.backend import position_ids

    feeds = trt._feeds(state, ids, position_ids(mask))
    assert set(feeds) == set(data["tensorrt"]["profiles"][0]["shapes"]) | {"tda_thresholds", "tda_density_bounds"}
    assert select_profile(trt.section, feeds) == 0
    _, st = ort.prefill(ids, mask, thresholds_of(data))
    dec = trt._feeds(dict(st, mask=np.concatenate([st["mask"], np.ones((2, 1), np.int64)], 1)),
                     ids[:, :1], st["mask"].sum(1, keepdims=True))
    assert select_profile(trt.section, dec) == 1
    with pytest.raises(ProfileBoundsError, match=r"input input_ids shape \[2, 17\] is outside the plan's prefill"):
        select_profile(trt.section, trt._feeds(state, np.ones((2, 17), np.int64), np.ones((2, 17), np.int64)))


def test_goldens_replay_and_compare(llama_fp16, tmp_path):
    import numpy as np

    from tda_export.trt import goldens

    data, ort, _ = _backends(llama_fp16)
    path = goldens.save(tmp_path, llama_fp16 / "model.onnx", data)
    golden = dict(np.load(path))
    assert golden["prefill"].shape == (2, data["vocab_size"]) and golden["tokens"].shape == (2, goldens.DECODE_STEPS)
    again = goldens.replay(ort, data, golden["input_ids"], golden["attention_mask"], golden["tokens"])
    ok, lines = goldens.compare(golden, again, atol=1e-6, rtol=1e-6)
    assert ok and len(lines) == 1 + goldens.DECODE_STEPS
    bad = dict(again, decode1=again["decode1"] + 1.0)
    ok, lines = goldens.compare(golden, bad, atol=0.1, rtol=0.05)
    assert not ok and "MISMATCH" in lines[-1] and "max |err| 1.000e+00" in lines[-1]


def test_block_engine_goldens_dequantize_in_each_run(tiny_dirs, llama_fp16, tmp_path, monkeypatch):
    """A block engine's fp16 goldens run ONNX Runtime without constant folding (nor its memory arena): folding would
    dequantize every weight to float32 when the session is made (3.8 GB per Mistral-7B-shaped layer at q4_0, the
    build's peak; see bench/build_scale.py) for three runs; their logits are the folded session's. A float engine
    keeps folding."""
    import numpy as np

    from tda_export.export.build import build
    from tda_export.runtime import ort_backend
    from tda_export.trt import goldens

    engine = build(str(tiny_dirs["llama"]), tmp_path / "q4", "float16", progress=False, weight_format="q4_0")
    data = json.loads((engine / "manifest.json").read_text())
    made, real = [], ort_backend.OrtBackend
    monkeypatch.setattr(ort_backend, "OrtBackend", lambda *a, **k: made.append(k) or real(*a, **k))
    golden = dict(np.load(goldens.save(tmp_path, engine / "model.onnx", data)))
    folded = goldens.replay(real(engine / "model.onnx", data, threads=1), data, golden["input_ids"],
                            golden["attention_mask"], golden["tokens"])
    ok, lines = goldens.compare(golden, folded, atol=1e-2, rtol=1e-3)
    assert ok, lines
    goldens.save(tmp_path, llama_fp16 / "model.onnx", json.loads((llama_fp16 / "manifest.json").read_text()))
    assert made == [dict(threads=1, low_memory=True), dict(threads=1, low_memory=False)]


def test_engine_backend_tensorrt_needs_a_plan(llama_fp16):
    from tda_export.runtime.engine import Engine, EngineError

    with pytest.raises(EngineError, match=r"backend tensorrt: .*no TensorRT plan \(build with --target"):
        Engine.load(llama_fp16, backend="tensorrt")


def test_builder_logger_keeps_tensorrts_errors():
    """A failed build reports TensorRT's own errors (its default Logger printed them to the stdout plan.py
    discards, so "TensorRT could not build the plan" came without the reason)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")
    from tda_export.trt.build.builder import _logger

    logger = _logger(trt)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    x = network.add_input("x", trt.float16, (1, 4))
    network.mark_output(x)  # an input cannot be an output: TensorRT logs an error
    assert any("markOutput" in e and "x" in e for e in logger.errors), logger.errors


def test_plan_stream_writer_appends_and_keeps_its_error(tmp_path):
    """The builder streams the plan to disk (no whole-plan host copy); a write failure, which TensorRT
    would only log, is kept so the builder reports it instead of leaving a truncated plan."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")
    from tda_export.trt.build.builder import _file_writer

    path = tmp_path / "plan"
    with open(path, "wb") as f:
        w = _file_writer(trt, f)
        assert w.write(b"abc") == 3 and w.write(b"de") == 2
    assert path.read_bytes() == b"abcde" and w.error is None
    assert w.write(b"x") == 0 and isinstance(w.error, ValueError)  # the file is closed now


def test_backend_contexts_share_one_activation_block():
    """The prefill and decode contexts never run at once: one user-managed block sized for the larger
    profile, not TensorRT's static block per context (a fake engine; the real one needs a GPU)."""
    from types import SimpleNamespace

    from tda_export.runtime.trt_backend import shared_contexts

    class Context:
        def __init__(self, strategy):
            self.strategy, self.profile, self.memory = strategy, None, None

        def set_optimization_profile_async(self, i, stream):
            self.profile = (i, stream)

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

    class Engine:
        def get_device_memory_size_for_profile_v2(self, i):
            return (1400 << 20, 96 << 20)[i]

        def create_execution_context(self, strategy="STATIC"):
            return Context(strategy)

    allocations = []

    def allocate(n):
        allocations.append(n)
        return SimpleNamespace(data_ptr=lambda: 0x7000)

    rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")
    contexts, block = shared_contexts(rtx, Engine(), 2, 42, allocate)
    assert allocations == [1400 << 20]
    assert [c.strategy for c in contexts] == [rtx.ExecutionContextAllocationStrategy.USER_MANAGED] * 2
    assert [c.profile for c in contexts] == [(0, 42), (1, 42)]
    assert [c.memory for c in contexts] == [(0x7000, 1400 << 20)] * 2 and block.data_ptr() == 0x7000


# ---- bf16 plans: float32 goldens, checked at the bf16 tolerance ----

@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    from tda_export.export.build import build
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("trt_bf16")
    return build(str(save_tiny("llama", root / "m")), root / "e", "bfloat16", progress=False)


def _bf16_runner(directory, data):
    """The engine run in bf16 by the torch backend, standing in for the plan (running a plan needs a GPU)."""
    from tda_export.runtime.torch_backend import TorchBackend

    return TorchBackend.from_engine(directory / "model.onnx", data, device="cpu", max_batch=2, max_context=16,
                                    cuda_graphs=False)


def test_bf16_goldens_are_float32_and_the_tolerance_follows_the_dtype(llama_bf16, tmp_path):
    import numpy as np

    from tda_export.trt import goldens

    data = json.loads((llama_bf16 / "manifest.json").read_text())
    golden = dict(np.load(goldens.save(tmp_path, llama_bf16 / "model.onnx", data)))
    assert str(golden["reference"]) == "torch float32" and str(golden["plan_dtype"]) == "bfloat16"
    assert golden["prefill"].dtype == np.float32 and golden["tokens"].shape == (2, goldens.DECODE_STEPS)
    assert goldens.tolerance("float16") == (0.1, 0.05) and goldens.tolerance("bfloat16") == (4.0, 0.1)
    with pytest.raises(ValueError, match="no goldens for float32 plans"):
        goldens.tolerance("float32")
    got = goldens.replay(_bf16_runner(llama_bf16, data), data, golden["input_ids"], golden["attention_mask"],
                         golden["tokens"])
    assert not np.array_equal(got["prefill"], golden["prefill"])  # a bf16 run, not the reference itself
    ok, lines = goldens.compare(golden, got, *goldens.tolerance("bfloat16"))
    assert ok, lines


def test_check_on_a_bf16_plan_uses_the_bf16_tolerance(llama_bf16, tmp_path, monkeypatch):
    """`check` end to end on the CPU, the plan's runner replaced by the bf16 torch backend."""
    import shutil

    from tda_export import manifest
    from tda_export.runtime import trt_backend
    from tda_export.trt import goldens

    engine = tmp_path / "e"
    shutil.copytree(llama_bf16, engine)
    data = manifest.read(engine)
    goldens.save(engine, engine / "model.onnx", data)
    data = dict(data, tensorrt={"flavour": "tensorrt", "version": "test", "plan_file": "model.plan",
                                "layers": {"plugins": {"tda::SparseGatedMLP/1": 3}}})
    manifest.write(engine, {k: v for k, v in data.items() if k not in ("files", "format")})
    monkeypatch.setattr(trt_backend, "TensorRTBackend", _bf16_runner)
    r = CliRunner().invoke(main, ["check", "-e", str(engine)])
    assert r.exit_code == 0, r.output
    assert "reference  torch float32 logits; bfloat16 plan: atol 4.0, rtol 0.1" in r.output and "check      ok" in r.output
    r = CliRunner().invoke(main, ["check", "-e", str(engine), "--atol", "0", "--rtol", "0"])
    assert r.exit_code == 1 and "beyond atol 0.0 / rtol 0.0" in r.output and "Traceback" not in r.output
