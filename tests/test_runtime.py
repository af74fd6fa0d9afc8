"""Runtime on real exported engines: the generation loop on ONNX Runtime vs the torch reference,
and engine directories that were tampered with or built by another version."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tda_export.calibration import Calibration
from tda_export.cli import main
from tda_export.models import load_model
from tda_export.quality import Evaluator
from tda_export.runtime.engine import Engine, EngineError
from tda_export.runtime.generate import ContextTooLong, Stats, generate, stream
from tda_export.runtime.sampling import SamplingParams

TEXT = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog, to be or not to be." for i in range(400))


def build_engine(model_dir, out, tmp_path, family="llama"):
    text = tmp_path / f"{family}.txt"
    text.write_text(TEXT)
    cal = tmp_path / f"{family}.cal.json"
    r = CliRunner().invoke(main, ["calibrate", "-m", str(model_dir), "--text", str(text), "--densities", "0.5",
                                  "--sequences", "8", "--prompt-tokens", "16", "-q", "-o", str(cal)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["build", "--model", str(model_dir), "--calibration",
                                  str(cal), "--density", "0.5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, cal


@pytest.fixture(scope="module")
def engine_llama(tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eng")
    out, cal = build_engine(tiny_dirs["llama"], tmp / "engine", tmp)
    return Engine.load(out, backend="onnxruntime", threads=1), cal


def test_greedy_matches_torch_reference(engine_llama, tiny_dirs):
    engine, cal_path = engine_llama
    lm = load_model(str(tiny_dirs["llama"]))
    thresholds = Calibration.load(cal_path).thresholds_for(0.5)
    prompts = torch.randint(5, lm.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    ref = Evaluator(lm, quiet=True).greedy(prompts, 10, "tda", thresholds=thresholds)
    assert _stream_ids(engine, [p.tolist() for p in prompts], 10) == ref.tolist()
    stats = Stats()
    texts = generate(engine, [p.tolist() for p in prompts], SamplingParams(max_new_tokens=10), stats=stats)
    assert len(texts) == 3 and 0.0 < stats.active_fraction < 1.0


def _stream_ids(engine, prompts, n):
    """Greedy token ids by driving the backend the way the loop does (no EOS/stop handling)."""
    from tda_export.runtime.generate import encode

    ids = [encode(engine, p) for p in prompts]
    width = max(map(len, ids))
    x = np.zeros((len(ids), width), np.int64)
    m = np.zeros_like(x)
    for b, s in enumerate(ids):
        x[b, width - len(s):], m[b, width - len(s):] = s, 1
    logits, state = engine.backend.prefill(x, m, engine.thresholds())
    out = [[] for _ in ids]
    for _ in range(n):
        tok = logits.argmax(-1)
        for b in range(len(ids)):
            out[b].append(int(tok[b]))
        logits = engine.backend.decode(state, tok)
    return out


def test_batch_with_padding_equals_each_alone(engine_llama):
    engine, _ = engine_llama
    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, 300, n).tolist() for n in (5, 11, 2)]
    together = _stream_ids(engine, prompts, 8)
    alone = [_stream_ids(engine, [p], 8)[0] for p in prompts]
    assert together == alone


def test_density_per_request_changes_active_neurons(engine_llama):
    engine, _ = engine_llama
    fractions = {}
    for density in (1.0, 0.5, 0.1):
        stats = Stats()
        generate(engine, [list(range(10, 30))], SamplingParams(max_new_tokens=3), density=density, stats=stats)
        fractions[density] = stats.active_fraction
    assert fractions[1.0] == 1.0
    assert fractions[1.0] > fractions[0.5] > fractions[0.1] > 0.0
    with pytest.raises(EngineError, match="no thresholds for density 0.33"):
        engine.thresholds(0.33)


def test_density_bounds_hold_each_sequence_and_layer(engine_llama):
    """A request for density d runs SelectActive clamped to d +- density_margin (the manifest's): every
    sequence's and layer's active count lands in [ceil((d-m)*I), floor((d+m)*I)], also where the thresholds
    alone would miss it."""
    engine, _ = engine_llama
    inter = engine.manifest["intermediate_size"]
    assert engine.density_margin == 0.05
    np.testing.assert_array_equal(engine.density_bounds(), np.float32(engine.manifest["calibration"]["density_bounds"]))
    np.testing.assert_array_equal(engine.density_bounds(1.0), [[0.0, 1.0]] * engine.num_layers)
    rng = np.random.default_rng(3)
    x = rng.integers(5, 300, (3, 14)).astype(np.int64)
    m = np.ones_like(x)
    x[2, :6], m[2, :6] = 0, 0
    missed = 0
    for density in (0.5, 0.1):
        th, bounds = engine.thresholds(density), engine.density_bounds(density)
        np.testing.assert_allclose(bounds, [[max(0.0, density - 0.05), density + 0.05]] * engine.num_layers, rtol=1e-6)
        _, plain = engine.backend.prefill(x, m, th)
        _, clamped = engine.backend.prefill(x, m, th, bounds)
        lo, hi = np.ceil(np.float32(bounds[:, :1]) * inter), np.floor(np.float32(bounds[:, 1:]) * inter)
        got, before = engine.backend.active_counts(clamped), engine.backend.active_counts(plain)
        assert ((got >= lo) & (got <= np.maximum(lo, hi))).all(), (density, got)
        missed += int(((before < lo) | (before > hi)).sum())
    assert missed > 0  # the thresholds alone miss somewhere, so the clamp is what held the density
    # an engine exported before the clamp has no tda_density_bounds input: no bounds, thresholds alone
    old = Engine(engine.directory, {k: v for k, v in engine.manifest.items() if k != "density_bounds_input"},
                 engine.tokenizer, engine.backend, engine.calibration)
    assert old.density_bounds(0.5) is None


def test_stop_strings_context_and_sampling(engine_llama):
    engine, _ = engine_llama
    prompt = list(range(40, 52))
    full = generate(engine, [prompt], SamplingParams(max_new_tokens=12))[0]
    assert full, "the tiny model should produce some text"
    stop = full[3:5] if len(full) >= 5 else full[-1]
    cut = generate(engine, [prompt], SamplingParams(max_new_tokens=12, stop=(stop,)))[0]
    assert cut == full[: full.find(stop)]
    with pytest.raises(ContextTooLong):
        list(stream(engine, [prompt], SamplingParams(max_new_tokens=engine.max_context)))
    a = generate(engine, [prompt], SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    b = generate(engine, [prompt], SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    assert a == b


def test_tampered_or_foreign_engine_is_refused(engine_llama, tmp_path):
    engine, _ = engine_llama
    copy = tmp_path / "copy"
    shutil.copytree(engine.directory, copy)
    Engine.load(copy, backend="onnxruntime", threads=1)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="model.onnx"):
        Engine.load(copy, backend="onnxruntime", threads=1)
    shutil.rmtree(copy)
    shutil.copytree(engine.directory, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["versions"]["tda-export"] = "99.0.0"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="99.0.0"):
        Engine.load(copy, backend="onnxruntime", threads=1)
    with pytest.raises(EngineError, match="manifest.json"):
        Engine.load(tmp_path / "nothing", threads=1)


def test_cli_run_and_bench(engine_llama):
    engine, _ = engine_llama
    r = CliRunner().invoke(main, ["run", "-e", str(engine.directory), "-p", "the quick brown", "-n", "6",
                                  "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "tokens; first token" in r.output
    r = CliRunner().invoke(main, ["bench", "-e", str(engine.directory), "--prompt-tokens", "8", "--new-tokens", "4",
                                  "--repeats", "1", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout[r.stdout.index("{"):])["rows"]
    assert rows[0]["density"] == "1.00" and rows[0]["active_fraction"] == 1.0
    assert any(row["active_fraction"] < 1.0 for row in rows[1:])
    assert all(row["decode_tok_s"] > 0 for row in rows)
