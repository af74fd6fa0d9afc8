"""The small interface every backend implements; the generation loop sees nothing else.

A backend runs one exported decoder for a batch: `prefill` processes left-padded
prompts densely (collecting TDA scores and selecting each sequence's active
neurons with the given per-layer thresholds, their counts clamped to the given
per-layer density bounds) and `decode` advances every
sequence by one token with its own mask and KV cache. Both return float32
logits of the last position, [B, V].
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, thresholds: np.ndarray,
                density_bounds: np.ndarray | None = None):
        """input_ids/attention_mask [B,S] int64 (left padded, S >= 2), thresholds [L] float32, density_bounds
        [L, 2] float32 (each layer's SelectActive clamp; None = no clamp) -> (logits, state)."""

    def decode(self, state, tokens: np.ndarray) -> np.ndarray:
        """tokens [B] int64 -> logits [B,V]; updates `state` in place."""

    def active_counts(self, state) -> np.ndarray:
        """[L, B] number of active MLP neurons per layer and sequence."""


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding: the first real token of each row is position 0."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)
