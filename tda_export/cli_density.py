"""Density values on the command line: one check for every command that takes them.

build --density, run --density, eval --density, bench --densities and calibrate --densities all take
the kept fraction of MLP neurons; calibration.density_problem says what a usable one is.
"""
from __future__ import annotations

import click

from .calibration import density_problem


def _parse(text, param, ctx, fail) -> float:
    try:
        d = float(text)
    except (TypeError, ValueError):
        fail(f"{text!r} is not a number", param, ctx)
    why = density_problem(d)
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
