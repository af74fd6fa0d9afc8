"""How much calibration thresholds and perplexity move when the model runs in bf16 instead of fp32.

The default compute dtype of calibrate/eval/build is the cheaper one only if the
difference is within noise. Noise is measured in the same run:
  thresholds: fp32 calibrated on two disjoint halves of the prompts (sampling noise of the calibration);
  perplexity: the standard error of the mean NLL over independent batches of held-out windows.
TDA scores are accumulated in fp32 in both cases (tda.token_contributions).

    python bench/compute_dtype.py --model smollm2-135m [--sequences 32] [--eval-sequences 32]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from tda_export.models import load, resolve
from tda_export.quality import Evaluator, build_calibration, tokenize, token_windows
from tda_export.text import corpus

DENSITIES = (0.5, 0.7, 0.9)


def calibrate(lm, text, sequences):
    t = time.perf_counter()
    cal = build_calibration(lm, text, "calibration split", list(DENSITIES), sequences, 128, "token_l2", None,
                            0.9, quiet=True)
    return cal, time.perf_counter() - t


def max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for d in DENSITIES for x, y in zip(a[f"{d:.2f}"], b[f"{d:.2f}"]))


def perplexities(lm, text, thresholds, sequences, batch_size=4):
    """(dense ppl, tda ppl, standard error of log ppl) over held-out windows, per-batch NLL means."""
    ev = Evaluator(lm, "token_l2", batch_size, quiet=True)
    windows = token_windows(tokenize(lm.tokenizer, text), sequences, 128 + 64)
    batches = ev.prefill(windows, 128)
    out = {}
    for mode, ths in (("dense", None), ("tda", thresholds)):
        per = []
        for b in batches:
            nll, n, _ = ev.continuation_nll([b], 128, mode, ths)
            per.append(nll / n)
        out[mode] = (math.exp(statistics.fmean(per)), statistics.stdev(per) / math.sqrt(len(per)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sequences", type=int, default=32, help="calibration prompts (256 tokens each)")
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.5, help="density whose thresholds perplexity is taken at")
    args = ap.parse_args()
    source = resolve(args.model)
    cal_text, eval_text = corpus("calibration"), corpus("evaluation")
    result = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads()}
    cals, ppls = {}, {}
    for dtype in ("float32", "bfloat16"):
        lm = load(source, dtype, "cpu")
        cals[dtype], result[f"calibrate_s_{dtype}"] = calibrate(lm, cal_text, args.sequences)
        t = time.perf_counter()
        ppls[dtype] = perplexities(lm, eval_text, cals[dtype].thresholds_for(args.density), args.eval_sequences)
        result[f"eval_s_{dtype}"] = time.perf_counter() - t
        if dtype == "float32":  # sampling noise of the calibration: two disjoint halves of the prompts
            ids = tokenize(lm.tokenizer, cal_text)
            half = ids[: ids.numel() * 3 // 8], ids[ids.numel() * 3 // 8: ids.numel() * 3 // 4]
            halves = [build_calibration(lm, lm.tokenizer.decode(h), "half", list(DENSITIES), args.sequences // 2,
                                        128, "token_l2", None, 0.9, quiet=True) for h in half]
            result["threshold_noise_halves"] = max_diff(halves[0].thresholds, halves[1].thresholds)
        del lm
    result["threshold_max_abs_diff_bf16_vs_fp32"] = max_diff(cals["float32"].thresholds, cals["bfloat16"].thresholds)
    for mode in ("dense", "tda"):
        (p32, se32), (p16, _) = ppls["float32"][mode], ppls["bfloat16"][mode]
        result[f"{mode}_ppl_fp32"], result[f"{mode}_ppl_bf16"] = p32, p16
        result[f"{mode}_ppl_rel_diff"] = p16 / p32 - 1
        result[f"{mode}_ppl_rel_se"] = se32  # se of log ppl = relative se of ppl
    print(json.dumps(result, indent=1))
    print("\n| quantity | fp32 | bf16 | difference | noise |\n|---|---|---|---|---|")
    print(f"| thresholds (max abs over layers, d={DENSITIES}) | | | {result['threshold_max_abs_diff_bf16_vs_fp32']:.4f}"
          f" | {result['threshold_noise_halves']:.4f} (fp32, disjoint halves) |")
    for mode in ("dense", "tda"):
        print(f"| {mode} perplexity{' d=' + str(args.density) if mode == 'tda' else ''} | {result[mode + '_ppl_fp32']:.3f} |"
              f" {result[mode + '_ppl_bf16']:.3f} | {result[mode + '_ppl_rel_diff']:+.2%} | ±{result[mode + '_ppl_rel_se']:.2%} (1 s.e.) |")
    print(f"| calibrate time (s) | {result['calibrate_s_float32']:.1f} | {result['calibrate_s_bfloat16']:.1f} | | |")
    print(f"| eval time (s) | {result['eval_s_float32']:.1f} | {result['eval_s_bfloat16']:.1f} | | |")


if __name__ == "__main__":
    main()
