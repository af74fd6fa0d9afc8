"""End-to-end decode benchmark of the torch backend on a Mistral-7B-shaped model (for a GPU session).

    python bench/gpu_e2e.py --out bench/gpu_e2e_h200.json        # H200: ~14.5 GB bf16 twice, a few minutes
    python bench/gpu_e2e.py --tiny --device cpu --out /tmp/e2e.json   # smoke run (tests/test_torch_backend.py)

Model: a Hugging Face MistralForCausalLM built from a MistralConfig with Mistral-7B-v0.2's shapes
(H 4096, I 14336, 32 layers, 32/8 heads, vocab 32000, no sliding window) and HF's random init, in bf16 on
the device; no checkpoint is needed. Its weights go through the exporter's own decoder builder into
memory (export.weights.MemoryWriter: the same names and layouts as an engine's ONNX initializers, without
writing 14.5 GB of ONNX) and feed runtime.torch_backend.TorchBackend, so the timed path is the one an
engine runs: CUDA-graph decode, sparse MLP kernel, SDPA attention over the static cache.

Random weights give no meaningful TDA calibration, so density d is set directly: after a dense prefill each
sequence of each layer gets an independent random sorted active list of round(d * I) neurons. At batch 8
independent lists union to most neurons (reported as "union"), so batch-8 gains are a lower bound for real,
correlated TDA masks.

Reported per batch (1, 8), MLP and density: decode tokens/s; the bandwidth floor, i.e. the weight bytes
one step must read (attention, norms, lm_head, and the MLP rows of the union) divided by the
device-to-device copy bandwidth measured in the same run; and Hugging Face `generate` (greedy, its default
dynamic cache) on the same model. MLPs: `cublas`, the same backend and graphs with a dense torch MLP (the
anchor, density 1.0 only), and `v1`/`v2`, our decode kernel versions (--versions) at each density; every
MLP is captured afresh. Targets: cuBLAS dense >= 80% of its floor, density 0.5 >= 1.5x cuBLAS dense
(batch 1: at batch 8 independent random masks union to ~100% of the neurons).
Prints a markdown table and writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

# --tiny on a CPU: libgomp's default spin-wait costs a scheduler tick per OpenMP barrier on a loaded box
# (56 ms vs 1.5 ms per tiny step measured); read once when torch loads libgomp (see tda_export/cli.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from tda_export import arch  # noqa: E402
from tda_export.export import names  # noqa: E402
from tda_export.export.decoder import build_decoder  # noqa: E402
from tda_export.export.spec import decoder_spec  # noqa: E402
from tda_export.export.weights import MemoryWriter  # noqa: E402
from tda_export.runtime.torch_backend import TorchBackend  # noqa: E402

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
                  rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)
TINY = dict(hidden_size=64, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=320, max_position_embeddings=512, sliding_window=None)
DTYPES = {"bf16": ("bfloat16", torch.bfloat16), "fp16": ("float16", torch.float16), "fp32": ("float32", torch.float32)}
TARGETS = {"dense_frac_of_floor": 0.80, "d0.5_vs_dense": 1.5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Read + written bytes per second of a large device-to-device copy, best of 5."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src, dst = torch.ones(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best / 1e9


def hf_model(shape: dict, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MistralConfig(**shape, hidden_act="silu"), dtype=dtype)
    return model.eval()


def exported(model, dtype_name: str):
    """(DecoderSpec, name -> tensor) exactly as `tda-export build` would lay the weights out."""
    loaded = types.SimpleNamespace(model=model, config=model.config, family="mistral", name="mistral-7b-shaped-random",
                                   activation=arch.activation_of(model.config),
                                   tensor=lambda module, attr="weight": getattr(module, attr).detach())
    spec = decoder_spec(loaded, dtype_name)
    writer = MemoryWriter(dtype_name)
    build_decoder(loaded, spec, [0.0] * spec.num_layers, writer)
    return spec, writer.tensors


def step_bytes(spec, weights: dict, union: float) -> float:
    """Weight bytes one decode step reads: everything but the embedding table (one row) and rope caches,
    with the MLP scaled by the fraction of neurons in the batch's union."""
    mlp = {names.gate_up(n) for n in range(spec.num_layers)} | {names.down_t(n) for n in range(spec.num_layers)}
    skip = {names.rope(r, w) for r in spec.rope_types for w in ("cos", "sin")}
    if not spec.tied_embeddings:
        skip.add(names.EMBED)
    total = 0.0
    for name, t in weights.items():
        if name in skip or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        total += t.numel() * t.element_size() * (union if name in mlp else 1.0)
    return total


def set_random_masks(backend: TorchBackend, batch: int, density: float, seed: int) -> float:
    """Independent random active lists of round(density * I) neurons per sequence and layer (written into the
    backend's static TDA buffers, which the captured decode graph reads); returns the mean union fraction."""
    inter = backend.net.spec.intermediate
    k = max(1, round(density * inter))
    g = torch.Generator().manual_seed(seed)
    unions = []
    for idx, cnt in zip(backend.mlp.idx, backend.mlp.count):
        rows = torch.stack([torch.randperm(inter, generator=g)[:k].sort().values for _ in range(batch)])
        idx[:batch, :k].copy_(rows.to(torch.int32))
        idx[:batch, k:].zero_()
        cnt[:batch].fill_(k)
        unions.append(torch.unique(rows).numel() / inter)
    return float(np.mean(unions))


def use_mlp(backend: TorchBackend, mlp: str) -> None:
    """Decode through `mlp` from the next step on: "cublas" (dense torch MLP) or "v1"/"v2" (our kernel).
    Drops captured graphs so the next step captures the chosen MLP; call after prefill (which resets
    the dense masks)."""
    if backend._graphs is not None:
        backend._graphs.graphs.clear()
    tda = backend.mlp
    if mlp == "cublas":
        ones = torch.ones(1, 1, backend.net.spec.intermediate, dtype=backend.net.dtype, device=backend.device)
        tda.dense_mask = [ones] * len(tda.dense_mask)
    else:
        tda.kernel_version = int(mlp.removeprefix("v"))


def ours_rate(backend: TorchBackend, spec, batch: int, density: float, prompt: int, new: int, seed: int,
              mlp: str = "v1"):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, spec.vocab - 1, (batch, prompt)).astype(np.int64)
    logits, state = backend.prefill(ids, np.ones_like(ids), np.zeros(spec.num_layers, np.float32))
    union = set_random_masks(backend, batch, density, seed) if density < 1.0 else 1.0
    use_mlp(backend, mlp)
    for _ in range(3):  # warm-up: captures this batch size's CUDA graph
        logits = backend.decode(state, logits.argmax(-1))
    sync(backend.device)
    t0 = time.perf_counter()
    for _ in range(new):
        logits = backend.decode(state, logits.argmax(-1))  # the host needs each token: realistic sync per step
    seconds = time.perf_counter() - t0
    return batch * new / seconds, seconds / new, union


def hf_rate(model, spec, batch: int, prompt: int, new: int, seed: int) -> float:
    """Greedy `generate`; decode rate from the difference between `new` and 1 new tokens (removes prefill)."""
    ids = torch.from_numpy(np.random.default_rng(seed).integers(10, spec.vocab - 1, (batch, prompt))).to(model.device)

    def timed(n: int) -> float:
        sync(model.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync(model.device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    return batch * (new - 1) / max(timed(new) - timed(1), 1e-9)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test, runs on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--densities", default="1.0,0.7,0.5,0.3")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=4096,
                    help="KV cache slots (decode graphs attend over the filled bucket of them)")
    ap.add_argument("--versions", default="1,2", help="decode kernel versions to run")
    ap.add_argument("--no-cublas", action="store_true", help="skip the dense torch-MLP anchor")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate baseline")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if not args.tiny and device.type != "cuda":
        # Mistral-7B shapes on a CPU would allocate ~29 GB and run for hours, and its numbers mean nothing
        raise SystemExit(f"gpu_e2e.py: Mistral-7B shapes need a CUDA GPU (device {device}; torch sees "
                         f"{'a GPU' if torch.cuda.is_available() else 'none'}); use --tiny for the CPU smoke run")
    dtype_name, dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    versions = [int(v) for v in args.versions.split(",")]
    if any(v not in (1, 2) for v in versions):
        ap.error(f"--versions {args.versions}: each must be 1 or 2")
    mlps = ([] if args.no_cublas else ["cublas"]) + [f"v{v}" for v in versions]
    shape = TINY if args.tiny else MISTRAL_7B

    copy_gbs = copy_bandwidth_gbs(device)
    model = hf_model(shape, dtype, device)
    spec, weights = exported(model, dtype_name)
    floor_bytes = {d: None for d in densities}
    hf = {} if args.no_hf else {b: hf_rate(model, spec, b, args.prompt_tokens, args.new_tokens, 0) for b in batches}
    dense_bytes = step_bytes(spec, weights, 1.0)
    mlp_bytes = dense_bytes - step_bytes(spec, weights, 0.0)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    needed = args.prompt_tokens + args.new_tokens + 8
    if args.max_context < needed:
        ap.error(f"--max-context {args.max_context} < prompt + new tokens + 8 = {needed}")
    backend = TorchBackend(spec, weights, device=device, max_batch=max(batches), max_context=args.max_context)
    rows = []
    for b in batches:
        dense_rate = None
        for mlp in mlps:
            for d in ([1.0] if mlp == "cublas" else sorted(densities, reverse=True)):
                rate, step_s, union = ours_rate(backend, spec, b, d, args.prompt_tokens, args.new_tokens, 1, mlp)
                floor_bytes[d] = dense_bytes - mlp_bytes * (1.0 - union)
                floor_s = floor_bytes[d] / (copy_gbs * 1e9)
                dense_rate = rate if mlp == "cublas" else dense_rate
                rows.append({"batch": b, "mlp": mlp, "density": d, "union": union, "tok_s": rate,
                             "step_ms": step_s * 1e3, "floor_ms": floor_s * 1e3, "frac_of_floor": floor_s / step_s,
                             "vs_cublas_dense": rate / dense_rate if dense_rate else None, "hf_tok_s": hf.get(b)})
                print(f"batch {b} {mlp} d={d}: {rate:.1f} tok/s", flush=True)
    verdicts = {}
    for b in batches:
        cublas = [r for r in rows if r["batch"] == b and r["mlp"] == "cublas"]
        if cublas:
            verdicts[f"batch{b} cublas dense >= {TARGETS['dense_frac_of_floor']:.0%} of floor"] = \
                cublas[0]["frac_of_floor"] >= TARGETS["dense_frac_of_floor"]
        for r in rows:
            if b == 1 and r["batch"] == b and r["density"] == 0.5 and r["vs_cublas_dense"]:
                verdicts[f"batch{b} {r['mlp']} d0.5 vs cublas dense >= {TARGETS['d0.5_vs_dense']}"] = \
                    r["vs_cublas_dense"] >= TARGETS["d0.5_vs_dense"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "shape": "tiny" if args.tiny else "mistral-7b", "dtype": dtype_name,
              "copy_gbs": copy_gbs, "weight_bytes_dense_step": dense_bytes, "prompt_tokens": args.prompt_tokens,
              "max_context": backend.max_context,
              "new_tokens": args.new_tokens, "rows": rows, "verdicts": verdicts, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    print(f"{name}, {result['shape']} {dtype_name}, copy bandwidth {copy_gbs:.0f} GB/s, "
          f"dense step reads {dense_bytes / 1e9:.2f} GB of weights")
    print("| batch | MLP | density | union active | tok/s | ms/step | floor ms | % of floor | vs cuBLAS dense | "
          "HF generate tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf_s = f"{r['hf_tok_s']:.1f}" if r["hf_tok_s"] else "-"
        vs = f"{r['vs_cublas_dense']:.2f}x" if r["vs_cublas_dense"] else "-"
        print(f"| {r['batch']} | {r['mlp']} | {r['density']:.1f} | {r['union']:.0%} | {r['tok_s']:.1f} | "
              f"{r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['frac_of_floor']:.0%} | {vs} | {hf_s} |")
    for k, ok in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'} {k}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
