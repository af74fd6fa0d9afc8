"""tda::sparse_gated_mlp and tda::select_active against the numpy reference."""
import numpy as np
import pytest
import torch

from tda_export.ops import blocks, reference
from tda_export.ops.contract import ACTIVATIONS, BLOCK_FORMATS, SCORE_NORMS
from tda_export.ops.torch_blocks import dequantize, quantize_x
from tda_export.ops.torch_ops import select_active, sparse_gated_mlp

from op_cases import (QH, QI, I, any_blocks, bound_cases, masks, mlp_inputs, poison_x, quant_mlp_inputs, same_floats,
                      score_cases, x_cases)


def _run(args, **attrs):
    out, scores = sparse_gated_mlp(*[torch.from_numpy(np.ascontiguousarray(a)) for a in args], **attrs)
    return out.float().numpy(), scores.numpy()


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("norm", SCORE_NORMS)
def test_prefill_matches_reference(act, norm):
    rng = np.random.default_rng(0)
    hidden, gu, dt, valid, sin = mlp_inputs(rng, 2, 5)
    idx, cnt = masks(rng)[0][1:]
    args = (hidden, gu, dt, idx[:2], cnt[:2], valid, sin)
    out, scores = _run(args, activation=act, score_norm=norm)
    ref_out, ref_scores = reference.sparse_gated_mlp(*args, activation=act, score_norm=norm)
    assert _rel(out, ref_out) < 1e-5 and _rel(scores, ref_scores) < 1e-5


@pytest.mark.parametrize("case", range(5))
def test_decode_matches_reference_and_never_reads_inactive(case):
    rng = np.random.default_rng(1)
    name, idx, cnt = masks(rng)[case]
    hidden, gu, dt, valid, sin = mlp_inputs(rng, 3, 1)
    ref_out, ref_scores = reference.sparse_gated_mlp(hidden, gu, dt, idx, cnt, valid[:, :1], sin)
    if name not in ("full", "mixed"):  # mixed: a neuron inactive in one row is active in another
        inactive = np.ones(I, bool)
        inactive[idx[0, : cnt[0]]] = False
        gu, dt = gu.copy(), dt.copy()
        gu[inactive], dt[inactive] = np.nan, np.nan
    out, scores = _run((hidden, gu, dt, idx, cnt, valid[:, :1], sin))
    assert np.isfinite(out).all(), name
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scores, sin)
    if name == "empty":
        assert not out.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_keep_dtype_and_float32_scores(dtype):
    rng = np.random.default_rng(2)
    hidden, gu, dt, valid, sin = mlp_inputs(rng, 2, 4)
    idx, cnt = masks(rng)[1][1:]
    t = [torch.from_numpy(a).to(dtype) for a in (hidden, gu, dt)]
    out, scores = sparse_gated_mlp(*t, torch.from_numpy(idx[:2]), torch.from_numpy(cnt[:2]),
                                   torch.from_numpy(valid), torch.from_numpy(sin))
    assert out.dtype == dtype and scores.dtype == torch.float32
    ref_out, ref_scores = reference.sparse_gated_mlp(*[x.float().numpy() for x in t], idx[:2], cnt[:2], valid, sin)
    assert _rel(out.float().numpy(), ref_out) < 2e-2 and _rel(scores.numpy(), ref_scores) < 1e-3


def test_select_active_matches_reference_exactly():
    rng = np.random.default_rng(3)
    for scores, tau in score_cases(rng):
        idx, cnt = select_active(torch.from_numpy(scores), torch.tensor(tau, dtype=torch.float32),
                                 torch.tensor([0.0, 1.0]))
        ref_idx, ref_cnt = reference.select_active(scores, tau)
        assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
        np.testing.assert_array_equal(idx.numpy(), ref_idx, err_msg=f"tau={tau}")
        np.testing.assert_array_equal(cnt.numpy(), ref_cnt, err_msg=f"tau={tau}")


def test_fake_kernels_give_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(2, 1, 8)
        out, s = sparse_gated_mlp(h, torch.empty(6, 2, 8), torch.empty(6, 8), torch.empty(2, 6, dtype=torch.int32),
                                  torch.empty(2, dtype=torch.int32), torch.empty(2, 1), torch.empty(2, 6))
        idx, cnt = select_active(torch.empty(2, 6), torch.empty(()), torch.empty(2))
    assert out.shape == (2, 1, 8) and s.shape == (2, 6)
    assert idx.shape == (2, 6) and idx.dtype == torch.int32 and cnt.shape == (2,)


def test_opcheck():
    rng = np.random.default_rng(4)
    hidden, gu, dt, valid, sin = mlp_inputs(rng, 3, 1)
    idx, cnt = masks(rng)[4][1:]
    args = [torch.from_numpy(a) for a in (hidden, gu, dt, idx, cnt, valid[:, :1], sin)]
    torch.library.opcheck(sparse_gated_mlp, args)
    torch.library.opcheck(select_active, (torch.from_numpy(score_cases(rng)[0][0]), torch.tensor(0.5),
                                          torch.tensor([0.4, 0.6])))


def test_select_active_clamp_matches_reference_exactly():
    for scores, tau, bounds in bound_cases(np.random.default_rng(5)):
        idx, cnt = select_active(torch.from_numpy(scores), torch.tensor(tau, dtype=torch.float32),
                                 torch.tensor(bounds, dtype=torch.float32))
        ref_idx, ref_cnt = reference.select_active(scores, tau, bounds)
        np.testing.assert_array_equal(idx.numpy(), ref_idx, err_msg=f"tau={tau} bounds={bounds}")
        np.testing.assert_array_equal(cnt.numpy(), ref_cnt, err_msg=f"tau={tau} bounds={bounds}")


# ---- block-quantized weights (weight_format) ----

@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_torch_dequantize_is_the_contracts_bit_for_bit(fmt):
    raw = any_blocks(np.random.default_rng(6), fmt, 400).reshape(100, 4 * BLOCK_FORMATS[fmt].block_bytes)
    got = dequantize(fmt, torch.from_numpy(raw)).numpy()
    want = blocks.dequantize(fmt, raw)
    assert got.shape == (100, 128) and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))  # -0 and every subnormal scale


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("seq", [5, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_block_weights_match_reference_of_dequantized(fmt, seq, batch):
    rng = np.random.default_rng(batch * 10 + seq)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, fmt, batch, seq)
    for name, idx, cnt in masks(rng, batch, QI):
        args = (hidden, gu, dt, idx, cnt, valid, sin)
        out, scores = _run(args, activation="gelu_tanh", weight_format=fmt)
        ref_out, ref_scores = reference.sparse_gated_mlp_blocks(hidden, gu, dt, fmt, idx, cnt, valid, sin,
                                                                activation="gelu_tanh")
        assert out.shape == (batch, seq, QH) and scores.shape == (batch, QI)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * max(np.abs(ref_out).max(initial=0), 1),
                                   err_msg=f"{fmt} {name}")
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7, err_msg=f"{fmt} {name}")
        if seq == 1 and name == "empty":
            assert not out.any()
        if seq > 1 and batch:
            assert _rel(out, ref_out) < 1e-5 and np.abs(ref_out).max() > 0.1


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_decode_reads_only_active_blocks(fmt):
    """Inactive neurons' blocks hold NaN scales (0x7e00): a decode that touched them would give NaN."""
    rng = np.random.default_rng(7)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, fmt, 3, 1)
    size = BLOCK_FORMATS[fmt].block_bytes
    for name, idx, cnt in masks(rng, 3, QI)[:4]:  # the same mask in every row
        ref_out, _ = reference.sparse_gated_mlp_blocks(hidden, gu, dt, fmt, idx, cnt, valid, sin)
        inactive = np.ones(QI, bool)
        inactive[idx[0, : cnt[0]]] = False
        gu_p, dt_p = gu.copy(), dt.copy()
        for w in (gu_p, dt_p):
            rows = w[inactive].reshape(-1, size)
            rows[:, :2] = np.array([0x00, 0x7E], np.uint8)
            w[inactive] = rows.reshape(w[inactive].shape)
        out, _ = _run((hidden, gu_p, dt_p, idx, cnt, valid, sin), weight_format=fmt)
        assert np.isfinite(out).all(), name
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_weights_with_half_activations(dtype):
    """T = float16/bfloat16 with block weights: output in T, scores float32, x widened (never the weights
    rounded to T)."""
    rng = np.random.default_rng(8)
    for seq in (4, 1):
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q4_1", 2, seq)
        idx, cnt = masks(rng, 2, QI)[3][1:]
        h = torch.from_numpy(hidden).to(dtype)
        out, scores = sparse_gated_mlp(h, torch.from_numpy(gu), torch.from_numpy(dt), torch.from_numpy(idx),
                                       torch.from_numpy(cnt), torch.from_numpy(valid), torch.from_numpy(sin),
                                       weight_format="q4_1")
        assert out.dtype == dtype and scores.dtype == torch.float32
        ref_out, ref_scores = reference.sparse_gated_mlp_blocks(h.float().numpy(), gu, dt, "q4_1", idx, cnt, valid,
                                                                sin)
        assert _rel(out.float().numpy(), ref_out) < 1e-2 and _rel(scores.numpy(), ref_scores) < 1e-5


def test_block_fake_propagates_shapes_and_checks_the_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    u8 = dict(dtype=torch.uint8)
    with FakeTensorMode():
        state = (torch.empty(2, 7, dtype=torch.int32), torch.empty(2, dtype=torch.int32))
        for fmt in BLOCK_FORMATS:
            nbytes = 64 // 32 * BLOCK_FORMATS[fmt].block_bytes
            for seq in (1, 5):
                out, s = sparse_gated_mlp(torch.empty(2, seq, 64), torch.empty(7, 2, nbytes, **u8),
                                          torch.empty(7, nbytes, **u8), *state, torch.empty(2, seq),
                                          torch.empty(2, 7), weight_format=fmt)
                assert out.shape == (2, seq, 64) and out.dtype == torch.float32 and s.shape == (2, 7)
        with pytest.raises(ValueError, match=r"down_weight_t has shape \[7, 36\].*W = H/32\*34 = 68"):
            sparse_gated_mlp(torch.empty(2, 1, 64), torch.empty(7, 2, 68, **u8), torch.empty(7, 36, **u8), *state,
                             torch.empty(2, 1), torch.empty(2, 7), weight_format="q8_0")
        with pytest.raises(TypeError, match="gate_up_weight is torch.float32; weight_format q4_0 needs torch.uint8"):
            sparse_gated_mlp(torch.empty(2, 1, 64), torch.empty(7, 2, 36), torch.empty(7, 36, **u8), *state,
                             torch.empty(2, 1), torch.empty(2, 7), weight_format="q4_0")
        with pytest.raises(ValueError, match="weight_format='q5_0' not in"):
            sparse_gated_mlp(torch.empty(2, 1, 64), torch.empty(7, 2, 36, **u8), torch.empty(7, 36, **u8), *state,
                             torch.empty(2, 1), torch.empty(2, 7), weight_format="q5_0")


@pytest.mark.parametrize("seq", [3, 1])
def test_block_opcheck(seq):
    rng = np.random.default_rng(9)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q4_0", 2, seq)
    idx, cnt = masks(rng, 2, QI)[4][1:]
    args = [torch.from_numpy(a) for a in (hidden, gu, dt, idx, cnt, valid, sin)]
    torch.library.opcheck(sparse_gated_mlp, args, {"weight_format": "q4_0"})


# ---- q8_0 activations (x_format) ----

def test_torch_quantize_x_is_the_contracts_bit_for_bit():
    """quantize_x against blocks.quantize_x: random blocks, zero, tiny, huge, halves (ties to even), 1/d overflow
    and inf/NaN blocks; any leading dims, 0 rows; float16/bfloat16 widened first."""
    x = x_cases(np.random.default_rng(10))
    want = blocks.quantize_x(x)
    for shape in ((24, 256), (6, 4, 256), (24 * 8, 32), (24 * 256,)):
        got = quantize_x(torch.from_numpy(x).reshape(shape))
        assert got.dtype == torch.float32 and got.shape == shape
        assert same_floats(got.numpy(), want.reshape(shape)), shape
    assert np.isnan(want).any() and np.isinf(want).any() and (want == 0).any()  # the edge blocks are there
    assert quantize_x(torch.empty(0, 3, 64)).shape == (0, 3, 64)
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.from_numpy(x[:, :64] * np.float32(1e-30)).to(dtype)  # in range, subnormal d among them
        assert same_floats(quantize_x(h).numpy(), blocks.quantize_x(h.float().numpy())), dtype
    with pytest.raises(ValueError, match="multiple of 32 values, got 48"):
        quantize_x(torch.zeros(2, 48))


def _x_q8_0_check(out, scores, ref_out, ref_scores, plain_out, what):
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * max(np.abs(ref_out).max(initial=0), 1),
                               err_msg=what)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7, err_msg=what)
    if np.abs(ref_out).max(initial=0) > 0.1:  # x really was quantized: q8_0's error is far above the tolerance
        assert _rel(out, ref_out) < 1e-5 and _rel(out, plain_out) > 1e-4, what


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("seq", [5, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_x_format_q8_0_matches_reference(fmt, seq, batch):
    """x_format q8_0: gate/up read blocks.quantize_x(hidden); the fp64 reference of the same xq and dequantized
    weights, every mask kind."""
    rng = np.random.default_rng(batch * 10 + seq + 100)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, fmt, batch, seq)
    for name, idx, cnt in masks(rng, batch, QI):
        args = (hidden, gu, dt, idx, cnt, valid, sin)
        out, scores = _run(args, activation="gelu_tanh", weight_format=fmt, x_format="q8_0")
        ref = reference.sparse_gated_mlp_blocks(hidden, gu, dt, fmt, idx, cnt, valid, sin, activation="gelu_tanh",
                                                x_format="q8_0")
        plain, _ = reference.sparse_gated_mlp_blocks(hidden, gu, dt, fmt, idx, cnt, valid, sin,
                                                     activation="gelu_tanh")
        assert out.shape == (batch, seq, QH) and scores.shape == (batch, QI)
        _x_q8_0_check(out, scores, *ref, plain, f"{fmt} {name}")
        if seq == 1 and name == "empty":
            assert not out.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_x_format_q8_0_with_half_activations(dtype):
    """T = float16/bfloat16: x widened to float32, then quantized; output in T, scores float32."""
    rng = np.random.default_rng(12)
    for seq in (4, 1):
        hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q4_0", 2, seq)
        idx, cnt = masks(rng, 2, QI)[4][1:]
        h = torch.from_numpy(hidden).to(dtype)
        out, scores = sparse_gated_mlp(h, torch.from_numpy(gu), torch.from_numpy(dt), torch.from_numpy(idx),
                                       torch.from_numpy(cnt), torch.from_numpy(valid), torch.from_numpy(sin),
                                       weight_format="q4_0", x_format="q8_0")
        assert out.dtype == dtype and scores.dtype == torch.float32
        ref_out, ref_scores = reference.sparse_gated_mlp_blocks(h.float().numpy(), gu, dt, "q4_0", idx, cnt, valid,
                                                                sin, x_format="q8_0")
        assert _rel(out.float().numpy(), ref_out) < 1e-2 and _rel(scores.numpy(), ref_scores) < 1e-5


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_x_format_q8_0_poisoned_blocks(value):
    """A block of x holding inf/NaN has d = NaN: every gate/up of that token is NaN, so its output row (prefill;
    decode with active neurons) and its sequence's scores are NaN, and nothing else is."""
    rng = np.random.default_rng(13)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q8_0", 3, 4)
    x = poison_x(hidden, value, [(0, 1, 5), (2, 3, 63)])
    idx, cnt = masks(rng, 3, QI)[1][1:]  # full
    out, scores = _run((x, gu, dt, idx, cnt, valid, sin), weight_format="q8_0", x_format="q8_0")
    ref_out, ref_scores = reference.sparse_gated_mlp_blocks(x, gu, dt, "q8_0", idx, cnt, valid, sin, x_format="q8_0")
    bad = np.zeros((3, 4), bool)
    bad[0, 1] = bad[2, 3] = True
    assert np.isnan(out).all(-1).tolist() == bad.tolist() and np.isfinite(out[~bad]).all()
    assert np.isnan(scores).all(-1).tolist() == [True, False, True] and np.isfinite(scores[1]).all()
    np.testing.assert_allclose(out[~bad], ref_out[~bad], rtol=1e-5, atol=1e-5 * np.abs(ref_out[~bad]).max())
    out, scores = _run((x[:, 1:2], gu, dt, idx, cnt, valid[:, :1], sin), weight_format="q8_0", x_format="q8_0")
    assert np.isnan(out).all(-1)[:, 0].tolist() == [True, False, False] and np.isfinite(out[1:]).all()
    np.testing.assert_array_equal(scores, sin)


def test_x_format_refused_outside_the_contract():
    """x_format q8_0 needs a block weight_format; the real op, its fake and the kernel op refuse it by name."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tda_export.kernels import torch_ops as K

    rng = np.random.default_rng(14)
    hidden, gu, dt, valid, sin = mlp_inputs(rng, 2, 1)
    idx, cnt = masks(rng, 2)[1][1:]
    args = [torch.from_numpy(a) for a in (hidden, gu, dt, idx, cnt, valid, sin)]
    with pytest.raises(ValueError, match="x_format='q8_0' needs a block weight_format, not 'dtype'"):
        sparse_gated_mlp(*args, x_format="q8_0")
    with pytest.raises(ValueError, match="x_format='q4_0' not in"):
        sparse_gated_mlp(*args, weight_format="q4_0", x_format="q4_0")
    with pytest.raises(ValueError, match="x_format='q8_0' needs a block weight_format, not 'dtype'"):
        K.sparse_gated_mlp_decode(*args[:5], x_format="q8_0")
    u8 = dict(dtype=torch.uint8)
    with FakeTensorMode():
        state = (torch.empty(2, 7, dtype=torch.int32), torch.empty(2, dtype=torch.int32))
        with pytest.raises(ValueError, match="x_format='q8_0' needs a block weight_format"):
            sparse_gated_mlp(torch.empty(2, 1, 64), torch.empty(7, 2, 64), torch.empty(7, 64), *state,
                             torch.empty(2, 1), torch.empty(2, 7), x_format="q8_0")
        out, s = sparse_gated_mlp(torch.empty(2, 3, 64), torch.empty(7, 2, 36, **u8), torch.empty(7, 36, **u8),
                                  *state, torch.empty(2, 3), torch.empty(2, 7), weight_format="q4_0", x_format="q8_0")
        assert out.shape == (2, 3, 64) and s.shape == (2, 7)
        assert K.sparse_gated_mlp_decode(torch.empty(2, 64), torch.empty(7, 2, 36, **u8), torch.empty(7, 36, **u8),
                                         *state, weight_format="q4_0", x_format="q8_0").shape == (2, 64)
        with pytest.raises(ValueError, match="x_format='q8_0' needs a block weight_format"):
            K.sparse_gated_mlp_decode(torch.empty(2, 64), torch.empty(7, 2, 64), torch.empty(7, 64), *state,
                                      x_format="q8_0")


@pytest.mark.parametrize("seq", [3, 1])
def test_x_format_opcheck(seq):
    rng = np.random.default_rng(15)
    hidden, gu, dt, valid, sin = quant_mlp_inputs(rng, "q4_1", 2, seq)
    idx, cnt = masks(rng, 2, QI)[4][1:]
    args = [torch.from_numpy(a) for a in (hidden, gu, dt, idx, cnt, valid, sin)]
    torch.library.opcheck(sparse_gated_mlp, args, {"weight_format": "q4_1", "x_format": "q8_0"})
