"""Block-quantized weights (contract.BLOCK_FORMATS): the numpy (de)quantizers against the gguf package
byte for byte, and the CPU library's quantized sparse decode against a float64 reference of the same
dequantized weights, on every SIMD variant this machine runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from tda_export.kernels import abi, build, testing
from tda_export.ops import blocks, contract, reference

FORMATS = tuple(contract.BLOCK_FORMATS)
GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ISAS = ("generic", "avx2", "best")  # TDA_CPU_ISA caps (a cap above the CPU falls back to the best it has)
# H a multiple of 32 (so of 8), I odd or not a multiple of 8 (allowed for block weights), a real shape.
SHAPES = ((32, 7), (96, 13), (160, 72), (576, 1536))
# Dequantized weights are exact float32 values, so the float32 tolerance holds (fp16/bf16 round x, z and y).
TOLERANCE = testing.TOLERANCE


def _edge_blocks() -> np.ndarray:
    """Rows of 32 weights that hit the quantizers' corner cases."""
    rng = np.random.default_rng(1)
    rows = [np.zeros(32), np.full(32, 0.75), np.full(32, -3.0), np.arange(32) - 15.5, -(np.arange(32) - 15.5),
            np.r_[2.0, -2.0, rng.standard_normal(30)],        # |max| tie: the first wins (q4_0 sign of d)
            np.r_[-2.0, 2.0, rng.standard_normal(30)],
            (np.arange(32) - 16) * (127 / 16) + 0.5,          # q8_0 products near .5: halves away from zero
            rng.standard_normal(32) * 1e-6, rng.standard_normal(32) * 1e3, np.r_[1e-8, np.zeros(31)],
            np.r_[np.zeros(31), -1e-8]]  # 12 rows: whole 64-weight rows with the 41 * 8 random blocks
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_contract_formats_are_ggml_blocks(name):
    fmt = contract.BLOCK_FORMATS[name]
    assert fmt.ggml_type == GGML[name]
    assert gguf.GGML_QUANT_SIZES[GGML[name]] == (contract.QUANT_BLOCK, fmt.block_bytes)


@pytest.mark.parametrize("name", FORMATS)
def test_quantize_matches_gguf_bytes(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    w = (rng.standard_normal((41, 256)) * rng.uniform(1e-3, 3.0, (41, 1))).astype(np.float32)
    w = np.concatenate([w.reshape(-1, 32), _edge_blocks()]).reshape(-1, 64)
    ours = blocks.quantize(name, w)
    assert ours.dtype == np.uint8 and ours.shape == (w.shape[0], 2 * contract.BLOCK_FORMATS[name].block_bytes)
    np.testing.assert_array_equal(ours, quants.quantize(w, GGML[name]))
    # Round trip: the dequantized values are gguf's, bit for bit, and within about half a step of the input
    # (q4_0: a whole step on the side opposite the largest |w|, whose range [-8d, 7d] is clipped), plus the
    # fp16 rounding of the scale (a block of ~1e-6 weights has a scale below fp16's subnormals).
    deq = blocks.dequantize(name, ours)
    np.testing.assert_array_equal(deq.view(np.int32), quants.dequantize(ours, GGML[name]).view(np.int32))
    amax = np.abs(w.reshape(-1, 32)).max(1, keepdims=True)
    bound = {"q8_0": 0.6 * amax / 127, "q4_0": 1.05 * amax / 8, "q4_1": 0.6 * 2 * amax / 15}[name]
    assert (np.abs(deq - w).reshape(-1, 32) <= bound + 1e-5).all()


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_any_block_matches_gguf(name):
    """Arbitrary bytes (every nibble and int8 value, any finite fp16 scale) dequantize as gguf does."""
    fmt = contract.BLOCK_FORMATS[name]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (300, fmt.block_bytes), dtype=np.uint8)
    n_fp16 = 2 if name == "q4_1" else 1
    scales = rng.standard_normal((300, n_fp16)).astype(np.float16)
    scales[:4] = np.array([0.0, -0.0, 6.1e-5, 65504.0], np.float16)[:, None]  # zero, subnormal edge, fp16 max
    raw[:, : 2 * n_fp16] = scales.view(np.uint8)
    np.testing.assert_array_equal(blocks.dequantize(name, raw), quants.dequantize(raw, GGML[name]))


def test_block_layout_by_hand():
    """The nibble order and fields, on one block worked out by hand: weight k in byte k's low nibble,
    weight k + 16 in its high nibble; Q4_0 w = d (q - 8), Q4_1 w = d q + m."""
    q = np.arange(32) % 16
    q4 = np.zeros(16, np.uint8) | q[:16].astype(np.uint8) | (q[16:].astype(np.uint8)[::-1] << 4)
    d = np.array([0.5], "<f2").view(np.uint8)
    m = np.array([-1.0], "<f2").view(np.uint8)
    w40 = blocks.dequantize("q4_0", np.concatenate([d, q4]))
    w41 = blocks.dequantize("q4_1", np.concatenate([d, m, q4]))
    expect = np.r_[q[:16], q[16:][::-1]].astype(np.float32)
    np.testing.assert_array_equal(w40, 0.5 * (expect - 8))
    np.testing.assert_array_equal(w41, 0.5 * expect - 1.0)
    w80 = blocks.dequantize("q8_0", np.concatenate([d, np.arange(-16, 16, dtype=np.int8).view(np.uint8)]))
    np.testing.assert_array_equal(w80, 0.5 * np.arange(-16, 16))


def test_quantize_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        blocks.quantize("q4_0", np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        blocks.quantize("q8_0", np.full((1, 32), np.inf, np.float32))
    with pytest.raises(ValueError, match="overflows fp16"):
        blocks.quantize("q4_1", np.r_[np.zeros(31), 1e7].astype(np.float32)[None])
    with pytest.raises(ValueError, match="not a block format"):
        blocks.quantize("q5_0", np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="whole blocks of 18 bytes"):
        blocks.dequantize("q4_0", np.zeros((2, 20), np.uint8))


def test_reference_is_the_float_op_on_dequantized_weights():
    x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(2, 64, 24, "q4_1", torch.float32,
                                                                   _masks(["random", "full"], 24, 3), 3)
    args = (idx.numpy(), cnt.numpy(), np.ones((2, 1), np.float32), np.zeros((2, 24), np.float32))
    got, _ = reference.sparse_gated_mlp_blocks(x.numpy()[:, None], gu_q.numpy(), wd_q.numpy(), "q4_1", *args)
    want, _ = reference.sparse_gated_mlp(x.numpy()[:, None], gu.numpy(), wd.numpy(), *args)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got).max() > 0.1


# ---- CPU kernels ----

def _masks(kinds, inter, seed):
    rng = np.random.default_rng(seed)
    return [testing.make_mask(k, inter, rng, density=rng.uniform(0.05, 0.9)) for k in kinds]


def _check(name, dtype, hidden, inter, kinds, activation="silu", seed=0, down="same"):
    x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(len(kinds), hidden, inter, name, dtype,
                                                                   _masks(kinds, inter, seed), seed, down)
    status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, activation, weight_format=name,
                                     down_weight_format=down)
    assert status == abi.TDA_OK
    assert out.dtype == dtype and out.shape == (len(kinds), hidden)
    for b, kind in enumerate(kinds):
        if kind == "empty":
            assert torch.all(out[b] == 0), "an empty mask must give an exact zero row"
    ref = testing.decode_reference(x, gu, wd, idx, cnt, activation)
    err = testing.rel_error(out, ref)
    assert err < TOLERANCE[dtype], (err, name, dtype, hidden, inter, kinds)
    return x, gu_q, wd_q, idx, cnt, out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("hidden,inter", SHAPES)
def test_decode_masks(monkeypatch, isa, name, hidden, inter):
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for kind in testing.MASK_KINDS:
        _check(name, torch.float32, hidden, inter, [kind], seed=zlib.crc32(f"{hidden}-{kind}".encode()) % 1000)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 4, 7])
def test_decode_batch(monkeypatch, isa, name, dtype, batch):
    """Per-sequence masks (tiles of 4/2/1 active sequences per row, rows no sequence of a tile uses)."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    kinds = [testing.MASK_KINDS[(b * 5 + 3) % len(testing.MASK_KINDS)] for b in range(batch)]
    _check(name, dtype, 96, 13, kinds, activation="gelu_tanh", seed=batch)
    x, gu_q, wd_q, idx, cnt, out = _check(name, dtype, 160, 72, ["random"] * batch, seed=batch + 1)
    # Each sequence sees only its own mask (a single call sums in other chains: fp32 noise, which can move a
    # 16-bit rounding of z or y by one unit, so 16-bit types get torch's default tolerance for them).
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    for b in range(batch):
        status, single = testing.run_decode(x[b:b + 1], gu_q, wd_q, idx[b:b + 1], cnt[b:b + 1], weight_format=name)
        assert status == abi.TDA_OK
        torch.testing.assert_close(out[b:b + 1], single, **tol)


# down_weight_format: down_weight_t in a block format of its own (q8_0 under 4-bit gate/up is what exporters
# write; the reverse pair checks the two phases really read their own formats).
MIXED = (("q4_0", "q8_0"), ("q4_1", "q8_0"), ("q8_0", "q4_1"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name,down", MIXED)
def test_decode_down_format_of_its_own(monkeypatch, isa, name, down):
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    kinds = ["empty", "full", "single", "random"]
    for hidden, inter in ((96, 13), (576, 1536)):
        _check(name, torch.float32, hidden, inter, kinds, seed=hidden, down=down)
    _check(name, torch.bfloat16, 160, 72, ["random"] * 5, activation="gelu_tanh", seed=2, down=down)
    if contract.BLOCK_FORMATS[down].block_bytes > contract.BLOCK_FORMATS[name].block_bytes:
        # down's bytes read in gate_up's (smaller) format stay in bounds and are another op: the field is read
        x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(1, 64, 9, name, torch.float32,
                                                                       _masks(["full"], 9, 1), 1, down)
        status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name)
        assert status == abi.TDA_OK
        assert testing.rel_error(out, testing.decode_reference(x, gu, wd, idx, cnt)) > 0.1


@pytest.mark.parametrize("activation", contract.ACTIVATIONS)
def test_decode_activations(activation):
    for name in FORMATS:
        _check(name, torch.float32, 64, 9, ["random", "full", "single"], activation, seed=5)


@pytest.mark.parametrize("name", FORMATS)
def test_decode_batch_zero(name):
    lib = abi.cpu_library()
    args = abi.DecodeArgs(dtype=0, activation=0, batch=0, hidden=4096, intermediate=14335,
                          weight_format=abi.WEIGHT_FORMAT_CODE[name])
    assert lib.workspace_size("tda_sparse_gated_mlp_decode", args) == 0
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == abi.TDA_OK


def test_decode_isas_agree_and_threads_are_invariant(monkeypatch):
    """Every variant meets the reference; each is bitwise-equal for 1, 2 and 3 OpenMP threads (the
    column split of the down projection moves in whole blocks)."""
    before = torch.get_num_threads()
    try:
        for name in FORMATS:
            x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(3, 1056, 2051, name, torch.float32,
                                                                           _masks(["full", "random", "single"],
                                                                                  2051, 8), 8)
            ref = testing.decode_reference(x, gu, wd, idx, cnt)
            for isa in ISAS:
                monkeypatch.setenv("TDA_CPU_ISA", isa) if isa != "best" else monkeypatch.delenv("TDA_CPU_ISA",
                                                                                                raising=False)
                outs = []
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    outs.append(testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name)[1])
                assert testing.rel_error(outs[0], ref) < 1e-5, (name, isa)
                assert all(torch.equal(outs[0], o) for o in outs[1:]), (name, isa)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", FORMATS)
def test_torch_kernel_op_takes_block_weights(name):
    """tda_kernels::sparse_gated_mlp_decode with weight_format passes the blocks to the CPU kernel: the reference
    of the dequantized weights and tda::sparse_gated_mlp agree with it; its fake gives the shape; a layout that
    does not match the format is refused by name before the kernel reads it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tda_export.kernels import torch_ops as K
    from tda_export.ops.torch_ops import sparse_gated_mlp

    x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(4, 96, 13, name, torch.float32,
                                                                   _masks(["empty", "full", "single", "random"], 13,
                                                                          9), 9)
    out = K.sparse_gated_mlp_decode(x[:, None], gu_q, wd_q, idx, cnt, "gelu_tanh", weight_format=name)
    assert out.shape == (4, 1, 96) and not out[0].any()
    assert testing.rel_error(out[:, 0], testing.decode_reference(x, gu, wd, idx, cnt, "gelu_tanh")) < 1e-5
    ops_out, _ = sparse_gated_mlp(x[:, None], gu_q, wd_q, idx, cnt, torch.ones(4, 1), torch.zeros(4, 13),
                                  activation="gelu_tanh", weight_format=name)
    torch.testing.assert_close(out, ops_out, rtol=1e-5, atol=1e-6)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert K.sparse_gated_mlp_decode(torch.empty(4, 96), gu_q, wd_q, idx, cnt, weight_format=name).shape == (4, 96)
    with pytest.raises(ValueError, match=f"gate_up_weight has shape .*weight_format {name}"):
        K.sparse_gated_mlp_decode(x, gu_q[:, :, 1:].contiguous(), wd_q, idx, cnt, weight_format=name)
    with pytest.raises(TypeError, match="down_weight_t is torch.float32"):
        K.sparse_gated_mlp_decode(x, gu_q, wd_q.float(), idx, cnt, weight_format=name)


@pytest.mark.parametrize("name,down", MIXED[:2])
def test_torch_ops_take_a_down_format_of_their_own(name, down):
    """The kernel op, the contract's torch op and the numpy reference agree with a down format of its own; a
    down_weight_t in gate_up's format is refused by name."""
    from tda_export.kernels import torch_ops as K
    from tda_export.ops.torch_ops import sparse_gated_mlp

    x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(3, 96, 13, name, torch.float32,
                                                                   _masks(["empty", "full", "random"], 13, 4), 4, down)
    out = K.sparse_gated_mlp_decode(x, gu_q, wd_q, idx, cnt, weight_format=name, down_weight_format=down)
    assert testing.rel_error(out, testing.decode_reference(x, gu, wd, idx, cnt)) < 1e-5
    args = (idx, cnt, torch.ones(3, 1), torch.zeros(3, 13))
    ops_out, _ = sparse_gated_mlp(x[:, None], gu_q, wd_q, *args, weight_format=name, down_weight_format=down)
    torch.testing.assert_close(out, ops_out[:, 0], rtol=1e-5, atol=1e-6)
    ref, _ = reference.sparse_gated_mlp_blocks(x.numpy()[:, None], gu_q.numpy(), wd_q.numpy(), name,
                                               *(a.numpy() for a in args), down_weight_format=down)
    assert testing.rel_error(out, ref[:, 0]) < 1e-5
    with pytest.raises(ValueError, match=f"down_weight_t has shape .*weight_format {name}"):
        K.sparse_gated_mlp_decode(x, gu_q, wd_q, idx, cnt, weight_format=name)  # read as down_weight_format=same
    with pytest.raises(ValueError, match="needs a block weight_format"):
        sparse_gated_mlp(x[:, None], gu, wd, *args, down_weight_format=down)


# ---- x_format q8_0: gate/up read x quantized per block of 32 (contract X_QUANT_SEMANTICS) ----

PAIRS = tuple((name, "same") for name in FORMATS) + MIXED  # every (weight_format, down_weight_format) tested above


def _q8_reference(x, gu, wd, idx, cnt, activation="silu"):
    """The float64 decode of blocks.quantize_x(x) (x widened to float32 first, as the kernel widens it)."""
    xq = torch.from_numpy(blocks.quantize_x(x.float().numpy()))
    return testing.decode_reference(xq, gu, wd, idx, cnt, activation)


def _check_q8(name, dtype, hidden, inter, kinds, activation="silu", seed=0, down="same"):
    x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(len(kinds), hidden, inter, name, dtype,
                                                                   _masks(kinds, inter, seed), seed, down)
    status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, activation, weight_format=name,
                                     down_weight_format=down, x_format="q8_0")
    assert status == abi.TDA_OK
    assert out.dtype == dtype and out.shape == (len(kinds), hidden)
    for b, kind in enumerate(kinds):
        if kind == "empty":
            assert torch.all(out[b] == 0), "an empty mask must give an exact zero row"
    ref = _q8_reference(x, gu, wd, idx, cnt, activation)
    err = testing.rel_error(out, ref)
    assert err < TOLERANCE[dtype], (err, name, down, dtype, hidden, inter, kinds)
    return x, gu_q, wd_q, idx, cnt, gu, wd, out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name,down", PAIRS)
def test_decode_x_q8_0(monkeypatch, isa, name, down):
    """Every format pair, mask kind, odd I and batch 1 / 3 / 4 / 7 (tiles of 4/2/1 sequences per weight block)
    against the float64 op on quantize_x(x) and the same dequantized weights; fp16/bf16 x is widened, then
    quantized. A full mask is far from the op on x itself (x_format is read), and the numpy reference
    (reference.sparse_gated_mlp_blocks with x_format q8_0) is the one checked."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for hidden, inter in SHAPES:
        for kind in testing.MASK_KINDS:
            _check_q8(name, torch.float32, hidden, inter, [kind], seed=zlib.crc32(f"{hidden}-{kind}".encode()) % 1000,
                      down=down)
    for batch in (3, 4, 7):
        kinds = [testing.MASK_KINDS[(b * 5 + 3) % len(testing.MASK_KINDS)] for b in range(batch)]
        _check_q8(name, torch.float32, 96, 13, kinds, activation="gelu_tanh", seed=batch, down=down)
    for dtype in DTYPES[1:]:
        _check_q8(name, dtype, 160, 72, ["random", "full", "empty", "single", "random"], seed=3, down=down)
    x, gu_q, wd_q, idx, cnt, gu, wd, out = _check_q8(name, torch.float32, 160, 72, ["full", "random", "single"],
                                                     activation="relu", seed=4, down=down)
    args = (idx.numpy(), cnt.numpy(), np.ones((3, 1), np.float32), np.zeros((3, 72), np.float32))
    ref, _ = reference.sparse_gated_mlp_blocks(x.numpy()[:, None], gu_q.numpy(), wd_q.numpy(), name, *args, "relu",
                                               down_weight_format=down, x_format="q8_0")
    assert testing.rel_error(out, ref[:, 0]) < TOLERANCE[torch.float32]
    assert testing.rel_error(out, testing.decode_reference(x, gu, wd, idx, cnt, "relu")) > 20 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("activation", contract.ACTIVATIONS)
def test_decode_x_q8_0_activations(activation):
    for name in FORMATS:
        _check_q8(name, torch.float32, 64, 9, ["random", "full", "single"], activation, seed=5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_decode_x_q8_0_non_finite_block(monkeypatch, isa, bad):
    """A block of x holding inf/NaN has d = NaN: every gate/up of that sequence is NaN, so its whole output row
    is (any active neuron); an empty mask still gives zeros, and the other sequences keep their bits."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for name, down in PAIRS:
        x, gu_q, wd_q, idx, cnt, _, _ = testing.block_decode_problem(5, 96, 13, name, torch.float32,
                                                                     _masks(["full", "single", "random", "empty",
                                                                             "random"], 13, 2), 2, down)
        status, clean = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name, down_weight_format=down,
                                           x_format="q8_0")
        assert status == abi.TDA_OK and torch.isfinite(clean).all()
        x[1, 40], x[3, 70], x[4, 95] = bad, bad, bad  # single, empty and random masks; blocks 1, 2 and the last
        status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name, down_weight_format=down,
                                         x_format="q8_0")
        assert status == abi.TDA_OK
        assert torch.isnan(out[[1, 4]]).all(), (name, down)
        assert torch.all(out[3] == 0)
        assert torch.equal(out[[0, 2]], clean[[0, 2]]), (name, down)


def test_decode_x_q8_0_isas_agree_and_threads_are_invariant(monkeypatch):
    """As test_decode_isas_agree_and_threads_are_invariant, with x_format q8_0 (x is quantized once per call,
    before the threads split the rows)."""
    before = torch.get_num_threads()
    try:
        for name, down in PAIRS[:3] + MIXED[1:2]:
            x, gu_q, wd_q, idx, cnt, gu, wd = testing.block_decode_problem(3, 1056, 2051, name, torch.float32,
                                                                           _masks(["full", "random", "single"],
                                                                                  2051, 8), 8, down)
            ref = _q8_reference(x, gu, wd, idx, cnt)
            for isa in ISAS:
                monkeypatch.setenv("TDA_CPU_ISA", isa) if isa != "best" else monkeypatch.delenv("TDA_CPU_ISA",
                                                                                                raising=False)
                outs = []
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    outs.append(testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format=name,
                                                   down_weight_format=down, x_format="q8_0")[1])
                assert testing.rel_error(outs[0], ref) < 1e-5, (name, isa)
                assert all(torch.equal(outs[0], o) for o in outs[1:]), (name, isa)
    finally:
        torch.set_num_threads(before)


def test_decode_x_format_arguments():
    """x_format 0 or 1 (q8_0, block weights only); anything else TDA_ERR_BAD_DTYPE with a zero workspace. The
    workspace does not depend on x_format (quantized x takes the fp32 x's place), batch 0 needs none."""
    lib = abi.cpu_library()
    fn = "tda_sparse_gated_mlp_decode"
    q8 = abi.X_FORMAT_CODE["q8_0"]
    for name in FORMATS:
        for dtype in contract.DTYPES:
            args = dict(dtype=abi.DTYPE_CODE[dtype], activation=0, batch=3, hidden=4096, intermediate=14335,
                        weight_format=abi.WEIGHT_FORMAT_CODE[name])
            same = lib.workspace_size(fn, abi.DecodeArgs(**args))
            assert same > 0 and lib.workspace_size(fn, abi.DecodeArgs(**args, x_format=q8)) == same, (name, dtype)
            empty = abi.DecodeArgs(**{**args, "batch": 0}, x_format=q8)
            assert lib.workspace_size(fn, empty) == 0 and lib.call_status(fn, empty, 0, 0) == abi.TDA_OK
            for bad in (2, -1):
                assert lib.workspace_size(fn, abi.DecodeArgs(**args, x_format=bad)) == 0
                assert lib.call_status(fn, abi.DecodeArgs(**args, x_format=bad), 0, 0) == 2  # TDA_ERR_BAD_DTYPE
    floats = abi.DecodeArgs(dtype=0, activation=0, batch=1, hidden=64, intermediate=16, x_format=q8)
    assert lib.workspace_size(fn, floats) == 0 and lib.call_status(fn, floats, 0, 0) == 2  # float weights
    assert "x_format" in lib.status_string(2)
    # through the helper, with real buffers: refused before anything is read or written
    x, gu, wd, idx, cnt = testing.decode_problem(2, 64, 16, torch.float32, _masks(["full", "random"], 16, 1), 1)
    status, out = testing.run_decode(x, gu, wd, idx, cnt, x_format="q8_0")
    assert status == 2 and torch.isnan(out).all()
    x, gu_q, wd_q, idx, cnt, _, _ = testing.block_decode_problem(2, 64, 16, "q4_1", torch.float32,
                                                                 _masks(["full", "random"], 16, 1), 1)
    for bad in (2, -1):
        status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, weight_format="q4_1", x_format=bad)
        assert status == 2 and torch.isnan(out).all()


def test_float_formats_unchanged_by_weight_format_field():
    """weight_format 0 (a zero-initialised struct) is the float op of ABI 3."""
    x, gu, wd, idx, cnt = testing.decode_problem(2, 40, 72, torch.float32, _masks(["random", "full"], 72, 4), 4)
    _, out = testing.run_decode(x, gu, wd, idx, cnt, weight_format="dtype")
    assert testing.rel_error(out, testing.decode_reference(x, gu, wd, idx, cnt)) < TOLERANCE[torch.float32]


def test_decode_bad_arguments():
    x, gu_q, wd_q, idx, cnt, _, _ = testing.block_decode_problem(2, 64, 13, "q4_0", torch.float32,
                                                                 _masks(["full", "random"], 13, 6), 6)
    run = testing.run_decode
    assert run(x, gu_q, wd_q, idx, cnt, weight_format="q4_0", hidden=40)[0] == 4  # TDA_ERR_BAD_SIZE: H % 32
    assert run(x, gu_q, wd_q, idx, cnt, weight_format="q4_0", hidden=0)[0] == 4
    lib = abi.cpu_library()
    args = abi.DecodeArgs(dtype=0, activation=0, batch=1, hidden=64, intermediate=13, weight_format=4)
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 2  # TDA_ERR_BAD_DTYPE
    args.weight_format = -1
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 2
    args.weight_format, args.intermediate = abi.WEIGHT_FORMAT_CODE["q8_0"], 0
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 4
    assert "multiple of 32" in lib.status_string(4) and "weight_format" in lib.status_string(2)
    # a down format of its own: a block format, under a block weight_format only
    for wf, dwf in ((0, abi.WEIGHT_FORMAT_CODE["q8_0"]), (abi.WEIGHT_FORMAT_CODE["q4_0"], 4),
                    (abi.WEIGHT_FORMAT_CODE["q4_0"], -1)):
        bad = abi.DecodeArgs(dtype=0, activation=0, batch=1, hidden=64, intermediate=16, weight_format=wf,
                             down_weight_format=dwf)
        assert lib.workspace_size("tda_sparse_gated_mlp_decode", bad) == 0
        assert lib.call_status("tda_sparse_gated_mlp_decode", bad, 0, 0) == 2, (wf, dwf)
    # Blocks need no alignment (18-byte blocks never are), but x and the output still do.
    gu_odd = torch.empty(gu_q.numel() + 1, dtype=torch.uint8)[1:].view(gu_q.shape)
    gu_odd.copy_(gu_q)
    assert run(x, gu_odd, wd_q, idx, cnt, weight_format="q4_0")[0] == abi.TDA_OK
    out = torch.empty(2 * 64 + 1, dtype=torch.float32)[1:].view(2, 64)
    assert run(x, gu_q, wd_q, idx, cnt, weight_format="q4_0", out=out)[0] == 6  # TDA_ERR_MISALIGNED


# ---- AddressSanitizer + UndefinedBehaviorSanitizer ----

@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_sanitizers(tmp_path):
    """The quantized kernels under ASan + UBSan: a C driver (tests/kernels_sanitize_main.cpp) runs every format,
    ISA, dtype and mask kind of the sparse decode, and every format, M (0 to prefill sizes) and row range of the
    dense block linear and dequantize, each with x as is and quantized (x_format q8_0), on weights allocated to
    the exact byte, so a read past a row's last block faults."""
    src = Path(build.SRC_ROOT)
    flags = ["g++", "-std=c++17", "-O1", "-g", "-fopenmp", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror"]
    sources = [Path(__file__).parent / "kernels_sanitize_main.cpp", *sorted((src / "src" / "cpu").glob("*.cpp"))]
    objs = [tmp_path / f"{i}_{s.stem}.o" for i, s in enumerate(sources)]
    compile_one = lambda s, o: subprocess.run(  # noqa: E731
        [*flags, f"-I{src / 'include'}", f"-I{src / 'src'}", "-c", str(s), "-o", str(o)], check=True,
        capture_output=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one g++ per source: ~3x faster
        list(pool.map(compile_one, sources, objs))
    exe = tmp_path / "kernels_sanitize"
    subprocess.run([*flags, *map(str, objs), "-o", str(exe)], check=True, capture_output=True)
    for isa in ISAS:
        env = {**os.environ, "TDA_CPU_ISA": isa, "OMP_NUM_THREADS": "2", "ASAN_OPTIONS": "detect_leaks=0"}
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0 and "runtime error" not in r.stderr, (isa, r.stdout[-2000:], r.stderr[-4000:])
        assert r.stdout.strip().endswith("ok"), r.stdout[-2000:]


def test_each_isa_unit_keeps_its_own_kernels():
    """The AVX2, AVX-512 and VNNI units each instantiate the block kernels from the same headers, on their own
    anonymous-namespace traits. GCC gave the dispatch templates over those (decode_ctx.h's block_kernels) one
    COMDAT name in every unit, so the linker kept decode_avx2.cpp's tables and an AVX-512 CPU silently ran the
    AVX2 block kernels (results equal by design, so no parity test saw it). Each unit's copies must survive."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on PATH")
    lib = build.build_cpu()
    names = subprocess.run([nm, "-C", str(lib)], check=True, capture_output=True, text=True).stdout.splitlines()

    def copies(fragment: str) -> int:
        return sum(fragment in line for line in names)

    # down on q8_0 rows: decode_avx2.cpp, decode_avx512.cpp and decode_vnni.cpp (which instantiates the
    # whole quantized-x family); gate_up with quantized x: decode_avx2.cpp and decode_vnni.cpp.
    assert copies("::down<tda::cpu::(anonymous namespace)::BlockWeights<(tda_dtype_t)0, (tda_weight_format_t)1> >(") \
        == 3
    assert copies("::gate_up<tda::cpu::(anonymous namespace)::BlockWeightsQx<(tda_dtype_t)0, "
                  "(tda_weight_format_t)1>, (tda_activation_t)0>(") == 2
