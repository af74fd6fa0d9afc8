"""`tda-export build` and `tda-export inspect`."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import click

from .cli import UserError
from .cli_density import Density
from .cli_device import device_options, resolve as resolve_device
from .export.quantize import AUTO, CHOICES as WEIGHT_CHOICES, COST as WEIGHT_COST, DOWN_CHOICES, FLOAT, X_CHOICES
from .export.spec import CLI_DTYPES


def _no_backend(ctx, param, value):
    if value is not None:  # scripts written for older versions: say what replaced it, not just "no such option"
        raise click.UsageError(f"build --backend {value}: removed; the output is chosen with --target onnx|"
                               f"tensorrt-rtx|tensorrt, and runtime backends with run/serve/bench --backend")


@click.command()
@click.option("--model", "-m", required=True, help="Recipe name, Hugging Face model directory or .gguf file.")
@click.option("--backend", hidden=True, expose_value=False, callback=_no_backend,
              help="Removed: the output format is --target; runtime backends are chosen by run/serve/bench.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(list(CLI_DTYPES)), default=None,
              help="Compute dtype of the graph [the recipe's dtype (tda-export recipes), else fp32]. TDA scores "
                   "and logits are always fp32. The native CPU runtime runs fp32 engines.")
@click.option("--weight-format", type=click.Choice(WEIGHT_CHOICES), default=FLOAT, show_default=True,
              help="How the linear layers and the embedding are stored: "
                   + "; ".join(f"{k}: {v}" for k, v in WEIGHT_COST.items())
                   + ". Block formats are GGUF's blocks of 32 weights: a GGUF already in that format is carried over "
                     "byte for byte (ffn_down requantized along H for the sparse kernels, see --down-weight-format; "
                     "a GGUF's higher-precision embedding kept), other sources are quantized round-to-nearest; norms and biases stay in --dtype, "
                     "activations are not quantized. The built-in calibration runs on the quantized weights. Needs "
                     "hidden size and heads*head_dim multiples of 32. See docs/export.md.")
@click.option("--down-weight-format", "down_format", type=click.Choice(DOWN_CHOICES), default=AUTO,
              show_default=True,
              help="With a block --weight-format: the format of the MLP's down projection, which is always "
                   "re-quantized (the sparse kernels need it blocked along the hidden size, a GGUF blocks it along "
                   "the intermediate size). auto: q8_0 under q4_0/q4_1, since 4 bits re-quantized from 4-bit "
                   "values cost SmolLM2 +9% held-out perplexity and q8_0 next to nothing, for 23% more MLP bytes (q4_1); "
                   "the --weight-format itself otherwise.")
@click.option("--x-format", type=click.Choice(X_CHOICES), default=FLOAT, show_default=True,
              help="With a block --weight-format: how the block linears and the MLP's gate/up read their input. "
                   "float: as is. q8_0: quantized to 8 bits per 32 values as llama.cpp does, so the CPU kernels "
                   "take int8 dot products (faster; costs a little quality, measured in bench/QUALITY.md; the "
                   "down projection's input is never quantized). CPU runtimes only: not with --target tensorrt*. "
                   "Calibration runs the same way.")
@click.option("--calibration", "-c", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration file (tda-export calibrate). Without it, thresholds are calibrated now on the "
                   "built-in text at the recipe's density (see --no-calibrate).")
@click.option("--no-calibrate", is_flag=True, help="Without --calibration: export dense thresholds (all 0).")
@click.option("--density", "-d", type=Density(),
              help="Build at this density (kept fraction of MLP neurons, two decimals) instead of the calibration's "
                   "default; the built-in calibration adds it to its grid.")
@click.option("--force", is_flag=True, help="Replace an existing export in --out.")
@click.option("--weights", type=click.Path(exists=True),
              help="Weights for a recipe model (HF directory or .gguf) instead of its default source.")
@click.option("--target", type=click.Choice(["onnx", "tensorrt-rtx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: the ONNX export only. tensorrt-rtx: also model.plan for TensorRT-RTX (builds on a CPU; "
                   "runs on RTX-class GPUs, cc 7.5-12.x, not Hopper). tensorrt: also model.plan for datacenter "
                   "TensorRT (build on the GPU machine that serves it). Needs --dtype fp16 or bf16.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="[tensorrt] Largest batch of both profiles.")
@click.option("--max-seq-len", type=int, help="[tensorrt] Longest sequence (prompt + generated); default "
                                               "min(model context, 4096).")
@click.option("--max-prompt", type=int, help="[tensorrt] Longest prompt of the prefill profile; default --max-seq-len.")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="[tensorrt] Timing cache file: read if present, updated after the build (speeds up rebuilds).")
@click.option("--builder-optimization-level", type=int, help="[tensorrt] 0-5 (TensorRT's default 3).")
@click.option("--compute-capability", "compute_capabilities", multiple=True,
              help="[tensorrt-rtx] Target GPU (repeatable): 7.5, 8.0, 8.6, 8.9, 12.0; default all (from 8.0 up "
                   "with a 4-bit --weight-format: TensorRT-RTX has no int4 for 7.5).")
@click.option("--plugin-library", type=click.Path(path_type=Path),
              help="[tensorrt] Build with the C++ libtda_trt_plugins.so (plugins/README.md) instead of the Python "
                   "plugins; the plan's plugin records are the same.")
@device_options
def build(model, out, dtype, weight_format, down_format, x_format, calibration, no_calibrate, density, force, weights, target, max_batch,
          max_seq_len, max_prompt, timing_cache, builder_optimization_level, compute_capabilities, plugin_library,
          device, compute_dtype):
    """Export the decoder with TDA sparse MLPs to ONNX (one graph for prefill and decode).

    The output directory holds model.onnx (the graph), model.safetensors (its weights), the tokenizer,
    calibration.json (every calibrated density, switchable per request at serve time) and
    manifest.json (I/O, versions, sha256 of every file). It is written to a temporary
    sibling and renamed on success, so a failed build leaves nothing that looks valid.

    The export reads the checkpoint one tensor at a time, so its memory does not grow
    with the model (Mistral-7B in bf16: 0.9 GB peak, 2 min; see README). The built-in
    calibration loads the model once in --compute-dtype on --device (7B bf16: ~16 GB).

    \b
    Examples:
      tda-export build -m smollm2-135m -o smollm2-engine
      tda-export build -m smollm2-135m --weight-format q4_1 -o smollm2-q4_1   # the GGUF's own Q4_1 bytes,
                                                                            # down in q8_0
      tda-export build -m mistral-7b --weights ~/ckpt/mistral --dtype bf16 -c mistral.cal.json -o mistral-engine
      tda-export build -m smollm2-135m --target tensorrt-rtx --dtype fp16 -o smollm2-rtx
      tda-export build -m smollm2-135m --weight-format q4_0 --target tensorrt-rtx --dtype fp16 -o smollm2-q4-rtx

    With --target tensorrt-rtx|tensorrt the directory also holds model.plan (every tda node a plugin
    layer, else the build fails; a prefill and a decode profile over batch) and the manifest's
    "tensorrt" section (see docs/tensorrt.md). With a block --weight-format the plan's MLP reads the
    engine's blocks in our plugin and its other linears are TensorRT int4/int8 weight-only layers,
    re-quantized where the target needs it (listed in tensorrt.weight_only).
    """
    from .arch import UnsupportedModel
    from .export.build import DenseWarning, build as run_build
    from .models import ModelNotFound
    from .trt.flavour import TensorRTMissing
    from .trt.build.plan import PlanOptions

    plan = None
    if target != "onnx":
        plan = PlanOptions(target, max_batch, max_seq_len, max_prompt, timing_cache, builder_optimization_level,
                           tuple(compute_capabilities), plugin_library)
    device, compute_dtype = resolve_device(device, compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DenseWarning)
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
        try:
            path = run_build(model, out, CLI_DTYPES[dtype] if dtype else None, calibration, density, force, weights,
                             auto_calibrate=not no_calibrate, plan=plan, device=device,
                             compute_dtype=compute_dtype, weight_format=weight_format, down_format=down_format,
                             x_format=x_format)
        except (ValueError, FileNotFoundError, UnsupportedModel, ModelNotFound, TensorRTMissing) as e:
            raise UserError(str(e)) from None
    click.echo(f"wrote {path}")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
def inspect(directory):
    """Verify every file's sha256 of an exported model directory and check it as `run` and `serve` would
    (version, thresholds, tokenizer, safetensors header), then summarise it.

    A failed verification is reported first, then each failed check naming its file; the summary still
    prints what can be read. Exit code 1 when verification or a check fails, 2 when the directory is not an
    export at all.

    \b
    Example:
      tda-export inspect smollm2-engine
    """
    from . import manifest
    from .runtime.validate import problems

    try:
        data = manifest.read(directory)
    except manifest.ManifestError as e:
        raise UserError(str(e)) from None
    try:
        manifest.verify(directory, data)
        failure = None
    except manifest.ManifestError as e:
        failure = f"verification failed: {e}"
        click.echo(f"error: {failure}", err=True)
    for problem in problems(directory, data):
        click.echo(f"error: {problem}", err=True)
        failure = failure or problem
    try:
        _summary(directory, data)
    except BrokenPipeError:
        raise  # the reader left: cli.py stops quietly
    except Exception as e:  # noqa: BLE001 - a damaged export must give a message, never a traceback
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        click.echo(f"error: {message}", err=True)
        failure = failure or message
    if failure:
        raise click.ClickException(failure)
    click.echo(f"verified   {len(data['files'])} files (sha256)")


def _summary(directory: Path, data: dict) -> None:
    import onnx

    from .ops.contract import DOMAIN

    g = lambda key: data.get(key, "?")  # noqa: E731 - a manifest from another version may lack a field
    cal = data.get("calibration") or {}
    click.echo(f"model      {g('model')} ({g('family')}, {g('activation')}) from {g('source')}")
    target = "onnx" + (f" + {data['tensorrt'].get('flavour')} plan" if isinstance(data.get("tensorrt"), dict) else "")
    click.echo(f"target     {target}  dtype {g('dtype')}  opset {g('opset')}")
    click.echo(f"shape      layers {g('num_layers')}  hidden {g('hidden_size')}  intermediate "
               f"{g('intermediate_size')}  heads {g('num_heads')}/{g('num_kv_heads')}x{g('head_dim')}  "
               f"vocab {g('vocab_size')}  context {g('max_context')}")
    _show_formats(data)
    click.echo(f"thresholds {cal.get('selected', cal)}: {cal.get('thresholds', 'all 0 (dense)')}")
    for kind in ("inputs", "outputs"):
        for v in (data.get("io") or {}).get(kind, []):
            click.echo(f"{kind[:-1]:6s}     {v['name']:32s} {v['dtype']:8s} {v['shape']}")
    model_path = directory / str(g("model_file"))
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a truncated or foreign file
        raise ValueError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    ops = Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph.node)
    click.echo("ops        " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    click.echo("functions  " + ", ".join(f"{f.domain}::{f.name} ({len(f.node)} nodes)" for f in model.functions))
    for n in model.graph.node:
        if n.domain == DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            click.echo(f"tda node   {n.name}: {n.domain}::{n.op_type} plugin_namespace={attrs.get('plugin_namespace')} "
                       f"{ {k: v for k, v in attrs.items() if k != 'plugin_namespace'} }")
    if isinstance(data.get("tensorrt"), dict):
        _show_tensorrt(data["tensorrt"])


def _show_formats(data: dict) -> None:
    """weights: the build's choice and how many tensors each format holds; a format held by only a
    few tensors names them (SmolLM2's Q4_1 GGUF: the q8_0 embedding)."""
    formats = data.get("weight_formats")
    if not isinstance(formats, dict):
        click.echo(f"weights    {data.get('dtype', '?')} (all tensors; built before weight_formats)")
        return
    by_format: dict[str, list[str]] = {}
    for name, fmt in formats.items():
        by_format.setdefault(str(fmt), []).append(name)
    parts = [f"{fmt} {len(ts)} tensor{'s' if len(ts) != 1 else ''}" + (f" ({', '.join(ts)})" if len(ts) <= 2 else "")
             for fmt, ts in sorted(by_format.items(), key=lambda kv: -len(kv[1]))]
    click.echo(f"weights    {data.get('weights', '?')}: " + ", ".join(parts))
    if data.get("x_format", "dtype") != "dtype":
        click.echo(f"x_format   {data['x_format']}: block linears and gate/up read their input quantized per 32 values")


def _show_tensorrt(trt: dict) -> None:
    """The plan summary: recorded at build time from the network (a CPU cannot deserialize a plan)."""
    layers = trt.get("layers", {})
    click.echo(f"tensorrt   {trt.get('flavour')} {trt.get('version')}: {trt.get('plan_file')} "
               f"({trt.get('plan_bytes', 0) / 2**20:.1f} MiB, sha256 {str(trt.get('plan_sha256'))[:16]}...)  "
               f"targets {', '.join(trt.get('compute_capabilities') or ['this GPU'])}")
    plugin = trt.get("plugin", {})
    decode = f", decode kernel v{plugin['decode_version']}" if "decode_version" in plugin else ""
    click.echo(f"plugins    {plugin.get('namespace')} v{plugin.get('version')} built with {plugin.get('built_with')}"
               f"{decode}: "
               + ", ".join(f"{k} {v} layers" for k, v in layers.get("plugins", {}).items())
               + f" (of {layers.get('num_layers')} layers)")
    wo = trt.get("weight_only")
    if isinstance(wo, dict):  # a plan from a block engine (docs/tensorrt.md "Plans from quantized engines")
        requantized = wo.get("requantized", [])
        click.echo(f"weights    {wo.get('weight_format')} engine: MLP blocks in the plugin, dense linears weight-only "
                   f"{wo.get('rule')}; {len(requantized)} of {len(wo.get('tensors', {}))} block tensors re-quantized"
                   + (f" ({', '.join(requantized[:3])}{' ...' if len(requantized) > 3 else ''})" if requantized
                      else ""))
    shown = ("input_ids", "attention_mask", "past_key_values.0.key")
    for p in trt.get("profiles", []):
        shapes = p.get("shapes", {})
        click.echo(f"profile    {str(p.get('name')):8s} " + "  ".join(
            f"{name} {shapes[name]['min']}..{shapes[name]['max']}" for name in shown if name in shapes))
    for entry in layers.get("plugin_layers", []):
        click.echo(f"plugin     {entry['name']:40s} {entry['plugin']}")
