"""Held-out evaluation and bounded memory of calibration/eval (tiny models; issue 12)."""
import json
import random

import pytest
import torch
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.models import load_model
from tda_export.quality import (Evaluator, overlapping_windows, passage_sketch, tokenize,
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
    sequences = tokenize(llama.tokenizer, held_in).numel() * 3 // 4 // 256
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
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_calibration_memory_stays_flat_over_windows():
    """A leak of each batch's [B,P,V] logits or [B,P,I] cumsums would add ~1 GB over these 16 batches."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tda_export.models import LoadedModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
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
    per_batch_logits = 8 * 64 * cfg.vocab_size * 4
    assert len(kept) == 16
    assert grown < 4 * per_batch_logits, f"RSS grew {grown / 1e6:.0f} MB over 16 batches"
