"""Load on `tda-export serve`'s server: N concurrent streaming clients on 127.0.0.1; throughput and latency.

Configurations run interleaved (repeats alternate between them, so a noisy neighbour hits all of them
alike), each against a fresh server on the same loaded engine:
  continuous - continuous batching (up to B sequences in flight; a request joins at the next decode step,
               a finished one frees its slot at once), the engine's default density
  static     - static batching: batches of up to B sequences run to completion (the scheduler before
               continuous batching, and the only mode of the torch/TensorRT backends)
  batch1     - static, B = 1: no batching, the unbatched baseline of the same runtime
  dense      - continuous at density 1.0 (TDA off) per request
Each client sends one streaming request; its max_tokens is N or drawn uniformly from LO..HI (a mixed-length
load, the same draws for every configuration). Per request: time to first token (first non-empty SSE text),
per-token latency ((time of the last text or finish chunk - TTFT) / (tokens - 1), what a reader of the
stream waits per token) and end-to-end latency to `[DONE]` (p99; p50 too in --json); tokens counted from the server's
usage (stream_options.include_usage), so they are the generated tokens, EOS included.

The issue-20 comparison (continuous vs static, mixed lengths, 16 and 64 clients):
  python bench/server_load.py --engine ENGINE --backend native --clients 16,64 --max-tokens 8..256 \\
      --configs continuous,static --repeats 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import threading
import time

import httpx
import numpy as np

from tda_export.runtime.engine import Engine
from tda_export.runtime.server import Server


async def one(client, prompt, max_tokens, density):
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    if density is not None:
        body["density"] = density
    t0 = time.perf_counter()
    ttft, last, tokens, done = None, None, 0, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
                    last = time.perf_counter() - t0
                    if ttft is None and chunk["choices"][0]["text"]:
                        ttft = last
    return {"status": 200, "done": done, "ttft": ttft, "last": last, "latency": time.perf_counter() - t0,
            "tokens": tokens}


async def load(port, prompts, max_tokens, density):
    limits = httpx.Limits(max_connections=len(prompts))
    timeout = httpx.Timeout(None, connect=60)  # a queued stream sees no byte until its batch starts
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout, limits=limits) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c, p, n, density) for p, n in zip(prompts, max_tokens)))
        return results, time.perf_counter() - t0


def run_config(engine, max_batch, density, batching, prompts, max_tokens):
    srv = Server(engine, "127.0.0.1", 0, queue_size=max(64, len(prompts)), max_batch=max_batch,
                 max_request=64, batching=batching)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    load_before = os.getloadavg()[0]
    try:
        results, wall = asyncio.run(load(srv.port, prompts, max_tokens, density))
    finally:
        srv.shutdown()
        thread.join(timeout=10)
    return summarize(results, wall, len(prompts), load_before)


def summarize(results, wall, clients, load_before=None):
    """Throughput and latency percentiles of one load run (what `load` returned)."""
    ok = [r for r in results if r["status"] == 200 and r["done"]]
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    latency = np.array([r["latency"] for r in ok])
    per_token = np.array([(r["last"] - r["ttft"]) / (r["tokens"] - 1) for r in ok
                          if r["ttft"] is not None and r["tokens"] > 1])
    tokens = sum(r["tokens"] for r in ok)
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")  # noqa: E731
    return {"complete": len(ok), "clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(per_token, 50), "tpot_p99_ms": 1e3 * pct(per_token, 99),
            "latency_p50_s": pct(latency, 50), "latency_p99_s": pct(latency, 99),
            "load": (load_before, os.getloadavg()[0])}


def token_counts(spec: str, clients: int, seed: int) -> list[int]:
    """N, or LO..HI drawn uniformly (inclusive) with a fixed seed."""
    if ".." in spec:
        lo, hi = (int(x) for x in spec.split(".."))
        if not 1 <= lo <= hi:
            raise SystemExit(f"--max-tokens {spec}: expected LO..HI with 1 <= LO <= HI")
        return [int(x) for x in np.random.default_rng(seed).integers(lo, hi + 1, clients)]
    return [int(spec)] * clients


def spread(values) -> str:
    values = list(values)
    digits = 2 if max(values) < 100 else 0
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


KEYS = ("tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "latency_p99_s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="/tmp/smollm2-engine")
    ap.add_argument("--backend", default="onnxruntime", choices=["native", "onnxruntime", "torch", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clients", default="64", help="concurrent clients; a comma-separated list runs each")
    ap.add_argument("--max-tokens", default="16", help="new tokens per request: N, or LO..HI drawn per client")
    ap.add_argument("--seed", type=int, default=0, help="of the LO..HI draws")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="continuous,static,batch1,dense",
                    help="comma-separated: continuous, static, batch1, dense")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    engine = Engine.load(args.engine, backend=args.backend, threads=args.threads, max_batch=args.max_batch)
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun".split()
    configs = {"continuous": (args.max_batch, None, "continuous"), "static": (args.max_batch, None, "static"),
               "batch1": (1, None, "static"), "dense": (args.max_batch, 1.0, "continuous")}
    chosen = [c for c in args.configs.split(",") if c]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {list(configs)}")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    report = {"command": command, "engine": args.engine, "backend": engine.backend.name, "cores": os.cpu_count(),
              "max_tokens": args.max_tokens, "repeats": args.repeats, "tables": []}
    for clients in [int(c) for c in args.clients.split(",")]:
        prompts = [f"Story {i}: " + " ".join(words[(i + k) % len(words)] for k in range(12)) for i in range(clients)]
        max_tokens = token_counts(args.max_tokens, clients, args.seed)
        runs = {c: [] for c in chosen}
        for _ in range(args.repeats):
            for name in chosen:
                runs[name].append(run_config(engine, *configs[name], prompts, max_tokens))
        rows = []
        for name in chosen:
            rs = runs[name]
            rows.append({"config": name, "max_batch": configs[name][0], "density": configs[name][1] or "default",
                         "batching": configs[name][2], "complete": f"{min(r['complete'] for r in rs)}/{clients}",
                         **{k: [r[k] for r in rs] for k in KEYS + ("latency_p50_s",)},
                         "load": [min(r["load"][0] for r in rs), max(r["load"][1] for r in rs)]})
        report["tables"].append({"clients": clients, "requested_tokens": sum(max_tokens), "rows": rows})
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(command)
    print(f"engine {args.engine}, backend {engine.backend.name}, {os.cpu_count()} cores, max batch {args.max_batch}, "
          f"max_tokens {args.max_tokens} per client, {args.repeats} interleaved repeats; cells are min / median / max")
    for table in report["tables"]:
        print(f"\n{table['clients']} concurrent streaming clients ({table['requested_tokens']} tokens requested)")
        print("| config | batching | max batch | density | complete | tok/s | TTFT p50 s | TTFT p99 s "
              "| per-token p50 ms | per-token p99 ms | latency p99 s | load avg (1 min) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in table["rows"]:
            print(f"| {r['config']} | {r['batching']} | {r['max_batch']} | {r['density']} | {r['complete']} | "
                  + " | ".join(spread(r[k]) for k in KEYS) + f" | {r['load'][0]:.1f}..{r['load'][1]:.1f} |")
        by = {r["config"]: r for r in table["rows"]}
        for name, base in (("continuous", "static"), ("static", "batch1"), ("continuous", "batch1")):
            if name in by and base in by:
                a, b = by[name], by[base]
                ratio = lambda k: statistics.median(a[k]) / (statistics.median(b[k]) or float("nan"))  # noqa: E731
                print(f"{name} / {base} (medians): throughput {ratio('tok_s'):.2f}x, "
                      f"TTFT p50 {ratio('ttft_p50_s'):.2f}x, TTFT p99 {ratio('ttft_p99_s'):.2f}x, "
                      f"per-token p99 {ratio('tpot_p99_ms'):.2f}x, latency p99 {ratio('latency_p99_s'):.2f}x")


if __name__ == "__main__":
    main()
