"""Decode tok/s of the native C++ runtime at density 1.0 and TDA densities vs dense ONNX Runtime, in one
run, interleaved and repeated (min/median), with % of the bandwidth floor.

The floor: weight bytes one decode step must read (attention, norms, lm_head, and the MLP rows of the
active neurons: the union over the batch) / measured copy bandwidth (numpy copy of 512 MiB, read +
write). Usage:
  python bench/native_decode.py -e smollm2-engine [--batch 1] [--densities 0.5,0.7] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tda_export.runtime.choose import PROMPT_TOKENS
from tda_export.runtime.engine import Engine


def copy_bandwidth(repeats: int = 5) -> float:
    a = np.ones(1 << 27, np.float32)  # 512 MiB
    b = np.empty_like(a)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


def decode_rate(backend, prompt, thresholds, steps):
    logits, state = backend.prefill(prompt, np.ones_like(prompt), thresholds)
    counts = backend.active_counts(state)
    t = time.perf_counter()
    for _ in range(steps):
        logits = backend.decode(state, logits.argmax(-1))
    return prompt.shape[0] * steps / (time.perf_counter() - t), counts




def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--engine", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--densities", default="0.9,0.7,0.5")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS * 2)
    args = ap.parse_args()

    nat = Engine.load(args.engine, backend="native", threads=args.threads)
    ort = Engine.load(args.engine, backend="onnxruntime", threads=args.threads, verify=False)
    m = nat.manifest
    H, I, L = m["hidden_size"], m["intermediate_size"], m["num_layers"]
    weight_bytes = nat.backend.engine.info.weight_bytes
    mlp_bytes = 3 * H * I * 4 * L
    prompt = np.random.default_rng(0).integers(10, m["vocab_size"] - 1,
                                               (args.batch, args.prompt_tokens)).astype(np.int64)
    densities = [1.0] + [float(d) for d in args.densities.split(",") if float(d) != 1.0]
    cands = [("onnxruntime dense", ort.backend, ort.thresholds(1.0, args.prompt_tokens), 1.0)]
    cands += [(f"native d={d:.2f}", nat.backend, nat.thresholds(d, args.prompt_tokens), d) for d in densities]
    for _, b, th, _ in cands:  # warm-up: page in the weights, lazy inits
        decode_rate(b, prompt, th, 2)
    rates = {c[0]: [] for c in cands}
    active = {}
    bw = []
    for _ in range(args.repeats):
        bw.append(copy_bandwidth(2))
        for name, b, th, _ in cands:
            r, counts = decode_rate(b, prompt, th, args.steps)
            rates[name].append(r)
            active[name] = float(counts.mean()) / I
    bandwidth = max(bw)
    dense_native = statistics.median(rates["native d=1.00"])
    ort_dense = statistics.median(rates["onnxruntime dense"])
    print(f"engine {args.engine}  batch {args.batch}  prompt {args.prompt_tokens}  steps {args.steps}  "
          f"repeats {args.repeats} (interleaved)  copy bandwidth {bandwidth / 1e9:.1f} GB/s (max of {len(bw)})")
    print(f"{'candidate':20s} {'active':>7s} {'tok/s min':>10s} {'tok/s med':>10s} {'tok/s max':>10s} "
          f"{'vs native dense':>15s} {'vs ORT dense':>12s} {'% floor (med)':>13s}")
    for name, *_ in cands:
        rs = rates[name]
        med = statistics.median(rs)
        share = active[name]
        # per-sequence active share is a lower bound of the union the batch reads
        step_bytes = weight_bytes - mlp_bytes + mlp_bytes * (share if args.batch == 1 else min(1.0, share * args.batch))
        floor = bandwidth / step_bytes * args.batch  # tok/s at the bandwidth floor
        print(f"{name:20s} {share:7.1%} {min(rs):10.1f} {med:10.1f} {max(rs):10.1f} {med / dense_native:14.2f}x "
              f"{med / ort_dense:11.2f}x {100 * med / floor:12.0f}%")


if __name__ == "__main__":
    main()
