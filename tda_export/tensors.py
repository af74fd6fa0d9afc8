"""A model's weights read one tensor at a time, in the dtype they are stored in.

A 7B export must never hold the model twice, nor in float32: the exporter asks
for one tensor, converts and writes it, and drops it. safetensors files are
memory-mapped (a tensor costs its own bytes only while it is used); GGUF tensors
are dequantised one at a time with the same per-architecture fix-ups
(llama's Q/K permutation, Gemma's norm offset) that transformers applies when
it loads the whole file.

Tensors are named as in the Hugging Face model's state dict, so the exporter
asks for the same names whatever the file format.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


class MissingTensor(KeyError):
    pass


class SafetensorsSource:
    """*.safetensors in a directory (sharded with model.safetensors.index.json, or not)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        self._where = {}
        for f in files:
            with safe_open(self.directory / f, framework="pt") as h:
                self._where.update(dict.fromkeys(h.keys(), self.directory / f))

    def names(self) -> set[str]:
        return set(self._where)

    def _open(self, name: str):
        """A handle for just this read: a long-lived one keeps every page read so far mapped, so the
        process's RSS would grow by the whole checkpoint over an export (measured: 1x its bytes)."""
        from safetensors import safe_open

        try:
            return safe_open(self._where[name], framework="pt")
        except KeyError:
            raise MissingTensor(f"{self.directory}: no tensor {name!r} in its safetensors files") from None

    def get(self, name: str) -> torch.Tensor:
        with self._open(name) as h:
            return h.get_tensor(name)

    def blocks(self, name: str):
        """No block-quantized tensors in safetensors checkpoints."""
        return None

    def head(self, name: str, count: int) -> torch.Tensor:
        """The first `count` elements (row-major) as float32, reading only the rows that hold them."""
        with self._open(name) as h:
            part = h.get_slice(name)
            shape = part.get_shape()
            rows = math.ceil(count / max(1, math.prod(shape[1:]))) if len(shape) > 1 else count
            return part[:rows].float().flatten()[:count]


class GGUFSource:
    """One .gguf file; `model` (any device, meta is fine) gives the GGUF -> HF name mapping."""

    def __init__(self, path: Path, model: torch.nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        from .arch import text_config

        self.path = Path(path)
        self._reader = GGUFReader(self.path)
        architecture = read_field(self._reader, "general.architecture")[0]
        c = text_config(model.config)
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
            config={"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads})
        to_hf = get_gguf_hf_weights_map(model, self._processor)
        self._tensors = {to_hf[t.name]: t for t in self._reader.tensors if t.name in to_hf}

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        try:
            t = self._tensors[name]
        except KeyError:
            raise MissingTensor(f"{self.path}: no tensor for {name!r}") from None
        weights = self._processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        return torch.from_numpy(weights if weights.flags.writeable else weights.copy())  # F32 ones map the file

    def blocks(self, name: str):
        """(format, uint8 [rows, row_bytes]): the tensor's own bytes when its GGML type is one of
        contract.BLOCK_FORMATS, rows in the HF order (llama's q/k rows un-permuted as whole rows, the same
        permutation `get` applies to the float values); None for other types. The rows are checked: their
        exact dequantization must equal `get(name)`, else (a processor that does more than move rows) None."""
        from .ops.blocks import dequantize
        from .ops.contract import BLOCK_FORMATS

        t = self._tensors.get(name)
        fmt = next((f.name for f in BLOCK_FORMATS.values() if f.ggml_type == int(t.tensor_type)), None) if t else None
        if fmt is None or np.asarray(t.data).ndim != 2:
            return None
        rows = self._processor.process(weights=np.asarray(t.data), name=t.name).weights
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        if rows.shape[0] != t.data.shape[0] or not np.array_equal(dequantize(fmt, rows), self.get(name).numpy()):
            import warnings

            warnings.warn(f"{self.path}: {t.name} ({fmt}): its blocks do not dequantize to the values transformers "
                          f"reads for {name} (a fix-up beyond moving rows), so they are requantized, not carried",
                          stacklevel=2)
            return None
        return fmt, rows

    def head(self, name: str, count: int) -> torch.Tensor:
        return self.get(name).flatten()[:count]


class ModuleSource:
    """The tensors of a model already in memory (a checkpoint whose names we cannot map)."""

    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.state_dict(keep_vars=True))

    def names(self) -> set[str]:
        return set(self._params)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._params[name].detach()
        except KeyError:
            raise MissingTensor(f"model has no tensor {name!r}") from None

    def blocks(self, name: str):
        return None

    def head(self, name: str, count: int) -> torch.Tensor:
        return self.get(name).float().flatten()[:count].cpu()


def open_source(directory: Path, gguf_file: str | None, model: torch.nn.Module):
    return GGUFSource(directory / gguf_file, model) if gguf_file else SafetensorsSource(directory)


def missing(source, model: torch.nn.Module) -> list[str]:
    """Parameters of `model` the source cannot give under their state-dict names (tied ones excepted)."""
    have = source.names()
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return sorted(n for n, _ in model.named_parameters() if n not in have and n not in tied)
