"""Reference logits saved at build time, and the comparison `tda-export check` makes against them.

At build time a reference runs the exported model on a fixed batch (two prompts, the second left
padded) for a prefill and greedy decode steps; `check` replays the same tokens through the plan
and compares the logits with polygraphy's comparator, at the tolerance of the plan's dtype.
The reference: fp16 plans, ONNX Runtime on the same fp16 graph; bf16 plans, float32 logits from the
torch backend on the engine's own weights widened to float32 (ONNX Runtime's CPU provider has no bf16
kernels), so a bf16 tolerance also carries bf16's rounding against float32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GOLDENS_FILE = "trt_goldens.npz"
DECODE_STEPS = 2
# check's default (atol, rtol) on logits by the plan's dtype; an element fails when it misses both.
# bf16 keeps 8 mantissa bits to fp16's 11 and is compared with float32, not with the same bf16 graph:
# SmolLM2-135M built bf16 at d=0.9, run in bf16 by the torch backend, strays from its float32 goldens by
# max |err| 0.48 at prefill (the same dense), 0.83 and 2.09 on the decode steps (mean 0.12, 0.25, 0.60;
# logits span about -20..28; bench/bf16_goldens.py). 4.0 leaves room for another model and engine; a
# broken plugin moves logits by far more.
TOLERANCES = {"float16": (0.1, 0.05), "bfloat16": (4.0, 0.1)}


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


def tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rtol) `check` uses for a plan in `dtype` unless told."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no goldens for {dtype} plans (plans are float16 or bfloat16)")
    return TOLERANCES[dtype]


def reference(onnx_path: Path, manifest: dict):
    """(backend, its name) computing the goldens for an engine of manifest["dtype"]."""
    if manifest["dtype"] != "bfloat16":
        from ..ops.contract import BLOCK_FORMATS
        from ..runtime.ort_backend import OrtBackend

        # three runs: a block engine dequantizes its weights in each rather than folding them all to float32
        # up front (+3.8 GB per Mistral-7B layer at q4_0, so 125 GB at 32 layers; bench/build_scale.py)
        blocks = any(f in BLOCK_FORMATS for f in (manifest.get("weight_formats") or {}).values())
        return OrtBackend(onnx_path, manifest, threads=1, low_memory=blocks), f"onnxruntime {manifest['dtype']}"
    import torch

    from ..export.spec import DecoderSpec
    from ..runtime.onnx_weights import load_initializers
    from ..runtime.torch_backend import TorchBackend

    weights = load_initializers(Path(onnx_path))
    for name, t in weights.items():  # one tensor at a time: the bf16 copy goes as its fp32 one arrives
        if t.is_floating_point():
            weights[name] = t.float()
    spec = DecoderSpec.from_dict(dict(manifest["decoder_spec"], dtype="float32"))
    ids, _ = prompt(manifest["vocab_size"])
    backend = TorchBackend(spec, weights, device=torch.device("cpu"), max_batch=ids.shape[0],
                           max_context=ids.shape[1] + DECODE_STEPS + 1, cuda_graphs=False,
                           weight_formats=manifest.get("weight_formats"))  # block engines: dequantized exactly
    return backend, "torch float32"


def save(directory: Path, onnx_path: Path, manifest: dict) -> Path:
    ids, mask = prompt(manifest["vocab_size"])
    backend, name = reference(onnx_path, manifest)
    got = replay(backend, manifest, ids, mask)
    path = Path(directory) / GOLDENS_FILE
    np.savez(path, input_ids=ids, attention_mask=mask, reference=np.str_(name), plan_dtype=np.str_(manifest["dtype"]),
             **got)
    return path


def compare(golden: dict, got: dict, atol: float, rtol: float) -> tuple[bool, list[str]]:
    """Each logits array of `got` against `golden` with polygraphy's simple comparator."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    names = [k for k in golden if k == "prefill" or k.startswith("decode")]
    cmp = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
    result = cmp(IterationResult({n: np.asarray(got[n], np.float32) for n in names}, runner_name="tensorrt"),
                 IterationResult({n: np.asarray(golden[n], np.float32) for n in names}, runner_name="goldens"))
    lines, ok = [], True
    for n in names:
        r = result[n]
        diff = np.abs(np.asarray(got[n], np.float32) - np.asarray(golden[n], np.float32))
        rel = float(np.linalg.norm(diff) / max(np.linalg.norm(golden[n]), 1e-30))
        ok &= bool(r)
        lines.append(f"{n:8s} max |err| {diff.max():.3e}  rel l2 {rel:.3e}  {'ok' if r else 'MISMATCH'}")
    return ok, lines
