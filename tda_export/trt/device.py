"""Device work of the Python plugins' enqueue that the C ABI does not cover (the prefill's dense
GEMMs and gated step, the decode's scores copy), done with torch on TensorRT's stream.

Runs only on a CUDA GPU with a CUDA build of torch; nothing here is reached at build time.
The kernels' own work always goes through the C ABI (tda_export/kernels).
"""
from __future__ import annotations

_TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "int32": "<i4"}


class _DevicePointer:
    def __init__(self, ptr: int, shape, dtype: str):
        self.__cuda_array_interface__ = {"shape": tuple(int(s) for s in shape), "typestr": _TYPESTR[dtype],
                                         "data": (int(ptr), False), "version": 3, "strides": None, "stream": None}


def tensor(ptr: int, shape, dtype: str):
    """A torch view of TensorRT-owned device memory (bf16 travels as int16: the interface has no bf16)."""
    import torch

    t = torch.as_tensor(_DevicePointer(ptr, shape, dtype), device="cuda")
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def stream_scope(stream: int):
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(int(stream)))


def copy(dst: int, src: int, count: int, dtype: str, stream: int) -> None:
    with stream_scope(stream):
        tensor(dst, (count,), dtype).copy_(tensor(src, (count,), dtype), non_blocking=True)


def prefill(plan, dtype: str, activation: str, sizes, hidden: int, gate_up_w: int, down_t: int, output: int,
            kernels, stream: int) -> None:
    """gate/up GEMM, act(gate)*up rounded to T, the C ABI's score reduction, down GEMM (plan: logic.PrefillPlan)."""
    from ..ops.torch_ops import activation as act_fn

    B, S, H, I = sizes
    M = B * S
    with stream_scope(stream):
        if M > 0:
            gu = tensor(plan.gate_up, (M, I, 2), dtype)
            x, w = tensor(hidden, (M, H), dtype), tensor(gate_up_w, (2 * I, H), dtype)
            gu.view(M, 2 * I).copy_(x @ w.t())  # rounded to T, as the ONNX reference and the C++ plugin do
            z = tensor(plan.z, (M, I), dtype)
            z.copy_(act_fn(activation, gu[..., 0].float()) * gu[..., 1].float())
        kernels.call("tda_prefill_scores", plan.scores, plan.scores_ws or 0, plan.scores_ws_bytes, stream)
        if M > 0:
            tensor(output, (M, H), dtype).copy_(z @ tensor(down_t, (I, H), dtype))
