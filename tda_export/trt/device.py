"""Device work of the Python plugins' enqueue that the C ABI does not cover (the prefill's dense
GEMMs and gated step, the decode's scores copy), done with torch on TensorRT's stream.

Runs only on a CUDA GPU with a CUDA build of torch; nothing here is reached at build time.
The kernels' own work always goes through the C ABI (tda_export/kernels).
"""
from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def fp32_accumulation():
    """torch GEMMs that accumulate in float32 as the contract (and the C++ plugin's CUBLAS_COMPUTE_32F) do:
    no reduced-precision reductions for float16/bfloat16, no TF32 for float32. The flags are process-wide,
    so they are restored on the way out."""
    import torch

    m = torch.backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction", "allow_tf32")
    saved = [getattr(m, n) for n in names]
    try:
        for n in names:
            setattr(m, n, False)
        yield
    finally:
        for n, v in zip(names, saved):
            setattr(m, n, v)


def dequantize_weights(plan, dtype: str, hidden: int, inter: int, gate_up_w: int, down_t: int, kernels,
                       stream: int) -> None:
    """Block weights -> T in the plan's workspace pieces (plan.gate_up_t, plan.down_t), for a prefill: the kernel
    library's tda_block_dequantize (the exact float32 weights) in row chunks through the float32 scratch piece,
    then rounded to T once, as the C++ plugin's dequant.cu does. Each weight in the format the plan gives it
    (plan.weight_format for gate_up, plan.down_weight_format for down_t: e.g. q8_0 rows under q4_1 gate/up)."""
    from ..kernels.abi import KernelError
    from ..ops.contract import BLOCK_FORMATS, WEIGHT_FORMATS

    rows_per = plan.cublas_ws_bytes // (4 * hidden)
    if rows_per < 1:
        raise ValueError(f"prefill: H = {hidden} needs {4 * hidden} bytes of scratch per row, the workspace has "
                         f"{plan.cublas_ws_bytes}")
    scratch = tensor(plan.cublas_ws, (rows_per, hidden), "float32")
    for src, dst, rows, code in ((gate_up_w, plan.gate_up_t, 2 * inter, plan.weight_format),
                                 (down_t, plan.down_t, inter, plan.down_weight_format)):
        row_bytes = hidden // 32 * BLOCK_FORMATS[WEIGHT_FORMATS[code]].block_bytes
        out = tensor(dst, (rows, hidden), dtype)
        for r0 in range(0, rows, rows_per):
            n = min(rows_per, rows - r0)
            status = kernels.block_dequantize_status(code, hidden, n, src + r0 * row_bytes, plan.cublas_ws, hidden,
                                                     stream)
            if status:
                raise KernelError(kernels, "tda_block_dequantize", status)
            out[r0:r0 + n].copy_(scratch[:n])


def quantize_x(plan, dtype: str, hidden: int, tokens: int, x: int) -> None:
    """x_format q8_0: hidden_states [M, H] -> plan.xq [M, H] in T, the contract's xq (ops/torch_blocks.quantize_x,
    the one torch realization of X_QUANT_SEMANTICS), exact in float32 and rounded to T once as the dequantized
    weights are. Only reached where x_format q8_0 runs, the CPU kernel library (the plugin refuses it on CUDA,
    so no graph capture): its temporaries are ordinary allocations."""
    from ..ops.torch_blocks import quantize_x as quantize

    src, out = tensor(x, (tokens, hidden), dtype), tensor(plan.xq, (tokens, hidden), dtype)
    out.copy_(quantize(src))


def prefill(plan, dtype: str, activation: str, sizes, hidden: int, gate_up_w: int, down_t: int, output: int,
            kernels, stream: int, weight_format: str = "dtype") -> None:
    """gate/up GEMM, act(gate)*up rounded to T, the C ABI's score reduction, down GEMM (plan: logic.PrefillPlan);
    block weights (weight_format q8_0/q4_0/q4_1; down_t in plan.down_weight_format) are first dequantized to T into
    the workspace, and the GEMMs read the weights the plan says (plan.*_gemm.a: the inputs, or those dequantized
    copies); with x_format q8_0 (plan.x_format) hidden_states is first quantized into plan.xq, which the gate/up GEMM reads
    (plan.gate_up_gemm.b).

    Nothing is allocated on TensorRT's stream (enqueue may be under CUDA graph capture): the GEMMs write
    into the workspace (plan.gate_up) and the output, and the float32 gated step runs in row chunks in the
    workspace piece the C++ plugin hands to cuBLAS (torch's GEMMs use torch's own cuBLAS workspace)."""
    import torch

    from ..ops.torch_ops import activation as act_fn

    B, S, H, I = sizes
    M = B * S
    with stream_scope(stream), fp32_accumulation():
        if M > 0:
            if weight_format != "dtype":
                dequantize_weights(plan, dtype, H, I, gate_up_w, down_t, kernels, stream)
            if plan.x_format:
                quantize_x(plan, dtype, H, M, hidden)
            gu = tensor(plan.gate_up, (M, I, 2), dtype)
            x, w = tensor(plan.gate_up_gemm.b, (M, H), dtype), tensor(plan.gate_up_gemm.a, (2 * I, H), dtype)
            torch.matmul(x, w.t(), out=gu.view(M, 2 * I))  # rounded to T, as the ONNX reference and C++ plugin do
            z = tensor(plan.z, (M, I), dtype)
            rows = plan.cublas_ws_bytes // (2 * 4 * I)  # two float32 [rows, I] buffers
            if rows < 1:
                raise ValueError(f"prefill: I = {I} needs {8 * I} bytes of scratch per row, the workspace has "
                                 f"{plan.cublas_ws_bytes}")
            scratch = tensor(plan.cublas_ws, (2, rows, I), "float32")
            for r0 in range(0, M, rows):
                n = min(rows, M - r0)
                g, u = scratch[0, :n], scratch[1, :n]
                g.copy_(gu[r0:r0 + n, :, 0])
                u.copy_(gu[r0:r0 + n, :, 1])
                z[r0:r0 + n].copy_(act_fn(activation, g, inplace=True).mul_(u))
        kernels.call("tda_prefill_scores", plan.scores, plan.scores_ws or 0, plan.scores_ws_bytes, stream)
        if M > 0:
            torch.matmul(z, tensor(plan.down_gemm.a, (I, H), dtype), out=tensor(output, (M, H), dtype))
