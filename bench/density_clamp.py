"""Realised density of an exported engine with and without SelectActive's density clamp, in-domain and
cross-domain (issue 12 item 2: the density asked for is the density each sequence gets).

The engine's own runtime selects (Engine.thresholds + Engine.density_bounds, the same call generate()
makes); the active counts come back from the backend after a prefill of each prompt, so the numbers are
what a user's request gets, per sequence and layer. Prompts: `--sequences` windows of `--prompt-tokens`
tokens from the held-out Shakespeare/Milton split (in-domain) and from the Python docs' prose in the
stdlib (pydoc_data, a domain the calibration never saw).

    python bench/density_clamp.py --engine /tmp/clamp/smollm2-engine --backend native
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tda_export.quality import token_windows, tokenize
from tda_export.runtime.engine import Engine
from tda_export.text import corpus


def python_docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def densities(engine, prompts: np.ndarray, density: float, clamp: bool, batch: int) -> np.ndarray:
    """[sequences, layers] active share after a prefill of each prompt."""
    inter = engine.manifest["intermediate_size"]
    th = engine.thresholds(density, prompts.shape[1])
    bounds = engine.density_bounds(density) if clamp else None
    out = []
    for i in range(0, len(prompts), batch):
        ids = prompts[i:i + batch]
        _, state = engine.backend.prefill(ids, np.ones_like(ids), th, bounds)
        out.append(engine.backend.active_counts(state).T / inter)
    return np.concatenate(out)


def summary(d: np.ndarray) -> dict:
    seq, layer = d.mean(1), d.mean(0)
    return {"mean": float(d.mean()), "seq_sd": float(seq.std(ddof=1)), "seq_min": float(seq.min()),
            "seq_max": float(seq.max()), "layer_min": float(layer.min()), "layer_max": float(layer.max()),
            "cell_min": float(d.min()), "cell_max": float(d.max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--densities", default="0.5,0.9")
    ap.add_argument("--sequences", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    engine = Engine.load(args.engine, backend=args.backend, threads=args.threads)
    if engine.density_bounds() is None:
        raise SystemExit(f"{args.engine}: exported before the clamp (no tda_density_bounds input); rebuild it")
    domains = {"in-domain (shakespeare eval split)": corpus("evaluation"),
               "cross-domain (python docs prose)": python_docs_text()}
    rows, t0 = [], time.time()
    print(f"engine {args.engine} ({engine.manifest['model']}, backend {engine.backend.name}), density margin "
          f"{engine.density_margin}, {args.sequences} prompts of {args.prompt_tokens} tokens per domain\n")
    print("| domain | request | selection | mean | sd over sequences | sequences min–max | layers min–max | "
          "sequence×layer min–max |")
    print("|---|---|---|---|---|---|---|---|")
    for dom, text in domains.items():
        prompts = token_windows(tokenize(engine.tokenizer, text), args.sequences, args.prompt_tokens).numpy()
        for d in map(float, args.densities.split(",")):
            for clamp in (False, True):
                r = summary(densities(engine, prompts.astype(np.int64), d, clamp, args.batch))
                label = f"clamp ±{engine.density_margin}" if clamp else "thresholds only"
                rows.append({"domain": dom, "density": d, "clamp": clamp, **r})
                print(f"| {dom} | {d} | {label} | {r['mean']:.3f} | {r['seq_sd']:.3f} | "
                      f"{r['seq_min']:.3f}–{r['seq_max']:.3f} | {r['layer_min']:.3f}–{r['layer_max']:.3f} | "
                      f"{r['cell_min']:.3f}–{r['cell_max']:.3f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"engine": args.engine, "backend": engine.backend.name, "margin": engine.density_margin,
                       "sequences": args.sequences, "prompt_tokens": args.prompt_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
