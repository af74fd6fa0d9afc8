"""tda::sparse_gated_mlp and tda::select_active against the numpy reference."""
import numpy as np
import pytest
import torch

from tda_export.ops import reference
from tda_export.ops.contract import ACTIVATIONS, SCORE_NORMS
from tda_export.ops.torch_ops import select_active, sparse_gated_mlp

from op_cases import I, bound_cases, masks, mlp_inputs, score_cases


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
