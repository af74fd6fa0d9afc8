"""TDA semantics on tiny random-weight models of every family (and the contract's reference)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tda_export import arch
from tda_export.calibration import Calibration
from tda_export.cli import main
from tda_export.models import forward, load_model
from tda_export.ops import reference
from tda_export.ops.contract import DEFAULT_DENSITY_MARGIN
from tda_export.quality import Evaluator, build_calibration, calibrate_thresholds, token_windows
from tda_export.tda import TDAHooks, prompt_scores, select_mask, thresholds_for_density
from tiny_models import FAMILIES

TEXT = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog, to be or not to be." for i in range(400))


def test_prompt_scores_match_reference():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 7, 24))
    valid = (rng.random((3, 7)) > 0.3).astype(np.float32)
    for norm in ("token_l2", "none"):
        got = prompt_scores(torch.tensor(z), torch.tensor(valid), norm).numpy()
        ref = reference.prompt_scores(z, valid, norm)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6


@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.3, 0.7, 1.0, 1.5])
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (0.4, 0.6), (0.25, 0.3), (0.5, 0.5)])
def test_select_mask_matches_reference_select(tau, bounds):
    rng = np.random.default_rng(1)
    scores = rng.random((4, 40)).astype(np.float32) ** 3
    scores[2] = 0.0  # no valid prompt token -> dense fallback
    scores[3, :10] = scores[3, 10:20]  # ties: the lower index wins
    idx, count = reference.select_active(scores, tau, bounds)
    expect = reference.mask_from_state(idx, count, 40).astype(bool)
    assert (select_mask(torch.tensor(scores), tau, bounds).numpy() == expect).all()
    assert expect[2].all()


def test_topk_mode_keeps_ceil_density():
    """The topk control is SelectActive with bounds (d, d): the top ceil(d*I) of each sequence."""
    scores = torch.rand(3, 50)
    hooks = TDAHooks.__new__(TDAHooks)  # set_masks needs only the scores
    for d in (0.02, 0.33, 0.5, 1.0):
        hooks.scores = [scores]
        hooks.set_masks("topk", densities=[d])
        m = hooks.masks[0]
        assert (m.sum(-1) == int(np.ceil(d * 50))).all()
        kept_min = torch.where(m, scores, torch.inf).amin(-1)
        dropped_max = torch.where(m, -torch.inf, scores).amax(-1)
        assert (kept_min >= dropped_max).all()


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs):
    return {f: load_model(str(d)) for f, d in tiny_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_dir_and_adapter(tiny_models, family):
    lm = tiny_models[family]
    assert lm.family == family
    assert lm.activation == ("silu" if family in ("llama", "mistral", "qwen2") else "gelu_tanh")
    assert len(arch.mlp_modules(lm.model)) == lm.config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_density_one_equals_dense_exactly(tiny_models, family):
    lm = tiny_models[family]
    ev = Evaluator(lm, quiet=True)
    ids = token_windows(torch.randint(3, lm.config.vocab_size, (4000,)), 4, 24)
    batches = ev.prefill(ids, 16)
    dense_nll = ev.continuation_nll(batches, 16, "dense")
    th = calibrate_thresholds(ev, ids[:, :16], [1.0])["1.00"]
    assert th == [0.0] * lm.config.num_hidden_layers
    tda_nll = ev.continuation_nll(batches, 16, "tda", thresholds=th)
    assert tda_nll[0] == dense_nll[0] and tda_nll[2] == [1.0] * len(th)
    assert torch.equal(ev.greedy(ids[:, :16], 6, "dense"), ev.greedy(ids[:, :16], 6, "tda", thresholds=th))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_masked_mlp_equals_computing_only_active_neurons(tiny_models, family):
    lm = tiny_models[family]
    mlp = arch.mlp_modules(lm.model)[1]
    x = torch.randn(2, 1, lm.config.hidden_size)
    with TDAHooks(lm.model) as hooks:
        mask = torch.rand(2, lm.config.intermediate_size) > 0.6
        mask[1] = False
        mask[1, 7] = True  # a single neuron
        hooks.masks[1] = mask
        hooks.phase = "masked"
        got = mlp(x)
    for b in range(2):
        idx = mask[b].nonzero()[:, 0]
        z = mlp.act_fn(x[b] @ mlp.gate_proj.weight[idx].T) * (x[b] @ mlp.up_proj.weight[idx].T)
        ref = z @ mlp.down_proj.weight[:, idx].T
        assert torch.allclose(got[b], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_thresholds_monotone_in_density(tiny_models, family):
    lm = tiny_models[family]
    cal = build_calibration(lm, TEXT, "test", [0.3, 0.5, 0.7], 8, 16, "token_l2", None, 0.5, quiet=True)
    keys = sorted(cal.thresholds, key=float)
    table = np.array([cal.thresholds[k] for k in keys])  # [densities, layers]
    assert (np.diff(table, axis=0) <= 0).all(), "higher density must never raise a threshold"
    assert (table[:-1] > 0).any()


def test_thresholds_for_density_keeps_that_fraction():
    rel = torch.rand(50, 100)
    for d in (0.1, 0.5, 0.9):
        tau = thresholds_for_density(rel, d)
        assert abs((rel >= tau).float().mean().item() - d) < 0.01


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_padding_excluded_from_scores(tiny_models, family):
    lm = tiny_models[family]
    short = torch.randint(3, lm.config.vocab_size, (1, 9))
    other = torch.randint(3, lm.config.vocab_size, (1, 14))
    padded = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), other])
    attn = torch.ones_like(padded)
    attn[0, :5] = 0
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with TDAHooks(lm.model) as hooks:
        with hooks.phase_("score", token_valid=attn):
            forward(lm.model, padded, attention_mask=attn, position_ids=pos)
        batched = [s[0] for s in hooks.scores]
        hooks.reset_scores()
        with hooks.phase_("score"):
            forward(lm.model, short)
        alone = [s[0] for s in hooks.scores]
    for a, b in zip(alone, batched):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_calibration_file_roundtrip_and_model_check(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    cal = build_calibration(lm, TEXT, "test", [0.5], 4, 16, "token_l2", None, 0.5, quiet=True)
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.thresholds == cal.thresholds and back.default == cal.default
    c = lm.config
    back.check_model(lm.fingerprint(), c.num_hidden_layers, c.intermediate_size)
    other = tiny_models["mistral"]
    with pytest.raises(ValueError, match="calibration is for"):
        back.check_model(other.fingerprint(), c.num_hidden_layers, c.intermediate_size, str(path))
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        Calibration.load(path)


def test_budget_allocation_stays_within_budget(tiny_models):
    lm = tiny_models["qwen2"]
    cal = build_calibration(lm, TEXT, "test", [0.5], 8, 16, "token_l2", 0.05, 0.5, quiet=True,
                            tune_sequences=4, continuation=8, validation_sequences=8)
    b = cal.budget
    assert b["measured_increase"] <= 0.05
    v = b["validation"]
    assert v["windows"] == 8 and v["upper_bound"] <= 0.05 and v["ci95"][0] <= v["increase"] <= v["ci95"][1]
    assert 0 <= b["kept_steps"] <= b["tuned_steps"] == len(b["steps"])
    assert cal.default["kind"] == "budget" and len(cal.default["thresholds"]) == lm.config.num_hidden_layers
    assert min(b["densities"]) < 1.0, "a 5% budget on a random model should allow some sparsity"
    assert b["density_margin"] == DEFAULT_DENSITY_MARGIN  # tuned and validated with the engines' clamp


def test_cli_calibrate_no_clamp_tunes_the_budget_on_thresholds_alone(tiny_dirs, tmp_path):
    text, out = tmp_path / "t.txt", tmp_path / "cal.json"
    text.write_text(TEXT)
    r = CliRunner().invoke(main, ["calibrate", "-m", str(tiny_dirs["qwen2"]), "--text", str(text), "--densities", "0.5",
                                  "--sequences", "4", "--prompt-tokens", "16", "--max-ppl-increase", "0.05",
                                  "--tune-sequences", "2", "--validation-sequences", "2", "--no-clamp", "-q",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["budget"]["density_margin"] is None


def test_cli_eval_json_on_hf_dir(tiny_dirs, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = CliRunner().invoke(main, ["eval", "-m", str(tiny_dirs["mistral"]), "--density", "0.5", "--json", "-q",
                                  "--text", str(text), "--sequences", "4", "--prompt-tokens", "16",
                                  "--continuation-tokens", "8", "--generate-prompts", "2", "--generate-tokens", "4",
                                  "--calibration-sequences", "4"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert report["dense"]["perplexity"] > 1 and report["tda"]["perplexity"] > 1
    assert 0.0 < report["realised_density"]["mean"] < 1.0
    assert report["mlp_bytes"]["skipped_per_token"] > 0


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["eval", "-m", "no-such-model", "--density", "0.5"])
    assert r.exit_code == 2 and "neither an existing path" in r.output and "smollm2-135m" in r.output
    r = runner.invoke(main, ["eval", "-m", "mistral-7b", "--density", "0.5"])
    assert r.exit_code == 2 and "--weights" in r.output and "looked in" in r.output
    (tmp_path / "config.json").write_text("{}")
    r = runner.invoke(main, ["calibrate", "-m", str(tmp_path)])
    assert r.exit_code == 2 and "no *.safetensors" in r.output


BAD_DENSITIES = [("1.5", "must be in (0, 1]"), ("0", "must be in (0, 1]"), ("nan", "must be in (0, 1]"),
                 ("0.555", "0.55 or 0.56"), ("half", "'half' is not a number")]


@pytest.mark.parametrize("value,message", BAD_DENSITIES)
@pytest.mark.parametrize("command,flag,rest", [("build", "--density", ["-m", "smollm2-135m", "-o", "out"]),
                                               ("run", "--density", ["-e", ".", "-p", "hi"]),
                                               ("eval", "--density", ["-m", "smollm2-135m"]),
                                               ("bench", "--densities", ["-e", "."]),
                                               ("calibrate", "--densities", ["-m", "smollm2-135m"])])
def test_every_density_flag_is_checked_alike(command, flag, rest, value, message, tmp_path, monkeypatch):
    """One validator: the flag and the value named in one line, exit code 2, before any model or engine loads."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, [command] + rest + [flag, f"0.5,{value}" if flag == "--densities" else value])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{flag}'" in r.output and message in r.output, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    assert not (tmp_path / "out").exists()


def test_build_backend_flag_is_gone_with_a_pointer_to_target():
    r = CliRunner().invoke(main, ["build", "-m", "smollm2-135m", "--backend", "onnx", "-o", "x"])
    assert r.exit_code == 2 and "--target onnx|tensorrt-rtx|tensorrt" in r.output, r.output
    for args in (["-h"], ["build", "-h"]):
        help_text = CliRunner().invoke(main, args).output
        assert "--backend" not in help_text and "--target" in help_text


def test_recipe_dtype_is_builds_default_and_evals_byte_count(tiny_dirs, tmp_path):
    """A recipe's dtype means one thing: the engine dtype build makes and eval counts MLP bytes for;
    --dtype overrides both. mistral-7b's recipe says bfloat16; its weights here are the tiny mistral."""
    from tda_export.recipes import get_recipe

    assert get_recipe("mistral-7b").dtype == "bfloat16" and get_recipe("smollm2-135m").dtype == "float32"
    weights = str(tiny_dirs["mistral"])
    dtypes = {}
    for extra in ([], ["--dtype", "fp32"]):
        out = tmp_path / f"e{len(extra)}"
        r = CliRunner().invoke(main, ["build", "-m", "mistral-7b", "--weights", weights, "--no-calibrate",
                                      "-o", str(out)] + extra)
        assert r.exit_code == 0, r.output
        dtypes[len(extra)] = json.loads((out / "manifest.json").read_text())["dtype"]
    assert dtypes == {0: "bfloat16", 2: "float32"}
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    counted = {}
    for extra in ([], ["--dtype", "fp32"]):
        r = CliRunner().invoke(main, ["eval", "-m", "mistral-7b", "--weights", weights, "--density", "0.5", "--json",
                                      "-q", "--text", str(text), "--mode", "topk", "--sequences", "2",
                                      "--prompt-tokens", "8", "--continuation-tokens", "4", "--generate-prompts", "1",
                                      "--generate-tokens", "2"] + extra)
        assert r.exit_code == 0, r.output
        mb = json.loads(r.stdout[r.stdout.index("{"):])["mlp_bytes"]
        counted[len(extra)] = (mb["dtype"], mb["bytes_per_param"])
    assert counted == {0: ("bfloat16", 2), 2: ("float32", 4)}


@pytest.mark.parametrize("args,message", [
    (["run", "-e", "nodir", "-p", "hi"], "Invalid value for '--engine' / '-e': Directory 'nodir' does not exist"),
    (["serve", "-e", "nodir"], "Directory 'nodir' does not exist"),
    (["bench", "-e", "nodir"], "Directory 'nodir' does not exist"),
    (["check", "-e", "nodir"], "Directory 'nodir' does not exist"),
    (["inspect", "nodir"], "nodir/manifest.json: no such file"),
    (["build", "-m", "no-such-model", "-o", "out"], "--model 'no-such-model' is neither an existing path"),
    (["eval", "-m", "smollm2-135m"], "give --density D or --calibration FILE"),
    (["eval", "-m", "smollm2-135m", "-c", "nofile.json"], "'--calibration' / '-c': File 'nofile.json' does not exist"),
    (["calibrate", "-m", "smollm2-135m", "--text", "nofile.txt"], "'--text': File 'nofile.txt' does not exist"),
    (["build", "-m", "mistral-7b", "--weights", "nodir", "-o", "out"], "'--weights': Path 'nodir' does not exist"),
])
def test_user_errors_are_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert isinstance(r.exception, SystemExit)


def test_build_plan_limits_fail_before_calibrating(tmp_path):
    """A bad --max-batch used to surface only after minutes of calibration."""
    r = CliRunner().invoke(main, ["build", "-m", "smollm2-135m", "--target", "tensorrt-rtx", "--dtype", "fp16",
                                  "--max-batch", "0", "-o", str(tmp_path / "e")])
    assert r.exit_code == 2 and "calibrating" not in r.output and not (tmp_path / "e").exists(), r.output
    assert "--max-batch 0: must be >= 1" in r.output or "which is not installed" in r.output, r.output
