"""The CPU test bodies rerun on the CUDA library, plus GPU-only checks
(CUDA-graph capture, agreement with the CPU library, real model shapes)."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from tda_export.kernels import testing
from tda_export.kernels import torch_ops as K

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

_spec = importlib.util.spec_from_file_location("_kernel_bodies", Path(__file__).with_name("test_kernels_cpu.py"))
_bodies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bodies)
# Re-collect the test bodies that take the `device` fixture (it makes them run on the GPU); the CPU-only ones
# (ISA variants, thread counts) would only rerun the CPU library here and spend GPU time for nothing.
globals().update({k: v for k, v in vars(_bodies).items()
                  if k.startswith("test_") and "device" in inspect.signature(v).parameters})


@pytest.fixture
def device():
    return "cuda"


@pytest.fixture(scope="module")
def mistral_weights():
    """One Mistral-7B-shaped MLP layer per dtype, drawn on the GPU (a CPU draw takes seconds per test)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    gu = torch.randn(14336, 2, 4096, generator=g, device="cuda") / 64.0
    wd = torch.randn(14336, 4096, generator=g, device="cuda") / 14336 ** 0.5
    return {dt: (gu.to(dt), wd.to(dt)) for dt in (torch.bfloat16, torch.float16)}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 4, 8, 16, 33])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_decode_mistral_shape(mistral_weights, dtype, batch, density, version):
    hidden, inter = 4096, 14336
    rng = np.random.default_rng(batch)
    masks = [testing.make_mask("random", inter, rng, density) for _ in range(batch)]
    gu, wd = mistral_weights[dtype]
    idx, cnt = (torch.from_numpy(a).cuda() for a in testing.state_from_masks(masks, inter))
    x = torch.randn(batch, hidden, device="cuda").to(dtype)
    status, out = testing.run_decode(x, gu, wd, idx, cnt, version=version)
    assert status == 0
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)  # float64 on the GPU: milliseconds
    assert testing.rel_error(out, ref) < testing.TOLERANCE[dtype]


def test_decode_matches_cpu_library():
    masks = [testing.make_mask(k, 1536, np.random.default_rng(1)) for k in ("random", "full", "single", "empty")]
    args = testing.decode_problem(4, 576, 1536, torch.float32, masks, 1, "cpu")
    cpu = testing.run_decode(*args)[1]
    gpu = testing.run_decode(*(a.cuda() for a in args))[1]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pdl", ["1", "0"])
def test_decode_v2_matches_v1_and_captures(monkeypatch, pdl):
    """v2 with and without programmatic dependent launch, eagerly and replayed from a CUDA graph with new
    masks: the same results as v1 within rounding, bitwise reproducible."""
    monkeypatch.setenv("TDA_PDL", pdl)
    for batch in (1, 2, 5, 8):
        masks = [testing.make_mask(k, 1536, np.random.default_rng(batch)) for k in ["random", "full", "single",
                                                                                  "empty"] * 2][:batch]
        x, gu, wd, idx, cnt = testing.decode_problem(batch, 576, 1536, torch.bfloat16, masks, batch, "cuda")
        v1 = K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt, "silu", True, 1)
        v2 = K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt, "silu", True, 2)
        ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
        assert testing.rel_error(v1, ref) < 2e-2 and testing.rel_error(v2, ref) < 2e-2
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt, "silu", True, 2)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt, "silu", True, 2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, v2)
        new_masks = [testing.make_mask("random", 1536, np.random.default_rng(100 + b), 0.2) for b in range(batch)]
        new_idx, new_cnt = testing.state_from_masks(new_masks, 1536)
        idx.copy_(torch.from_numpy(new_idx))
        cnt.copy_(torch.from_numpy(new_cnt))
        graph.replay()
        torch.cuda.synchronize()
        assert testing.rel_error(out, testing.decode_reference_torch(x, gu, wd, idx, cnt)) < 2e-2


def test_cuda_graph_capture_and_replay():
    """No host sync inside: the whole select -> decode chain captures, and a
    replay with new scores picks up the new masks."""
    torch.cuda.synchronize()
    scores = torch.rand(4, 1536, device="cuda")
    tau = torch.tensor(0.5, device="cuda")
    x, gu, wd, _, _ = testing.decode_problem(4, 576, 1536, torch.bfloat16, [np.zeros(0, np.int32)] * 4, 2, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up the allocator and the lazy library build outside the capture
            idx, cnt = K.select_active(scores, tau)
            K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        idx, cnt = K.select_active(scores, tau)
        out = K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt)
    for seed in range(3):
        scores.copy_(torch.rand(4, 1536, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        torch.cuda.synchronize()
        ref_idx, ref_cnt = testing.reference.select_active(scores.cpu().numpy(), 0.5)
        np.testing.assert_array_equal(cnt.cpu().numpy(), ref_cnt)
        ref = testing.decode_reference(x, gu, wd, torch.from_numpy(ref_idx), torch.from_numpy(ref_cnt))
        assert testing.rel_error(out, ref) < testing.TOLERANCE[torch.bfloat16]
