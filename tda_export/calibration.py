"""The calibration file: per-layer TDA thresholds that later steps (eval, export, runtime) consume.

JSON, written atomically. `thresholds[density]` maps a requested density to a
per-layer list of relative thresholds; `default` is what an export uses when
no density is named (the budget allocation if one was run, else the recipe's
density).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    def thresholds_for(self, density: float) -> list[float]:
        key = density_key(density)
        if key not in self.thresholds:
            raise KeyError(f"calibration has no thresholds for density {key}; it has {sorted(self.thresholds)}")
        return self.thresholds[key]

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(asdict(self), tmp, indent=1)
        os.replace(tmp.name, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"calibration file {path}: not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"calibration file {path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {FORMAT!r}")
        try:
            cal = cls(**data)
        except TypeError as e:
            raise ValueError(f"calibration file {path}: {e}") from None
        for key, ths in list(cal.thresholds.items()) + [("default", cal.default.get("thresholds", []))]:
            if len(ths) != cal.num_layers:
                raise ValueError(f"calibration file {path}: thresholds[{key}] has {len(ths)} entries, "
                                 f"expected {cal.num_layers}")
        return cal


def density_key(density: float) -> str:
    return f"{float(density):.2f}"
