"""Engine.load(DIR): a verified exported directory, its tokenizer, thresholds and a backend."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import manifest
from ..calibration import CALIBRATION_FILE, Calibration  # noqa: F401  (CALIBRATION_FILE: re-exported)
from ..ops.contract import DEFAULT_DENSITY_MARGIN, DENSITY_BOUNDS_INPUT, NO_CLAMP, density_bounds
from . import adapters, validate
from .errors import EngineError
from .selection import BACKENDS, Request, native_unusable_reason, report_line, select


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Engine:
    def __init__(self, directory: Path, data: dict, tokenizer, backend, calibration: Calibration | None,
                 choice=None, selection=None):
        self.directory, self.manifest, self.tokenizer = directory, data, tokenizer
        self.backend, self.calibration = backend, calibration
        self.choice = choice  # choose.Choice when backend="auto" measured on a CPU, else None
        self.selection = selection  # selection.Selection: what was chosen and why

    @classmethod
    def load(cls, directory, backend: str = "auto", threads: int | None = None, verify: bool = True,
             device: str | None = None, max_batch: int | None = None, max_context: int | None = None,
             report: Callable[[str], None] | None = _to_stderr) -> "Engine":
        """backend: "auto" (torch on a GPU; on a CPU the native C++ runtime where it can run the engine, else
        whichever of torch and ONNX Runtime decodes faster; selection.py has the rule), "torch",
        "onnxruntime", "native" (cpp/, built on demand) or "tensorrt". device/max_batch/max_context
        configure the torch backend. report: told one line where auto passed over a faster backend (and
        why, and how to get it) or measured; stderr by default, None for silence."""
        directory = Path(directory)
        if backend not in BACKENDS:
            raise EngineError(f"backend {backend!r} not in {list(BACKENDS)}")
        try:
            data = manifest.verify(directory) if verify else manifest.read(directory)
        except manifest.ManifestError as e:
            raise EngineError(str(e)) from None
        validate.check_version(directory, data)
        calibration = validate.load_calibration(directory, data)
        tokenizer = validate.load_tokenizer(directory)
        request = Request(backend, device, decoder_spec="decoder_spec" in data,
                          native_reason=native_unusable_reason(data),
                          native_off=os.environ.get("TDA_EXPORT_NATIVE", "1") == "0")
        machine = adapters.Machine(directory, data, threads)
        chosen = select(request, machine.cuda, machine.native)
        torch_options = {k: v for k, v in dict(device=device, max_batch=max_batch, max_context=max_context).items()
                         if v is not None}
        impl, choice = adapters.construct(chosen, machine, torch_options)
        if report is not None and (line := report_line(chosen, impl.name, choice)) is not None:
            report(line)
        return cls(directory, data, tokenizer, impl, calibration, choice, chosen)

    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def max_context(self) -> int:
        """The model's context, or less where the backend's cache is smaller."""
        return min(self.manifest["max_context"], getattr(self.backend, "max_context", self.manifest["max_context"]))

    def thresholds(self, density: float | None = None, prompt_len: int | None = None) -> np.ndarray:
        """Per-layer thresholds: the built default density, or `density` (1.0 = dense), for prompts of
        about `prompt_len` tokens when the calibration has per-length tables."""
        if density is not None and not 0.0 < density <= 1.0:
            raise EngineError(f"density must be in (0, 1], got {density}")
        dense_default = density is None and self.choice is not None and self.choice.dense_default
        if density == 1.0 or dense_default:  # auto measured that TDA does not pay on this machine
            return np.zeros(self.num_layers, np.float32)
        built = self.manifest.get("calibration") or {}
        if self.calibration is None:
            if density is not None:
                raise EngineError(f"{self.directory}: built without a calibration, so only density 1.0 is available")
            return np.asarray(built.get("thresholds", [0.0] * self.num_layers), np.float32)
        try:
            if density is not None:
                return np.asarray(self.calibration.thresholds_for(density, prompt_len), np.float32)
            return np.asarray(self.calibration.thresholds_for_layers(self.default_densities(), prompt_len),
                              np.float32)
        except KeyError as e:
            raise EngineError(str(e.args[0])) from None

    @property
    def density_margin(self) -> float:
        """How far each sequence's per-layer density may stray from the target (manifest calibration)."""
        return float((self.manifest.get("calibration") or {}).get("density_margin", DEFAULT_DENSITY_MARGIN))

    def density_bounds(self, density: float | None = None) -> np.ndarray | None:
        """Per-layer SelectActive density bounds [L, 2] for a request (the built default for None): the
        target density +- density_margin, so the density asked for is the density each sequence gets
        (thresholds alone drift on text the calibration did not see, bench/QUALITY.md). None for engines
        exported before the clamp (no tda_density_bounds input): they select by thresholds alone."""
        if self.manifest.get("density_bounds_input") != DENSITY_BOUNDS_INPUT:
            return None
        if density is not None and not 0.0 < density <= 1.0:
            raise EngineError(f"density must be in (0, 1], got {density}")
        dense_default = density is None and self.choice is not None and self.choice.dense_default
        if density == 1.0 or dense_default or self.calibration is None:
            return np.asarray([NO_CLAMP] * self.num_layers, np.float32)
        if density is None:
            built = (self.manifest.get("calibration") or {}).get("density_bounds")
            if built is not None:
                return np.asarray(built, np.float32)
        densities = self.default_densities() if density is None else [density] * self.num_layers
        return np.asarray(density_bounds(densities, self.density_margin), np.float32)

    def default_densities(self) -> list[float]:
        """Per-layer densities the engine was built with (a --density, or the calibration's default)."""
        selected = (self.manifest.get("calibration") or {}).get("selected", {})
        if selected.get("kind") == "density" and "density" in selected:
            return [float(selected["density"])] * self.num_layers
        return [float(d) for d in self.calibration.default["densities"]]

    def densities(self) -> list[str]:
        return sorted(self.calibration.thresholds) if self.calibration else ["1.00"]
