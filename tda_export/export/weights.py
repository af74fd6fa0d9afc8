"""Initializers from torch tensors: inline, or appended to one external data file as they are made.

Streaming each converted tensor to disk right away keeps peak memory near one
copy of the model (the HF model itself) even for models far over protobuf's 2 GB.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIGN = 4096  # lets a runtime mmap each tensor page-aligned


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bit pattern is what ONNX stores
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class WeightWriter:
    def __init__(self, dtype: str, data_path: Path | None):
        """data_path None: weights inline in the model; else streamed to that file."""
        self.dtype = dtype
        self.data_path = data_path
        self._file = open(data_path, "wb") if data_path else None
        self.initializers: list[TensorProto] = []
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: str | None = None) -> str:
        """Convert `tensor` to `dtype` (default: the compute dtype) and store it under `name`."""
        dtype = dtype or self.dtype
        data = raw_bytes(tensor.to(TORCH_TYPES[dtype]))
        proto = TensorProto(name=name, data_type=ONNX_TYPES[dtype], dims=list(tensor.shape))
        if self._file is None:
            proto.raw_data = data
        else:
            offset = self._file.seek(0, 2)
            pad = -offset % ALIGN
            self._file.write(b"\0" * pad)
            self._file.write(data)
            proto.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_path.name), ("offset", offset + pad), ("length", len(data))):
                proto.external_data.add(key=k, value=str(v))
        self.initializers.append(proto)
        self.nbytes += len(data)
        return name

    def add_array(self, name: str, array: np.ndarray) -> str:
        """A small non-weight initializer (indices, defaults): always inline."""
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def close(self) -> None:
        if self._file:
            self._file.close()


class MemoryWriter:
    """The WeightWriter interface keeping tensors in memory (on their device) instead of in initializers:
    the exporter's exact names and layouts for a runtime fed directly, e.g. bench/gpu_e2e.py's random
    7B model, which would take longer to write as ONNX than to benchmark."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.initializers: list[TensorProto] = []  # the graph gets none: its weights live in `tensors`
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: str | None = None) -> str:
        t = tensor.detach().to(TORCH_TYPES[dtype or self.dtype]).contiguous()
        self.tensors[name] = t
        self.nbytes += t.numel() * t.element_size()
        return name

    def add_array(self, name: str, array: np.ndarray) -> str:
        self.tensors[name] = torch.from_numpy(np.array(array))
        return name

    def close(self) -> None:
        pass
