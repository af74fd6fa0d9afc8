"""`--device` and `--compute-dtype`: where and in what dtype calibrate, eval and build's calibration run."""
from __future__ import annotations

import click

from .cli import UserError

COMPUTE_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def device_options(f):
    f = click.option("--compute-dtype", type=click.Choice(list(COMPUTE_DTYPE_NAMES)), default=None,
                     help="Dtype the model runs in while calibrating/evaluating [bf16]: bf16 or fp32 on a CPU; "
                          "bf16, fp16 or fp32 on a GPU. TDA scores are always accumulated in fp32. bf16 moves "
                          "SmolLM2's thresholds and perplexity by less than their sampling noise "
                          "(bench/RESULTS.md), runs 4x faster on an AMX CPU and halves memory: a 7B model "
                          "calibrates in about 15 GB instead of 30.")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where calibration/evaluation run: auto takes the GPU when torch sees one.")(f)
    return f


def resolve(device: str, compute_dtype: str | None) -> tuple[str, str]:
    """CLI values -> (device, torch dtype name), or a UserError naming the bad option."""
    from .models import check_compute_dtype, default_compute_dtype, resolve_device

    try:
        device = resolve_device(device)
        dtype = COMPUTE_DTYPE_NAMES[compute_dtype] if compute_dtype else default_compute_dtype(device)
        return device, check_compute_dtype(dtype, device)
    except ValueError as e:
        raise UserError(str(e)) from None
