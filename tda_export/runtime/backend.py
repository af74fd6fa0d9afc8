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


class SlotBackend(Backend, Protocol):
    """A backend with continuous (in-flight) batching: a state of slots, each one sequence with its own length,
    positions, thresholds, density bounds and active neurons. Newcomers are prefilled into free slots and
    decode in the same steps as the sequences already there; a finished or cancelled one frees its slot at
    once. A sequence's greedy tokens do not depend on which others share its steps.

    Implemented by the native backend (C API tda_rt_join/step/release) and ONNX Runtime. The torch and
    TensorRT backends have only prefill/decode (static batches), see docs/server.md."""

    max_slots: int

    def open_slots(self):
        """An empty state."""

    def join(self, state, slots, input_ids: np.ndarray, attention_mask: np.ndarray, thresholds: np.ndarray,
             density_bounds: np.ndarray | None = None) -> np.ndarray:
        """Prefill n newcomers into free slots [n]: input_ids/attention_mask [n, S] (left padded, S >= 2),
        thresholds [n, L], density_bounds [n, L, 2] (None = no clamp) -> logits [n, V]."""

    def step(self, state, slots, tokens: np.ndarray) -> np.ndarray:
        """One decode step of every joined slot (slots [n], any order), tokens [n] -> logits [n, V]."""

    def release(self, state, slot: int) -> None:
        """Free a slot; a free one is left as it is."""

    def slot_active_counts(self, state, slot: int) -> np.ndarray:
        """[L] active MLP neurons per layer of a joined slot."""


def has_slots(backend) -> bool:
    return all(hasattr(backend, m) for m in ("open_slots", "join", "step", "release"))


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding: the first real token of each row is position 0."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)
