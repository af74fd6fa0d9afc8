"""Graph input/output names and symbolic shapes: the interface the runtime binds to."""
from __future__ import annotations

from ..ops.contract import (DENSITY_BOUNDS_INPUT, SPARSE_GATED_MLP, STATE_TENSORS, THRESHOLDS_INPUT, past_state_name,
                            present_state_name)

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
BATCH, SEQ, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


def past_key(layer: int, which: str) -> str:
    return f"past_key_values.{layer}.{which}"


def present_key(layer: int, which: str) -> str:
    return f"present.{layer}.{which}"


# the SparseGatedMLP input each piece of layer state feeds
STATE_OP_INPUT = {"scores": "scores_in", "active_idx": "active_idx", "active_count": "active_count"}
assert set(STATE_OP_INPUT) == set(STATE_TENSORS) and set(STATE_OP_INPUT.values()) <= set(SPARSE_GATED_MLP.input_names)


def tda_state_shapes(intermediate: int) -> dict[str, tuple[str, tuple]]:
    """Per-layer TDA state: state name -> (dtype, shape), read from the contract's SparseGatedMLP inputs."""
    specs = {t.name: t for t in SPARSE_GATED_MLP.inputs}
    dims = {"B": BATCH, "I": intermediate}
    return {w: (specs[i].dtype, tuple(dims[d] for d in specs[i].shape)) for w, i in STATE_OP_INPUT.items()}


__all__ = ["INPUT_IDS", "ATTENTION_MASK", "POSITION_IDS", "LOGITS", "BATCH", "SEQ", "PAST", "TOTAL", "past_key",
           "present_key", "tda_state_shapes", "STATE_TENSORS", "THRESHOLDS_INPUT", "DENSITY_BOUNDS_INPUT", "past_state_name",
           "present_state_name"]
