"""Initializers from torch tensors: inline, or streamed into one `model.safetensors` as they are made.

The engine stores its weights once, in a safetensors file that model.onnx references through ONNX
external data (location/offset/length). ONNX Runtime, TensorRT and the C++ runtime (cpp/) all read the
same bytes: the ONNX runtimes by offset, everything else by the safetensors header, so a runtime that
needs only the tensors never parses protobuf.

Streaming each converted tensor to disk right away keeps peak memory near one tensor beyond the
source model, for models far over protobuf's 2 GB. The header is not known until the last tensor,
so HEADER_BYTES are reserved up front and the JSON is padded with spaces (which the format allows)
to fill them: the data then starts page-aligned and nothing is copied at the end.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Where the data region starts: 8 bytes of header length, then the space-padded JSON header. About
# 120 header bytes per tensor, so this holds ~8,000 tensors (a 70B Llama has ~730).
HEADER_BYTES = 1 << 20
# Each tensor starts on this boundary (relative to the page-aligned data region), so a runtime can use
# the mmap in place with vector loads. safetensors forbids holes in the data region, so the gaps are
# covered by U8 tensors named PAD_PREFIX<n> that no graph references.
ALIGN = 64
PAD_PREFIX = "__padding__."
FORMAT = "tda-export-weights/1"


class WeightFileError(ValueError):
    pass


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bit pattern is what ONNX stores
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class WeightWriter:
    def __init__(self, dtype: str, data_path: Path | None):
        """data_path None: weights inline in the model; else streamed to that safetensors file."""
        self.dtype = dtype
        self.data_path = Path(data_path) if data_path else None
        self._file = open(data_path, "wb") if data_path else None
        if self._file:
            self._file.truncate(HEADER_BYTES)
            self._file.seek(HEADER_BYTES)
        self._header: dict[str, dict] = {}
        self._data_end = 0  # bytes of the data region written so far
        self.initializers: list[TensorProto] = []
        self.nbytes = 0
        self.formats: dict[str, str] = {}  # tensor name -> its dtype or block format (manifest weight_formats)

    def add(self, name: str, tensor: torch.Tensor, dtype: str | None = None) -> str:
        """Convert `tensor` to `dtype` (default: the compute dtype) and store it under `name`."""
        dtype = dtype or self.dtype
        return self._store(name, raw_bytes(tensor.to(TORCH_TYPES[dtype])), list(tensor.shape), dtype,
                           ONNX_TYPES[dtype], SAFETENSORS_TYPES[dtype])

    def add_blocks(self, name: str, blocks: np.ndarray, fmt: str, as_int8: bool = False) -> str:
        """uint8 blocks of block format `fmt` (contract.BLOCK_FORMATS), stored as they are (U8); as_int8: the
        same bytes typed INT8 (TensorRT plugin inputs cannot be uint8; the plugins read them as bytes)."""
        assert blocks.dtype == np.uint8, blocks.dtype
        return self._store(name, np.ascontiguousarray(blocks).tobytes(), list(blocks.shape), fmt,
                           TensorProto.INT8 if as_int8 else TensorProto.UINT8, "I8" if as_int8 else "U8")

    def add_weight_only(self, name: str, q: np.ndarray, bits: int, label: str) -> str:
        """Integers of TensorRT's weight-only pattern (export/weight_only.py): INT8, or INT4 packed two per
        byte (ONNX's layout; the safetensors header calls those bytes U8 of their own length)."""
        if bits == 8:
            return self._store(name, np.ascontiguousarray(q, np.int8).tobytes(), list(q.shape), label,
                               TensorProto.INT8, "I8")
        from .weight_only import pack_int4

        data = pack_int4(q)
        return self._store(name, data, list(q.shape), label, TensorProto.INT4, "U8", st_shape=[len(data)])

    def _store(self, name: str, data: bytes, shape: list[int], fmt: str, onnx_type: int, st_dtype: str,
               st_shape: list[int] | None = None) -> str:
        proto = TensorProto(name=name, data_type=onnx_type, dims=shape)
        if self._file is None:
            proto.raw_data = data
        else:
            if name in self._header or name.startswith(PAD_PREFIX):
                raise WeightFileError(f"{self.data_path}: tensor name {name!r} used twice or reserved")
            pad = -self._data_end % ALIGN
            if pad:
                self._append(f"{PAD_PREFIX}{len(self._header)}", "U8", [pad], b"\0" * pad)
            offset = self._append(name, st_dtype, st_shape or shape, data)
            proto.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_path.name), ("offset", HEADER_BYTES + offset), ("length", len(data))):
                proto.external_data.add(key=k, value=str(v))
        self.initializers.append(proto)
        self.nbytes += len(data)
        self.formats[name] = fmt
        return name

    def _append(self, name: str, st_dtype: str, shape: list[int], data: bytes) -> int:
        offset = self._data_end
        self._file.write(data)
        self._data_end += len(data)
        self._header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, self._data_end]}
        return offset

    def add_array(self, name: str, array: np.ndarray) -> str:
        """A small non-weight initializer (indices, defaults): always inline."""
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def close(self) -> None:
        if not self._file:
            return
        header = json.dumps({"__metadata__": {"format": FORMAT}, **self._header}, separators=(",", ":")).encode()
        room = HEADER_BYTES - 8
        try:
            if len(header) > room:
                raise WeightFileError(f"{self.data_path}: header of {len(header)} bytes for {len(self._header)} "
                                      f"tensors exceeds the reserved {room}")
            self._file.seek(0)
            self._file.write(struct.pack("<Q", room) + header + b" " * (room - len(header)))
        finally:
            self._file.close()
            self._file = None


class MemoryWriter:
    """The WeightWriter interface keeping tensors in memory (on their device) instead of in initializers:
    the exporter's exact names and layouts for a runtime fed directly, e.g. bench/gpu_e2e.py's random
    7B model, which would take longer to write as ONNX than to benchmark."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.initializers: list[TensorProto] = []  # the graph gets none: its weights live in `tensors`
        self.nbytes = 0
        self.formats: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor, dtype: str | None = None) -> str:
        t = tensor.detach().to(TORCH_TYPES[dtype or self.dtype]).contiguous()
        self.tensors[name] = t
        self.nbytes += t.numel() * t.element_size()
        self.formats[name] = dtype or self.dtype
        return name

    def add_blocks(self, name: str, blocks: np.ndarray, fmt: str) -> str:
        self.tensors[name] = torch.from_numpy(np.ascontiguousarray(blocks))
        self.nbytes += blocks.nbytes
        self.formats[name] = fmt
        return name

    def add_array(self, name: str, array: np.ndarray) -> str:
        self.tensors[name] = torch.from_numpy(np.array(array))
        return name

    def close(self) -> None:
        pass
