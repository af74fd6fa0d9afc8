"""Engine.load(DIR): a verified exported directory, its tokenizer, thresholds and a backend."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from .. import __version__, manifest
from ..calibration import CALIBRATION_FILE, Calibration
from ..ops.contract import DEFAULT_DENSITY_MARGIN, DENSITY_BOUNDS_INPUT, NO_CLAMP, density_bounds

BACKENDS = ("auto", "torch", "onnxruntime", "native", "tensorrt")


class EngineError(ValueError):
    pass


class Engine:
    def __init__(self, directory: Path, data: dict, tokenizer, backend, calibration: Calibration | None,
                 choice=None):
        self.directory, self.manifest, self.tokenizer = directory, data, tokenizer
        self.backend, self.calibration = backend, calibration
        self.choice = choice  # choose.Choice when backend="auto" measured on a CPU, else None

    @classmethod
    def load(cls, directory, backend: str = "auto", threads: int | None = None, verify: bool = True,
             device: str | None = None, max_batch: int | None = None, max_context: int | None = None) -> "Engine":
        """backend: "auto" (torch on a GPU; on a CPU the native C++ runtime where it can run the engine, else
        whichever decodes faster, see choose.py), "torch", "onnxruntime" or "native" (cpp/, built on
        demand). device/max_batch/max_context configure the torch backend."""
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
        try:
            calibration = Calibration.load(cal_path) if cal_path.is_file() else None
        except ValueError as e:
            raise EngineError(str(e)) from None
        check_thresholds(directory, data, calibration)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        torch_opts = {k: v for k, v in dict(device=device, max_batch=max_batch, max_context=max_context).items()
                      if v is not None}
        make_torch = lambda: _torch(directory, data, threads, torch_opts)  # noqa: E731
        make_ort = lambda: _ort(directory, data, threads)  # noqa: E731
        choice = None
        if backend == "onnxruntime":
            impl = make_ort()
        elif backend == "tensorrt":  # never picked by auto: a plan runs only on GPUs its TensorRT supports
            impl = _tensorrt(directory, data)
        elif backend == "torch":
            impl = make_torch()
        elif backend == "native":
            impl = _native(directory, data, threads)
        elif "decoder_spec" not in data:
            warnings.warn(f"{directory}: built by an older tda-export without a decoder_spec, so only ONNX Runtime "
                          f"can run it; rebuild it for the torch backend", stacklevel=2)
            impl = make_ort()
        elif device != "cpu" and _cuda_kernels_usable():
            impl = make_torch()
        elif (native := _native_if_usable(directory, data, threads)) is not None:
            impl = native  # measured faster than torch and ONNX Runtime on a CPU (choose.py says why)
        else:
            from .choose import choose_cpu

            choice, impl = choose_cpu(lambda: _torch(directory, data, threads, dict(torch_opts, device="cpu")),
                                      make_ort, data, _built_thresholds(data), threads)
        return cls(directory, data, tokenizer, impl, calibration, choice)

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


def check_thresholds(directory: Path, data: dict, calibration: Calibration | None) -> None:
    """Every threshold the engine may use is a number in [0, 1] (relative to the top score; above 1 no
    neuron is active, NaN selects garbage), one per layer, and the calibration is this model's."""
    layers = data.get("num_layers")

    def check(where: str, values) -> None:
        if not isinstance(values, list) or len(values) != layers:
            raise EngineError(f"{where}: expected a list of {layers} thresholds (one per layer), got {values!r:.80}")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise EngineError(f"{where}: threshold of layer {i} is {v!r}; thresholds must be finite and in "
                                  f"[0, 1]; rebuild or recalibrate the engine")

    built = data.get("calibration") or {}
    if "thresholds" in built:
        check(f"{directory / manifest.NAME} calibration.thresholds", built["thresholds"])
    if calibration is None:
        return
    where = directory / CALIBRATION_FILE
    try:
        calibration.check_model(data.get("fingerprint", calibration.fingerprint), layers,
                                data.get("intermediate_size"), str(where))
    except ValueError as e:
        raise EngineError(str(e)) from None
    for key, ths in calibration.thresholds.items():
        check(f"{where} thresholds[{key}]", ths)
    for n, table in calibration.by_prompt_length.items():
        for key, ths in table.items():
            check(f"{where} by_prompt_length[{n}][{key}]", ths)
    if "thresholds" in calibration.default:
        check(f"{where} default.thresholds", calibration.default["thresholds"])
    densities = calibration.default.get("densities", [])
    if any(not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 < d <= 1) for d in densities):
        raise EngineError(f"{where}: default densities must be in (0, 1], got {densities}")


def _built_thresholds(data: dict) -> np.ndarray:
    cal = data.get("calibration") or {}
    return np.asarray(cal.get("thresholds", [0.0] * data["num_layers"]), np.float32)


def _cuda_kernels_usable() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    from ..kernels import BuildError, cuda_library

    try:
        cuda_library()
    except (BuildError, OSError) as e:
        warnings.warn(f"GPU present but the CUDA kernels are unusable ({e}); choosing a CPU backend", stacklevel=3)
        return False
    return True


def _torch(directory: Path, data: dict, threads, options: dict):
    from .torch_backend import TorchBackend, TorchBackendError

    try:
        return TorchBackend.from_engine(directory / data["model_file"], data, threads=threads, **options)
    except TorchBackendError as e:
        raise EngineError(str(e)) from None


def _tensorrt(directory: Path, data: dict):
    from .trt_backend import TensorRTBackend
    from ..trt.flavour import TensorRTMissing

    try:
        return TensorRTBackend(directory, data)
    except (TensorRTMissing, ValueError, RuntimeError) as e:
        raise EngineError(f"backend tensorrt: {e}") from None


def _native(directory: Path, data: dict, threads):
    from ..native import NativeBuildError
    from ..native.binding import NativeBackend, NativeError

    if (reason := native_unusable_reason(data)) is not None:
        raise EngineError(f"{directory}: {reason}")
    try:
        return NativeBackend(directory, data, threads)
    except (NativeError, NativeBuildError) as e:
        raise EngineError(f"native backend: {e}") from None


def native_unusable_reason(data: dict) -> str | None:
    """Why the native CPU executor cannot run this engine (None if it can): decided from the manifest."""
    if data.get("weights_file") != "model.safetensors":
        return "built before model.safetensors (weights inside model.onnx); rebuild it for the native backend"
    if data.get("dtype") != "float32":
        return f"the native CPU executor runs float32 engines, this one is {data.get('dtype')}"
    return None


def _native_if_usable(directory: Path, data: dict, threads):
    """auto on a CPU: the native runtime wherever it runs the engine, with no load-time probe. It decodes
    faster than torch and ONNX Runtime at every density (bench/RESULTS.md, native section), and its own
    per-layer rule (cpp/src/cpu_executor.h kDenseAbove) keeps a TDA layer from decoding slower than dense,
    so the probe's two questions (which backend; does TDA pay) have their answers without measuring at
    load. The probe (choose.py) remains for engines it cannot run. TDA_EXPORT_NATIVE=0 turns it off."""
    if native_unusable_reason(data) is not None or os.environ.get("TDA_EXPORT_NATIVE", "1") == "0":
        return None
    from ..native import NativeBuildError

    try:
        return _native(directory, data, threads)
    except (EngineError, NativeBuildError) as e:  # no compiler or BLAS here: the Python backends still run
        warnings.warn(f"native backend unusable ({e}); choosing between torch and ONNX Runtime", stacklevel=3)
        return None


def _ort(directory: Path, data: dict, threads):
    from .ort_backend import OrtBackend

    return OrtBackend(directory / data["model_file"], data, threads)
