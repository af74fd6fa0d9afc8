"""`tda-export build` and `tda-export inspect`."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import click

from .cli import UserError
from .export.spec import CLI_DTYPES


@click.command()
@click.option("--model", "-m", required=True, help="Recipe name, Hugging Face model directory or .gguf file.")
@click.option("--backend", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(list(CLI_DTYPES)), default="fp32", show_default=True,
              help="Compute dtype of the graph (TDA scores are always fp32, logits are fp32).")
@click.option("--calibration", "-c", type=click.Path(path_type=Path),
              help="Calibration file (tda-export calibrate). Without it, thresholds are calibrated now on the "
                   "built-in text at the recipe's density (see --no-calibrate).")
@click.option("--no-calibrate", is_flag=True, help="Without --calibration: export dense thresholds (all 0).")
@click.option("--density", type=float, help="Use the calibration's thresholds for this density instead of its default.")
@click.option("--force", is_flag=True, help="Replace an existing export in --out.")
@click.option("--weights", help="Weights for a recipe model (HF directory or .gguf) instead of its default source.")
def build(model, backend, out, dtype, calibration, no_calibrate, density, force, weights):
    """Export the decoder with TDA sparse MLPs to ONNX (one graph for prefill and decode).

    The output directory holds model.onnx (the graph), model.safetensors (its weights), the tokenizer,
    calibration.json (every calibrated density, switchable per request at serve time) and
    manifest.json (I/O, versions, sha256 of every file). It is written to a temporary
    sibling and renamed on success, so a failed build leaves nothing that looks valid.

    \b
    Examples:
      tda-export build -m smollm2-135m -o smollm2-engine
      tda-export build -m mistral-7b --weights ~/ckpt/mistral --dtype bf16 -c mistral.cal.json -o mistral-engine
    """
    from .arch import UnsupportedModel
    from .export.build import DenseWarning, build as run_build
    from .models import ModelNotFound

    with warnings.catch_warnings():
        warnings.simplefilter("always", DenseWarning)
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
        try:
            path = run_build(model, out, CLI_DTYPES[dtype], calibration, density, force, weights,
                             auto_calibrate=not no_calibrate)
        except (ValueError, FileNotFoundError, UnsupportedModel, ModelNotFound) as e:
            raise UserError(str(e)) from None
    click.echo(f"wrote {path}")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
def inspect(directory):
    """Summarise an exported model directory and verify every file's sha256."""
    import onnx

    from . import manifest
    from .ops.contract import DOMAIN

    try:
        data = manifest.read(directory)
    except manifest.ManifestError as e:
        raise UserError(str(e)) from None
    cal = data["calibration"]
    click.echo(f"model      {data['model']} ({data['family']}, {data['activation']}) from {data['source']}")
    click.echo(f"backend    {data['backend']}  dtype {data['dtype']}  opset {data['opset']}")
    click.echo(f"shape      layers {data['num_layers']}  hidden {data['hidden_size']}  intermediate "
               f"{data['intermediate_size']}  heads {data['num_heads']}/{data['num_kv_heads']}x{data['head_dim']}  "
               f"vocab {data['vocab_size']}  context {data['max_context']}")
    click.echo(f"thresholds {cal.get('selected', cal)}: {cal.get('thresholds', 'all 0 (dense)')}")
    model = onnx.load(str(directory / data["model_file"]), load_external_data=False)
    ops = Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph.node)
    click.echo("ops        " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    click.echo("functions  " + ", ".join(f"{f.domain}::{f.name} ({len(f.node)} nodes)" for f in model.functions))
    for n in model.graph.node:
        if n.domain == DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            click.echo(f"tda node   {n.name}: {n.domain}::{n.op_type} plugin_namespace={attrs.get('plugin_namespace')} "
                       f"{ {k: v for k, v in attrs.items() if k != 'plugin_namespace'} }")
    for kind in ("inputs", "outputs"):
        for v in data["io"][kind]:
            click.echo(f"{kind[:-1]:6s}     {v['name']:32s} {v['dtype']:8s} {v['shape']}")
    try:
        manifest.verify(directory, data)
    except manifest.ManifestError as e:
        raise click.ClickException(f"verification failed: {e}") from None
    click.echo(f"verified   {len(data['files'])} files (sha256)")
