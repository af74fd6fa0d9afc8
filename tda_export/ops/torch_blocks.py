"""Block-quantized SparseGatedMLP weights in torch (any device): the weight check every torch realization
runs, dequantization to the contract's exact float32 values and the q8_0 activation (x_format) (tests check
both bit for bit against ops/blocks.py, the numpy reference)."""
from __future__ import annotations

import torch

from .blocks import block_format, row_bytes
from .contract import BLOCK_FORMATS, QUANT_BLOCK, SPARSE_GATED_MLP, down_format, x_format_check


def check_weights(hidden: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, weight_format: str,
                  down_weight_format: str = "same", x_format: str = "dtype") -> None:
    """gate_up_weight / down_weight_t against hidden_states and the formats (contract: float T [I, 2, H] /
    [I, H], or uint8 [I, 2, H/32*block_bytes] / [I, H/32*block_bytes], down_weight_t in its own block format
    when down_weight_format is one); ValueError/TypeError naming the tensor, or the attribute for an x_format
    outside the contract (q8_0 needs a block weight_format)."""
    SPARSE_GATED_MLP.check_attrs({"weight_format": weight_format, "down_weight_format": down_weight_format,
                                  "x_format": x_format})
    down = down_format(weight_format, down_weight_format)
    x_format_check(weight_format, x_format)
    hidden_size = hidden.shape[-1]
    inter = gate_up.shape[0] if gate_up.dim() == 3 else -1
    down_attr = "weight_format" if down_weight_format == "same" else "down_weight_format"
    for name, t, fmt, attr in (("gate_up_weight", gate_up, weight_format, "weight_format"),
                               ("down_weight_t", down_t, down, down_attr)):
        if fmt == "dtype":
            width, dtype, what = hidden_size, hidden.dtype, "H"
        else:
            width, dtype = row_bytes(fmt, hidden_size), torch.uint8
            what = f"H/{QUANT_BLOCK}*{BLOCK_FORMATS[fmt].block_bytes}"
        shape = [inter, 2, width] if name == "gate_up_weight" else [inter, width]
        if list(t.shape) != shape:
            want = "[I, 2, W]" if name == "gate_up_weight" else "[I, W]"
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {want} with W = {what} = {width} "
                             f"({attr} {fmt}, H={hidden_size} from hidden_states"
                             + (f", I={inter} from gate_up_weight)" if inter >= 0 else ")"))
        if t.dtype != dtype:
            raise TypeError(f"{name} is {t.dtype}; {attr} {fmt} needs {dtype}")


def dequantize(weight_format: str, blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H/32*block_bytes] -> float32 [..., H]: the block format's dequantize, exactly (fp16 fields read
    little-endian, as GGUF stores them)."""
    fmt = block_format(weight_format)
    flat = blocks.reshape(-1, fmt.block_bytes)
    d = flat[:, 0:2].contiguous().view(torch.float16).float()        # [n, 1]
    if weight_format == "q8_0":
        w = d * flat[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = flat[:, 4 if weight_format == "q4_1" else 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=1).float()              # weight k low nibble, k + 16 high
        if weight_format == "q4_0":
            w = d * (q - 8)
        else:
            w = d * q + flat[:, 2:4].contiguous().view(torch.float16).float()
    return w.reshape(*blocks.shape[:-1], blocks.shape[-1] // fmt.block_bytes * QUANT_BLOCK)


def quantize_x(x: torch.Tensor) -> torch.Tensor:
    """contract X_QUANT_SEMANTICS (x_format q8_0): float [..., H] -> float32 xq [..., H], exactly as
    ops/blocks.quantize_x: per block of 32 along the last dim d = max|x| / 127, q = round-half-even(x * (1/d))
    (d below the smallest normal float32 flushed to 0, 1/d = 0 then), xq = q * d; a block holding inf/NaN gets d = NaN. Any leading dims, 0 rows too."""
    v = x.float()
    if v.shape[-1] % QUANT_BLOCK:
        raise ValueError(f"x_format q8_0 needs rows of a multiple of {QUANT_BLOCK} values, got {v.shape[-1]}")
    b = v.reshape(*v.shape[:-1], v.shape[-1] // QUANT_BLOCK, QUANT_BLOCK)
    finite = torch.isfinite(b).all(-1, keepdim=True)
    d = torch.where(finite, b, 0.0).abs().amax(-1, keepdim=True) / 127.0   # float32 division
    d = torch.where(d < torch.finfo(torch.float32).tiny, 0.0, d)              # subnormal d: a zero block
    inv = torch.where(d == 0, 0.0, 1.0 / d)                                  # 1/0 = inf is never taken
    q = torch.round(b * inv)                                                 # float32 product; half to even
    return (q * torch.where(finite, d, float("nan"))).reshape(v.shape)
