"""Research gating modes beside the bench scripts (bench/gating_modes.py; issue 12 item 4): per-token gating
(CATS, TEAL, WINA) inside the static mask, the hindsight neuron oracle, pooled (one threshold per layer)
selection, LaRoSA rotations, low-rank and low-bit predictors, per-layer gating and its greedy allocation.

Each checks the mask and the bytes-saved arithmetic against an explicit float64 reference that computes
only the kept rows and columns, on tiny random-weight models.
"""
import sys
from math import ceil
from pathlib import Path

import pytest
import torch

from tda_export import arch
from tda_export.models import load_model
from tda_export.quality import Evaluator, token_windows, tokenize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gating_modes import (GatedHooks, TokenGating, activation_rotations, allocate_gating,  # noqa: E402
                          gated_continuation, keep_fraction, quantize_rows)

TEXT = " ".join(["the quick brown fox jumps over the lazy dog while to be or not to be is the question"] * 40)


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return load_model(str(tiny_dirs["llama"]))


def gated(lm, layer, x, static, gating, rotations=None):
    with GatedHooks(lm.model) as hooks:
        if rotations is not None:
            hooks.set_rotations(rotations)
        hooks.masks[layer] = static
        hooks.gating = gating
        with hooks.phase_("masked"):
            out = arch.mlp_modules(lm.model)[layer](x)
        return out, hooks.byte_fractions()[layer]


def weights(mlp):
    return [w.double() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]


def test_oracle_neuron_keeps_the_largest_true_contributions(llama):
    layer = 1
    mlp = arch.mlp_modules(llama.model)[layer]
    wg, wu, wd = weights(mlp)
    torch.manual_seed(2)
    x = torch.randn(2, 3, llama.config.hidden_size)
    static = torch.rand(2, llama.config.intermediate_size) > 0.3
    static[1] = False
    static[1, 7:12] = True  # a five-neuron mask: ceil(0.6 * 5) = 3 neurons per token
    got, streamed = gated(llama, layer, x, static, TokenGating(neuron_density=0.6))
    inter, ref, fractions = static.shape[-1], torch.zeros(got.shape, dtype=torch.float64), []
    dnorm = wd.norm(dim=0)
    for b in range(2):
        s_idx = static[b].nonzero()[:, 0]
        for t in range(3):
            xt = x[b, t].double()
            z = mlp.act_fn(wg[s_idx] @ xt) * (wu[s_idx] @ xt)   # exact z of the mask's neurons
            keep = s_idx[(z.abs() * dnorm[s_idx]).topk(ceil(0.6 * s_idx.numel() - 1e-9)).indices]
            ref[b, t] = wd[:, keep] @ (mlp.act_fn(wg[keep] @ xt) * (wu[keep] @ xt))
            fractions.append(keep.numel() / inter)  # gate rows, up rows and down columns of kept neurons only
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert abs(streamed - sum(fractions) / len(fractions)) < 1e-6
    assert fractions[-1] == 3 / inter


def test_pooled_selection_is_one_threshold_over_all_tokens():
    torch.manual_seed(3)
    scores = torch.rand(4, 5, 50) * torch.linspace(0.1, 3.0, 4)[:, None, None]  # rows on different scales
    allowed = torch.rand(4, 5, 50) > 0.2
    keep = keep_fraction(scores, allowed, 0.3, pooled=True)
    assert int(keep.sum()) == ceil(0.3 * int(allowed.sum()) - 1e-9)
    assert not (keep & ~allowed).any()
    kept_min = scores[keep].min()
    assert (scores[allowed & ~keep] <= kept_min).all()
    counts = keep.sum(-1)
    assert counts.min() < counts.max()  # unlike per-token top-k, rows keep different counts
    per_row = keep_fraction(scores, allowed, 0.3)
    assert torch.equal(per_row.sum(-1), torch.ceil(allowed.sum(-1) * 0.3 - 1e-9).long())


def random_orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()


def test_rotated_gating_is_input_sparsity_in_the_rotated_basis(llama):
    layer = 0
    mlp = arch.mlp_modules(llama.model)[layer]
    wg, wu, wd = weights(mlp)
    hidden, inter = llama.config.hidden_size, llama.config.intermediate_size
    rotations = [(random_orthogonal(hidden, i), random_orthogonal(inter, 10 + i))
                 for i in range(llama.config.num_hidden_layers)]
    qx, qz = (q.double() for q in rotations[layer])
    torch.manual_seed(4)
    x = torch.randn(2, 3, hidden)
    static = torch.ones(2, inter, dtype=torch.bool)
    gating = TokenGating(x_density=0.55, z_density=0.4, rotated=True)
    got, streamed = gated(llama, layer, x, static, gating, rotations)
    rg, ru, rd = wg @ qx, wu @ qx, wd @ qz            # the rotated weights a deployment would store
    gu_norm, d_norm = torch.cat([rg, ru]).norm(dim=0), rd.norm(dim=0)
    ref = torch.zeros(got.shape, dtype=torch.float64)
    kx, kz = ceil(0.55 * hidden - 1e-9), ceil(0.4 * inter - 1e-9)
    for b in range(2):
        for t in range(3):
            xr = x[b, t].double() @ qx
            j = (xr.abs() * gu_norm).topk(kx).indices
            zr = (mlp.act_fn(rg[:, j] @ xr[j]) * (ru[:, j] @ xr[j])) @ qz
            i = (zr.abs() * d_norm).topk(kz).indices
            ref[b, t] = rd[:, i] @ zr[i]
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert abs(streamed - (2 * kx / hidden + kz / inter) / 3) < 1e-6
    # identity rotations are the unrotated modes
    eye = [(torch.eye(hidden), torch.eye(inter))] * llama.config.num_hidden_layers
    for score in ("wina", "teal"):
        a, fa = gated(llama, layer, x, static, TokenGating(x_density=0.55, z_density=0.4, score=score, rotated=True),
                      eye)
        b, fb = gated(llama, layer, x, static, TokenGating(x_density=0.55, z_density=0.4, score=score))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) and abs(fa - fb) < 1e-9
    with pytest.raises(ValueError, match="rotated"):
        TokenGating(neuron_density=0.5, rotated=True)


def test_activation_rotations_order_the_calibration_energy(llama):
    ids = tokenize(llama.tokenizer, TEXT)
    rotations = activation_rotations(llama, token_windows(ids, 2, 32))
    assert len(rotations) == llama.config.num_hidden_layers
    for qx, qz in rotations:
        for q in (qx, qz):
            assert torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-4)
    # on the same windows, the rotated MLP inputs' energy decreases along the basis
    captured = []
    mlp = arch.mlp_modules(llama.model)[1]
    h = mlp.register_forward_pre_hook(lambda _m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        from tda_export.models import forward
        with torch.no_grad():
            forward(llama.model, token_windows(ids, 2, 32))
    finally:
        h.remove()
    energy = (torch.cat(captured) @ rotations[1][0]).square().sum(0)
    assert torch.all(energy[:-1] >= energy[1:] * (1 - 1e-3))


def test_per_layer_gating_and_greedy_allocation(llama):
    n, hidden, inter = llama.config.num_hidden_layers, llama.config.hidden_size, llama.config.intermediate_size
    ev = Evaluator(llama, batch_size=4, quiet=True, hooks_type=GatedHooks)
    ids = tokenize(llama.tokenizer, TEXT)
    batches = ev.prefill(token_windows(ids, 4, 24), 16)
    # per-layer gating: None leaves a layer dense
    run = gated_continuation(ev, batches, 16, [None, TokenGating(x_density=0.5, z_density=0.5), None])
    assert run.byte_fractions[0] == 1.0 and run.byte_fractions[2] == 1.0
    assert abs(run.byte_fractions[1] - (2 * ceil(0.5 * hidden) / hidden + ceil(0.5 * inter) / inter) / 3) < 1e-6
    levels = (1.0, 0.7, 0.4)
    alloc = allocate_gating(ev, batches, 16, lambda d: TokenGating(x_density=d, z_density=d), levels)
    for layer in range(n):
        for li, saved in enumerate(alloc["sensitivity_saved"][layer]):
            d = levels[li]
            assert abs(saved - (1 - (2 * ceil(d * hidden - 1e-9) / hidden + ceil(d * inter - 1e-9) / inter) / 3)) < 1e-6
    path = alloc["path"]
    assert len(path) == sum(len(c) - 1 for c in alloc["sensitivity_cost"])  # every measured step is taken
    prev = [0] * n
    for p in path:  # one layer one level deeper per step, saving rising
        diff = [a - b for a, b in zip(p["level_index"], prev)]
        assert sorted(diff) == [0] * (n - 1) + [1]
        prev = p["level_index"]
    assert all(a["predicted_saving"] < b["predicted_saving"] for a, b in zip(path, path[1:]))
    # the path's last point, measured, saves what it predicts
    final = [TokenGating(x_density=d, z_density=d) if d < 1.0 else None for d in path[-1]["levels"]]
    measured = gated_continuation(ev, batches, 16, final)
    assert abs((1 - sum(measured.byte_fractions) / n) - path[-1]["predicted_saving"]) < 1e-6


def test_svd_predictor_chooses_from_a_low_rank_estimate_and_pays_for_it(llama):
    layer = 2
    mlp = arch.mlp_modules(llama.model)[layer]
    wg, wu, wd = weights(mlp)
    hidden, inter = llama.config.hidden_size, llama.config.intermediate_size
    torch.manual_seed(5)
    x = torch.randn(1, 4, hidden)
    static = torch.ones(1, inter, dtype=torch.bool)
    # full rank: the estimate is the exact z, so the choice is the oracle's; only the bytes differ
    oracle, f_oracle = gated(llama, layer, x, static, TokenGating(neuron_density=0.5))
    full, f_full = gated(llama, layer, x, static, TokenGating(neuron_density=0.5, predictor_rank=hidden))
    assert torch.allclose(oracle, full, rtol=1e-4, atol=1e-5)
    assert abs(f_full - f_oracle - 2 * hidden * (hidden + inter) / (3 * hidden * inter)) < 1e-6
    # rank 4: neurons chosen by |act(g_4) * u_4| * ||W_down[:, i]|| from truncated SVDs of W_gate and W_up
    got, streamed = gated(llama, layer, x, static, TokenGating(neuron_density=0.5, predictor_rank=4))
    approx = []
    for w in (wg, wu):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        approx.append((u[:, :4] * s[:4]) @ vh[:4])
    ref = torch.zeros(got.shape, dtype=torch.float64)
    k = ceil(0.5 * inter - 1e-9)
    for t in range(4):
        xt = x[0, t].double()
        est = mlp.act_fn(approx[0] @ xt) * (approx[1] @ xt)
        keep = (est.abs() * wd.norm(dim=0)).topk(k).indices
        ref[0, t] = wd[:, keep] @ (mlp.act_fn(wg[keep] @ xt) * (wu[keep] @ xt))
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert abs(streamed - (k / inter + 2 * 4 * (hidden + inter) / (3 * hidden * inter))) < 1e-6
    with pytest.raises(ValueError, match="predictor_rank"):
        TokenGating(predictor_rank=4)


def test_quantized_predictor_ranks_by_low_bit_weights_and_pays_for_them(llama):
    layer = 1
    mlp = arch.mlp_modules(llama.model)[layer]
    wg, wu, wd = weights(mlp)
    hidden, inter = llama.config.hidden_size, llama.config.intermediate_size
    q = quantize_rows(mlp.gate_proj.weight, 2)
    assert all(len(torch.unique(row)) <= 3 for row in q)  # 2 bits: 3 levels per row
    assert (quantize_rows(mlp.gate_proj.weight, 4) - mlp.gate_proj.weight).norm() < (q - mlp.gate_proj.weight).norm()
    torch.manual_seed(6)
    x = torch.randn(1, 3, hidden)
    static = torch.ones(1, inter, dtype=torch.bool)
    got, streamed = gated(llama, layer, x, static, TokenGating(neuron_density=0.4, predictor_bits=3))
    qg, qu = quantize_rows(mlp.gate_proj.weight, 3).double(), quantize_rows(mlp.up_proj.weight, 3).double()
    k = ceil(0.4 * inter - 1e-9)
    ref = torch.zeros(got.shape, dtype=torch.float64)
    for t in range(3):
        xt = x[0, t].double()
        keep = ((mlp.act_fn(qg @ xt) * (qu @ xt)).abs() * wd.norm(dim=0)).topk(k).indices
        ref[0, t] = wd[:, keep] @ (mlp.act_fn(wg[keep] @ xt) * (wu[keep] @ xt))
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert abs(streamed - (k / inter + 2 * 3 / 16 / 3)) < 1e-6
    with pytest.raises(ValueError, match="predictor_bits"):
        TokenGating(neuron_density=0.5, predictor_bits=5)


def sparse_reference(mlp, x, static, gating, gu_norm, down_norm):
    """Per token, compute only the kept rows and columns of gate, up and down (float64, explicit gathers)."""
    from math import ceil

    wg, wu, wd = (w.double() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    out = torch.zeros(x.shape[0], x.shape[1], wd.shape[0], dtype=torch.float64)
    streamed = []
    for b in range(x.shape[0]):
        s_idx = static[b].nonzero()[:, 0]
        for t in range(x.shape[1]):
            xt = x[b, t].double()
            x_idx = (xt.abs() * gu_norm.double()).topk(ceil(gating.x_density * xt.numel() - 1e-9)).indices
            a = mlp.act_fn(wg[s_idx][:, x_idx] @ xt[x_idx])
            g_sel = a.abs().topk(ceil(gating.gate_density * s_idx.numel() - 1e-9)).indices
            g_idx = s_idx[g_sel]
            z = a[g_sel] * (wu[g_idx][:, x_idx] @ xt[x_idx])
            z_sel = (z.abs() * down_norm[g_idx].double()).topk(ceil(gating.z_density * g_idx.numel() - 1e-9)).indices
            out[b, t] = wd[:, g_idx[z_sel]] @ z[z_sel]
            inter, hidden = static.shape[-1], xt.numel()
            streamed.append((s_idx.numel() * x_idx.numel() / (inter * hidden)
                             + g_idx.numel() * x_idx.numel() / (inter * hidden) + z_sel.numel() / inter) / 3)
    return out, sum(streamed) / len(streamed)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_token_gating_equals_computing_only_kept_weights(tiny_dirs, family):
    lm = load_model(str(tiny_dirs[family]))
    layer = 1
    mlp = arch.mlp_modules(lm.model)[layer]
    torch.manual_seed(1)
    x = torch.randn(2, 3, lm.config.hidden_size)
    static = torch.rand(2, lm.config.intermediate_size) > 0.4
    static[1] = False
    static[1, :5] = True  # a five-neuron mask
    gating = TokenGating(x_density=0.55, gate_density=0.6, z_density=0.7)
    with GatedHooks(lm.model) as hooks:
        hooks.masks[layer] = static
        hooks.gating = gating
        with hooks.phase_("masked"):
            got = mlp(x)
        ref, streamed = sparse_reference(mlp, x, static, gating, *hooks.column_norms(layer))
        assert abs(hooks.byte_fractions()[layer] - streamed) < 1e-6
    assert (got.double() - ref).norm() / ref.norm() < 1e-5


def test_token_gating_off_is_the_static_mask(tiny_dirs):
    lm = load_model(str(tiny_dirs["qwen2"]))
    mlp = arch.mlp_modules(lm.model)[0]
    x = torch.randn(2, 4, lm.config.hidden_size)
    static = torch.rand(2, lm.config.intermediate_size) > 0.5
    outs, fractions = [], []
    for gating in (None, TokenGating()):
        with GatedHooks(lm.model) as hooks:
            hooks.masks[0], hooks.gating = static, gating
            with hooks.phase_("masked"):
                outs.append(mlp(x))
            fractions.append(hooks.byte_fractions()[0])
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    assert abs(fractions[0] - static.float().mean().item()) < 1e-6 and abs(fractions[1] - fractions[0]) < 1e-6
    with pytest.raises(ValueError, match="x_density"):
        TokenGating(x_density=0.0)
