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


def test_eval_on_an_engines_block_weights(tiny_dirs, tmp_path):
    """eval --weight-format q8_0 runs the model on a q8_0 engine's dequantized weights (said on stderr) and counts
    the MLP bytes at 34 bytes per 32 weights; its dense perplexity is that model's, not the checkpoint's."""
    f = tmp_path / "t.txt"
    f.write_text(random_text(800))
    args = ["eval", "-m", tiny_dirs["llama"], "--density", "0.5", "--text", f, "--prompt-tokens", "16", "-q",
            "--sequences", "4", "--continuation-tokens", "8", "--generate-prompts", "2", "--generate-tokens", "4",
            "--calibration-sequences", "8", "--json"]
    reports = {}
    for fmt in ("float", "q8_0"):
        r = cli(*args, "--weight-format", fmt)
        assert r.exit_code == 0, r.output
        reports[fmt] = json.loads(r.stdout)
    assert "replacing its weights by an engine's q8_0 blocks (dequantized)" in r.stderr
    assert reports["q8_0"]["mlp_bytes"]["bytes_per_param"] == 34 / 32
    assert reports["q8_0"]["mlp_bytes"]["dtype"] == "q8_0"
    assert reports["q8_0"]["dense"]["perplexity"] != reports["float"]["dense"]["perplexity"]


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


def test_tda_masks_are_the_engines_selection():
    """eval's tda masks are SelectActive with the engines' bounds (d - m, d + m): the count rule of the contract
    (floor(hi*I) above, ceil(lo*I) below), each sequence clamped per layer."""
    from tda_export.ops import reference
    from tda_export.ops.contract import density_bounds
    from tda_export.quality import selection_bounds
    from tda_export.tda import TDAHooks

    torch.manual_seed(0)
    inter = 203  # odd-sized: 0.55 * 203 = 111.65 keeps 111, not 112
    peaked = torch.rand(6, inter) ** torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 0.5])[:, None]
    hooks = TDAHooks.__new__(TDAHooks)  # set_masks needs only the scores
    hooks.scores = [peaked] * 3
    densities = [0.5, 0.9, 1.0]
    bounds = selection_bounds("tda", densities, 0.05)
    assert bounds == density_bounds(densities, 0.05)
    for tau in (0.0, 0.1, 0.4, 0.8):
        hooks.set_masks("tda", [tau] * 3, densities, bounds)
        for mask, b in zip(hooks.masks, bounds):
            idx, count = reference.select_active(peaked.numpy(), tau, b)
            assert (mask.numpy() == reference.mask_from_state(idx, count, inter).astype(bool)).all()
        k = hooks.masks[0].sum(-1)
        assert k.min() >= 92 and k.max() <= 111  # ceil(0.45 * 203), floor(0.55 * 203)
    assert selection_bounds("tda", densities, None) is None and selection_bounds("topk", densities, 0.05) is None


def test_budget_backs_off_until_validation_holds(llama):
    """A budget that tuning windows allow but validation does not is backed off, and says so."""
    from tda_export.ops.contract import DEFAULT_DENSITY_MARGIN
    from tda_export.quality import allocate_budget, bootstrap_increase, hold_budget, selection_bounds

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
    # the report is the measurement: re-measure the accepted allocation on the validation windows, selected as
    # engines select it (clamped to each layer's density +- the engines' margin)
    assert held["density_margin"] == DEFAULT_DENSITY_MARGIN
    bounds = selection_bounds("tda", held["densities"], DEFAULT_DENSITY_MARGIN)
    run = ev.continuation(val, 16, "tda", held["thresholds"], bounds=bounds)
    dense = ev.continuation(val, 16, "dense")
    assert abs(bootstrap_increase(dense, run)[0] - v["increase"]) < 1e-9
    # a budget no sparse allocation can meet (random weights may even gain from sparsity) leaves dense
    assert tuned["steps"], "a 5% budget on a random model should allow some sparsity"
    impossible = hold_budget(ev, val, 16, thresholds, {**tuned, "max_ppl_increase": -0.99})
    assert impossible["densities"] == [1.0] * 3 and impossible["kept_steps"] == 0


def engine_density(engine, tokenizer, text_file, sequences: int, prompt: int, continuation: int, bounds):
    """[sequences, layers] share of neurons the engine keeps after a prefill of the prompts `eval` reads from
    text_file (the first `sequences` held-out windows, one more window for greedy generation)."""
    import numpy as np

    windows = token_windows(tokenize(tokenizer, read_text(text_file, "evaluation")), sequences + 1,
                            prompt + continuation)
    ids = windows[:sequences, :prompt].numpy().astype(np.int64)
    _, state = engine.backend.prefill(ids, np.ones_like(ids), engine.thresholds(0.5, prompt), bounds)
    return engine.backend.active_counts(state).T / engine.manifest["intermediate_size"]


def eval_json(model, calibration, text_file, sequences: int, prompt: int, continuation: int, *extra) -> dict:
    r = cli("eval", "-m", model, "-c", calibration, "--density", "0.5", "--text", text_file, "--prompt-tokens", prompt,
            "--sequences", sequences, "--continuation-tokens", continuation, "--generate-prompts", 1,
            "--generate-tokens", 2, "--json", "-q", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def assert_same_density(report: dict, kept, tol: float = 0.01):
    import numpy as np

    got = report["realised_density"]
    assert abs(got["mean"] - kept.mean()) < tol, (got["mean"], kept.mean())
    np.testing.assert_allclose(got["per_layer"], kept.mean(0), atol=tol)
    assert abs(got["per_sequence_min"] - kept.mean(1).min()) < tol
    assert abs(got["per_sequence_max"] - kept.mean(1).max()) < tol


def test_eval_density_is_the_exported_engines_on_the_same_windows(served_engine_dir, tiny_dirs, llama, tmp_path):
    """`eval --density 0.5 --json` reports the density the exported engine keeps on the same windows (ONNX
    Runtime, the engine's own thresholds table and clamp); --no-clamp reports the engine fed thresholds alone."""
    from tda_export.runtime.engine import Engine

    engine = Engine.load(served_engine_dir, backend="onnxruntime", threads=1)
    f = tmp_path / "t.txt"
    f.write_text(random_text(800, seed=2))  # not the text the engine was calibrated on: thresholds drift
    shape = (8, 16, 8)  # windows, prompt and continuation tokens
    cal = served_engine_dir / "calibration.json"
    clamped = eval_json(tiny_dirs["llama"], cal, f, *shape)
    sel = clamped["selection"]
    assert sel["as_engine"] and sel["density_margin"] == 0.05 and sel["threshold_table_prompt_tokens"] == 16
    assert_same_density(clamped, engine_density(engine, llama.tokenizer, f, *shape, engine.density_bounds(0.5)))
    alone = eval_json(tiny_dirs["llama"], cal, f, *shape, "--no-clamp")
    assert alone["selection"]["density_bounds"] is None and not alone["selection"]["as_engine"]
    assert_same_density(alone, engine_density(engine, llama.tokenizer, f, *shape, None))
    # here the thresholds alone keep far less than asked: only the clamp makes eval's figure the engine's
    assert alone["realised_density"]["mean"] < clamped["realised_density"]["mean"] - 0.03
