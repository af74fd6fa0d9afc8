"""Decode tok/s of the native C++ runtime (dense and TDA densities, with the density clamp users get),
dense ONNX Runtime and, when given, llama.cpp GGUFs: every batch size and candidate in one run,
interleaved round by round (min / median / max), with % of the bandwidth floor and, when given,
the held-out quality each density costs.

  python bench/native_decode.py -e ENGINE [--batches 1,4] [--densities 0.9,0.7,0.5] [--repeats 5] [--steps 32]
      [--llama-bin DIR --gguf F32=f32.gguf,F16=f16.gguf,Q8_0=...] [--quality eval-0.9.json,eval-0.5.json]
      [--quick]

Rows per batch size: ONNX Runtime dense, native d=1.0 and each density (thresholds + the engine's
clamp, Engine.density_bounds: what `run`/`serve` do), then llama.cpp per GGUF: batch 1 is
`llama-bench -p 0 -n STEPS -d PROMPT -r 1` (one sequence decoding at depth PROMPT), batch B > 1 is
`llama-batched-bench -npp PROMPT -ntg STEPS -npl B` (B sequences decoding in parallel; its S_TG,
generated tokens of all sequences per second). "MLP rows kept" is the realised share per sequence
(mean over sequences and layers, from the runtime's active counts after each prefill).

% of floor = tok/s / floor, floor = B x copy bandwidth / weight bytes one decode step reads (attention,
norms, embeddings, lm_head and the kept MLP rows; llama.cpp: its GGUF file's bytes). At B > 1 the
step reads the union of the sequences' rows, which the runtime does not report: the per-sequence share
is used (the fewest bytes the step can read), so the % is a lower bound there. Copy bandwidth: the
runtime's one probe, tda_rt_copy_bandwidth (cpp/include/tda/runtime.h; `tda-run --bench` uses the
same), taken before every round; the best is used.

Quality: `--quality` takes `tda-export eval ... --density D --json` reports (one per density, from the
same engine's calibration) and prints each density's held-out perplexity increase (95% CI) and eval's
realised density beside its speed; a report whose selection is not the engines' (`as_engine`) is
flagged. llama.cpp is never part of the repo: build it yourself and give its bin directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tda_export.native.binding import copy_bandwidth
from tda_export.runtime.engine import Engine

RUNTIME_H = Path(__file__).resolve().parents[1] / "cpp" / "include" / "tda" / "runtime.h"


def probe_description() -> str:
    h = RUNTIME_H.read_text()
    size = int(re.search(r"#define TDA_RT_COPY_PROBE_BYTES \((\d+)ll << 20\)", h).group(1))
    reps = re.search(r"#define TDA_RT_COPY_PROBE_REPEATS (\d+)", h).group(1)
    return f"tda_rt_copy_bandwidth: best of {reps} single-thread memcpy of {size} MiB, read + write"


def decode_rate(backend, prompt, thresholds, steps, bounds):
    """tok/s of `steps` greedy decode steps after a prefill, and the active counts [layers, batch]."""
    logits, state = backend.prefill(prompt, np.ones_like(prompt), thresholds, bounds)
    counts = backend.active_counts(state)
    t = time.perf_counter()
    for _ in range(steps):
        logits = backend.decode(state, logits.argmax(-1))
    return prompt.shape[0] * steps / (time.perf_counter() - t), counts


def llama_rate(bin_dir: Path, gguf: str, batch: int, prompt: int, steps: int, threads: int,
               poll: int | None, timeout: float | None = None) -> float:
    """Decode tok/s of llama.cpp on `gguf`: all sequences' generated tokens per second (batch 1 raises
    subprocess.TimeoutExpired past `timeout` seconds)."""
    if batch == 1:
        cmd = [str(bin_dir / "llama-bench"), "-m", gguf, "-p", "0", "-n", str(steps), "-d", str(prompt), "-r", "1",
               "-t", str(threads), "-o", "json"] + (["--poll", str(poll)] if poll is not None else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout
        return float(json.loads(out)[0]["avg_ts"])
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", gguf, "-c", str(batch * (prompt + steps) + 64),
           "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(steps), "-npl", str(batch),
           "-t", str(threads), "--output-format", "jsonl"]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (r.stdout + r.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    return float(rows[-1]["speed_tg"])


def load_quality(paths: str) -> dict[float, dict]:
    """requested density -> tda-export eval --json report."""
    out = {}
    for p in filter(None, paths.split(",")):
        r = json.loads(Path(p).read_text())
        if r.get("requested_density") is None:
            raise SystemExit(f"{p}: no requested_density (run eval with --density D)")
        out[round(float(r["requested_density"]), 4)] = r | {"_path": p}
    return out


def quality_cell(r: dict | None) -> str:
    if r is None:
        return "not measured"
    t, sel = r["tda"], r.get("selection") or {}
    lo, hi = t["increase_ci95"]
    flag = "" if sel.get("as_engine") else " (NOT the engines' selection: rerun eval with its default clamp)"
    return (f"{100 * t['perplexity_increase']:+.1f}% ({100 * lo:+.1f}%, {100 * hi:+.1f}%), "
            f"kept {r['realised_density']['mean']:.3f}{flag}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--engine", required=True)
    ap.add_argument("--batches", default="1,4", help="batch sizes, all in the same interleaved rounds")
    ap.add_argument("--densities", default="0.9,0.7,0.5")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per candidate and round")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="[all cores], for every candidate")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime dense")
    ap.add_argument("--llama-bin", default=None,
                    help="llama.cpp's bin directory (llama-bench; llama-batched-bench for batch > 1)")
    ap.add_argument("--gguf", default="", help="NAME=file.gguf,... for --llama-bin (any weights of the same "
                                               "architecture: speed depends on the bytes, not the values)")
    ap.add_argument("--poll", type=int, default=None, help="llama-bench --poll (0: no busy-wait) [its default]")
    ap.add_argument("--quality", default="", help="tda-export eval --density D --json reports, comma-separated")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 round, 4 steps, 16-token prompts (the numbers mean nothing)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.prompt_tokens = 1, 4, 16
    print("command: " + shlex.join(["python", *sys.argv]))
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"  {platform.processor() or platform.machine()}  {os.cpu_count()} cores" + ("  QUICK: smoke test, "
                                                                                      "numbers mean nothing" if args.quick else ""))
    sys.stdout.flush()

    threads = args.threads or os.cpu_count()
    quality = load_quality(args.quality)
    nat = Engine.load(args.engine, backend="native", threads=args.threads)
    ort = None if args.no_ort else Engine.load(args.engine, backend="onnxruntime", threads=args.threads, verify=False)
    m = nat.manifest
    I = m["intermediate_size"]
    weight_bytes = nat.backend.engine.info.weight_bytes
    mlp_bytes = nat.backend.engine.info.mlp_weight_bytes  # blocks where the engine stores blocks
    batches = [int(b) for b in args.batches.split(",") if b]
    densities = [1.0] + [float(d) for d in args.densities.split(",") if d and float(d) != 1.0]
    llama = []
    if args.llama_bin:
        bin_dir = Path(args.llama_bin)
        for item in filter(None, args.gguf.split(",")):
            name, path = item.split("=", 1)
            if not Path(path).exists():
                raise SystemExit(f"--gguf {name}: {path} does not exist")
            llama.append((f"llama.cpp {name}", path))
        need = ["llama-bench"] + (["llama-batched-bench"] if max(batches) > 1 else [])
        missing = [n for n in need if not (bin_dir / n).exists()]
        if missing:
            raise SystemExit(f"--llama-bin {bin_dir}: no {', '.join(missing)}")

    cands = []  # (batch, name, run() -> (tok/s, counts or None), density)
    for B in batches:
        prompt = np.random.default_rng(B).integers(10, m["vocab_size"] - 1, (B, args.prompt_tokens)).astype(np.int64)
        if ort is not None:
            th = ort.thresholds(1.0, args.prompt_tokens)
            cands.append((B, "onnxruntime dense", lambda p=prompt, th=th: decode_rate(ort.backend, p, th, args.steps,
                                                                                      None), 1.0))
        for d in densities:
            th, bd = nat.thresholds(d, args.prompt_tokens), nat.density_bounds(d)
            cands.append((B, f"native d={d:.2f}",
                          lambda p=prompt, th=th, bd=bd: decode_rate(nat.backend, p, th, args.steps, bd), d))
        for name, path in llama:
            cands.append((B, name, lambda B=B, path=path: (llama_rate(bin_dir, path, B, args.prompt_tokens,
                                                                      args.steps, threads, args.poll), None), None))

    for B, _, run, d in cands:  # warm-up: page in the weights, lazy inits (llama.cpp warms up itself)
        if d is not None:
            run()
    rates = {(B, name): [] for B, name, _, _ in cands}
    kept = {}
    bw = []
    for _ in range(args.repeats):  # interleaved: every batch size and candidate once per round
        bw.append(copy_bandwidth())
        for B, name, run, _ in cands:
            r, counts = run()
            rates[B, name].append(r)
            if counts is not None:
                kept[B, name] = float(counts.mean()) / I
    bandwidth = max(bw)
    gguf_bytes = {name: os.path.getsize(path) for name, path in llama}

    print(f"engine {args.engine}  threads {threads}  prompt {args.prompt_tokens} tokens  steps {args.steps}  "
          f"rounds {args.repeats} (interleaved, batches {args.batches})  ended {time.strftime('%H:%M:%S')}  "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}  GOMP_SPINCOUNT="
          f"{os.environ.get('GOMP_SPINCOUNT')}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (best of the rounds; worst round {min(bw) / 1e9:.1f}) by "
          f"{probe_description()}; dense weight bytes per step {weight_bytes / 1e6:.1f} MB")
    print("% of floor = median tok/s / (batch x copy bandwidth / weight bytes one step reads); "
          "native at batch > 1: per-sequence MLP rows, a lower bound of the %")
    for B in batches:
        print(f"\nbatch {B}\n\n| candidate | MLP rows kept | tok/s min | median | max | vs native dense "
              f"| vs llama.cpp F32 | % of floor | held-out perplexity increase (95% CI), eval's kept share |\n"
              f"|---|---|---|---|---|---|---|---|---|")
        med = {name: statistics.median(rs) for (b, name), rs in rates.items() if b == B and rs}
        f32 = med.get("llama.cpp F32")
        for b, name, _, d in cands:
            if b != B:
                continue
            rs = rates[B, name]
            share = kept.get((B, name), 1.0)
            step_bytes = gguf_bytes[name] if name in gguf_bytes else weight_bytes - mlp_bytes + mlp_bytes * share
            floor = B * bandwidth / step_bytes
            rows = (f"{share:.1%}" if (B, name) in kept else f"100% ({gguf_bytes[name] / 2**20:.0f} MiB file)"
                    if name in gguf_bytes else "100%")
            q = "0 (reference)" if d == 1.0 else quality_cell(quality.get(round(d, 4))) if d else "-"
            vs_f32 = f"{med[name] / f32:.2f}x" if f32 else "-"
            print(f"| {name} | {rows} | {min(rs):.1f} | {med[name]:.1f} | {max(rs):.1f} "
                  f"| {med[name] / med['native d=1.00']:.2f}x | {vs_f32} | {100 * med[name] / floor:.0f}% | {q} |")
    for d, r in sorted(quality.items()):
        print(f"quality d={d}: {r['_path']} ({r['model']}, {r['text']['source']}, {r['text']['sequences']} windows "
              f"of {r['text']['prompt_tokens']}+{r['text']['continuation_tokens']} tokens)")


if __name__ == "__main__":
    main()
