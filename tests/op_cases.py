"""Random inputs for the TDA ops, shared by the torch and ONNX realization tests."""
from __future__ import annotations

import numpy as np

from tda_export.ops import blocks
from tda_export.ops.contract import BLOCK_FORMATS

H, I = 24, 40


def masks(rng, batch: int = 3, inter: int = I):
    """(name, active_idx, active_count): empty, full, single, odd and per-sequence-different masks."""
    def state(sets):
        idx = np.zeros((len(sets), inter), np.int32)
        for b, s in enumerate(sets):
            s = np.sort(np.asarray(s, np.int64))
            idx[b, : s.size] = s
        return idx, np.array([len(s) for s in sets], np.int32)

    out = [("empty", *state([[]] * batch)), ("full", *state([range(inter)] * batch)),
           ("single", *state([[inter - 1]] * batch)), ("odd", *state([range(1, inter, 2)] * batch))]
    out.append(("mixed", *state([rng.choice(inter, size=n, replace=False)
                                 for n in (0, min(7, inter), inter, 1)][:batch])))
    return out


def mlp_inputs(rng, batch: int, seq: int, dtype=np.float32):
    hidden = rng.normal(size=(batch, seq, H)).astype(dtype)
    gate_up = (rng.normal(size=(I, 2, H)) * 0.3).astype(dtype)
    down_t = (rng.normal(size=(I, H)) * 0.3).astype(dtype)
    token_valid = (rng.random((batch, seq)) > 0.3).astype(np.float32)
    scores_in = rng.random((batch, I)).astype(np.float32)
    return hidden, gate_up, down_t, token_valid, scores_in


# Block-quantized weights (contract.BLOCK_FORMATS): H a multiple of 32, I odd.
QH, QI = 64, 13


def quant_mlp_inputs(rng, weight_format: str, batch: int, seq: int, dtype=np.float32, down_format: str | None = None):
    """mlp_inputs with the weights as uint8 blocks (gate_up [QI, 2, QH/32*bytes], down_t [QI, QH/32*bytes], in
    down_format's blocks if given) of scaled normal weights, so blocks of different ranges and signs occur."""
    hidden = rng.normal(size=(batch, seq, QH)).astype(dtype)
    scale = rng.uniform(0.05, 0.6, size=(QI, 1, 1))
    gate_up = blocks.quantize(weight_format, rng.normal(size=(QI, 2, QH)) * scale)
    down_t = blocks.quantize(down_format or weight_format, rng.normal(size=(QI, QH)) * scale[:, 0])
    token_valid = (rng.random((batch, seq)) > 0.3).astype(np.float32)
    scores_in = rng.random((batch, QI)).astype(np.float32)
    return hidden, gate_up, down_t, token_valid, scores_in


def any_blocks(rng, weight_format: str, rows: int) -> np.ndarray:
    """[rows, block_bytes] arbitrary bytes with finite fp16 fields, the edge values among them (zero, -0,
    subnormals, the smallest normal, fp16 max): every nibble and int8 value."""
    fmt = BLOCK_FORMATS[weight_format]
    raw = rng.integers(0, 256, (rows, fmt.block_bytes), dtype=np.uint8)
    n_fp16 = 2 if weight_format == "q4_1" else 1
    scales = (rng.standard_normal((rows, n_fp16)) * 10.0 ** rng.integers(-6, 4, (rows, 1))).astype(np.float16)
    edges = np.array([0.0, -0.0, 6e-8, -1.2e-7, 6.1e-5, 6.104e-5, 65504.0, -65504.0], np.float16)
    scales[: edges.size] = edges[:, None]
    raw[:, : 2 * n_fp16] = scales.view(np.uint8)
    return raw


def score_cases(rng):
    """(scores [B, I], tau) covering the dense fallbacks, ties at the threshold and ordinary cases."""
    s = rng.random((3, I)).astype(np.float32)
    s[1, :] = 0.0                       # no valid prompt token -> dense
    s[2, 5] = s[2].max() * np.float32(0.25)  # exactly at tau=0.5
    return [(s, 0.5), (s, 0.0), (s, -1.0), (s, 0.9), (s, 1.0), (s, 2.0), (rng.random((1, I)).astype(np.float32), 0.3)]


def bound_cases(rng):
    """(scores [B, I], tau, density_bounds) for the clamp: bounds that bind from below and from above, crossed
    bounds, ties at the cut, odd and single-neuron widths, batch 0, all-zero rows (no clamp) and no clamp."""
    s = rng.random((4, I)).astype(np.float32)
    s[1, :] = 0.0                                   # no valid prompt token: dense, never clamped
    s[2, ::3] = np.float32(0.75)                    # ties across the cut, -0/+0 in row 3
    s[3, :10], s[3, 10:20] = np.float32(0.0), np.float32(-0.0)
    odd = rng.random((3, 37)).astype(np.float32)
    odd[0, 4] = odd[0, 9] = odd[0].max()            # a tie at the top
    one = rng.random((2, 1)).astype(np.float32)
    ties = np.repeat(rng.random((2, 1)).astype(np.float32), I, 1)
    return [(s, 0.5, (0.0, 1.0)), (s, 0.9, (0.45, 0.55)), (s, 0.1, (0.45, 0.55)), (s, 0.5, (0.5, 0.5)),
            (s, 0.0, (0.2, 0.3)), (s, 2.0, (0.0, 1.0)), (s, 2.0, (0.25, 1.0)), (s, 0.3, (0.7, 0.2)),
            (s, 0.5, (-1.0, 2.0)), (s, 0.99, (1.0, 1.0)), (s, 0.0, (0.0, 0.0)),
            (odd, 0.5, (0.33, 0.37)), (odd, 0.95, (0.4, 0.6)), (odd, 0.05, (0.4, 0.6)),
            (one, 0.5, (0.5, 0.5)), (one, 0.5, (0.0, 0.0)), (ties, 0.5, (0.3, 0.6)), (ties, 0.5, (0.0, 0.33)),
            (np.zeros((0, I), np.float32), 0.5, (0.4, 0.6))]


def x_cases(rng, rows: int = 24, width: int = 256) -> np.ndarray:
    """float32 [rows, width] for x_format q8_0 (blocks.quantize_x): random blocks over ~80 decades, then edge
    blocks: all zero (d = 0), -0, one nonzero value, halves (max 127 * 2^e so 1/d is exact and x * (1/d) lands on
    k + 0.5: ties to even), values just off the halves, float32 max, blocks whose d is subnormal or rounds to 0
    (the contract flushes d below the smallest normal float32: a zero block; ggml's rule would give 1/d = inf
    there), and blocks holding +inf, -inf or NaN (d = NaN)."""
    n = width // 32
    x = (rng.standard_normal((rows, n, 32)) * 10.0 ** rng.integers(-38, 38, (rows, n, 1))).astype(np.float32)
    halves = (np.arange(32) - 15.5).astype(np.float32)                         # -15.5 .. 15.5
    halves[0] = 127.0                                                          # max 127: d = 2^e exactly
    edges = [np.zeros(32), -np.zeros(32), np.r_[np.zeros(31), -3.0], halves, halves * np.float32(2.0 ** -20),
             -halves * np.float32(2.0 ** 40), np.nextafter(halves, np.float32(np.inf)),
             np.nextafter(halves, np.float32(-np.inf)), np.r_[np.finfo(np.float32).max, -np.ones(31) * 1e38],
             np.linspace(-1, 1, 32) * 1e-44, np.linspace(-1, 1, 32) * 1e-40, np.linspace(-1, 1, 32) * 1e-37,
             np.r_[np.inf, np.ones(31)], np.r_[np.ones(31), -np.inf], np.r_[np.zeros(5), np.nan, np.zeros(26)]]
    flat = x.reshape(-1, 32)
    flat[: len(edges)] = np.asarray(edges, np.float32)
    return flat.reshape(rows, width)


def same_floats(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit for bit, except that any NaN equals any NaN (realizations differ in NaN sign and payload)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    nan = np.isnan(want)
    return got.shape == want.shape and np.array_equal(np.isnan(got), nan) and \
        np.array_equal(got[~nan].view(np.int32), want[~nan].view(np.int32))


def poison_x(hidden: np.ndarray, value: float, cells) -> np.ndarray:
    """hidden [B, S, H] with x[b, t, k] = value for each (b, t, k) in cells."""
    x = hidden.copy()
    for b, t, k in cells:
        x[b, t, k] = value
    return x
