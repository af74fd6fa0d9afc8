"""What a TensorRT plan's weight-only dense linears cost in quality, on held-out text.

A plan from a block-quantized engine runs the MLP on the engine's own blocks (our plugin) but the
dense linears (attention q/k/v/o, embedding, lm_head) through TensorRT's weight-only pattern
(tda_export/export/weight_only.py): carried exactly where the target takes the engine's 32-weight
blocks, re-quantized elsewhere (q4_1 always; datacenter TensorRT: int4 block 128, int8 per channel).
This runs the model on the engine's dequantized weights ("engine": what ONNX Runtime and the native
runtime compute) and on each target's dense weights, and prints held-out perplexity, dense and with
top-k TDA at --density, with the increase over "engine".

    python bench/trt_reblock_quality.py -m smollm2-135m --weight-format q4_0
    python bench/trt_reblock_quality.py -m smollm2-135m --weights /work/scratch/gguf/q4_1.gguf --weight-format q4_1
    python bench/trt_reblock_quality.py -m smollm2-135m --weight-format q8_0 --sequences 64 --json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from tda_export import arch
from tda_export.export.engine_weights import EngineWeights, apply
from tda_export.export.weight_only import RULES, Rule, convert, dequantized
from tda_export.models import load_model
from tda_export.quality import evaluate
from tda_export.text import read_text

# the targets' rules (datacenter TensorRT: int4 block 128 where the row divides, else 64), and block 64 alone
VARIANTS = {"tensorrt-rtx": RULES["tensorrt-rtx"], "tensorrt": RULES["tensorrt"],
            "int4 block 64": Rule(int4_blocks=(64,), int8_block=None)}


def dense_modules(model):
    """(module, kind) of every weight a plan runs weight-only: embedding, untied lm_head, q/k/v/o."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    out = [(embed, "embedding")]
    if head is not None and head.weight is not embed.weight:
        out.append((head, "embedding"))
    for layer in arch.decoder_layers(model):
        out += [(getattr(layer.self_attn, f"{c}_proj"), "linear") for c in "qkvo"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--weights", default=None, help="checkpoint or GGUF for the model (as build --weights)")
    ap.add_argument("--weight-format", required=True, choices=["q8_0", "q4_0", "q4_1"])
    ap.add_argument("--text", default=None, help="text file (its last quarter is held out) [shakespeare]")
    ap.add_argument("--density", type=float, default=0.5, help="top-k TDA density also evaluated [0.5]")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--continuation-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    lm = load_model(a.model, a.weights, "float32", "cpu")
    apply(lm, a.weight_format)  # every weight is now the engine's, exactly
    ew = EngineWeights(lm, a.weight_format)
    mods = dense_modules(lm.model)
    encoded = [(m, ew.embedding(m) if kind == "embedding" else ew.linear(m)) for m, kind in mods]
    engine = [m.weight.detach().clone() for m, _ in mods]
    text = read_text(a.text, "evaluation")
    layers = lm.config.num_hidden_layers
    rows = []
    for name, rule in [("engine", None), *VARIANTS.items()]:
        requantized = 0
        with torch.no_grad():
            for (m, enc), w in zip(encoded, engine):
                if rule is None:
                    m.weight.copy_(w)
                    continue
                c = convert(enc.fmt, enc.blocks, rule)
                requantized += not c.exact
                m.weight.copy_(torch.from_numpy(dequantized(c)).reshape(m.weight.shape))
        r = evaluate(lm, text, a.text or "shakespeare (evaluation split)", "topk", densities=[a.density] * layers,
                     requested_density=a.density, sequences=a.sequences, prompt_len=a.prompt_tokens,
                     continuation=a.continuation_tokens, generate_prompts=0, quiet=True)
        rows.append({"variant": name, "rule": rule.describe() if rule else "engine blocks, exact",
                     "requantized": f"{requantized}/{len(mods)}", "dense_ppl": r["dense"]["perplexity"],
                     "topk_ppl": r["tda"]["perplexity"]})
    base = rows[0]
    for r in rows:
        r["dense_increase"] = r["dense_ppl"] / base["dense_ppl"] - 1
        r["topk_increase"] = r["topk_ppl"] / base["topk_ppl"] - 1
    if a.json:
        print(json.dumps({"model": a.model, "weight_format": a.weight_format, "density": a.density,
                          "sequences": a.sequences, "rows": rows}, indent=1))
        return 0
    print(f"{a.model} {a.weight_format}: held-out perplexity, {a.sequences} windows of {a.prompt_tokens}+"
          f"{a.continuation_tokens} tokens; MLP always the engine's blocks")
    print(f"{'variant':14s} {'dense linears':46s} {'requant':>8s} {'dense ppl':>10s} {'vs engine':>9s} "
          f"{'topk d=' + str(a.density):>12s} {'vs engine':>9s}")
    for r in rows:
        print(f"{r['variant']:14s} {r['rule']:46s} {r['requantized']:>8s} {r['dense_ppl']:10.4f} "
              f"{100 * r['dense_increase']:+8.2f}% {r['topk_ppl']:12.4f} {100 * r['topk_increase']:+8.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
