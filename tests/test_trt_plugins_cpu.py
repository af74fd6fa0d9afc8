"""The Python plugins' enqueue, run on the CPU: the same code path as on a GPU (creator fields, the
C++ logic's launch arguments, the C ABI calls), with the CPU kernel library in place of the CUDA
one and host memory in place of device memory. Checked against the numpy reference of the contract.

Only the device shim is swapped (device.tensor wraps host pointers, no stream); everything the
plugin decides and passes to the C ABI is what a GPU enqueue would do.
"""
import contextlib
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from op_cases import H, I, QH, bound_cases, masks, mlp_inputs, score_cases
from tda_export.kernels import build as kbuild
from tda_export.kernels.abi import cpu_library, cuda_library
from tda_export.ops import reference
from tda_export.trt import device, logic as lg, plugins

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")

pytestmark = pytest.mark.trt

NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "bfloat16": np.int16}
FORMATS = ("q8_0", "q4_0", "q4_1")
# (weight_format, down_weight_format): each format for both weights, and the 4-bit engines' q8_0 down rows.
FORMAT_PAIRS = [(f, "same") for f in FORMATS] + [("q4_1", "q8_0"), ("q4_0", "q8_0")]
QI = 24  # the plugins need I a multiple of 8 (the prefill's score reduction), whatever the weights


def _block_inputs(rng, name, batch, seq, dtype, down=None):
    """Random activations and scaled-normal weights quantized to `name` (uint8 blocks), down_t to `down`
    (default: name)."""
    from tda_export.ops import blocks

    hidden = rng.normal(size=(batch, seq, QH)).astype(dtype)
    scale = rng.uniform(0.05, 0.6, size=(QI, 1, 1))
    gate_up = blocks.quantize(name, rng.normal(size=(QI, 2, QH)) * scale)
    down_t = blocks.quantize(down or name, rng.normal(size=(QI, QH)) * scale[:, 0])
    return hidden, gate_up, down_t, (rng.random((batch, seq)) > 0.3).astype(np.float32), \
        rng.random((batch, QI)).astype(np.float32)


@pytest.fixture
def on_cpu(monkeypatch):
    lib = cpu_library()
    monkeypatch.setattr(plugins, "_kernels", lambda: lib)
    monkeypatch.setattr(plugins, "_queries", lambda: lg.kernel_queries(lib))

    def host_tensor(ptr, shape, dtype):
        import torch

        n = int(np.prod(shape)) * np.dtype(NP[dtype]).itemsize
        arr = np.frombuffer((ctypes.c_char * max(n, 1)).from_address(int(ptr)), NP[dtype], int(np.prod(shape)))
        t = torch.from_numpy(arr.reshape(shape))
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t

    monkeypatch.setattr(device, "tensor", host_tensor)
    monkeypatch.setattr(device, "stream_scope", lambda stream: contextlib.nullcontext())


_KEEP = []  # PluginField holds a pointer into its array


def _fields(**kv):
    arrays = [(k, np.frombuffer(v.encode() + b"\0", np.int8).copy()) for k, v in kv.items()]
    _KEEP.append(arrays)
    return trt.PluginFieldCollection([trt.PluginField(k, a, trt.PluginFieldType.CHAR) for k, a in arrays])


def _desc(arr, trt_type):
    return SimpleNamespace(dims=arr.shape, type=trt_type, min=arr.shape, max=arr.shape,
                           desc=SimpleNamespace(type=trt_type, dims=arr.shape))


def _workspace(nbytes):
    buf = np.zeros(nbytes + 256, np.uint8)
    return buf, (buf.ctypes.data + 255) // 256 * 256


def _run_mlp(plugin, tensors, trt_type, out_dtype, workspace_bytes=None, weight_type=None):
    B, S, hidden = tensors[0].shape
    out = np.full((B, S, hidden), np.nan, out_dtype)
    scores_out = np.full((B, tensors[6].shape[1]), np.nan, np.float32)
    types = [trt_type] + [weight_type or trt_type] * 2 + [trt.DataType.INT32] * 2 + [trt.DataType.FLOAT] * 2
    descs = [_desc(t, ty) for t, ty in zip(tensors, types)]
    _keep, ws = _workspace(plugin.get_workspace_size(descs, []) if workspace_bytes is None else workspace_bytes)
    plugin.enqueue(descs, [], [t.ctypes.data for t in tensors], [out.ctypes.data, scores_out.ctypes.data], ws, 0)
    return out, scores_out


def _rel(got, ref):
    return np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("activation,score_norm", [("silu", "token_l2"), ("gelu_tanh", "none")])
def test_sparse_gated_mlp_prefill_and_decode(on_cpu, activation, score_norm):
    creator = plugins.plugin_classes(trt)[0]()
    plugin = creator.create_plugin("mlp", _fields(activation=activation, score_norm=score_norm),
                                   trt.TensorRTPhase.RUNTIME)
    served = {f.name: bytes(np.asarray(f.data).tobytes()) for f in plugin.get_fields_to_serialize()}
    assert served == {"activation": activation.encode() + b"\0", "score_norm": score_norm.encode() + b"\0",
                      "weight_format": b"dtype\0", "down_weight_format": b"same\0", "x_format": b"dtype\0",
                      "decode_version": b"1\0"}
    rng = np.random.default_rng(0)
    for seq in (5, 1):  # prefill, then decode with every mask shape
        hidden, gate_up, down_t, token_valid, scores_in = mlp_inputs(rng, 3, seq)
        for name, idx, count in masks(rng) if seq == 1 else [("prefill", *masks(rng)[1][1:])]:
            tensors = [np.ascontiguousarray(x) for x in (hidden, gate_up, down_t, idx, count, token_valid, scores_in)]
            out, scores_out = _run_mlp(plugin, tensors, trt.DataType.FLOAT, np.float32)
            ref_out, ref_scores = reference.sparse_gated_mlp(*tensors, activation=activation, score_norm=score_norm)
            assert _rel(out, ref_out) < 1e-5, (seq, name)
            assert _rel(scores_out, ref_scores) < 1e-5, (seq, name)


def test_sparse_gated_mlp_fp16_and_batch_zero(on_cpu):
    plugin = plugins.plugin_classes(trt)[0]().create_plugin("mlp", _fields(), trt.TensorRTPhase.RUNTIME)
    rng = np.random.default_rng(1)
    for seq in (4, 1):
        hidden, gate_up, down_t, token_valid, scores_in = mlp_inputs(rng, 2, seq, np.float16)
        _, idx, count = masks(rng, 2)[4]
        tensors = [np.ascontiguousarray(x) for x in (hidden, gate_up, down_t, idx, count, token_valid, scores_in)]
        out, _ = _run_mlp(plugin, tensors, trt.DataType.HALF, np.float16)
        ref, _ = reference.sparse_gated_mlp(*tensors)
        assert _rel(out, ref) < 5e-3, seq
    empty = [np.zeros((0,) + t.shape[1:], t.dtype) if k not in (1, 2) else t for k, t in enumerate(tensors)]
    out, scores_out = _run_mlp(plugin, empty, trt.DataType.HALF, np.float16)
    assert out.shape == (0, 1, H) and scores_out.shape == (0, I)


def test_select_active(on_cpu):
    plugin = plugins.plugin_classes(trt)[1]().create_plugin("sel", trt.PluginFieldCollection([]),
                                                            trt.TensorRTPhase.RUNTIME)
    cases = [(s, t, (0.0, 1.0)) for s, t in score_cases(np.random.default_rng(2))]
    cases += [c for c in bound_cases(np.random.default_rng(5)) if c[0].shape[0] > 0]
    for scores, tau, bounds in cases:
        threshold = np.array(tau, np.float32)
        density_bounds = np.array(bounds, np.float32)
        idx = np.full(scores.shape, -7, np.int32)
        count = np.full(scores.shape[:1], -7, np.int32)
        descs = [_desc(scores, trt.DataType.FLOAT), _desc(threshold, trt.DataType.FLOAT),
                 _desc(density_bounds, trt.DataType.FLOAT)]
        _keep, ws = _workspace(plugin.get_workspace_size(descs, []))
        plugin.enqueue(descs, [], [scores.ctypes.data, threshold.ctypes.data, density_bounds.ctypes.data],
                       [idx.ctypes.data, count.ctypes.data], ws, 0)
        ref_idx, ref_count = reference.select_active(scores, tau, bounds)
        assert np.array_equal(idx, ref_idx) and np.array_equal(count, ref_count), (tau, bounds)


class _RecordingKernels:
    """The CUDA library's workspace queries (host code, no GPU needed), the CPU library's launches, and a
    record of what the plugin passed: (decode version, workspace bytes) per decode call."""

    def __init__(self, cuda, cpu):
        self.cuda, self.cpu, self.calls = cuda, cpu, []

    def workspace_size(self, fn, args):
        return self.cuda.workspace_size(fn, args)

    def call(self, fn, args, workspace, workspace_size, stream=0):
        self.calls.append((args.version, workspace_size))
        self.cpu.call(fn, args, workspace, self.cpu.workspace_size(fn, args), stream)


@pytest.mark.skipif(kbuild.nvcc_path() is None, reason="nvcc not installed (the CUDA library's workspace queries)")
def test_decode_workspace_is_the_plans_whatever_the_environment(on_cpu, monkeypatch):
    """A plan built without $TDA_DECODE_VERSION, run where TDA_DECODE_VERSION=2: the CUDA library's v2 needs
    more workspace than TensorRT reserved for v1, so enqueue must keep to the recorded version and pass its
    size (the old enqueue passed a fresh query: v2's size over a v1 reservation)."""
    cuda = cuda_library()
    kernels = _RecordingKernels(cuda, cpu_library())
    monkeypatch.setattr(plugins, "_kernels", lambda: kernels)
    monkeypatch.setattr(plugins, "_queries", lambda: lg.kernel_queries(cuda))
    monkeypatch.delenv("TDA_DECODE_VERSION", raising=False)
    creator = plugins.plugin_classes(trt)[0]()
    built = creator.create_plugin("mlp", _fields(activation="silu"), trt.TensorRTPhase.BUILD)
    rng = np.random.default_rng(3)
    hidden, gate_up, down_t, token_valid, scores_in = mlp_inputs(rng, 3, 1, np.float16)
    _, idx, count = masks(rng, 3)[4]
    tensors = [np.ascontiguousarray(x) for x in (hidden, gate_up, down_t, idx, count, token_valid, scores_in)]
    types = [trt.DataType.HALF] * 3 + [trt.DataType.INT32] * 2 + [trt.DataType.FLOAT] * 2
    descs = [_desc(t, ty) for t, ty in zip(tensors, types)]
    reserved = built.get_workspace_size(descs, [])
    # What the CUDA library would ask for under TDA_DECODE_VERSION=2 here: more than the reservation.
    monkeypatch.setenv("TDA_DECODE_VERSION", "2")
    v2_need = max(cuda.workspace_size("tda_sparse_gated_mlp_decode", a) for a in _decode_args(3))
    assert v2_need > reserved, "the shapes no longer show the overrun: pick ones where v2 needs more"
    # The plan as TensorRT deserializes it, in the process where the variable is set.
    serialized = built.get_fields_to_serialize()
    fc = trt.PluginFieldCollection([trt.PluginField(f.name, np.asarray(f.data).copy(), f.type) for f in serialized])
    _KEEP.append(fc)
    plugin = creator.create_plugin("mlp", fc, trt.TensorRTPhase.RUNTIME)
    out, _ = _run_mlp(plugin, tensors, trt.DataType.HALF, np.float16, workspace_bytes=reserved)
    assert kernels.calls and all(version == 1 and nbytes <= reserved for version, nbytes in kernels.calls), \
        (kernels.calls, reserved)
    ref, _ = reference.sparse_gated_mlp(*tensors)
    assert _rel(out, ref) < 5e-3


def _decode_args(batch):
    from tda_export.kernels.abi import DTYPE_CODE, DecodeArgs

    return [DecodeArgs(dtype=DTYPE_CODE["float16"], batch=b, hidden=H, intermediate=I, deterministic=1)
            for b in range(1, batch + 1)]


def test_creator_rejects_a_bad_field():
    creator = plugins.plugin_classes(trt)[0]()
    with pytest.raises(lg.LogicError, match="activation 'swish' not in"):
        creator.create_plugin("mlp", _fields(activation="swish"), trt.TensorRTPhase.BUILD)
    with pytest.raises(lg.LogicError, match="down_weight_format 'q5_k' not in same, q8_0, q4_0, q4_1"):
        creator.create_plugin("mlp", _fields(weight_format="q4_1", down_weight_format="q5_k"),
                              trt.TensorRTPhase.BUILD)
    with pytest.raises(lg.LogicError, match="down_weight_format 'q8_0' needs a block weight_format, not 'dtype'"):
        creator.create_plugin("mlp", _fields(down_weight_format="q8_0"), trt.TensorRTPhase.RUNTIME)
    with pytest.raises(lg.LogicError, match="x_format 'q4_0' not in dtype, q8_0"):
        creator.create_plugin("mlp", _fields(weight_format="q4_0", x_format="q4_0"), trt.TensorRTPhase.BUILD)
    with pytest.raises(lg.LogicError, match="x_format 'q8_0' needs a block weight_format, not 'dtype'"):
        creator.create_plugin("mlp", _fields(x_format="q8_0"), trt.TensorRTPhase.RUNTIME)


@pytest.mark.parametrize("phase", ["BUILD", "RUNTIME"])
def test_creator_refuses_quantized_activations_over_the_cuda_library(monkeypatch, phase):
    """x_format q8_0 runs on the CPU kernel library only: where enqueue would run the CUDA library (a plan build,
    a GPU), the creator refuses it, building or deserializing, naming the field and the fix; over the CPU library
    (on_cpu, below) it makes the plugin. The CUDA library is asked for its tda_backend() only for such a field."""
    asked = []
    monkeypatch.setattr(plugins, "_kernels", lambda: asked.append(1) or SimpleNamespace(backend="cuda"))
    creator = plugins.plugin_classes(trt)[0]()
    with pytest.raises(lg.LogicError, match="SparseGatedMLP: x_format 'q8_0' runs on the CPU kernel library only, not "
                                            "the cuda one: rebuild the engine with x_format dtype for TensorRT"):
        creator.create_plugin("mlp", _fields(weight_format="q4_1", x_format="q8_0"), getattr(trt.TensorRTPhase, phase))
    assert asked == [1]
    plugin = creator.create_plugin("mlp", _fields(weight_format="q4_1", x_format="dtype"),
                                   getattr(trt.TensorRTPhase, phase))
    assert plugin.attrs.x_format == 0 and asked == [1]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_prefill_quantizes_x_as_the_contract(on_cpu, dtype):
    """device.quantize_x (the Python plugin's prefill step for x_format q8_0) is blocks.quantize_x rounded to T,
    bit for bit, in row chunks of the scratch: zero blocks, ties (half to even), tiny and huge scales, and blocks
    holding inf or NaN (all NaN)."""
    import torch

    from tda_export.ops import blocks

    H, M = 96, 7
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(M, H)) * rng.choice([1e-3, 1.0, 300.0], size=(M, 1))).astype(np.float32)
    x[0, :32] = 0  # d = 0: q = 0
    x[1, :32] = np.float32(0.5) * rng.integers(-9, 10, size=32)  # with max 127 below: d = 1, halves tie
    x[1, 0] = 127
    x[2, 32:64] = np.inf
    x[3, 64] = np.nan
    x[4, 40] = -np.inf
    src = torch.from_numpy(x).to(getattr(torch, dtype))  # x in T, as the plugin gets it
    want = torch.from_numpy(blocks.quantize_x(src.float().numpy())).to(src.dtype)
    out = torch.full_like(src, 7.0)
    scratch = torch.zeros(3 * H)  # three rows per chunk: M = 7 takes three chunks
    plan = SimpleNamespace(cublas_ws=scratch.data_ptr(), cublas_ws_bytes=scratch.numel() * 4, xq=out.data_ptr())
    device.quantize_x(plan, dtype, H, M, src.data_ptr())
    nan = out.isnan()
    assert torch.equal(nan, want.isnan()) and bool(nan[2, 32:64].all() and nan[3, 64:96].all() and nan[4, 32:64].all())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    assert bool((out[0, :32] == 0).all()) and bool((out[1, :32].float() == torch.from_numpy(np.rint(x[1, :32]))).all())


def test_prefill_allocates_nothing_and_accumulates_in_fp32(on_cpu, monkeypatch):
    """enqueue may run under CUDA graph capture, where allocating is illegal: the prefill's GEMMs and gated
    step write only into TensorRT's workspace and outputs (torch's allocator sees no allocation), and its
    GEMMs run with reduced-precision reductions off (the contract accumulates in float32)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    seen = []
    matmul = torch.matmul

    def recording_matmul(*args, **kwargs):
        m = torch.backends.cuda.matmul
        seen.append((m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction,
                     "out" in kwargs))
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    flags = torch.backends.cuda.matmul
    saved = flags.allow_fp16_reduced_precision_reduction
    flags.allow_fp16_reduced_precision_reduction = True
    try:
        _prefill_allocates_nothing(seen)
    finally:
        flags.allow_fp16_reduced_precision_reduction = saved


def _prefill_allocates_nothing(seen):
    import torch
    from torch.profiler import ProfilerActivity, profile

    plugin = plugins.plugin_classes(trt)[0]().create_plugin("mlp", _fields(activation="gelu_tanh"),
                                                            trt.TensorRTPhase.RUNTIME)
    rng = np.random.default_rng(4)
    hidden, gate_up, down_t, token_valid, scores_in = mlp_inputs(rng, 2, 7, np.float16)
    _, idx, count = masks(rng, 2)[4]
    tensors = [np.ascontiguousarray(x) for x in (hidden, gate_up, down_t, idx, count, token_valid, scores_in)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, _ = _run_mlp(plugin, tensors, trt.DataType.HALF, np.float16)
    allocating = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocating == []
    assert seen == [(False, False, True)] * 2
    assert torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction  # the process's setting is back
    ref, _ = reference.sparse_gated_mlp(*tensors, activation="gelu_tanh")
    assert _rel(out, ref) < 5e-3


@pytest.mark.parametrize("x_format", ["dtype", "q8_0"])
@pytest.mark.parametrize("name,down", FORMAT_PAIRS)
@pytest.mark.parametrize("dtype,trt_type,tol", [(np.float32, "FLOAT", 1e-5), (np.float16, "HALF", 5e-3)])
def test_sparse_gated_mlp_block_weights(on_cpu, name, down, dtype, trt_type, tol, x_format):
    """weight_format q8_0/q4_0/q4_1: the plugin takes the contract's blocks as int8 tensors (TensorRT plugin
    inputs cannot be uint8), decodes on them through the C ABI, and prefills on weights the kernel library
    dequantized into the plan's workspace (then rounded to T); both against the numpy reference of the exact
    dequantized weights, every mask kind. down_weight_format q8_0 under 4-bit gate/up rows: down_t is read (decode)
    and dequantized (prefill) in its own blocks. The creator serializes both formats; its int8 inputs are
    supported only with a block format. x_format q8_0 (on the CPU kernel library, where it runs): decode passes it to
    the C ABI, the prefill quantizes x into the workspace before its gate/up GEMM; against the reference on
    blocks.quantize_x(hidden)."""
    from tda_export.ops import blocks

    trt_type = getattr(trt.DataType, trt_type)
    down_fmt = name if down == "same" else down
    creator = plugins.plugin_classes(trt)[0]()
    plugin = creator.create_plugin("mlp", _fields(weight_format=name, down_weight_format=down, activation="gelu_tanh",
                                                  x_format=x_format), trt.TensorRTPhase.RUNTIME)
    served = {f.name: bytes(np.asarray(f.data).tobytes()) for f in plugin.get_fields_to_serialize()}
    assert served["weight_format"] == name.encode() + b"\0" and served["down_weight_format"] == down.encode() + b"\0"
    assert served["x_format"] == x_format.encode() + b"\0"
    rng = np.random.default_rng(7)
    for seq in (5, 1):
        hidden, gate_up, down_t, token_valid, scores_in = _block_inputs(rng, name, 3, seq, dtype, down_fmt)
        cases = masks(rng, 3, QI) if seq == 1 else [("prefill", *masks(rng, 3, QI)[4][1:])]
        for kind, idx, count in cases:
            tensors = [np.ascontiguousarray(x) for x in (hidden, gate_up.view(np.int8), down_t.view(np.int8), idx,
                                                         count, token_valid, scores_in)]
            out, scores_out = _run_mlp(plugin, tensors, trt_type, dtype, weight_type=trt.DataType.INT8)
            # the float op on each weight's exactly dequantized values (contract.QUANTIZED_SEMANTICS), on xq for q8_0
            ref_out, ref_scores = reference.sparse_gated_mlp_blocks(hidden, gate_up, down_t, name, idx, count,
                                                                    token_valid, scores_in, activation="gelu_tanh",
                                                                    down_weight_format=down, x_format=x_format)
            assert out.shape == (3, seq, QH)
            assert _rel(out, ref_out) < tol, (name, seq, kind)
            assert _rel(scores_out, ref_scores) < (1e-5 if dtype == np.float32 else 5e-3), (name, seq, kind)
    # int8 weights need a block format, and a block format needs int8 weights.
    io = [SimpleNamespace(desc=SimpleNamespace(type=t, format=trt.TensorFormat.LINEAR))
          for t in (trt_type, trt.DataType.INT8)]
    assert plugin.supports_format_combination(1, io, 7)
    dense = creator.create_plugin("mlp", _fields(), trt.TensorRTPhase.RUNTIME)
    assert not dense.supports_format_combination(1, io, 7)
    with pytest.raises(lg.LogicError, match=f"gate_up_weight: last dimension {QH} but weight_format {name}"):
        plugin.configure_plugin([SimpleNamespace(desc=SimpleNamespace(dims=d)) for d in
                                 [(3, 1, QH), (QI, 2, QH), (QI, QH), (3, QI), (3,), (3, 1), (3, QI)]], [])
    if down != "same":  # down_weight_t in gate_up's bytes: refused, naming the field whose bytes it needs
        row = gate_up.shape[-1]
        with pytest.raises(lg.LogicError, match=f"down_weight_t: last dimension {row} but down_weight_format {down}"):
            plugin.configure_plugin([SimpleNamespace(desc=SimpleNamespace(dims=d)) for d in
                                     [(3, 1, QH), (QI, 2, row), (QI, row), (3, QI), (3,), (3, 1), (3, QI)]], [])
