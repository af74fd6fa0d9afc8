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

from op_cases import H, I, bound_cases, masks, mlp_inputs, score_cases
from tda_export.kernels.abi import cpu_library
from tda_export.ops import reference
from tda_export.trt import device, logic as lg, plugins

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")

pytestmark = pytest.mark.trt

NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "bfloat16": np.int16}


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


def _run_mlp(plugin, tensors, trt_type, out_dtype):
    B, S = tensors[0].shape[:2]
    out = np.full((B, S, H), np.nan, out_dtype)
    scores_out = np.full((B, I), np.nan, np.float32)
    types = [trt_type] * 3 + [trt.DataType.INT32] * 2 + [trt.DataType.FLOAT] * 2
    descs = [_desc(t, ty) for t, ty in zip(tensors, types)]
    _keep, ws = _workspace(plugin.get_workspace_size(descs, []))
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
    assert served == {"activation": activation.encode() + b"\0", "score_norm": score_norm.encode() + b"\0"}
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


def test_creator_rejects_a_bad_field():
    creator = plugins.plugin_classes(trt)[0]()
    with pytest.raises(lg.LogicError, match="activation 'swish' not in"):
        creator.create_plugin("mlp", _fields(activation="swish"), trt.TensorRTPhase.BUILD)
