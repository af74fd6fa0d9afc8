"""Torch backend vs the ONNX Runtime backend (the reference) on tiny engines of every family: same logits,
same TDA selection, same greedy text; left padding, per-sequence masks, density per request; both CPU
decode paths (kernel, masked dense); the auto choice; GPU variants when a GPU is present."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import parity
from tda_export.calibration import Calibration
from tda_export.export.build import build
from tda_export.models import load_model
from tda_export.runtime import choose, torch_tda
from tda_export.runtime.engine import CALIBRATION_FILE, Engine
from tda_export.runtime.generate import Stats, generate, stream
from tda_export.runtime.sampling import SamplingParams
from tda_export.runtime.torch_backend import TorchBackendError
from tiny_models import FAMILIES

STEPS = 8
LENS = (12, 9)  # left padding on the second row; 12 + 8 > the tiny sliding window of 8


@pytest.fixture(scope="module")
def engines(tiny_dirs, tmp_path_factory):
    """family -> fp32 engine directory with thresholds at ~50% density (stored as density 0.50)."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for family in FAMILIES:
        loaded = load_model(str(tiny_dirs[family]))
        ids, mask, pos = parity.prompt(LENS, loaded.config.vocab_size)
        taus = parity.half_density_thresholds(loaded.model, loaded.activation, ids, mask, pos)
        cal = root / f"{family}.json"
        parity.write_calibration(cal, loaded, taus)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[family] = build(str(tiny_dirs[family]), root / family, "float32", str(cal), progress=False)
    return out


def _load(path, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ORT's note about the thresholds initializer being an input
        return Engine.load(path, backend=backend, verify=False, **kw)


def _decode_both(torch_b, ort_b, ids, mask, thresholds, bounds=None):
    """Prefill + STEPS greedy steps on both, feeding ORT's tokens to both; returns per-step rel errors."""
    lo, so = ort_b.prefill(ids, mask, thresholds, bounds)
    lt, st = torch_b.prefill(ids, mask, thresholds, bounds)
    np.testing.assert_array_equal(torch_b.active_counts(st), ort_b.active_counts(so))
    errs = [parity.rel(lt, lo)]
    for _ in range(STEPS):
        tok = lo.argmax(-1)
        lo, lt = ort_b.decode(so, tok), torch_b.decode(st, tok)
        errs.append(parity.rel(lt, lo))
    return errs, torch_b.active_counts(st)


@pytest.mark.parametrize("decode_path", ["kernel", "masked_dense"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_ort(engines, family, decode_path, monkeypatch):
    monkeypatch.setattr(torch_tda, "CPU_DENSE_ABOVE", 1.0 if decode_path == "kernel" else 0.0)
    monkeypatch.setattr(torch_tda, "CPU_KERNEL_MAX_BATCH", 64 if decode_path == "kernel" else 1)
    t, o = _load(engines[family], "torch", max_context=64), _load(engines[family], "onnxruntime")
    ids, mask, _ = parity.prompt(LENS, t.manifest["vocab_size"])
    errs, counts = _decode_both(t.backend, o.backend, ids, mask, t.thresholds(), t.density_bounds())
    assert max(errs) < 1e-4, errs
    inter = t.manifest["intermediate_size"]
    lo, hi = np.ceil(t.density_bounds()[:, :1] * inter), np.floor(t.density_bounds()[:, 1:] * inter)
    assert ((counts >= lo) & (counts <= hi)).all()  # the engine's default clamp, the same in both
    assert 0 < counts.min() and counts.max() < inter  # really sparse
    assert (counts[:, 0] != counts[:, 1]).any()        # each sequence has its own mask


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_same_text(engines, family):
    """The one generation loop, greedy, a batch of different-length prompts: identical completions."""
    prompts = ["The quick brown fox jumps", "To be", "or not to be, that is the question."]
    params = SamplingParams(max_new_tokens=10)
    out = {b: generate(_load(engines[family], b, max_context=128), prompts, params)
           for b in ("torch", "onnxruntime")}
    assert out["torch"] == out["onnxruntime"]
    assert all(out["torch"])


def test_density_per_request(engines):
    """One engine, one backend instance, requests at different densities: selection follows the thresholds."""
    t, o = _load(engines["qwen2"], "torch", max_context=64), _load(engines["qwen2"], "onnxruntime")
    ids, mask, _ = parity.prompt(LENS, t.manifest["vocab_size"])
    inter = t.manifest["intermediate_size"]
    fractions = {}
    for density in (0.5, 1.0):
        errs, counts = _decode_both(t.backend, o.backend, ids, mask, t.thresholds(density))
        assert max(errs) < 1e-4, (density, errs)
        fractions[density] = counts.mean() / inter
    assert fractions[1.0] == 1.0 and fractions[0.5] < 0.8
    stats = Stats()
    for _ in stream(t, [[5, 6, 7, 8]], SamplingParams(max_new_tokens=3), density=0.5, stats=stats):
        pass
    assert stats.active_fraction < 0.8


def test_stale_state_and_limits(engines):
    t = _load(engines["llama"], "torch", max_context=16, max_batch=2)
    ids, mask, _ = parity.prompt((4, 3), t.manifest["vocab_size"])
    _, first = t.backend.prefill(ids, mask, t.thresholds())
    t.backend.prefill(ids, mask, t.thresholds())
    with pytest.raises(TorchBackendError, match="taken over"):
        t.backend.decode(first, np.array([1, 2]))
    with pytest.raises(TorchBackendError, match="max_batch"):
        t.backend.prefill(np.ones((3, 4), np.int64), np.ones((3, 4), np.int64), t.thresholds())
    assert t.max_context == 16  # generate() checks prompts + new tokens against the cache, not the model


def test_auto_decision_rule():
    d = choose.decide
    assert d({"torch": 20.0, "onnxruntime": 10.0, "onnxruntime_dense": 10.5}).backend == "torch"
    slow = d({"torch": 8.0, "onnxruntime": 10.0, "onnxruntime_dense": 12.0})
    assert slow.backend == "onnxruntime" and slow.dense_default  # TDA never slower than dense ORT by default
    noisy = d({"torch": 11.8, "onnxruntime": 10.0, "onnxruntime_dense": 12.0})
    assert noisy.backend == "torch" and not noisy.dense_default


def test_auto_measures_once_and_caches(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_EXPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("TDA_EXPORT_NATIVE", "0")  # the probe is for engines the native runtime cannot run
    first = _load(engines["llama"], "auto", device="cpu", max_context=64)
    c = first.choice
    assert not c.cached and c.backend in ("torch", "onnxruntime") and set(c.tok_s) == {
        "torch", "onnxruntime", "onnxruntime_dense"}
    assert first.backend.name == c.backend
    again = _load(engines["llama"], "auto", device="cpu", max_context=64)
    assert again.choice.cached and again.choice.backend == c.backend
    expected = np.zeros(3) if c.dense_default else Calibration.load(engines["llama"] / CALIBRATION_FILE).default[
        "thresholds"]
    np.testing.assert_allclose(first.thresholds(), expected)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_ort(engines, family, cuda_graphs):
    t = _load(engines[family], "torch", device="cuda", max_context=64)
    t.backend._graphs = t.backend._graphs if cuda_graphs else None
    o = _load(engines[family], "onnxruntime")
    ids, mask, _ = parity.prompt(LENS, t.manifest["vocab_size"])
    for density in (0.5, 1.0):  # a captured graph serves any thresholds
        errs, _ = _decode_both(t.backend, o.backend, ids, mask, t.thresholds(density))
        assert max(errs) < 1e-3, (density, errs)


def test_context_buckets():
    from tda_export.runtime.torch_backend import bucket_for, context_buckets

    assert context_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert context_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert context_buckets(64) == [64] and context_buckets(256) == [256]
    assert context_buckets(100, smallest=16) == [16, 32, 64, 100]
    buckets = context_buckets(4096)
    assert [bucket_for(s, buckets) for s in (0, 255, 256, 1000, 4095)] == [256, 256, 512, 1024, 4096]
    with pytest.raises(ValueError, match="beyond"):
        bucket_for(4096, buckets)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphs_cross_context_buckets(engines, monkeypatch):
    """Decoding across bucket boundaries (16 -> 32 -> 64 slots) captures one graph per bucket and still
    matches ORT step by step."""
    from tda_export.runtime import torch_backend

    monkeypatch.setattr(torch_backend, "MIN_CONTEXT_BUCKET", 16)
    t = _load(engines["llama"], "torch", device="cuda", max_context=64)
    o = _load(engines["llama"], "onnxruntime")
    ids, mask, _ = parity.prompt(LENS, t.manifest["vocab_size"])
    errs, _ = _decode_both(t.backend, o.backend, ids, mask, t.thresholds(0.5))
    assert max(errs) < 1e-3, errs
    assert t.backend._graphs.buckets == [16, 32, 64]
    assert {k[1] for k in t.backend._graphs.graphs} == {16, 32}  # slots 12..19


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_is_torch(engines):
    assert _load(engines["llama"], "auto", max_context=64).backend.name == "torch"


def _gpu_e2e_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_e2e.py"
    spec = importlib.util.spec_from_file_location("gpu_e2e", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_e2e_refuses_mistral_shapes_on_cpu(tmp_path):
    """Without --tiny the script needs a GPU: a clear message and a non-zero exit, not hours of CPU work."""
    with pytest.raises(SystemExit) as e:
        _gpu_e2e_module().main(["--device", "cpu", "--out", str(tmp_path / "x.json")])
    assert "need a CUDA GPU" in str(e.value.code) and "--tiny" in str(e.value.code)
    assert not (tmp_path / "x.json").exists()


def test_gpu_e2e_script_tiny(tmp_path):
    """bench/gpu_e2e.py end to end at tiny shapes on the CPU, so the GPU session's script is known to run."""
    mod = _gpu_e2e_module()
    out = tmp_path / "e2e.json"
    result = mod.main(["--tiny", "--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "3", "--batches", "1,2",
                       "--densities", "1.0,0.5", "--versions", "1,2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"])) and len(rows) == 10  # per batch: cublas, v1 x2, v2 x2
    assert all(r["tok_s"] > 0 and r["hf_tok_s"] > 0 for r in rows)
    assert [(r["mlp"], r["union"]) for r in rows if r["batch"] == 1] == [
        ("cublas", 1.0), ("v1", 1.0), ("v1", pytest.approx(0.5, abs=0.01)), ("v2", 1.0),
        ("v2", pytest.approx(0.5, abs=0.01))]
    assert all(r["vs_cublas_dense"] > 0 for r in rows) and result["max_context"] == 512  # the tiny model's limit
