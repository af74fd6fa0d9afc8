"""numpy quantize / dequantize of the contract's block formats (contract.BLOCK_FORMATS).

The reference every realization of the quantized weights is checked against, and what an exporter
uses to quantize a float source: round to nearest per block exactly as the contract's `quantize` rules
(ggml's reference quantizers; tests check the bytes against the gguf package's). Rows run along the
last axis: a float array [..., H] becomes uint8 [..., H/32 * block_bytes] and back.
"""
from __future__ import annotations

import numpy as np

from .contract import BLOCK_FORMATS, QUANT_BLOCK

_NIBBLES = QUANT_BLOCK // 2


def block_format(name: str):
    """The contract's BlockFormat of a format name; ValueError naming the choices otherwise."""
    if name not in BLOCK_FORMATS:
        raise ValueError(f"weight format {name!r} is not a block format; choices: {list(BLOCK_FORMATS)}")
    return BLOCK_FORMATS[name]


def row_bytes(name: str, hidden: int) -> int:
    """Bytes of one quantized row of `hidden` weights."""
    if hidden <= 0 or hidden % QUANT_BLOCK:
        raise ValueError(f"a {name} row needs a positive multiple of {QUANT_BLOCK} weights, got {hidden}")
    return hidden // QUANT_BLOCK * block_format(name).block_bytes


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """[n] float32 -> [n, 2] little-endian binary16 bytes (round to nearest even; overflow is checked by
    quantize)."""
    with np.errstate(over="ignore"):
        return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] ints 0..15 -> [n, 16] bytes: weight k in the low nibble of byte k, weight k + 16 in the high."""
    q = q.astype(np.uint8)
    return q[:, :_NIBBLES] | (q[:, _NIBBLES:] << np.uint8(4))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """float32 1/d, 0 where d == 0 (a constant block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _quantize_blocks(name: str, w: np.ndarray) -> np.ndarray:
    """[n, 32] float32 -> [n, block_bytes] uint8."""
    if name == "q8_0":
        d = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
        v = (w * _inverse(d)[:, None]).astype(np.float64)  # the float32 product, rounded exactly below
        q = np.sign(v) * np.floor(np.abs(v) + 0.5)           # roundf: halves away from zero
        return np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)
    if name == "q4_0":
        v = np.take_along_axis(w, np.abs(w).argmax(axis=1)[:, None], axis=1)[:, 0]  # first largest |w|
        d = (v / np.float32(-8)).astype(np.float32)
        q = np.minimum(np.trunc(w * _inverse(d)[:, None] + np.float32(8.5)), 15)
        return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)
    if name == "q4_1":
        lo, hi = w.min(axis=1), w.max(axis=1)
        d = ((hi - lo) / np.float32(15)).astype(np.float32)
        q = np.minimum(np.trunc((w - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5)), 15)
        return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)
    raise AssertionError(name)


def quantize(name: str, weights: np.ndarray) -> np.ndarray:
    """float [..., H] -> uint8 [..., H/32 * block_bytes] in block format `name`."""
    fmt = block_format(name)
    w = np.asarray(weights, dtype=np.float32)
    nbytes = row_bytes(name, w.shape[-1])
    if not np.isfinite(w).all():
        raise ValueError(f"cannot quantize to {name}: the weights hold NaN or inf")
    blocks = _quantize_blocks(name, w.reshape(-1, QUANT_BLOCK))
    scales = blocks[:, :4 if name == "q4_1" else 2].copy().view("<f2")  # d (and m): fp16 fields
    if not np.isfinite(scales).all():
        raise ValueError(f"cannot quantize to {name}: a block's scale or minimum overflows fp16 (max 65504)")
    assert blocks.shape[1] == fmt.block_bytes
    return blocks.reshape(*w.shape[:-1], nbytes)


def dequantize(name: str, blocks: np.ndarray) -> np.ndarray:
    """uint8 [..., H/32 * block_bytes] in block format `name` -> float32 [..., H], exactly the contract's values."""
    fmt = block_format(name)
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    if b.ndim == 0 or b.shape[-1] % fmt.block_bytes:
        raise ValueError(f"{name} rows are whole blocks of {fmt.block_bytes} bytes; got shape {list(b.shape)}")
    flat = b.reshape(-1, fmt.block_bytes)
    d = flat[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
    if name == "q8_0":
        w = d * flat[:, 2:].view(np.int8).astype(np.float32)
    elif name == "q4_0":
        w = d * (_unpack_nibbles(flat[:, 2:]) - np.float32(8))
    else:
        m = flat[:, 2:4].copy().view("<f2").astype(np.float32)
        w = d * _unpack_nibbles(flat[:, 4:]) + m
    return w.astype(np.float32).reshape(*b.shape[:-1], b.shape[-1] // fmt.block_bytes * QUANT_BLOCK)



def quantize_x(x: np.ndarray) -> np.ndarray:
    """contract X_QUANT_SEMANTICS (x_format q8_0): float [..., H] -> float32 xq [..., H], each block of 32
    along the last axis replaced by q * d (d = max|x| / 127, flushed to 0 below the smallest normal float32,
    q = round-half-even(x * (1/d)), d = NaN for a block holding inf/NaN)."""
    v = np.asarray(x, dtype=np.float32)
    if v.shape[-1] % QUANT_BLOCK:
        raise ValueError(f"x_format q8_0 needs rows of a multiple of {QUANT_BLOCK} values, got {v.shape[-1]}")
    b = v.reshape(-1, QUANT_BLOCK)
    q, d = _x_blocks(b)
    with np.errstate(over="ignore"):
        return (q * d[:, None]).astype(np.float32).reshape(v.shape)  # q keeps the sign of a zero x


def x_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The integers and scales of quantize_x: (q int8 [..., H], d float32 [..., H/32]); for kernels and tests
    that take integer dot products. Blocks holding inf/NaN get d = NaN and q = 0."""
    v = np.asarray(x, dtype=np.float32)
    q, d = _x_blocks(v.reshape(-1, QUANT_BLOCK))
    return q.astype(np.int8).reshape(v.shape), d.reshape(*v.shape[:-1], v.shape[-1] // QUANT_BLOCK)


def _x_blocks(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 32] float32 -> (q float32 integers [n, 32], d float32 [n]): the contract's rule, d below the smallest normal
    float32 flushed to 0 (q = 0), d = NaN and q = 0 for a block holding inf/NaN."""
    finite = np.isfinite(b).all(axis=1)
    bz = np.where(finite[:, None], b, 0).astype(np.float32)
    d = (np.abs(bz).max(axis=1) / np.float32(127)).astype(np.float32)
    d = np.where(d < np.finfo(np.float32).tiny, np.float32(0), d).astype(np.float32)
    q = np.rint(bz * _inverse(d)[:, None]).astype(np.float32)  # float32 product, then half to even
    return q, np.where(finite, d, np.float32(np.nan)).astype(np.float32)
