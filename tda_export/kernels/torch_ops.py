"""torch custom ops backed by the kernel libraries, in their own namespace.

``tda_kernels::*`` (not ``tda::*``): the exporter owns ``tda::sparse_gated_mlp``
and ``tda::select_active`` with the full prefill+decode contract; these ops
are the building blocks a runtime calls. CPU tensors go to
libtda_kernels_cpu.so, CUDA tensors to libtda_kernels_cuda.so on the current
stream, with the workspace taken from torch's allocator, so the CUDA path can
be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.contract import SELECT_ACTIVE, SPARSE_GATED_MLP
from ..ops.torch_blocks import check_weights
from . import abi

NAMESPACE = "tda_kernels"
_TORCH_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _library(device: torch.device) -> abi.Library:
    return abi.cuda_library() if device.type == "cuda" else abi.cpu_library()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def workspace(size: int, device: torch.device, fill: int | None = None) -> tuple[Tensor, int]:
    """A buffer of at least `size` bytes and its 256-byte aligned address (the header's rule; torch's CPU
    allocator only promises 64). Keep the tensor alive for as long as the address is used."""
    buf = (torch.empty if fill is None else lambda *a, **k: torch.full(*a, fill, **k))(
        (size + abi.WORKSPACE_ALIGNMENT,), dtype=torch.uint8, device=device)
    return buf, (buf.data_ptr() + abi.WORKSPACE_ALIGNMENT - 1) & ~(abi.WORKSPACE_ALIGNMENT - 1)


def _call(lib: abi.Library, fn: str, args, device: torch.device) -> None:
    size = lib.workspace_size(fn, args)
    _buf, ptr = workspace(size, device)
    lib.call(fn, args, ptr, size, _stream(device))


def _dtype_code(t: Tensor) -> int:
    if t.dtype not in _TORCH_DTYPE:
        raise TypeError(f"dtype {t.dtype} not in {list(_TORCH_DTYPE)}")
    return abi.DTYPE_CODE[_TORCH_DTYPE[t.dtype]]


def _check_version(version: int) -> None:
    if version not in abi.DECODE_VERSIONS:
        raise ValueError(f"version {version} not in {list(abi.DECODE_VERSIONS)} (0: the library's default)")


def _check_decode_inputs(x: Tensor, gate_up: Tensor, down_t: Tensor, idx: Tensor, cnt: Tensor,
                         weight_format: str = "dtype", down_weight_format: str = "same",
                         x_format: str = "dtype") -> None:
    """Shapes, dtypes and devices against hidden_states before any pointer reaches a kernel: a mismatch
    would read out of bounds (and on a GPU poison the whole CUDA context)."""
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[1] != 1):
        raise ValueError(f"hidden_states must be [B, H] or [B, 1, H], got {list(x.shape)}")
    _dtype_code(x)
    batch = x.shape[0]
    inter = gate_up.shape[0] if gate_up.dim() == 3 else -1
    expected = {"gate_up_weight": gate_up, "down_weight_t": down_t, "active_idx": (idx, [batch, inter]),
                "active_count": (cnt, [batch])}
    for name, t in expected.items():
        t = t[0] if isinstance(t, tuple) else t
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {x.device}")
    check_weights(x, gate_up, down_t, weight_format, down_weight_format, x_format)
    for name, (t, shape) in list(expected.items())[2:]:
        if list(t.shape) != shape:
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {shape} with I={inter} from "
                             f"gate_up_weight")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


@torch.library.custom_op(f"{NAMESPACE}::sparse_gated_mlp_decode", mutates_args=(), device_types=("cpu", "cuda"))
def sparse_gated_mlp_decode(hidden_states: Tensor, gate_up_weight: Tensor, down_weight_t: Tensor,
                            active_idx: Tensor, active_count: Tensor,
                            activation: str = SPARSE_GATED_MLP.attr("activation").default,
                            deterministic: bool = True, version: int = 0,
                            weight_format: str = SPARSE_GATED_MLP.attr("weight_format").default,
                            down_weight_format: str = SPARSE_GATED_MLP.attr("down_weight_format").default,
                            x_format: str = SPARSE_GATED_MLP.attr("x_format").default) -> Tensor:
    """Decode step of SparseGatedMLP: hidden_states [B, H] or [B, 1, H] -> same shape.

    version: the kernel algorithm (tda_decode_args_t.version): 0 the library default (v1 unless
    $TDA_DECODE_VERSION=2), 1 or 2; same results contract for all, the CPU library has one algorithm.
    weight_format: the contract's attribute; a block format takes uint8 weights in the contract's layout
    (the kernel reads only the active neurons' blocks); down_weight_format: down_weight_t's own block format
    ("same": weight_format's); x_format: how gate/up read hidden_states (q8_0: quantized per block of 32,
    contract X_QUANT_SEMANTICS; only with a block weight_format)."""
    SPARSE_GATED_MLP.check_attrs({"activation": activation, "weight_format": weight_format,
                                  "down_weight_format": down_weight_format, "x_format": x_format})
    _check_version(version)
    _check_decode_inputs(hidden_states, gate_up_weight, down_weight_t, active_idx, active_count, weight_format,
                         down_weight_format, x_format)
    x = hidden_states.contiguous()
    batch, hidden = x.shape[0], x.shape[-1]
    inter = gate_up_weight.shape[0]
    gu, wd = gate_up_weight.contiguous(), down_weight_t.contiguous()
    idx, cnt = active_idx.to(torch.int32).contiguous(), active_count.to(torch.int32).contiguous()
    out = x.new_empty(x.shape)
    args = abi.DecodeArgs(
        dtype=_dtype_code(x), activation=abi.ACTIVATION_CODE[activation],
        batch=batch, hidden=hidden, intermediate=inter, deterministic=int(deterministic),
        hidden_states=x.data_ptr(), gate_up_weight=gu.data_ptr(), down_weight_t=wd.data_ptr(),
        active_idx=idx.data_ptr(), active_count=cnt.data_ptr(), output=out.data_ptr(), version=version,
        weight_format=abi.WEIGHT_FORMAT_CODE[weight_format],
        down_weight_format=abi.DOWN_WEIGHT_FORMAT_CODE[down_weight_format],
        x_format=abi.X_FORMAT_CODE[x_format])
    _call(_library(x.device), "tda_sparse_gated_mlp_decode", args, x.device)
    return out


@sparse_gated_mlp_decode.register_fake
def _(hidden_states, gate_up_weight, down_weight_t, active_idx, active_count, activation="silu",
      deterministic=True, version=0, weight_format="dtype", down_weight_format="same", x_format="dtype"):
    _check_version(version)
    _check_decode_inputs(hidden_states, gate_up_weight, down_weight_t, active_idx, active_count, weight_format,
                         down_weight_format, x_format)
    # what the real op returns: a fresh contiguous tensor (empty_like would copy a view's strides)
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.custom_op(f"{NAMESPACE}::{SELECT_ACTIVE.torch_name}", mutates_args=(), device_types=("cpu", "cuda"))
def select_active(scores: Tensor, threshold: Tensor, density_bounds: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """scores [B, I] float32, threshold scalar float32 tensor, density_bounds [2] float32 (None: no clamp)
    -> (active_idx [B, I], active_count [B]) int32."""
    s = scores.to(torch.float32).contiguous()
    tau = threshold.to(device=s.device, dtype=torch.float32).reshape(()).contiguous()
    bounds = None
    if density_bounds is not None:
        bounds = density_bounds.to(device=s.device, dtype=torch.float32).reshape(2).contiguous()
    idx = torch.empty(s.shape, dtype=torch.int32, device=s.device)
    cnt = torch.empty(s.shape[:1], dtype=torch.int32, device=s.device)
    args = abi.SelectArgs(batch=s.shape[0], intermediate=s.shape[1], scores=s.data_ptr(), threshold=tau.data_ptr(),
                          active_idx=idx.data_ptr(), active_count=cnt.data_ptr(),
                          density_bounds=bounds.data_ptr() if bounds is not None else None)
    _call(_library(s.device), "tda_select_active", args, s.device)
    return idx, cnt


@select_active.register_fake
def _(scores, threshold, density_bounds=None):
    return (torch.empty(scores.shape, dtype=torch.int32, device=scores.device),
            torch.empty(scores.shape[:1], dtype=torch.int32, device=scores.device))


@torch.library.custom_op(f"{NAMESPACE}::prefill_scores", mutates_args=(), device_types=("cpu", "cuda"))
def prefill_scores(z: Tensor, token_valid: Tensor, scores_in: Tensor,
                   score_norm: str = SPARSE_GATED_MLP.attr("score_norm").default) -> Tensor:
    """scores_in + per-neuron sum over valid tokens of (row-normalised) z^2; z [B, S, I] -> [B, I] float32."""
    SPARSE_GATED_MLP.check_attrs({"score_norm": score_norm})
    zc = z.contiguous()
    valid = token_valid.to(torch.float32).contiguous()
    s_in = scores_in.to(torch.float32).contiguous()
    out = torch.empty_like(s_in)
    args = abi.PrefillArgs(dtype=_dtype_code(zc), score_norm=abi.SCORE_NORM_CODE[score_norm],
                           batch=zc.shape[0], seq_len=zc.shape[1], intermediate=zc.shape[2], z=zc.data_ptr(),
                           token_valid=valid.data_ptr(), scores_in=s_in.data_ptr(), scores_out=out.data_ptr())
    _call(_library(zc.device), "tda_prefill_scores", args, zc.device)
    return out


@prefill_scores.register_fake
def _(z, token_valid, scores_in, score_norm="token_l2"):
    return scores_in.new_empty(scores_in.shape, dtype=torch.float32)  # contiguous, as the real op
