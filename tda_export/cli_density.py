"""Density values on the command line: one check for every command that takes them.

build --density, run --density, eval --density, bench --densities and calibrate --densities all
take the kept fraction of MLP neurons. It must be in (0, 1], and, because a calibration stores its
thresholds per density rounded to two decimals (calibration.density_key), on the 0.01 grid: 0.555
would silently be read as 0.56's thresholds.
"""
from __future__ import annotations

import math

import click

GRID = 100  # densities are keyed to 2 decimals (calibration.density_key)


def problem(d: float) -> str | None:
    """Why `d` is not a usable density, or None."""
    if not math.isfinite(d) or not 0.0 < d <= 1.0:
        return "a density (the kept fraction of MLP neurons) must be in (0, 1]"
    if abs(d * GRID - round(d * GRID)) > 1e-6:
        return (f"calibrations keep thresholds per 0.01 of density, so use two decimals "
                f"(e.g. {math.floor(d * GRID) / GRID:.2f} or {math.ceil(d * GRID) / GRID:.2f})")
    return None


def _parse(text, param, ctx, fail) -> float:
    try:
        d = float(text)
    except (TypeError, ValueError):
        fail(f"{text!r} is not a number", param, ctx)
    why = problem(d)
    if why:
        fail(f"{text}: {why}", param, ctx)
    return d


class Density(click.ParamType):
    """One density: click reports a bad value as `Invalid value for '--density': ...`, exit code 2."""
    name = "density"

    def convert(self, value, param, ctx):
        return _parse(value, param, ctx, self.fail)


class Densities(click.ParamType):
    """Comma-separated densities, e.g. 0.3,0.5,0.7 -> [0.3, 0.5, 0.7]."""
    name = "densities"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail(f"{value!r}: expected comma-separated densities like 0.3,0.5,0.7", param, ctx)
        return [_parse(v, param, ctx, self.fail) for v in items]
