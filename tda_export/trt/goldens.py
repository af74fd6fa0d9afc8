"""Reference logits saved at build time, and the comparison `tda-export check` makes against them.

At build time ONNX Runtime runs the exported graph on a fixed batch (two prompts, the second left
padded) for a prefill and greedy decode steps; `check` replays the same tokens through the plan
and compares the logits with polygraphy's comparator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GOLDENS_FILE = "trt_goldens.npz"
DECODE_STEPS = 2


def prompt(vocab: int, length: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    return ids, mask


def thresholds_of(manifest: dict) -> np.ndarray:
    return np.asarray(manifest["calibration"].get("thresholds", [0.0] * manifest["num_layers"]), np.float32)


def bounds_of(manifest: dict) -> np.ndarray | None:
    """The built density's clamp (None for engines built without one: no clamp)."""
    bounds = (manifest.get("calibration") or {}).get("density_bounds")
    return None if bounds is None else np.asarray(bounds, np.float32)


def replay(backend, manifest: dict, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray | None = None) -> dict:
    """Prefill then DECODE_STEPS decode steps; the tokens fed are `tokens` if given, else greedy."""
    logits, state = backend.prefill(ids, mask, thresholds_of(manifest), bounds_of(manifest))
    out, fed = {"prefill": logits}, []
    for step in range(DECODE_STEPS):
        nxt = tokens[:, step] if tokens is not None else logits.argmax(-1).astype(np.int64)
        fed.append(nxt)
        logits = backend.decode(state, nxt)
        out[f"decode{step}"] = logits
    out["tokens"] = np.stack(fed, 1)
    return out


def save(directory: Path, onnx_path: Path, manifest: dict) -> Path:
    from ..runtime.ort_backend import OrtBackend

    ids, mask = prompt(manifest["vocab_size"])
    got = replay(OrtBackend(onnx_path, manifest, threads=1), manifest, ids, mask)
    path = Path(directory) / GOLDENS_FILE
    np.savez(path, input_ids=ids, attention_mask=mask, **got)
    return path


def compare(golden: dict, got: dict, atol: float, rtol: float) -> tuple[bool, list[str]]:
    """Each logits array of `got` against `golden` with polygraphy's simple comparator."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    names = [k for k in golden if k == "prefill" or k.startswith("decode")]
    cmp = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
    result = cmp(IterationResult({n: np.asarray(got[n], np.float32) for n in names}, runner_name="tensorrt"),
                 IterationResult({n: np.asarray(golden[n], np.float32) for n in names}, runner_name="onnxruntime"))
    lines, ok = [], True
    for n in names:
        r = result[n]
        diff = np.abs(np.asarray(got[n], np.float32) - np.asarray(golden[n], np.float32))
        rel = float(np.linalg.norm(diff) / max(np.linalg.norm(golden[n]), 1e-30))
        ok &= bool(r)
        lines.append(f"{n:8s} max |err| {diff.max():.3e}  rel l2 {rel:.3e}  {'ok' if r else 'MISMATCH'}")
    return ok, lines
