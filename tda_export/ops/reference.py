"""numpy reference of the TDA ops (float64 math), written from contract.SEMANTICS.

Every other realization (torch op, ONNX function, CPU and CUDA kernels) is
tested against these functions.
"""
from __future__ import annotations

import math

import numpy as np

from . import blocks
from .contract import ACTIVATIONS, NO_CLAMP, NORM_FLOOR, SCORE_NORMS, down_format, x_format_check


def activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"activation {name!r} not in {list(ACTIVATIONS)}")


def intermediate(hidden: np.ndarray, gate_up_weight: np.ndarray, act: str) -> np.ndarray:
    """z[b,t,j] in float64."""
    h = hidden.astype(np.float64)
    w = gate_up_weight.astype(np.float64)
    gate = h @ w[:, 0, :].T
    up = h @ w[:, 1, :].T
    return activation(act, gate) * up


def prompt_scores(z: np.ndarray, token_valid: np.ndarray, score_norm: str = "token_l2") -> np.ndarray:
    """Per-neuron sum over valid tokens of (normalised) squared activations: [B, I]."""
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm {score_norm!r} not in {list(SCORE_NORMS)}")
    sq = z.astype(np.float64) ** 2
    if score_norm == "token_l2":
        sq = sq / np.maximum(sq.sum(-1, keepdims=True), NORM_FLOOR)
    return (sq * token_valid.astype(np.float64)[..., None]).sum(1)


def mask_from_state(active_idx: np.ndarray, active_count: np.ndarray, intermediate_size: int) -> np.ndarray:
    """Dense 0/1 mask [B, I] from the index-list state."""
    mask = np.zeros((active_idx.shape[0], intermediate_size), dtype=np.float64)
    for b in range(active_idx.shape[0]):
        mask[b, active_idx[b, : int(active_count[b])]] = 1.0
    return mask


def sparse_gated_mlp(hidden, gate_up_weight, down_weight_t, active_idx, active_count, token_valid, scores_in,
                     activation: str = "silu", score_norm: str = "token_l2"):
    """Returns (output float64 [B,S,H], scores_out float64 [B,I])."""
    z = intermediate(hidden, gate_up_weight, activation)
    w_down = down_weight_t.astype(np.float64)
    scores_out = scores_in.astype(np.float64).copy()
    if hidden.shape[1] > 1:
        scores_out += prompt_scores(z, token_valid, score_norm)
    else:
        z = z * mask_from_state(active_idx, active_count, w_down.shape[0])[:, None, :]
    return z @ w_down, scores_out


def sparse_gated_mlp_blocks(hidden, gate_up_blocks, down_blocks_t, weight_format: str, active_idx, active_count,
                            token_valid, scores_in, activation: str = "silu", score_norm: str = "token_l2",
                            down_weight_format: str = "same", x_format: str = "dtype"):
    """SparseGatedMLP with block-quantized weights (contract.QUANTIZED_SEMANTICS): the float op on the
    dequantized float32 weights, gate/up reading blocks.quantize_x(hidden) when x_format is q8_0. gate_up_blocks uint8 [I, 2, H/32*block_bytes], down_blocks_t uint8
    [I, H/32*block_bytes] of down_format(weight_format, down_weight_format). Returns (output float64 [B,S,H],
    scores_out float64 [B,I])."""
    down = down_format(weight_format, down_weight_format)
    if x_format_check(weight_format, x_format) == "q8_0":
        hidden = blocks.quantize_x(hidden)
    return sparse_gated_mlp(hidden, blocks.dequantize(weight_format, gate_up_blocks),
                            blocks.dequantize(down, down_blocks_t), active_idx, active_count, token_valid,
                            scores_in, activation, score_norm)


def clamp_count(count: int, inter: int, density_bounds) -> int:
    """k = max(n_lo, min(count, n_hi)) of the contract, with the float32 products lo*I and hi*I."""
    lo, hi = (np.float32(v) * np.float32(inter) for v in density_bounds)
    n_lo = int(min(max(np.ceil(lo), 0), inter))
    n_hi = int(min(max(np.floor(hi), 0), inter))
    return max(n_lo, min(count, n_hi))


def rank_order(scores_row: np.ndarray) -> np.ndarray:
    """Neuron indices by descending score, equal scores by ascending index (-0 == +0)."""
    return np.lexsort((np.arange(scores_row.size), -(scores_row.astype(np.float64) + 0.0)))


def select_active(scores: np.ndarray, threshold: float, density_bounds=NO_CLAMP):
    """Returns (active_idx int32 [B,I], active_count int32 [B]) exactly as the contract specifies."""
    scores = scores.astype(np.float32)
    tau = np.float32(threshold)
    batch, inter = scores.shape
    idx = np.zeros((batch, inter), dtype=np.int32)
    count = np.zeros((batch,), dtype=np.int32)
    for b in range(batch):
        m = scores[b].max() if inter else np.float32(0)
        if m == 0:
            keep = np.ones(inter, dtype=bool)
        else:
            keep = np.ones(inter, dtype=bool) if tau <= 0 else scores[b] >= (tau * tau) * m
            k = clamp_count(int(keep.sum()), inter, density_bounds)
            keep = np.zeros(inter, dtype=bool)
            keep[rank_order(scores[b])[:k]] = True
        active = np.nonzero(keep)[0]
        idx[b, : active.size] = active
        count[b] = active.size
    return idx, count
