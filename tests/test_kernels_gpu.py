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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 4, 8, 16, 33])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_decode_mistral_shape(dtype, batch, density):
    hidden, inter = 4096, 14336
    rng = np.random.default_rng(batch)
    masks = [testing.make_mask("random", inter, rng, density) for _ in range(batch)]
    x, gu, wd, idx, cnt = testing.decode_problem(batch, hidden, inter, dtype, masks, batch, "cuda")
    status, out = testing.run_decode(x, gu, wd, idx, cnt)
    assert status == 0
    ref = testing.decode_reference(x, gu, wd, idx, cnt)
    assert testing.rel_error(out, ref) < testing.TOLERANCE[dtype]


def test_decode_matches_cpu_library():
    masks = [testing.make_mask(k, 1536, np.random.default_rng(1)) for k in ("random", "full", "single", "empty")]
    args = testing.decode_problem(4, 576, 1536, torch.float32, masks, 1, "cpu")
    cpu = testing.run_decode(*args)[1]
    gpu = testing.run_decode(*(a.cuda() for a in args))[1]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


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
