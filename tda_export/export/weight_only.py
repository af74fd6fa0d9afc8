"""TensorRT's weight-only pattern for the dense linears of a block-quantized engine (plans only).

A TensorRT plan cannot read the engine's GGUF blocks in its own layers, but it has a weight-only pattern:
int4/int8 initializer -> DequantizeLinear (scale a constant, zero point 0) -> MatMul/Gemm/Gather. This
module turns one tensor of contract blocks (uint8 [rows, in/32*block_bytes], rows = output features) into
that pattern's values, numpy only:

- the integers q (int8 array, int4 values in -8..7 or int8 in -127..127) [rows, in] and
- the scales [rows, in/block] (block along the input) or [rows, 1] (one per row: per output channel),
  so that w = q * scale.

RULES says what each target takes (found by building plans: tests/test_trt_engines.py, docs/tensorrt.md
"Quantized plans"). When the engine's blocks already are such a pattern they are carried exactly (q8_0 ->
int8 block 32, q4_0 -> int4 block 32 with q - 8; the fp16 scale is exact in an fp16 plan, rounded to bf16 in
a bf16 plan). Otherwise the exactly dequantized weights are re-quantized symmetric round-to-nearest
(absmax / 7 or / 127 per block or row), and Converted.exact is False: q4_1 (its minimum is no integer zero
point) everywhere, and every format for datacenter TensorRT, whose int4 needs block 64 or 128 and whose
int8 is per channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.blocks import block_format, dequantize
from ..ops.contract import QUANT_BLOCK


@dataclass(frozen=True)
class Rule:
    int4_blocks: tuple[int, ...]  # DequantizeLinear block_size along the input for 4-bit formats, the first
    #                               that divides the row (SmolLM2's H = 576 is no multiple of 128)
    int8_block: int | None        # block for q8_0; None: one scale per output row (per channel)

    def int4_block(self, width: int) -> int:
        for b in self.int4_blocks:
            if width % b == 0:
                return b
        raise ValueError(f"a row of {width} weights is not a multiple of any int4 block this target takes "
                         f"({', '.join(map(str, self.int4_blocks))})")

    def describe(self) -> str:
        return (f"int4 block {' or '.join(map(str, self.int4_blocks))}, int8 "
                + ("per output channel" if self.int8_block is None else f"block {self.int8_block}"))


# tensorrt-rtx 1.7 builds int4 and int8 DequantizeLinear with block 32 (the engine's own blocks, carried);
# datacenter TensorRT documents int4 block 64/128 only and int8 per channel.
RULES = {"tensorrt-rtx": Rule(int4_blocks=(QUANT_BLOCK,), int8_block=QUANT_BLOCK),
         "tensorrt": Rule(int4_blocks=(128, 64), int8_block=None)}


@dataclass(frozen=True)
class Converted:
    bits: int                 # 4 or 8
    q: np.ndarray             # int8 [rows, in]
    scale: np.ndarray         # float32 [rows, in/block] or [rows, 1]
    block: int | None         # block along the input; None: per row
    exact: bool               # q * scale is exactly the engine's dequantized weights (before the scale's dtype)

    def describe(self, fmt: str, scale_dtype: str = "float16") -> dict:
        """The manifest's record. exact: the plan's weights are the engine's; not so when requantized, nor
        when a bf16 plan rounds the engine's fp16 scales (q8_0/q4_0 carried: only the scales differ)."""
        return {"from": fmt, "to": f"int{self.bits}", "block": self.block or "per_channel",
                "requantized": not self.exact, "exact": self.exact and scale_dtype == "float16",
                "weights": int(self.q.size),
                "bytes": self.q.size * self.bits // 8 + self.scale.size * 2}  # scales in fp16/bf16


def int_bits(fmt: str) -> int:
    """The integer width block format fmt becomes in a plan: 8 for q8_0, 4 for the 4-bit formats (q4_0, q4_1)."""
    block_format(fmt)  # raises on an unknown format
    return 8 if fmt == "q8_0" else 4


def convert(fmt: str, blocks: np.ndarray, rule: Rule) -> Converted:
    """uint8 blocks [rows, in/32*block_bytes] of block format fmt -> the weight-only pattern under rule."""
    bf = block_format(fmt)
    flat = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows = flat.shape[0]
    width = flat.shape[-1] // bf.block_bytes * QUANT_BLOCK
    per = flat.reshape(-1, bf.block_bytes)
    d = per[:, :2].copy().view("<f2").astype(np.float32).reshape(rows, -1)
    if fmt == "q8_0" and rule.int8_block == QUANT_BLOCK:
        return Converted(8, per[:, 2:].view(np.int8).reshape(rows, width).copy(), d, QUANT_BLOCK, True)
    if fmt == "q4_0" and rule.int4_block(width) == QUANT_BLOCK:
        qs = per[:, 2:]
        q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.int8) - np.int8(8)
        return Converted(4, q.reshape(rows, width), d, QUANT_BLOCK, True)
    w = dequantize(fmt, flat).reshape(rows, width)
    if int_bits(fmt) == 8:
        return requantize(w, 8, rule.int8_block)
    return requantize(w, 4, rule.int4_block(width))


def requantize(w: np.ndarray, bits: int, block: int | None) -> Converted:
    """float32 [rows, in] -> symmetric round-to-nearest, zero point 0, scale absmax / (2^(bits-1) - 1) per
    block of `block` inputs (None: per row). The scale is rounded to fp16 before q is computed, so q * scale
    is what the plan computes."""
    rows, width = w.shape
    if block is not None and (block <= 0 or width % block):
        raise ValueError(f"a row of {width} weights is not whole blocks of {block}")
    g = w.reshape(rows, -1, block or width)
    top = (1 << (bits - 1)) - 1
    scale = (np.abs(g).max(axis=2) / np.float32(top)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] == 0, 0, np.rint(g / scale[..., None]))
    q = np.clip(q, -top - 1, top).astype(np.int8).reshape(rows, width)
    return Converted(bits, q, scale, block, False)


def dequantized(c: Converted) -> np.ndarray:
    """float32 [rows, in]: what the pattern computes (scale as stored in fp16)."""
    rows, width = c.q.shape
    g = c.q.reshape(rows, -1, c.block or width).astype(np.float32)
    return (g * c.scale[..., None]).reshape(rows, width)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: elements in row-major order, element 2i in the low nibble of byte i."""
    flat = np.ascontiguousarray(q, dtype=np.int8).reshape(-1)
    assert flat.size % 2 == 0, flat.size
    u = flat.view(np.uint8) & np.uint8(15)
    return (u[0::2] | (u[1::2] << np.uint8(4))).tobytes()
