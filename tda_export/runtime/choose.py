"""The faster of torch and ONNX Runtime on this CPU, decided by measurement: what `backend="auto"` runs
where the native runtime cannot run the engine (selection.py holds the whole rule).

The answer depends on the model's shapes, the thresholds and the machine (our CPU
kernel is portable SSE2 against MKL/ORT's AVX GEMVs), so both backends decode a few steps at the
engine's default thresholds, interleaved and best-of-N against the noise of a shared machine, next to
dense ONNX Runtime. The faster one wins; if even that is slower than dense ONNX Runtime, TDA does not
pay on this machine and the default thresholds become dense (which is never worse for quality), because
TDA must never make the default engine slower than dense ONNX Runtime. The decision is cached per
model, thresholds, thread count and machine, so only the first load pays for it (a few seconds).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

STEPS = 8
REPEATS = 3
PROMPT_TOKENS = 32
# Within this fraction the decode rates count as equal, so noise alone never turns TDA off.
TOLERANCE = 0.03


@dataclass
class Choice:
    backend: str          # "torch" | "onnxruntime"
    dense_default: bool   # the default thresholds were replaced by dense ones (TDA does not pay here)
    tok_s: dict           # measured decode tokens/s: "torch", "onnxruntime" (default thresholds), "onnxruntime_dense"
    cached: bool = False


def decode_rate(backend, prompt: np.ndarray, thresholds: np.ndarray, steps: int = STEPS) -> float:
    """Greedy decode tokens/s of one sequence after a prefill (decode steps only)."""
    mask = np.ones_like(prompt)
    logits, state = backend.prefill(prompt, mask, thresholds)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = backend.decode(state, logits.argmax(-1))
    return steps / (time.perf_counter() - t0)


def measure(torch_backend, ort_backend, thresholds: np.ndarray, vocab: int, repeats: int = REPEATS) -> dict:
    prompt = np.random.default_rng(0).integers(10, vocab - 1, (1, PROMPT_TOKENS)).astype(np.int64)
    dense = np.zeros_like(thresholds)
    runs = {"torch": (torch_backend, thresholds), "onnxruntime": (ort_backend, thresholds),
            "onnxruntime_dense": (ort_backend, dense)}
    for b, t in {id(b): (b, t) for b, t in runs.values()}.values():  # warm-up: lazy inits, kernel builds
        decode_rate(b, prompt, t, steps=2)
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):  # interleaved, so a burst of load on the machine hits every candidate
        for name, (b, t) in runs.items():
            best[name] = max(best[name], decode_rate(b, prompt, t))
    return best


def decide(tok_s: dict) -> Choice:
    winner = "torch" if tok_s["torch"] >= tok_s["onnxruntime"] else "onnxruntime"
    slower = tok_s[winner] < (1.0 - TOLERANCE) * tok_s["onnxruntime_dense"]
    return Choice(backend=winner, dense_default=slower, tok_s=tok_s)


def _cache_path(manifest: dict, thresholds: np.ndarray, threads: int | None) -> Path:
    import torch

    key = json.dumps({"model": manifest["files"].get(manifest["model_file"], {}).get("sha256"),
                      "thresholds": [float(t) for t in thresholds], "threads": threads or os.cpu_count(),
                      "machine": [platform.machine(), platform.processor(), os.cpu_count()],
                      "torch": torch.__version__, "rule": [STEPS, REPEATS, PROMPT_TOKENS, TOLERANCE]}, sort_keys=True)
    root = Path(os.environ.get("TDA_EXPORT_CACHE", Path.home() / ".cache" / "tda-export"))
    return root / "backend-choice" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def choose_cpu(make_torch, make_ort, manifest: dict, threads: int | None):
    """(Choice, the chosen backend instance). make_*: () -> backend, so a cached choice builds only one."""
    thresholds = np.asarray((manifest.get("calibration") or {}).get("thresholds", [0.0] * manifest["num_layers"]),
                            np.float32)
    path = _cache_path(manifest, thresholds, threads)
    if path.is_file():
        choice = Choice(**dict(json.loads(path.read_text()), cached=True))
        return choice, (make_torch() if choice.backend == "torch" else make_ort())
    torch_b, ort_b = make_torch(), make_ort()
    choice = decide(measure(torch_b, ort_b, thresholds, manifest["vocab_size"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: v for k, v in asdict(choice).items() if k != "cached"}))
    os.replace(tmp, path)
    return choice, (torch_b if choice.backend == "torch" else ort_b)
