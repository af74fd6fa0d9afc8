"""Engines built with --x-format q8_0 (contract x_format): every block linear but down reads its input quantized
per 32 values. The ONNX graph computes what the HF model with the same quantized inputs (export/engine_weights.apply
hooks, what calibration and eval run) computes; torch, ONNX Runtime and the native runtime agree on greedy tokens;
the setting is recorded, shown, checked and refused where it cannot run."""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import parity
from tda_export import manifest
from tda_export.cli import main
from tda_export.export import quantize
from tda_export.export.engine_weights import apply
from tda_export.models import load_model
from tda_export.ops import blocks
from tda_export.runtime.engine import Engine
from tiny_models import tiny_model, tiny_tokenizer


def _save_with_norm_weights(family, out):
    """A tiny model whose norm weights are not all equal, as trained models' are: with a uniform norm weight a
    q4_0 embedding row (d * n, n in [-8, 7]) normalises to blocks where x * (1/d_x) = n * 127/8 lands exactly
    on k + 0.5 (n = +-4), so round-half-even would turn on the last bit of the norm, which each backend
    computes in its own order (their logits then part by 1-2%: ties of that input, not a realization's bug)."""
    import torch

    model = tiny_model(family, 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return out

CASES = (("llama", "q8_0"), ("gemma2", "q4_1"), ("qwen2", "q4_0"))
BACKENDS = ("torch", "onnxruntime", "native")
STEPS = 6
LENS = (12, 9)


def test_x_choice_rules():
    assert quantize.x_choice("q4_1", "float") == "dtype" and quantize.x_choice("q8_0", "q8_0") == "q8_0"
    with pytest.raises(quantize.WeightFormatError, match="--x-format q8_0 needs a block --weight-format .* not float"):
        quantize.x_choice("float", "q8_0")
    with pytest.raises(quantize.WeightFormatError, match="--x-format 'q4_0': not one of float, q8_0"):
        quantize.x_choice("q8_0", "q4_0")


@pytest.fixture(scope="module")
def xengines(tiny_dirs, tmp_path_factory):
    """(family, fmt) -> (x_format q8_0 engine, the same engine with x as is, HF model on its weights with the
    quantized inputs, thresholds at ~d=0.5 on that model)."""
    root = tmp_path_factory.mktemp("xq")
    out = {}
    for family, fmt in CASES:
        src = _save_with_norm_weights(family, root / f"{family}-model")
        loaded = load_model(str(src))
        apply(loaded, fmt, quantize.AUTO, "q8_0")
        ids, mask, pos = parity.prompt(LENS, loaded.config.vocab_size)
        taus = parity.half_density_thresholds(loaded.model, loaded.activation, ids, mask, pos)
        cal = root / f"{family}-{fmt}.json"
        parity.write_calibration(cal, loaded, taus)
        engines = []
        for x in ("q8_0", "float"):
            d = root / f"{family}-{fmt}-{x}"
            r = CliRunner().invoke(main, ["build", "-m", str(src), "-o", str(d), "--dtype", "fp32",
                                          "--weight-format", fmt, "--x-format", x, "-c", str(cal)])
            assert r.exit_code == 0, r.output
            engines.append(d)
        out[family, fmt] = (*engines, loaded, taus)
    return out


@pytest.mark.parametrize("family, fmt", CASES)
def test_engine_computes_quantized_inputs(xengines, family, fmt):
    """ONNX Runtime on the engine == the HF model on the engine's dequantized weights whose block linears read
    blocks.quantize_x of their input, under the same TDA masks; and not what the x-as-is engine computes."""
    out, plain, loaded, taus = xengines[family, fmt]
    data = manifest.verify(out)
    assert data["x_format"] == "q8_0" and manifest.verify(plain)["x_format"] == "dtype"
    ids, mask, pos = parity.prompt(LENS, loaded.config.vocab_size)
    ref = parity.reference_run(loaded.model, loaded.activation, taus, ids, mask, pos, STEPS,
                               data["calibration"]["density_bounds"], x_format="q8_0")
    got = parity.onnx_run(out / "model.onnx", ids, mask, pos, STEPS, ref)
    other = parity.onnx_run(plain / "model.onnx", ids, mask, pos, STEPS, ref)
    # Per token: fp32 noise upstream of a quantizer can move a value across a rounding boundary (one q by 1, an
    # error of d in one input), so tokens after such a flip differ by about that much; the ones before it agree
    # within fp32 noise. The engine built with x as is is off on every token: the setting is not a no-op.
    def token_errors(a, b):
        return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)

    errs, plain_errs = [], []
    for step, ((ref_logits, _), g, o) in enumerate(zip(ref, got, other)):
        sel = mask.astype(bool) if step == 0 else np.ones(ref_logits.shape[:2], bool)
        errs += list(token_errors(g["logits"][sel], ref_logits[sel]))
        plain_errs += list(token_errors(o["logits"][sel], ref_logits[sel]))
    errs, plain_errs = np.array(errs), np.array(plain_errs)
    # (A flip at token t reaches every later token through the KV cache, so count tokens, not a median.)
    assert (errs < 1e-5).sum() >= 6 and errs.max() < 0.25, (family, fmt, errs)
    assert (plain_errs < 1e-4).sum() == 0 and np.median(plain_errs) > 1e-3, (family, fmt, plain_errs)


def _forced(backend, ids, mask, thresholds, bounds, tokens):
    """Last-position logits of the prompt, then of each decode step fed `tokens` [B, STEPS] (teacher forcing,
    so one backend's rounding flip cannot send the others down another text), and the prompt's active counts."""
    logits, state = backend.prefill(ids, mask, thresholds, bounds)
    out, counts = [logits], backend.active_counts(state)
    for t in range(tokens.shape[1] - 1):
        out.append(backend.decode(state, tokens[:, t]))
    return np.stack(out, 1), counts


@pytest.mark.parametrize("family, fmt", CASES)
def test_backends_agree(xengines, family, fmt):
    """torch, ONNX Runtime and native on one x_format q8_0 engine, fed the same tokens: every step's logits
    agree within fp32 noise until a value lands on the other side of a quantizer's rounding boundary in one
    backend (one q off by 1), after which they differ by about that much; greedy tokens almost always agree."""
    out = xengines[family, fmt][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engines = {b: Engine.load(out, backend=b, threads=1, **({"max_context": 64} if b == "torch" else {}))
                   for b in BACKENDS}
    ids, mask, _ = parity.prompt(LENS, engines["torch"].manifest["vocab_size"])
    first = engines["torch"]
    for density in (None, 1.0):
        th, bounds = first.thresholds(density), first.density_bounds(density)
        tokens = np.random.default_rng(1).integers(3, first.manifest["vocab_size"], (len(LENS), STEPS))
        want, want_counts = _forced(first.backend, ids, mask, th, bounds, tokens)
        for b in BACKENDS[1:]:
            got, counts = _forced(engines[b].backend, ids, mask, th, bounds, tokens)
            err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
            print(b, family, fmt, density, np.array2string(err, precision=1))
            assert (err < 1e-4).mean() >= 0.9 and err.max() < 0.25, (b, family, fmt, density, err)
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75, (b, family, fmt, density)
            if density == 1.0:
                np.testing.assert_array_equal(counts, want_counts)  # dense: every neuron, whatever the values


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from tda_export.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True)


def test_inspect_shows_and_checks_x_format(xengines, tmp_path):
    src = xengines["llama", "q8_0"][0]
    r = _cli("inspect", src)
    assert r.returncode == 0, r.stderr
    assert "x_format   q8_0: block linears and gate/up read their input quantized per 32 values" in r.stdout
    for i, (value, message) in enumerate((("q4_0", "x_format 'q4_0' is not one of \\['dtype', 'q8_0'\\]"),)):
        out = tmp_path / f"e{i}"
        shutil.copytree(src, out)
        data = manifest.read(out)
        data["x_format"] = value
        manifest.write(out, {k: v for k, v in data.items() if k not in ("files", "format")})
        r = _cli("inspect", out)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert __import__("re").search(message, r.stderr.splitlines()[0]), r.stderr
        with pytest.raises(Exception, match="x_format 'q4_0' is not one of"):
            Engine.load(out, backend="native", verify=False)


def test_cli_refuses_x_format_where_it_cannot_run(tiny_dirs, tmp_path):
    out = tmp_path / "e"
    for args, message in ((("--x-format", "q8_0"), "Error: --x-format q8_0 needs a block --weight-format"),
                          (("--weight-format", "q8_0", "--x-format", "q8_0", "--target", "tensorrt-rtx", "--dtype",
                            "fp16"), "Error: --x-format q8_0 with --target tensorrt-rtx: TensorRT plans read x as is")):
        r = CliRunner().invoke(main, ["build", "-m", str(tiny_dirs["llama"]), "-o", str(out), "--no-calibrate", *args])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
        assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() and not list(tmp_path.glob(".e*"))
    text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())
    assert "--x-format [float|q8_0]" in text and "int8 dot products" in text


def test_quantize_x_is_the_contract_rule():
    """Spot values of the rule itself (the realizations are checked against blocks.quantize_x elsewhere)."""
    x = np.zeros((2, 32), np.float32)
    x[0, :3] = [127.0, 0.5, -1.5]  # d = 1: halves go to even
    x[1, 0] = np.nan
    xq = blocks.quantize_x(x)
    np.testing.assert_array_equal(xq[0, :3], [127.0, 0.0, -2.0])
    assert (xq[0, 3:] == 0).all() and np.isnan(xq[1]).all()
    q, d = blocks.x_q8_0(x)
    assert d[0, 0] == 1.0 and np.isnan(d[1, 0]) and (q[1] == 0).all()
    # every finite block: |q| <= 127 and a finite xq, subnormal scales included (flushed to a zero block)
    from op_cases import x_cases

    x = x_cases(np.random.default_rng(0))
    q, d = blocks.x_q8_0(x)
    finite = np.isfinite(x.reshape(-1, 32)).all(1)
    assert (np.abs(q.reshape(-1, 32).astype(np.int32)[finite]) <= 127).all()
    below_max = finite & (np.abs(x.reshape(-1, 32)).max(1) < 1e38)  # 127 * (FLT_MAX / 127) may round to inf
    assert np.isfinite(blocks.quantize_x(x).reshape(-1, 32)[below_max]).all()
    tiny = np.linspace(-1, 1, 32, dtype=np.float32) * np.float32(1e-40)  # d subnormal: a zero block
    assert (blocks.quantize_x(tiny) == 0).all()
