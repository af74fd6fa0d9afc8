"""Thin constructors: one function per backend, turning its failures into EngineError, and the two
machine facts `selection.select` asks about (Machine). No choosing happens here."""
from __future__ import annotations

from pathlib import Path

from .errors import EngineError
from .selection import MEASURE, Selection, first_line, native_unusable_reason


def torch(directory: Path, data: dict, threads, options: dict):
    from .torch_backend import TorchBackend, TorchBackendError

    try:
        return TorchBackend.from_engine(directory / data["model_file"], data, threads=threads, **options)
    except TorchBackendError as e:
        raise EngineError(str(e)) from None


def onnxruntime(directory: Path, data: dict, threads):
    from .ort_backend import OrtBackend

    return OrtBackend(directory / data["model_file"], data, threads)


def tensorrt(directory: Path, data: dict):
    from .trt_backend import TensorRTBackend
    from ..trt.flavour import TensorRTMissing

    try:
        return TensorRTBackend(directory, data)
    except (TensorRTMissing, ValueError, RuntimeError) as e:
        raise EngineError(f"backend tensorrt: {e}") from None


def _open_native(directory: Path, data: dict, threads):
    """The native backend, or the exception saying why it cannot run here (not raised)."""
    from ..native import NativeBuildError
    from ..native.binding import NativeBackend, NativeError

    try:
        return NativeBackend(directory, data, threads)
    except (NativeError, NativeBuildError, OSError) as e:  # no compiler, no package, no library, unsupported
        return e


def native(directory: Path, data: dict, threads):
    if (reason := native_unusable_reason(data)) is not None:
        raise EngineError(f"{directory}: {reason}")
    backend = _open_native(directory, data, threads)
    if isinstance(backend, Exception):
        raise EngineError(f"native backend: {backend}") from None
    return backend


class Machine:
    """What auto asks about this machine (select asks each question at most once, and only when its rule
    reaches it). native() opens the native backend to answer, building cpp/ on first use, and keeps it,
    so taking it costs no second open."""

    def __init__(self, directory: Path, data: dict, threads):
        self.directory, self.data, self.threads = directory, data, threads
        self.native_backend = None

    def cuda(self) -> bool | str:
        """True: torch sees a GPU and the CUDA kernels load; False: no GPU; else why the kernels do not."""
        import torch as _torch

        if not _torch.cuda.is_available():
            return False
        from ..kernels import BuildError, cuda_library

        try:
            cuda_library()
        except (BuildError, OSError) as e:
            return str(e)
        return True

    def native(self) -> str | None:
        """None where the native runtime runs the engine here, else the first line of why not."""
        backend = _open_native(self.directory, self.data, self.threads)
        if isinstance(backend, Exception):
            return first_line(str(backend) or type(backend).__name__)
        self.native_backend = backend
        return None


def construct(sel: Selection, machine: Machine, torch_options: dict):
    """(backend, choose.Choice or None) for a selection: the one constructor it names, or for MEASURE
    both Python backends timed against each other (choose.py)."""
    directory, data, threads = machine.directory, machine.data, machine.threads
    if sel.device is not None:
        torch_options = dict(torch_options, device=sel.device)
    if sel.backend == "native":
        return machine.native_backend or native(directory, data, threads), None
    if sel.backend == "torch":
        return torch(directory, data, threads, torch_options), None
    if sel.backend == "onnxruntime":
        return onnxruntime(directory, data, threads), None
    if sel.backend == "tensorrt":  # never picked by auto: a plan runs only on GPUs its TensorRT supports
        return tensorrt(directory, data), None
    if sel.backend != MEASURE:
        raise ValueError(f"unknown selection {sel.backend!r}")
    from .choose import choose_cpu

    choice, backend = choose_cpu(lambda: torch(directory, data, threads, torch_options),
                                 lambda: onnxruntime(directory, data, threads), data, threads)
    return backend, choice
