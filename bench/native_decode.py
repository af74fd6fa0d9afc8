"""Decode tok/s of the native C++ runtime at density 1.0 and TDA densities vs dense ONNX Runtime (and
llama.cpp when given), in one run, interleaved and repeated (min/median), with % of the bandwidth floor.

The floor: weight bytes one decode step must read (attention, norms, lm_head, and the MLP rows of the
active neurons: the union over the batch) / measured copy bandwidth (memcpy of 512 MiB counted as read
+ write, best of a few, measured between the rounds). Usage:
  python bench/native_decode.py -e smollm2-engine [--batch 1] [--densities 0.5,0.7] [--repeats 5]
      [--llama-bench PATH/llama-bench --gguf F32=model-f32.gguf,F16=model-f16.gguf] [--poll 0]

llama.cpp is optional and never part of the repo: give its llama-bench and GGUF files (any weights of
the same architecture: speed depends on the bytes, not the values); each round runs
`llama-bench -p 0 -n STEPS -r 1 -t THREADS --poll P -o json` once per GGUF, interleaved with the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np

from tda_export.runtime.choose import PROMPT_TOKENS
from tda_export.runtime.engine import Engine


def copy_bandwidth(repeats: int = 3) -> float:
    a = np.ones(1 << 27, np.float32)  # 512 MiB
    b = np.empty_like(a)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


def decode_rate(backend, prompt, thresholds, steps, bounds=None):
    # bounds: the density clamp a user's request gets (Engine.density_bounds; None on engines without it)
    logits, state = backend.prefill(prompt, np.ones_like(prompt), thresholds, bounds)
    counts = backend.active_counts(state)
    t = time.perf_counter()
    for _ in range(steps):
        logits = backend.decode(state, logits.argmax(-1))
    return prompt.shape[0] * steps / (time.perf_counter() - t), counts


def llama_rate(llama_bench: str, gguf: str, steps: int, threads: int, poll: int | None) -> float:
    cmd = [llama_bench, "-m", gguf, "-p", "0", "-n", str(steps), "-r", "1", "-t", str(threads), "-o", "json"]
    if poll is not None:
        cmd += ["--poll", str(poll)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def union_share(counts: np.ndarray, batch: int) -> float:
    """Upper estimate of the share of MLP rows one step reads: the batch's union is at most the sum."""
    per_seq = float(counts.mean())
    return min(1.0, per_seq * batch) if batch > 1 else per_seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--engine", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--densities", default="0.9,0.7,0.5")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS * 2)
    ap.add_argument("--dense-above", type=float, default=None,
                    help="also run the TDA densities with TDA_NATIVE_DENSE_ABOVE=X (sparse kernel up to share X)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime dense")
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench (optional)")
    ap.add_argument("--gguf", default="", help="NAME=file.gguf,... for --llama-bench")
    ap.add_argument("--poll", type=int, default=None, help="llama-bench --poll (0: no busy-wait) [its default]")
    args = ap.parse_args()

    nat = Engine.load(args.engine, backend="native", threads=args.threads)
    threads = args.threads or os.cpu_count()
    m = nat.manifest
    H, I, L = m["hidden_size"], m["intermediate_size"], m["num_layers"]
    weight_bytes = nat.backend.engine.info.weight_bytes
    mlp_bytes = 3 * H * I * 4 * L
    prompt = np.random.default_rng(0).integers(10, m["vocab_size"] - 1,
                                               (args.batch, args.prompt_tokens)).astype(np.int64)
    densities = [1.0] + [float(d) for d in args.densities.split(",") if d and float(d) != 1.0]
    cands = []  # (name, run() -> (tok/s, active share), fixed share or None)
    if not args.no_ort:
        ort = Engine.load(args.engine, backend="onnxruntime", threads=args.threads, verify=False)
        th = ort.thresholds(1.0, args.prompt_tokens)
        cands.append(("onnxruntime dense", lambda th=th: decode_rate(ort.backend, prompt, th, args.steps)))
    for d in densities:
        th, bd = nat.thresholds(d, args.prompt_tokens), nat.density_bounds(d)
        cands.append((f"native d={d:.2f}", lambda th=th, bd=bd: decode_rate(nat.backend, prompt, th, args.steps, bd)))
    if args.dense_above is not None:  # the same densities with another dense/sparse switch point
        os.environ["TDA_NATIVE_DENSE_ABOVE"] = str(args.dense_above)
        alt = Engine.load(args.engine, backend="native", threads=args.threads)
        del os.environ["TDA_NATIVE_DENSE_ABOVE"]
        for d in densities[1:]:
            th, bd = alt.thresholds(d, args.prompt_tokens), alt.density_bounds(d)
            cands.append((f"native d={d:.2f} sparse<={args.dense_above:g}",
                          lambda th=th, bd=bd: decode_rate(alt.backend, prompt, th, args.steps, bd)))
    llama = []
    if args.llama_bench and os.path.exists(args.llama_bench):
        for item in filter(None, args.gguf.split(",")):
            name, path = item.split("=", 1)
            if os.path.exists(path):
                llama.append((f"llama.cpp {name}", path))
    elif args.llama_bench:
        print(f"llama-bench not found at {args.llama_bench}: skipped")

    for _, run in cands:  # warm-up: page in the weights, lazy inits
        run()
    rates = {c[0]: [] for c in cands} | {n: [] for n, _ in llama}
    active = {}
    bw = []
    for _ in range(args.repeats):  # interleaved: every candidate once per round
        bw.append(copy_bandwidth())
        for name, run in cands:
            r, counts = run()
            rates[name].append(r)
            active[name] = union_share(counts / I, args.batch)
        if args.batch == 1:
            for name, path in llama:
                rates[name].append(llama_rate(args.llama_bench, path, args.steps, threads, args.poll))
    bandwidth = max(bw)
    gguf_bytes = {name: os.path.getsize(path) for name, path in llama}
    dense_native = statistics.median(rates["native d=1.00"])
    ort_dense = statistics.median(rates["onnxruntime dense"]) if not args.no_ort else None
    print(f"engine {args.engine}  batch {args.batch}  threads {threads}  prompt {args.prompt_tokens}  steps "
          f"{args.steps}  repeats {args.repeats} (interleaved)  copy bandwidth {bandwidth / 1e9:.1f} GB/s (max of "
          f"{len(bw)}; min {min(bw) / 1e9:.1f})  dense weight bytes/step {weight_bytes / 1e6:.1f} MB  "
          f"load {os.getloadavg()[0]:.2f}  GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    print(f"| candidate | MLP rows read | tok/s min | tok/s median | tok/s max | vs native dense | vs ORT dense "
          f"| % floor (median) |\n|---|---|---|---|---|---|---|---|")
    for name in rates:
        rs = rates[name]
        if not rs:
            continue
        med = statistics.median(rs)
        share = active.get(name, 1.0)  # llama.cpp: dense, its own bytes (the GGUF file, ~all tensors)
        step_bytes = gguf_bytes[name] if name in gguf_bytes else weight_bytes - mlp_bytes + mlp_bytes * share
        floor = bandwidth / step_bytes * args.batch  # tok/s at the bandwidth floor
        vs_ort = f"{med / ort_dense:.2f}x" if ort_dense else "-"
        print(f"| {name} | {share:.1%} | {min(rs):.1f} | {med:.1f} | {max(rs):.1f} | {med / dense_native:.2f}x "
              f"| {vs_ort} | {100 * med / floor:.0f}% |")


if __name__ == "__main__":
    main()
