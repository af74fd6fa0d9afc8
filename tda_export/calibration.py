"""The calibration file: per-layer TDA thresholds that later steps (eval, export, runtime) consume.

JSON, written atomically. `thresholds[density]` maps a requested density to a
per-layer list of relative thresholds at the calibration prompt length;
`by_prompt_length[n][density]` holds the same table for prompts of n tokens.
`default` is what an export uses when no density is named (the budget
allocation if one was run, else the recipe's density).

Why per prompt length: r_j = s_j / max s is computed over the prompt, and a
short prompt's scores are far more peaked than a long one's. Thresholds
calibrated on 128-token prompts keep ~33% of SmolLM2's neurons for an 8-token
prompt when 90% was asked for (bench/QUALITY.md), so the runtime picks the
table of the nearest calibrated length.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .jsonfile import read_versioned, write_atomic

FORMAT = "tda-calibration/1"
CALIBRATION_FILE = "calibration.json"  # its name inside an exported directory


@dataclass
class Calibration:
    model: str
    fingerprint: str
    num_layers: int
    intermediate_size: int
    score_norm: str
    text: dict
    thresholds: dict[str, list[float]]  # density (as "%.2f") -> per-layer thresholds
    default: dict                       # {"kind": "density"|"budget", "densities": [...], "thresholds": [...]}
    budget: dict | None = None
    by_prompt_length: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def nearest_length(self, prompt_len: int | None = None) -> int | None:
        """The calibrated prompt length whose table serves prompts of about `prompt_len` tokens (nearest in log
        scale); None where the file has one table only (or no length is given)."""
        if prompt_len is None or not self.by_prompt_length:
            return None
        return int(min(self.by_prompt_length, key=lambda n: abs(math.log(int(n) / max(prompt_len, 1)))))

    def table(self, prompt_len: int | None = None) -> dict[str, list[float]]:
        """density -> per-layer thresholds for prompts of about `prompt_len` tokens (see nearest_length)."""
        nearest = self.nearest_length(prompt_len)
        return self.thresholds if nearest is None else self.by_prompt_length[str(nearest)]

    def thresholds_for(self, density: float, prompt_len: int | None = None) -> list[float]:
        key, table = density_key(density), self.table(prompt_len)
        if key not in table:
            raise KeyError(f"calibration has no thresholds for density {key}; it has {sorted(table)}")
        return table[key]

    def thresholds_for_layers(self, densities: list[float], prompt_len: int | None = None) -> list[float]:
        """Per-layer densities (a budget allocation) -> per-layer thresholds."""
        return [self.thresholds_for(d, prompt_len)[layer] for layer, d in enumerate(densities)]

    def check_model(self, fingerprint: str, num_layers: int, intermediate_size: int, path: str = "") -> None:
        where = f"{path}: " if path else ""
        if (num_layers, intermediate_size) != (self.num_layers, self.intermediate_size):
            raise ValueError(f"{where}calibration is for {self.model} ({self.num_layers} layers, intermediate "
                             f"{self.intermediate_size}), not this model ({num_layers} layers, intermediate "
                             f"{intermediate_size})")
        if fingerprint != self.fingerprint:
            raise ValueError(f"{where}calibration is for {self.model} (fingerprint {self.fingerprint}), "
                             f"not this model (fingerprint {fingerprint})")

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path}: no such file")
        data = read_versioned(path, FORMAT, ValueError, "calibration file")
        try:
            cal = cls(**data)
        except TypeError as e:
            raise ValueError(f"calibration file {path}: {e}") from None
        tables = list(cal.thresholds.items()) + [("default", cal.default.get("thresholds", [])),
                                                  ("default densities", cal.default.get("densities", []))]
        tables += [(f"{n} tokens: {d}", t) for n, tab in cal.by_prompt_length.items() for d, t in tab.items()]
        for key, ths in tables:
            if len(ths) != cal.num_layers:
                raise ValueError(f"calibration file {path}: thresholds[{key}] has {len(ths)} entries, "
                                 f"expected {cal.num_layers}")
        return cal


DENSITY_GRID = 100  # tables are keyed per 0.01 of density (density_key)


def density_key(density: float) -> str:
    return f"{float(density):.2f}"


def density_problem(d: float) -> str | None:
    """Why `d` cannot be asked for, or None: it must be in (0, 1] and on the tables' 0.01 grid (0.555 would
    silently read 0.56's thresholds)."""
    if not math.isfinite(d) or not 0.0 < d <= 1.0:
        return "a density (the kept fraction of MLP neurons) must be in (0, 1]"
    if abs(d * DENSITY_GRID - round(d * DENSITY_GRID)) > 1e-6:
        return (f"calibrations keep thresholds per 0.01 of density, so use two decimals "
                f"(e.g. {math.floor(d * DENSITY_GRID) / DENSITY_GRID:.2f} or "
                f"{math.ceil(d * DENSITY_GRID) / DENSITY_GRID:.2f})")
    return None
