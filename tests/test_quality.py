"""Held-out evaluation and bounded memory of calibration/eval (tiny models; issue 12)."""
import json
import random

import pytest
import torch
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.models import load_model
from tda_export.quality import (Evaluator, calibrate_thresholds, overlapping_windows, passage_sketch, tokenize,
                                token_windows)
from tda_export.text import read_text

WORDS = ("the quick brown fox jumps over lazy dog to be or not that is question whether tis nobler in mind "
         "suffer slings arrows outrageous fortune take arms against sea of troubles and by opposing end them "
         "die sleep no more say we").split()


def random_text(lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) for _ in range(lines)) + "\n"


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return load_model(str(tiny_dirs["llama"]))


def test_user_text_split_is_a_disjoint_partition(tmp_path):
    text = random_text()
    f = tmp_path / "t.txt"
    f.write_text(text)
    held_in, held_out = read_text(f, "calibration"), read_text(f, "evaluation")
    assert held_in + held_out == text and held_in.endswith("\n")
    assert 0.7 < len(held_in) / len(text) < 0.8


def test_passage_sketch_finds_overlap_and_only_overlap(llama):
    ids = tokenize(llama.tokenizer, random_text(600))
    calib, other = ids[: ids.numel() // 2], ids[ids.numel() // 2:]
    sketch = passage_sketch(token_windows(calib, 8, 64))
    assert overlapping_windows(token_windows(other, 8, 64), sketch) == []
    # a window shifted by a few tokens still overlaps: the sketch is alignment-free
    shifted = torch.stack([calib[5:69], other[:64]])
    assert overlapping_windows(shifted, sketch) == [0]


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def test_calibrate_then_eval_on_the_same_file_is_held_out(tiny_dirs, llama, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(random_text(400))
    held_in = read_text(f, "calibration")
    # as many calibration windows as fit, so that they cover the held-in text
    sequences = tokenize(llama.tokenizer, held_in).numel() * 6 // 10 // 256  # thresholds read the first 60%
    cal = tmp_path / "cal.json"
    r = cli("calibrate", "-m", tiny_dirs["llama"], "--text", f, "--densities", "0.5", "--sequences", sequences,
            "--prompt-tokens", "64", "-q", "-o", cal)
    assert r.exit_code == 0, r.output
    text = json.loads(cal.read_text())["text"]
    assert text["passages"] and text["source"].endswith("(calibration part)")
    ev = ["--sequences", "4", "--continuation-tokens", "64", "--generate-prompts", "2", "--generate-tokens", "4",
          "--prompt-tokens", "64", "--json", "-q"]
    r = cli("eval", "-m", tiny_dirs["llama"], "-c", cal, "--density", "0.5", "--text", f, *ev)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["text"]["source"].endswith("(evaluation part)")
    # a file whose evaluation part is the calibration part of f is refused, naming the problem
    g = tmp_path / "g.txt"
    filler = random_text(1200, seed=1)[: 3 * len(held_in) - 1] + "\n"
    g.write_text(filler + held_in)
    assert read_text(g, "evaluation").strip() in held_in
    r = cli("eval", "-m", tiny_dirs["llama"], "-c", cal, "--density", "0.5", "--text", g, *ev)
    assert r.exit_code == 2 and "not held out" in r.output and "overlap" in r.output, r.output


def test_eval_density_calibrates_on_the_users_text(tiny_dirs, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(random_text(800))
    r = cli("eval", "-m", tiny_dirs["llama"], "--density", "0.5", "--text", f, "--prompt-tokens", "16", "-q",
            "--sequences", "4", "--continuation-tokens", "8", "--generate-prompts", "2", "--generate-tokens", "4",
            "--calibration-sequences", "8", "--json")
    assert r.exit_code == 0, r.output
    assert f"calibrating thresholds for density 0.5 on {f} (calibration part)" in r.stderr


def test_prefill_keeps_no_views_of_big_tensors(llama):
    ev = Evaluator(llama, batch_size=4, quiet=True)
    ids = torch.randint(0, llama.config.vocab_size, (4, 32))
    ev.hooks.prefix_lengths = (8, 16)
    try:
        (p,) = ev.prefill(ids, 32)
    finally:
        ev.hooks.prefix_lengths = ()
    f32 = 4
    assert p.first_logits.untyped_storage().nbytes() == 4 * llama.config.vocab_size * f32
    inter = llama.config.intermediate_size
    for layer in range(ev.hooks.num_layers):
        assert p.scores[layer].untyped_storage().nbytes() == 4 * inter * f32
        for n in (8, 16):
            assert p.prefix_scores[layer][n].untyped_storage().nbytes() == 4 * inter * f32


def rss_bytes() -> int:
    """Resident memory after handing freed heap pages back (so only live tensors count)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_calibration_memory_stays_flat_over_windows():
    """Leaking each batch's [B,P,I] cumsums (or its [B,P,V] logits) would add >= 0.5 GB over these 16 batches."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tda_export.models import LoadedModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=32000, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    lm = LoadedModel(source=None, model=model, tokenizer=None, family="llama", activation="silu")
    ev = Evaluator(lm, batch_size=8, quiet=True)
    batch = lambda n: torch.randint(0, cfg.vocab_size, (8 * n, 64))  # noqa: E731
    ev.hooks.prefix_lengths = (8, 32, 64)  # as calibration runs it
    ev.prefill(batch(2), 64)  # warm up allocator and kernels
    before = rss_bytes()
    kept = ev.prefill(batch(16), 64)  # held, as calibration and eval hold their prefilled batches
    grown = rss_bytes() - before
    leak_per_batch = 8 * 64 * cfg.intermediate_size * 4 * cfg.num_hidden_layers
    assert len(kept) == 16
    assert grown < 4 * leak_per_batch, f"RSS grew {grown / 1e6:.0f} MB over 16 batches"


def test_clamped_threshold_mask_bounds_each_sequence():
    from tda_export.tda import clamped_threshold_mask, threshold_mask

    torch.manual_seed(0)
    inter = 203  # odd-sized
    peaked = torch.rand(6, inter) ** torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 0.5])[:, None]
    for tau in (0.1, 0.4, 0.8):
        plain = threshold_mask(peaked, tau)
        got = clamped_threshold_mask(peaked, tau, 0.4, 0.6)
        lo, hi = 82, 122  # ceil(0.4 * 203), ceil(0.6 * 203)
        n, k = plain.sum(-1), got.sum(-1)
        assert torch.equal(k, n.clamp(lo, hi))
        # the clamped mask keeps the best-scoring neurons: a superset or a subset of the threshold's
        assert torch.all((got | plain) == torch.where((n < lo)[:, None], got, plain))
        worst_kept = peaked.masked_fill(~got, 2.0).amin(-1)
        best_dropped = peaked.masked_fill(got, -1.0).amax(-1)
        assert torch.all(worst_kept >= best_dropped)


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
    from tda_export import arch
    from tda_export.tda import TDAHooks, TokenGating

    lm = load_model(str(tiny_dirs[family]))
    layer = 1
    mlp = arch.mlp_modules(lm.model)[layer]
    torch.manual_seed(1)
    x = torch.randn(2, 3, lm.config.hidden_size)
    static = torch.rand(2, lm.config.intermediate_size) > 0.4
    static[1] = False
    static[1, :5] = True  # a five-neuron mask
    gating = TokenGating(x_density=0.55, gate_density=0.6, z_density=0.7)
    with TDAHooks(lm.model) as hooks:
        hooks.masks[layer] = static
        hooks.gating = gating
        with hooks.phase_("masked"):
            got = mlp(x)
        ref, streamed = sparse_reference(mlp, x, static, gating, *hooks.column_norms(layer))
        assert abs(hooks.byte_fractions()[layer] - streamed) < 1e-6
    assert (got.double() - ref).norm() / ref.norm() < 1e-5


def test_token_gating_off_is_the_static_mask(tiny_dirs):
    from tda_export import arch
    from tda_export.tda import TDAHooks, TokenGating

    lm = load_model(str(tiny_dirs["qwen2"]))
    mlp = arch.mlp_modules(lm.model)[0]
    x = torch.randn(2, 4, lm.config.hidden_size)
    static = torch.rand(2, lm.config.intermediate_size) > 0.5
    outs, fractions = [], []
    for gating in (None, TokenGating()):
        with TDAHooks(lm.model) as hooks:
            hooks.masks[0], hooks.gating = static, gating
            with hooks.phase_("masked"):
                outs.append(mlp(x))
            fractions.append(hooks.byte_fractions()[0])
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    assert abs(fractions[0] - static.float().mean().item()) < 1e-6 and abs(fractions[1] - fractions[0]) < 1e-6
    with pytest.raises(ValueError, match="x_density"):
        TokenGating(x_density=0.0)


def test_budget_backs_off_until_validation_holds(llama):
    """A budget that tuning windows allow but validation does not is backed off, and says so."""
    from tda_export.quality import allocate_budget, bootstrap_increase, hold_budget

    ev = Evaluator(llama, batch_size=8, quiet=True)
    ids = tokenize(llama.tokenizer, random_text(600))
    levels = (1.0, 0.7, 0.4)
    thresholds = calibrate_thresholds(ev, token_windows(ids[: ids.numel() // 2], 8, 32), levels)
    tune = ev.prefill(token_windows(ids[ids.numel() // 2:], 16, 24)[::2], 16)
    val = ev.prefill(token_windows(ids[ids.numel() // 2:], 16, 24)[1::2], 16)
    tuned = allocate_budget(ev, tune, 16, thresholds, 0.05, levels)
    held = hold_budget(ev, val, 16, thresholds, tuned, confidence=0.9)
    v = held["validation"]
    assert v["upper_bound"] <= 0.05 and held["kept_steps"] <= held["tuned_steps"]
    # the report is the measurement: re-measure the accepted allocation on the validation windows
    run = ev.continuation(val, 16, "tda", held["thresholds"])
    dense = ev.continuation(val, 16, "dense")
    assert abs(bootstrap_increase(dense, run)[0] - v["increase"]) < 1e-9
    # a budget no sparse allocation can meet (random weights may even gain from sparsity) leaves dense
    assert tuned["steps"], "a 5% budget on a random model should allow some sparsity"
    impossible = hold_budget(ev, val, 16, thresholds, {**tuned, "max_ppl_increase": -0.99})
    assert impossible["densities"] == [1.0] * 3 and impossible["kept_steps"] == 0
