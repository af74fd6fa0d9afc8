"""Engine.load(DIR): a verified exported directory, its tokenizer, thresholds and a backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__, manifest
from ..calibration import CALIBRATION_FILE, Calibration

BACKENDS = ("auto", "onnxruntime")


class EngineError(ValueError):
    pass


class Engine:
    def __init__(self, directory: Path, data: dict, tokenizer, backend, calibration: Calibration | None):
        self.directory, self.manifest, self.tokenizer = directory, data, tokenizer
        self.backend, self.calibration = backend, calibration

    @classmethod
    def load(cls, directory, backend: str = "auto", threads: int | None = None, verify: bool = True) -> "Engine":
        from transformers import AutoTokenizer

        directory = Path(directory)
        if backend not in BACKENDS:
            raise EngineError(f"backend {backend!r} not in {list(BACKENDS)}")
        try:
            data = manifest.verify(directory) if verify else manifest.read(directory)
        except manifest.ManifestError as e:
            raise EngineError(str(e)) from None
        built_with = data.get("versions", {}).get("tda-export")
        if built_with and built_with.split(".")[0] != __version__.split(".")[0]:
            raise EngineError(f"{directory / manifest.NAME}: built by tda-export {built_with}, this is "
                              f"{__version__} (major versions differ); rebuild the engine")
        cal_path = directory / CALIBRATION_FILE
        calibration = Calibration.load(cal_path) if cal_path.is_file() else None
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # CPU default: ONNX Runtime (the torch backend with our kernels is chosen here once it exists).
        impl = _ort(directory, data, threads)
        return cls(directory, data, tokenizer, impl, calibration)

    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def max_context(self) -> int:
        return self.manifest["max_context"]

    def thresholds(self, density: float | None = None) -> np.ndarray:
        """Per-layer thresholds: the built default, or those calibrated for `density` (1.0 = dense)."""
        if density is None:
            cal = self.manifest.get("calibration") or {}
            return np.asarray(cal.get("thresholds", [0.0] * self.num_layers), np.float32)
        if not 0.0 < density <= 1.0:
            raise EngineError(f"density must be in (0, 1], got {density}")
        if density == 1.0:
            return np.zeros(self.num_layers, np.float32)
        if self.calibration is None:
            raise EngineError(f"{self.directory}: built without a calibration, so only density 1.0 is available")
        try:
            return np.asarray(self.calibration.thresholds_for(density), np.float32)
        except KeyError as e:
            raise EngineError(str(e.args[0])) from None

    def densities(self) -> list[str]:
        return sorted(self.calibration.thresholds) if self.calibration else ["1.00"]


def _ort(directory: Path, data: dict, threads):
    from .ort_backend import OrtBackend

    return OrtBackend(directory / data["model_file"], data, threads)
