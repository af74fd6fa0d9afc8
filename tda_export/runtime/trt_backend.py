"""The `tensorrt` runtime backend: a TensorRT plan (model.plan) run by TensorRT's Python API.

Thin on purpose: the state (mask, thresholds, past KV and TDA tensors, fed back from the matching
presents) and the prefill/decode steps are the ONNX Runtime backend's, so the generation loop is
the same; only `_run` differs. Prefill calls run in execution context 0 (prefill profile), decode
calls in context 1 (decode profile), each built with its own profile; both use one activation block
(shared_contexts). The plugins run as the
Python plugins (tda_export.trt.plugins), registered before deserializing.

Needs a GPU TensorRT supports (RTX plans: cc 7.5-12.x, not Hopper) and CUDA torch for the buffers.
On a CPU everything up to deserialization is checked (select_profile, io tables) by the tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..ops.contract import DENSITY_BOUNDS_INPUT
from .ort_backend import OrtBackend, past_name

# bf16 state lives on the host as 2-byte words (numpy has no bf16; TensorRT reads only the bytes):
# the empty past is zeros, whose bytes are the same as float16 zeros.
_ORT_TYPE = {"float32": "tensor(float)", "float16": "tensor(float16)", "int32": "tensor(int32)",
             "int64": "tensor(int64)", "bfloat16": "tensor(float16)"}


class ProfileBoundsError(ValueError):
    pass


class _Input:
    def __init__(self, name: str, dtype: str):
        self.name, self.type = name, _ORT_TYPE[dtype]


def select_profile(section: dict, feeds: dict) -> int:
    """0 (prefill) for a multi-token call, 1 (decode) for one token; raises if a shape is outside it."""
    index = 0 if feeds["input_ids"].shape[1] > 1 else 1
    prof = section["profiles"][index]
    for name, bounds in prof["shapes"].items():
        if name not in feeds:
            raise ProfileBoundsError(f"profile {prof['name']}: input {name} not fed")
        shape = list(feeds[name].shape)
        if len(shape) != len(bounds["min"]) or any(not lo <= d <= hi for d, lo, hi in
                                                   zip(shape, bounds["min"], bounds["max"])):
            raise ProfileBoundsError(f"input {name} shape {shape} is outside the plan's {prof['name']} profile "
                                     f"{bounds['min']}..{bounds['max']} (rebuild with larger --max-batch/"
                                     f"--max-seq-len/--max-prompt)")
    return index


def io_tables(manifest: dict) -> tuple[dict, list[str]]:
    """(inputs by name with ORT-style types, present outputs) from the manifest, as OrtBackend expects."""
    inputs = {v["name"]: _Input(v["name"], v["dtype"]) for v in manifest["io"]["inputs"]}
    presents = [v["name"] for v in manifest["io"]["outputs"] if v["name"].startswith("present")]
    missing = [past_name(p) for p in presents if past_name(p) not in inputs]
    if missing:
        raise ValueError(f"outputs without matching past inputs: {missing[:3]}")
    return inputs, presents


def shared_contexts(trt, engine, n_profiles: int, stream: int, allocate) -> tuple[list, object]:
    """One execution context per profile, all on one activation block sized for the largest profile:
    the contexts never run at once (one backend, one stream, prefill then decode), so a block each
    (TensorRT's default) would hold prefill's workspace twice (~1.4 GB at Mistral 8x2048).
    allocate(nbytes) -> a buffer with .data_ptr() (256-byte aligned; torch's are). Returns (contexts, buffer);
    the buffer must outlive the contexts."""
    nbytes = max(engine.get_device_memory_size_for_profile_v2(i) for i in range(n_profiles))
    block = allocate(nbytes)
    contexts = []
    for i in range(n_profiles):
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"TensorRT could not create the execution context of profile {i}")
        ctx.set_optimization_profile_async(i, stream)
        ctx.set_device_memory(block.data_ptr(), nbytes)
        contexts.append(ctx)
    return contexts, block


class TensorRTBackend(OrtBackend):
    name = "tensorrt"

    def __init__(self, directory: Path, manifest: dict):
        import torch

        from ..trt.flavour import import_module
        from ..trt.plugins import register

        section = manifest.get("tensorrt")
        if not isinstance(section, dict):
            raise ValueError(f"{directory}: no TensorRT plan (build with --target tensorrt-rtx or tensorrt)")
        self.manifest, self.section = manifest, section
        self.max_context, self.max_batch = section["limits"]["max_seq_len"], section["limits"]["max_batch"]
        self.inputs, self.presents = io_tables(manifest)
        self.has_bounds = DENSITY_BOUNDS_INPUT in self.inputs
        trt = import_module(section["flavour"])
        register(trt)
        self._trt, self._torch = trt, torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((Path(directory) / section["plan_file"]).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{directory / section['plan_file']}: TensorRT could not deserialize the plan "
                               "(it needs a GPU this TensorRT supports)")
        self._stream = torch.cuda.Stream()
        self.contexts, self._activations = shared_contexts(
            trt, self.engine, len(section["profiles"]), self._stream.cuda_stream,
            lambda n: torch.empty(max(n, 1), dtype=torch.uint8, device="cuda"))

    def _run(self, state: dict, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        torch = self._torch
        feeds = self._feeds(state, input_ids, positions)
        ctx = self.contexts[select_profile(self.section, feeds)]
        keep = {}
        for name, value in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(value)).cuda()
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            keep[name] = t
        outs = {}
        for name in ["logits"] + self.presents:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                     "INT32": torch.int32}[self.engine.get_tensor_dtype(name).name]
            outs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, outs[name].data_ptr())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        self._stream.synchronize()
        state["past"] = {past_name(p): _numpy(outs[p]) for p in self.presents}
        return outs["logits"][:, -1].float().cpu().numpy()


def _numpy(t):
    import torch

    return t.view(torch.int16).cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()
