"""`tda-export check`: a TensorRT plan's logits against the ONNX Runtime goldens saved at build time."""
from __future__ import annotations

from pathlib import Path

import click

from .cli import UserError


@click.command()
@click.option("--engine", "-e", "directory", required=True, type=click.Path(path_type=Path),
              help="Engine directory built with --target tensorrt-rtx|tensorrt.")
@click.option("--atol", type=float, default=0.1, show_default=True, help="Absolute tolerance on logits.")
@click.option("--rtol", type=float, default=0.05, show_default=True, help="Relative tolerance on logits.")
def check(directory, atol, rtol):
    """Run the plan (GPU with TensorRT) on the build-time prompt and compare its logits with ONNX Runtime's.

    Replays the prefill and greedy decode steps recorded in trt_goldens.npz (the same tokens), compares
    with polygraphy's comparator and prints the max error per step and the plugin layers the plan uses.
    Exit code 1 on a mismatch. Needs a GPU the plan's TensorRT supports (RTX plans: not Hopper).
    """
    import numpy as np

    from . import manifest
    from .trt.goldens import GOLDENS_FILE, compare, replay

    try:
        data = manifest.verify(directory)
    except manifest.ManifestError as e:
        raise UserError(str(e)) from None
    section = data.get("tensorrt")
    if not isinstance(section, dict):
        raise UserError(f"{directory}: no TensorRT plan in {manifest.NAME} (build with --target tensorrt-rtx|tensorrt)")
    goldens_path = directory / GOLDENS_FILE
    if not goldens_path.is_file():
        raise UserError(f"{goldens_path}: no goldens (saved at build time for fp16 plans only)")
    import importlib.util

    if importlib.util.find_spec("polygraphy") is None:  # its comparator judges the logits
        raise UserError("tda-export check compares with polygraphy, which is not installed: pip install polygraphy")
    golden = dict(np.load(goldens_path))
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
    for line in lines:
        click.echo(line)
    if not ok:
        raise click.ClickException(f"logits differ from ONNX Runtime beyond atol {atol} / rtol {rtol}")
    click.echo("check      ok")
