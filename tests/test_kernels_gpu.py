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


# ---- Block-quantized weights (decode.cu gate_up_q / down_proj<BlockRows>, block_linear.cu) ----
# Against the float64 reference of the blocks' exact dequantized weights (ops/blocks.py), the same masks.

BLOCK_FORMATS = ("q8_0", "q4_0", "q4_1")


def _block_masks(kinds, inter, seed):
    rng = np.random.default_rng(seed)
    return [testing.make_mask(k, inter, rng, density=rng.uniform(0.05, 0.9)) for k in kinds]


@pytest.mark.parametrize("name", BLOCK_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3, 8, 33])
@pytest.mark.parametrize("hidden,inter", [(32, 7), (1056, 2051)])
@pytest.mark.parametrize("version", [0, 2])  # 2 asks for v2, which serves float weights only: v1 runs
def test_block_decode_vs_fp64(name, dtype, batch, hidden, inter, version):
    _block_decode_vs_fp64(name, "same", dtype, batch, hidden, inter, version)


def _block_decode_vs_fp64(name, down, dtype, batch, hidden, inter, version=0):
    """down: down_weight_format ("same": down_t in name's blocks too)."""
    kinds = [testing.MASK_KINDS[(b * 5 + batch) % len(testing.MASK_KINDS)] for b in range(batch)]
    x, gu_q, wd_q, idx, cnt, gu, wd = (t.cuda() for t in testing.block_decode_problem(
        batch, hidden, inter, name, dtype, _block_masks(kinds, inter, batch), batch, down_weight_format=down))
    row = hidden // 32 * contract_block_bytes(name if down == "same" else down)
    assert wd_q.shape == (inter, row)  # down_t really is in its own blocks
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
    for det in (True, False):
        status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, deterministic=det, version=version,
                                         weight_format=name, down_weight_format=down)
        assert status == 0
        for b, kind in enumerate(kinds):
            if kind == "empty":
                assert torch.all(out[b] == 0)
        assert testing.rel_error(out, ref) < testing.TOLERANCE[dtype], (name, down, dtype, batch, det)


@pytest.fixture(scope="module")
def mistral_blocks():
    """One Mistral-7B-shaped MLP layer per block format: random blocks made on the GPU (testing.random_blocks) and
    their exact float32 weights (ops/torch_blocks.py, checked bit for bit against ops/blocks.py elsewhere)."""
    from tda_export.ops import torch_blocks

    cache = {}

    def get(name, down=None):  # down: down_t's own format (down_weight_format), default name's
        down = down or name
        if (name, down) not in cache:
            gu_q = testing.random_blocks(name, 2 * 14336, 4096, "cuda", 1, 0.5 / 64).view(14336, 2, -1)
            wd_q = testing.random_blocks(down, 14336, 4096, "cuda", 2, 0.5 / 14336 ** 0.5)
            cache[name, down] = (gu_q, wd_q, torch_blocks.dequantize(name, gu_q), torch_blocks.dequantize(down, wd_q))
        return cache[name, down]
    return get


@pytest.mark.parametrize("name", BLOCK_FORMATS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_block_decode_mistral_shape(mistral_blocks, name, batch, density):
    hidden, inter = 4096, 14336
    rng = np.random.default_rng(batch)
    masks = [testing.make_mask("random", inter, rng, density) for _ in range(batch)]
    gu_q, wd_q, gu, wd = mistral_blocks(name)
    idx, cnt = (torch.from_numpy(a).cuda() for a in testing.state_from_masks(masks, inter))
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name)
    assert status == 0
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
    assert testing.rel_error(out, ref) < testing.TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_decode_matches_cpu_library(name):
    masks = _block_masks(["random", "full", "single", "empty"], 1537, 1)
    args = testing.block_decode_problem(4, 576, 1537, name, torch.float32, masks, 1)[:5]
    cpu = testing.run_decode(*args, weight_format=name)[1]
    gpu = testing.run_decode(*(a.cuda() for a in args), weight_format=name)[1]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_decode_alignment_and_capture(name):
    """Block arrays must be 4-byte aligned for the CUDA library (TDA_ERR_MISALIGNED, nothing launched); the
    quantized decode captures into a CUDA graph and a replay picks up new masks."""
    masks = _block_masks(["random", "full"], 300, 2)
    x, gu_q, wd_q, idx, cnt, gu, wd = (t.cuda() for t in testing.block_decode_problem(2, 128, 300, name,
                                                                                     torch.bfloat16, masks, 2))
    shifted = torch.empty(gu_q.numel() + 2, dtype=torch.uint8, device="cuda")[2:].view(gu_q.shape)
    shifted.copy_(gu_q)
    assert testing.run_decode(x, shifted, wd_q, idx, cnt, weight_format=name)[0] == 6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.sparse_gated_mlp_decode(x, gu_q, wd_q, idx, cnt, weight_format=name)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = K.sparse_gated_mlp_decode(x, gu_q, wd_q, idx, cnt, weight_format=name)
    new_idx, new_cnt = testing.state_from_masks(_block_masks(["single", "random"], 300, 3), 300)
    idx.copy_(torch.from_numpy(new_idx))
    cnt.copy_(torch.from_numpy(new_cnt))
    graph.replay()
    torch.cuda.synchronize()
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
    assert testing.rel_error(out, ref) < testing.TOLERANCE[torch.bfloat16]


# ---- down_weight_format (ABI 6): down_t in a block format of its own (decode.cu run<D, F, Fd>) ----
# The 4-bit engines' q8_0 down rows, and one reverse pair (8-bit gate/up, 4-bit down): every pair shares the
# kernels, so these catch a down_proj reading the wrong format's blocks or row stride.
OWN_DOWN = [("q4_1", "q8_0"), ("q4_0", "q8_0"), ("q8_0", "q4_1")]


# fp16 and batch 3 add nothing the single formats' cases do not cover (dtype and batch tiles live outside
# down's format); fewer cases keep gpu_check.sh's pytest stages inside their budgets.
@pytest.mark.parametrize("name,down", OWN_DOWN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("hidden,inter", [(32, 7), (1056, 2051)])
def test_own_down_format_decode_vs_fp64(name, down, dtype, batch, hidden, inter):
    _block_decode_vs_fp64(name, down, dtype, batch, hidden, inter)


@pytest.mark.parametrize("name,down", OWN_DOWN[:2])
@pytest.mark.parametrize("batch", [1, 8])
def test_own_down_format_mistral_shape(mistral_blocks, name, down, batch):
    hidden, inter = 4096, 14336
    rng = np.random.default_rng(batch)
    masks = [testing.make_mask("random", inter, rng, 0.5) for _ in range(batch)]
    gu_q, wd_q, gu, wd = mistral_blocks(name, down)
    idx, cnt = (torch.from_numpy(a).cuda() for a in testing.state_from_masks(masks, inter))
    x = torch.randn(batch, hidden, device="cuda").to(torch.bfloat16)
    status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name, down_weight_format=down)
    assert status == 0
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
    assert testing.rel_error(out, ref) < testing.TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("name,down", OWN_DOWN)
def test_own_down_format_matches_cpu_library_and_checks_alignment(name, down):
    masks = _block_masks(["random", "full", "single", "empty"], 1537, 1)
    args = testing.block_decode_problem(4, 576, 1537, name, torch.float32, masks, 1, down_weight_format=down)[:5]
    cpu = testing.run_decode(*args, weight_format=name, down_weight_format=down)[1]
    x, gu_q, wd_q, idx, cnt = (a.cuda() for a in args)
    gpu = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name, down_weight_format=down)[1]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    # down_weight_t 2 bytes off in its own format: TDA_ERR_MISALIGNED before anything is launched
    shifted = torch.empty(wd_q.numel() + 2, dtype=torch.uint8, device="cuda")[2:].view(wd_q.shape)
    shifted.copy_(wd_q)
    assert testing.run_decode(x, gu_q, shifted, idx, cnt, weight_format=name, down_weight_format=down)[0] == 6


def contract_block_bytes(name: str) -> int:
    from tda_export.ops.contract import BLOCK_FORMATS as FORMATS

    return FORMATS[name].block_bytes


@pytest.mark.parametrize("name", BLOCK_FORMATS)
@pytest.mark.parametrize("m", [0, 1, 3, 8, 17])
def test_block_linear_vs_fp64(name, m):
    """tda_block_linear (ABI 5) on the GPU: strided x and y (ldx > K, ldy > N), a row range that leaves the
    other columns untouched (NaN-poisoned), M past one tile of 8, K not a multiple of a warp step (33 blocks)."""
    from tda_export.ops import blocks
    rng = np.random.default_rng(m)
    for n, k in ((5, 32), (300, 1056), (4096, 4096)):
        w_q = blocks.quantize(name, rng.standard_normal((n, k)).astype(np.float32))
        w = torch.from_numpy(blocks.dequantize(name, w_q)).cuda().double()
        xs = torch.randn(m, k + 3, device="cuda")
        x = xs[:, :k]
        y = torch.full((m, n + 5), float("nan"), device="cuda")
        n_begin, n_end = (1, n - 1) if n > 2 else (0, n)
        assert testing.run_block_linear(x, torch.from_numpy(w_q).cuda(), name, n_begin, n_end, out=y)[0] == 0
        torch.cuda.synchronize()
        if m == 0:
            continue
        ref = x.double() @ w.T
        assert testing.rel_error(y[:, n_begin:n_end], ref[:, n_begin:n_end]) < 1e-6, (name, m, n, k)
        assert torch.isnan(y[:, :n_begin]).all() and torch.isnan(y[:, n_end:]).all()


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_dequantize_bit_for_bit(name):
    from tda_export.kernels import abi
    from tda_export.ops import blocks
    lib = abi.cuda_library()
    w_q = blocks.quantize(name, np.random.default_rng(4).standard_normal((37, 1056)).astype(np.float32))
    out = torch.full((37, 1060), float("nan"), device="cuda")
    status = lib.block_dequantize_status(abi.WEIGHT_FORMAT_CODE[name], 1056, 37, torch.from_numpy(w_q).cuda().data_ptr(),
                                         out.data_ptr(), 1060, torch.cuda.current_stream().cuda_stream)
    assert status == 0
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out[:, :1056].cpu().numpy(), blocks.dequantize(name, w_q))
    assert torch.isnan(out[:, 1056:]).all()
