"""Read an exported model's initializers into torch tensors: the ONNX file is the one artifact every
backend loads, so the torch backend takes its weights from there (inline or external data) too."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

TORCH_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT32: torch.int32,
                TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8}  # uint8: weight blocks


def _external(proto: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in proto.external_data}


def _read_external(proto: TensorProto, base: Path, dtype: torch.dtype, files: dict) -> torch.Tensor:
    info = _external(proto)
    path = base / info["location"]
    offset, length = int(info.get("offset", 0)), int(info["length"])
    out = torch.empty(tuple(proto.dims), dtype=dtype)
    if out.numel() * out.element_size() != length:
        raise ValueError(f"{path}: initializer {proto.name} has {length} bytes, shape {list(proto.dims)} "
                         f"of {dtype} needs {out.numel() * out.element_size()}")
    f = files.get(path) or files.setdefault(path, open(path, "rb"))
    f.seek(offset)
    # straight into the tensor's memory: no intermediate copy of a multi-GB weight
    if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != length:
        raise ValueError(f"{path}: truncated at initializer {proto.name}")
    return out


def load_initializers(model_path: Path, wanted=None) -> dict[str, torch.Tensor]:
    """name -> CPU tensor for every initializer (or only those whose name is in `wanted`)."""
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    out, files = {}, {}
    try:
        for proto in model.graph.initializer:
            if wanted is not None and proto.name not in wanted:
                continue
            if proto.data_type not in TORCH_DTYPES:
                raise ValueError(f"{model_path}: initializer {proto.name} has unsupported ONNX type {proto.data_type}")
            dtype = TORCH_DTYPES[proto.data_type]
            if proto.data_location == TensorProto.EXTERNAL:
                out[proto.name] = _read_external(proto, model_path.parent, dtype, files)
            elif proto.raw_data:
                raw = bytearray(proto.raw_data)  # writable, so torch shares it without a warning
                out[proto.name] = torch.frombuffer(raw, dtype=dtype).reshape(tuple(proto.dims))
            else:  # small typed-field arrays (numpy can spell every type but bfloat16, which is never stored so)
                out[proto.name] = torch.from_numpy(np.array(numpy_helper.to_array(proto)))
    finally:
        for f in files.values():
            f.close()
    return out
