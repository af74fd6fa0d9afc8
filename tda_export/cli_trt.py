"""`tda-export check`: a TensorRT plan's logits against the ONNX Runtime goldens saved at build time."""
from __future__ import annotations

from pathlib import Path

import click

from .cli import UserError
from .trt.goldens import TOLERANCES


@click.command()
@click.option("--engine", "-e", "directory", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Engine directory built with --target tensorrt-rtx|tensorrt.")
@click.option("--atol", type=click.FloatRange(0.0), default=None,
              help=f"Absolute tolerance on logits [fp16 plans {TOLERANCES['float16'][0]}, bf16 plans "
                   f"{TOLERANCES['bfloat16'][0]}].")
@click.option("--rtol", type=click.FloatRange(0.0), default=None,
              help=f"Relative tolerance on logits [fp16 plans {TOLERANCES['float16'][1]}, bf16 plans "
                   f"{TOLERANCES['bfloat16'][1]}]; an element fails when it misses both.")
def check(directory, atol, rtol):
    """Run the plan (GPU with TensorRT) on the build-time prompt and compare its logits with the build-time
    reference: ONNX Runtime on the same graph for fp16 plans, float32 logits for bf16 plans.

    Replays the prefill and greedy decode steps recorded in trt_goldens.npz (the same tokens), compares
    with polygraphy's comparator and prints the max error per step and the plugin layers the plan uses.
    Exit code 1 on a mismatch. Needs a GPU the plan's TensorRT supports (RTX plans: not Hopper).

    \b
    Example:
      tda-export build -m smollm2-135m --target tensorrt --dtype bf16 -o smollm2-trt
      tda-export check -e smollm2-trt
    """
    import numpy as np

    from . import manifest
    from .trt.goldens import GOLDENS_FILE, compare, replay, tolerance

    try:
        data = manifest.verify(directory)
    except manifest.ManifestError as e:
        raise UserError(str(e)) from None
    section = data.get("tensorrt")
    if not isinstance(section, dict):
        raise UserError(f"{directory}: no TensorRT plan in {manifest.NAME} (build with --target tensorrt-rtx|tensorrt)")
    goldens_path = directory / GOLDENS_FILE
    if not goldens_path.is_file():
        raise UserError(f"{goldens_path}: no such file (an older tda-export saved goldens for fp16 plans only: "
                        f"rebuild the engine)")
    import importlib.util

    if importlib.util.find_spec("polygraphy") is None:  # its comparator judges the logits
        raise UserError("tda-export check compares with polygraphy, which is not installed: pip install polygraphy")
    golden = dict(np.load(goldens_path))
    try:
        default_atol, default_rtol = tolerance(data["dtype"])
    except ValueError as e:
        raise UserError(f"{directory}: {e}") from None
    atol, rtol = default_atol if atol is None else atol, default_rtol if rtol is None else rtol
    reference = str(golden.get("reference", "onnxruntime"))  # goldens of older builds do not name it
    plugins = section["layers"]["plugins"]
    click.echo(f"plan       {section['flavour']} {section['version']}, plugin layers: "
               + ", ".join(f"{k} x{v}" for k, v in plugins.items()))
    try:
        from .runtime.trt_backend import TensorRTBackend

        backend = TensorRTBackend(directory, data)
    except Exception as e:  # noqa: BLE001 - no GPU / no TensorRT: one clear line, not a traceback
        raise click.ClickException(f"cannot run {directory / section['plan_file']} here: {type(e).__name__}: {e}")
    got = replay(backend, data, golden["input_ids"], golden["attention_mask"], golden["tokens"])
    ok, lines = compare(golden, got, atol, rtol)
    click.echo(f"reference  {reference} logits; {data['dtype']} plan: atol {atol}, rtol {rtol}")
    for line in lines:
        click.echo(line)
    if not ok:
        raise click.ClickException(f"logits differ from the reference ({reference}) beyond atol {atol} / rtol {rtol}")
    click.echo("check      ok")
