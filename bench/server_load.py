"""Load on `tda-export serve`'s server: N concurrent streaming clients on 127.0.0.1; throughput and latency.

Configurations run interleaved (repeats alternate between them, so a noisy neighbour hits all of them
alike), each against a fresh server on the same loaded engine:
  batch B   - the default scheduler (request batching up to B sequences), engine's default density
  batch 1   - no batching: the unbatched baseline of the same runtime
  dense     - batch B at density 1.0 (TDA off) per request
Per request: time to first token (first non-empty SSE text) and total latency; tokens counted from the
server's usage (stream_options.include_usage), so they are the generated tokens, EOS included.

  python bench/server_load.py --engine /tmp/smollm2-engine --clients 64 --max-tokens 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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
    ttft, tokens, done = None, 0, False
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
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    ttft = time.perf_counter() - t0
    return {"status": 200, "done": done, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def load(port, prompts, max_tokens, density):
    limits = httpx.Limits(max_connections=len(prompts))
    timeout = httpx.Timeout(None, connect=60)  # a queued stream sees no byte until its batch starts
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout, limits=limits) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c, p, max_tokens, density) for p in prompts))
        return results, time.perf_counter() - t0


def run_config(engine, max_batch, density, prompts, max_tokens):
    srv = Server(engine, "127.0.0.1", 0, queue_size=max(64, len(prompts)), max_batch=max_batch)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        results, wall = asyncio.run(load(srv.port, prompts, max_tokens, density))
    finally:
        srv.shutdown()
        thread.join(timeout=10)
    return summarize(results, wall, len(prompts))


def summarize(results, wall, clients):
    """Throughput and latency percentiles of one load run (what `load` returned)."""
    ok = [r for r in results if r["status"] == 200 and r["done"]]
    lat = np.array([r["latency"] for r in ok])
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    tokens = sum(r["tokens"] for r in ok)
    return {"complete": len(ok), "clients": clients, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="/tmp/smollm2-engine")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="batch,batch1,dense", help="comma-separated: batch, batch1, dense")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    engine = Engine.load(args.engine, backend=args.backend, threads=args.threads, max_batch=args.max_batch)
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun".split()
    prompts = [f"Story {i}: " + " ".join(words[(i + k) % len(words)] for k in range(12)) for i in range(args.clients)]
    configs = {"batch": (args.max_batch, None), "batch1": (1, None), "dense": (args.max_batch, 1.0)}
    chosen = [c for c in args.configs.split(",") if c]
    runs = {c: [] for c in chosen}
    for _ in range(args.repeats):
        for name in chosen:
            runs[name].append(run_config(engine, *configs[name], prompts, args.max_tokens))
    rows = []
    for name in chosen:
        rs = runs[name]
        best = max(rs, key=lambda r: r["tok_s"])
        rows.append({"config": name, "max_batch": configs[name][0], "density": configs[name][1] or "default",
                     "complete": f"{min(r['complete'] for r in rs)}/{args.clients}",
                     "tok_s_max": best["tok_s"], "tok_s_median": statistics.median(r["tok_s"] for r in rs),
                     **{k: min(r[k] for r in rs) for k in ("p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s")},
                     "p50_s_median": statistics.median(r["p50_s"] for r in rs),
                     "p99_s_median": statistics.median(r["p99_s"] for r in rs)})
    if args.json:
        print(json.dumps({"engine": args.engine, "backend": engine.backend.name, "clients": args.clients,
                          "max_tokens": args.max_tokens, "repeats": args.repeats, "rows": rows}, indent=1))
        return
    print(f"engine {args.engine}, backend {engine.backend.name}, {args.clients} concurrent streaming clients, "
          f"{args.max_tokens} new tokens each, {args.repeats} interleaved repeats (min / median)")
    print("| config | max batch | density | complete | tok/s max / median | latency p50 s | latency p99 s "
          "| TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['max_batch']} | {r['density']} | {r['complete']} | {r['tok_s_max']:.1f} / "
              f"{r['tok_s_median']:.1f} | {r['p50_s']:.2f} / {r['p50_s_median']:.2f} | {r['p99_s']:.2f} / "
              f"{r['p99_s_median']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} |")
    base = next((r for r in rows if r["config"] == "batch1"), None)
    if base:
        for r in rows:
            if r is not base:
                print(f"{r['config']}: {r['tok_s_median'] / base['tok_s_median']:.2f}x the throughput of batch 1")


if __name__ == "__main__":
    main()
