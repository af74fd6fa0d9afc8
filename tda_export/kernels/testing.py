"""Shared by the kernel tests and bench/gpu_kernels.py: random problems,
masks, poisoned direct ABI calls and the float64-reference error."""
from __future__ import annotations

import numpy as np
import torch

from ..ops import blocks, contract, reference
from . import abi
from .torch_ops import workspace

# Relative-error tolerances per dtype: fp32 is accumulation-order noise; for
# fp16/bf16 z and the output are rounded to T (as a dense T-typed MLP does).
# fp32: a one-neuron mask's error is one dot product's, relative to a result that cancellation can
# make small, so 1e-5 failed for ~0.7% of seeds; 1e-4 still catches any indexing or masking bug.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
MASK_KINDS = ("empty", "full", "single", "first", "last", "random")


def make_mask(kind: str, inter: int, rng: np.random.Generator, density: float = 0.37) -> np.ndarray:
    """Sorted active indices for one sequence."""
    if kind == "empty":
        return np.zeros(0, np.int32)
    if kind == "full":
        return np.arange(inter, dtype=np.int32)
    if kind == "single":
        return np.array([rng.integers(inter)], np.int32)
    if kind == "first":
        return np.array([0], np.int32)
    if kind == "last":
        return np.array([inter - 1], np.int32)
    if kind == "random":
        n = max(1, int(round(density * inter))) | 1  # odd-sized
        return np.sort(rng.choice(inter, size=min(n, inter), replace=False)).astype(np.int32)
    raise ValueError(kind)


def state_from_masks(masks: list[np.ndarray], inter: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.zeros((len(masks), inter), np.int32)
    cnt = np.zeros(len(masks), np.int32)
    for b, m in enumerate(masks):
        idx[b, : m.size] = m
        cnt[b] = m.size
    return idx, cnt


def decode_problem(batch: int, hidden: int, inter: int, dtype, masks: list[np.ndarray], seed: int = 0,
                   device="cpu"):
    """Random nonzero inputs scaled so z and the output are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=g)
    gu = torch.randn(inter, 2, hidden, generator=g) / hidden ** 0.5
    wd = torch.randn(inter, hidden, generator=g) / inter ** 0.5
    idx, cnt = state_from_masks(masks, inter)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), gu.to(**to), wd.to(**to), torch.from_numpy(idx).to(device), torch.from_numpy(cnt).to(device))


def block_decode_problem(batch: int, hidden: int, inter: int, weight_format: str, dtype, masks: list[np.ndarray],
                         seed: int = 0, down_weight_format: str = "same"):
    """decode_problem's random problem with its weights quantized to a block format (down_t to its own with
    down_weight_format): returns (x, gate_up blocks uint8 [I, 2, H/32*bytes], down_t blocks uint8 [I, H/32*bytes],
    idx, cnt, gate_up float32, down_t float32), the float32 weights being the blocks' exact dequantized values
    (the contract's operands)."""
    x, gu, wd, idx, cnt = decode_problem(batch, hidden, inter, torch.float32, masks, seed)
    formats = (weight_format, contract.down_format(weight_format, down_weight_format))
    gu_q, wd_q = (blocks.quantize(f, t.numpy()) for f, t in zip(formats, (gu, wd)))
    gu_f, wd_f = (torch.from_numpy(blocks.dequantize(f, q)) for f, q in zip(formats, (gu_q, wd_q)))
    return x.to(dtype), torch.from_numpy(gu_q), torch.from_numpy(wd_q), idx, cnt, gu_f, wd_f


def decode_reference(x, gu, wd, idx, cnt, activation="silu") -> np.ndarray:
    f = lambda t: t.detach().cpu().to(torch.float64).numpy()  # noqa: E731
    b = x.shape[0]
    out, _ = reference.sparse_gated_mlp(f(x)[:, None], f(gu), f(wd), idx.cpu().numpy(), cnt.cpu().numpy(),
                                        np.ones((b, 1), np.float32), np.zeros((b, gu.shape[0]), np.float32),
                                        activation=activation)
    return out[:, 0]


_TORCH_ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.nn.functional.relu,
                      "gelu": torch.nn.functional.gelu,
                      "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}


def decode_reference_torch(x, gu, wd, idx, cnt, activation="silu") -> torch.Tensor:
    """The float64 decode reference with the same masks, computed by torch on the inputs' device (the 7B
    shapes take milliseconds on a GPU and minutes in numpy): y[b] = sum over active j of
    act(x_b . gate_j) * (x_b . up_j) * down_j, nothing rounded."""
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    batch, inter = x.shape[0], gu.shape[0]
    xd = f(x)
    z = _TORCH_ACTIVATIONS[activation](f(gu[:, 0]) @ xd.T) * (f(gu[:, 1]) @ xd.T)  # [I, B]
    keep = torch.arange(inter, device=x.device)[None, :] < cnt.to(x.device).long()[:, None]
    active = torch.zeros(batch, inter + 1, dtype=torch.bool, device=x.device)  # column I: padding
    active.scatter_(1, torch.where(keep, idx.to(x.device).long(), inter), True)
    return (z.T * active[:, :inter]) @ f(wd)


def rel_error(out: torch.Tensor, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (ref: a numpy array or a tensor); inf if out has a NaN/inf."""
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().cpu().to(torch.float64).numpy()
    o = out.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(o).all():
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(o - ref) / denom) if denom > 0 else float(np.linalg.norm(o))


def library_for(device) -> abi.Library:
    return abi.cuda_library() if torch.device(device).type == "cuda" else abi.cpu_library()


def _stream(device) -> int:
    return torch.cuda.current_stream().cuda_stream if torch.device(device).type == "cuda" else 0


def run_decode(x, gu, wd, idx, cnt, activation="silu", deterministic=True, poison=True, out=None,
               workspace_bytes=None, hidden=None, workspace_offset=0, version=0,
               weight_format="dtype", down_weight_format="same", x_format="dtype") -> tuple[int, torch.Tensor]:
    """Direct ABI call with a NaN-filled output and a garbage-filled 256-byte aligned workspace (moved
    by workspace_offset bytes to test the alignment check); returns (status, output). For a block
    weight_format, gu and wd are the uint8 block tensors (block_decode_problem); x_format a name of
    contract.X_FORMATS or a raw int code."""
    if out is None:
        out = torch.full_like(x, float("nan")) if poison else torch.empty_like(x)
    lib = library_for(x.device)
    args = abi.DecodeArgs(dtype=abi.DTYPE_CODE[str(x.dtype).removeprefix("torch.")],
                          activation=abi.ACTIVATION_CODE[activation], batch=x.shape[0],
                          hidden=x.shape[-1] if hidden is None else hidden, intermediate=gu.shape[0],
                          deterministic=int(deterministic), hidden_states=x.data_ptr(), gate_up_weight=gu.data_ptr(),
                          down_weight_t=wd.data_ptr(), active_idx=idx.data_ptr(), active_count=cnt.data_ptr(),
                          output=out.data_ptr(), version=version,
                          weight_format=abi.WEIGHT_FORMAT_CODE[weight_format],
                          down_weight_format=abi.DOWN_WEIGHT_FORMAT_CODE[down_weight_format],
                          x_format=_x_code(x_format))
    need = lib.workspace_size("tda_sparse_gated_mlp_decode", args)
    size = need if workspace_bytes is None else workspace_bytes
    _buf, ptr = workspace(max(size, need) + workspace_offset, x.device, fill=0xA5)  # garbage, not zeros
    status = lib.call_status("tda_sparse_gated_mlp_decode", args, ptr + workspace_offset, size, _stream(x.device))
    return status, out


def _x_code(x_format) -> int:
    return x_format if isinstance(x_format, int) else abi.X_FORMAT_CODE[x_format]


def run_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_format: str, n_begin: int = 0,
                     n_end: int | None = None, out: torch.Tensor | None = None,
                     x_format="dtype") -> tuple[int, torch.Tensor]:
    """Direct tda_block_linear call: y[:, n_begin:n_end] = x . dequant(weight)^T (x_format q8_0:
    blocks.quantize_x(x) . dequant(weight)^T), x float32 [M, K] (any row stride), weight uint8
    [N, K/32 * block_bytes]; y NaN-poisoned unless given. Returns (status, y)."""
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.full((m, n), float("nan"), dtype=torch.float32, device=x.device)
    lib = library_for(x.device)
    args = abi.BlockLinearArgs(weight_format=abi.WEIGHT_FORMAT_CODE[weight_format], m=m, n=n, k=k, n_begin=n_begin,
                               n_end=n if n_end is None else n_end, ldx=x.stride(0) if m else k,
                               ldy=out.stride(0) if m else n, x=x.data_ptr(), weight=weight.data_ptr(),
                               y=out.data_ptr(), x_format=_x_code(x_format))
    need = lib.workspace_size("tda_block_linear", args)
    _buf, ptr = workspace(need, x.device, fill=0xA5)
    return lib.call_status("tda_block_linear", args, ptr, need, _stream(x.device)), out


def random_blocks(name: str, rows: int, hidden: int, device: str, seed: int, scale: float) -> torch.Tensor:
    """uint8 [rows, H/32*block_bytes]: random bytes (every nibble / int8 value) with fp16 scales sized so the
    weights are O(scale) like a real layer's (|d| ~ scale / 64 for q8_0's +-127, scale / 4 for 4-bit; q4_1's
    minimum ~ -8 d), so fp16 activations and outputs stay finite."""
    bb = contract.BLOCK_FORMATS[name].block_bytes
    scale = scale / (64 if name == "q8_0" else 4)
    g = torch.Generator(device=device).manual_seed(seed)
    nblk = hidden // contract.QUANT_BLOCK
    raw = torch.randint(0, 256, (rows, nblk, bb), generator=g, device=device, dtype=torch.uint8)
    n16 = 2 if name == "q4_1" else 1
    f = (torch.rand(rows, nblk, n16, generator=g, device=device) + 0.5) * scale
    f[..., 0] *= torch.where(torch.rand(f.shape[:2], generator=g, device=device) < 0.5, -1.0, 1.0)
    if n16 == 2:
        f[..., 1] = -8 * f[..., 1]
    raw[..., : 2 * n16] = f.to(torch.float16).view(torch.uint8).reshape(rows, nblk, 2 * n16)
    return raw.reshape(rows, -1)
