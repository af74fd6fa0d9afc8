"""`serve --ray`: one replica vs two under the same load, N concurrent streaming clients through Ray Serve's
proxy; throughput and latency (the client and the statistics are bench/server_load.py's).

Without --address it starts a local Ray cluster of two nodes (ray.cluster_utils.Cluster, --node-cpus each) and
places at most one replica per node, as a two-machine deployment would. With --address it deploys on that
cluster instead (run it on one of its nodes: it talks to the proxy on 127.0.0.1). Configurations alternate
round by round (--repeats), redeploying in place between them, so a noisy neighbour hits both alike.

  python bench/ray_load.py --engine /tmp/smollm2-engine --clients 64 --max-tokens 32 --threads 1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_load import load, summarize  # noqa: E402  (bench/ is not a package)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="/tmp/smollm2-engine")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "native", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="threads per replica")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--node-cpus", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="CPUs of each of the two local nodes (without --address)")
    ap.add_argument("--address", default=None, help="an existing Ray cluster instead of the local two-node one")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import ray
    from ray import serve

    from tda_export.runtime.ray_serve import APP_NAME, application
    from tda_export.runtime.replicas import ReplicaPlan

    cluster = None
    if args.address is None:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.node_cpus, "include_dashboard": False})
        cluster.add_node(num_cpus=args.node_cpus)
    ray.init(address=args.address or cluster.address, logging_level="warning", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun".split()
    prompts = [f"Story {i}: " + " ".join(words[(i + k) % len(words)] for k in range(12)) for i in range(args.clients)]
    counts = [int(n) for n in args.replicas.split(",")]
    runs = {n: [] for n in counts}
    try:
        for _ in range(args.repeats):
            for n in counts:
                plan = ReplicaPlan(replicas=n, cpus=args.replica_cpus, max_per_node=1 if cluster else None)
                serve.run(application(os.path.abspath(args.engine), plan, args.max_batch, backend=args.backend,
                                      threads=args.threads, queue_size=max(256, args.clients)),
                          name=APP_NAME, route_prefix="/")
                asyncio.run(load(port, prompts[:8], [4] * 8, None))  # warm: the replicas' first batches
                results, wall = asyncio.run(load(port, prompts, [args.max_tokens] * len(prompts), None))
                runs[n].append(summarize(results, wall, len(prompts)))
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster:
            cluster.shutdown()

    rows = [{"replicas": n, "complete": f"{min(r['complete'] for r in rs)}/{args.clients}",
             "tok_s_min": min(r["tok_s"] for r in rs), "tok_s_median": statistics.median(r["tok_s"] for r in rs),
             "tok_s_max": max(r["tok_s"] for r in rs),
             **{k: statistics.median(r[k] for r in rs) for k in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s")}}
            for n, rs in runs.items()]
    load_avg = os.getloadavg()
    if args.json:
        print(json.dumps({"engine": args.engine, "backend": args.backend, "clients": args.clients,
                          "max_tokens": args.max_tokens, "repeats": args.repeats, "load_avg": load_avg,
                          "rows": rows}, indent=1))
        return
    print(f"engine {args.engine}, backend {args.backend} ({args.threads} thread(s) per replica), {args.clients} "
          f"concurrent streaming clients, {args.max_tokens} new tokens each, {args.repeats} interleaved repeats; "
          f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    print("| replicas | complete | tok/s min / median / max | latency p50 s | latency p99 s | TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']} | {r['complete']} | {r['tok_s_min']:.1f} / {r['tok_s_median']:.1f} / "
              f"{r['tok_s_max']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.2f} | "
              f"{r['ttft_p99_s']:.2f} |")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['replicas']} replicas: {r['tok_s_median'] / base['tok_s_median']:.2f}x the median throughput of "
              f"{base['replicas']}")


if __name__ == "__main__":
    main()
