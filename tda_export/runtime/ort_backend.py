"""ONNX Runtime backend: the portable path.

The TDA nodes run through their model-local ONNX functions (the reference
computation), so this backend is correct everywhere ONNX Runtime runs but does
not get faster with sparsity. Past tensors are fed back from the matching
present outputs, named as optimum/onnxruntime-genai do.

Continuous batching (runtime/backend.py SlotBackend) keeps the running sequences as left-padded batch
tensors, one group per thresholds table: the graph's SelectActive re-selects every step with the one
tda_thresholds it is fed, so sequences of different densities (or per-length tables) decode in separate
calls of the same step. A newcomer is prefilled and its past tensors left-padded into its group; a
released row is dropped, and columns that only padding fills any more are cut off.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..ops.contract import BLOCK_FORMATS, DENSITY_BOUNDS_INPUT, NO_CLAMP, THRESHOLDS_INPUT
from .backend import position_ids
from .heap import release_heap

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64}


def past_name(present: str) -> str:
    """present.N.key -> past_key_values.N.key; present_tda.N.x -> past_tda.N.x."""
    if present.startswith("present_tda."):
        return "past_tda." + present[len("present_tda."):]
    return "past_key_values." + present[len("present."):]


class OrtBackend:
    name = "onnxruntime"
    max_slots = 1 << 30  # no bound of its own: slots are rows of its batch tensors

    def __init__(self, model_path: Path, manifest: dict, threads: int | None = None, providers=None,
                 low_memory: bool = False):
        """low_memory: no constant folding and no CPU memory arena, for a few runs of a block engine. Folding
        dequantizes every weight to float32 when the session is made (7.3 GB for one Mistral-7B-shaped q4_0
        layer with its embedding and head, +3.8 GB per layer); unfolded, each run dequantizes again, and
        without the arena the float32 weights freed after their MatMul go back to malloc instead of an arena
        that keeps its largest extent (1.8 -> 1.5 GB at 1 layer, 3.7 -> 2.8 GB at 4: bench/build_scale.py)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_cpu_mem_arena = not low_memory
        opts.log_severity_level = 3  # tda_thresholds is an overridable initializer on purpose; skip that warning
        self.session = ort.InferenceSession(str(model_path), opts,
                                            providers=providers or ort.get_available_providers(),
                                            disabled_optimizers=["ConstantFolding"] if low_memory else [])
        if any(f in BLOCK_FORMATS for f in (manifest.get("weight_formats") or {}).values()):
            release_heap()
        self.manifest = manifest
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # engines exported before the clamp have no such input (and select by thresholds alone)
        self.has_bounds = manifest.get("density_bounds_input") == DENSITY_BOUNDS_INPUT
        self.presents = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]
        missing = [past_name(p) for p in self.presents if past_name(p) not in self.inputs]
        if missing:
            raise ValueError(f"{model_path}: outputs without matching past inputs: {missing[:3]}")

    def _empty_past(self, batch: int) -> dict:
        """Zero-length KV cache and zero TDA state for a prefill."""
        m, feeds = self.manifest, {}
        for p in self.presents:
            name = past_name(p)
            dtype = NP_DTYPES[self.inputs[name].type]
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((batch, m["num_kv_heads"], 0, m["head_dim"]), dtype)
            elif name.endswith(".active_count"):
                feeds[name] = np.zeros((batch,), dtype)
            else:
                feeds[name] = np.zeros((batch, m["intermediate_size"]), dtype)
        return feeds

    @staticmethod
    def _feeds(state: dict, input_ids: np.ndarray, positions: np.ndarray) -> dict:
        feeds = {"input_ids": input_ids, "attention_mask": state["mask"], "position_ids": positions,
                 THRESHOLDS_INPUT: state["thresholds"], **state["past"]}
        if state.get("bounds") is not None:
            feeds[DENSITY_BOUNDS_INPUT] = state["bounds"]
        return feeds

    def _run(self, state: dict, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = self._feeds(state, input_ids, positions)
        outs = self.session.run(["logits"] + self.presents, feeds)
        state["past"] = {past_name(p): v for p, v in zip(self.presents, outs[1:])}
        return outs[0][:, -1].astype(np.float32)

    def prefill(self, input_ids, attention_mask, thresholds, density_bounds=None):
        thresholds = np.asarray(thresholds, np.float32)
        bounds = None
        if self.has_bounds:  # fed even when None: the initializer holds the built density's clamp, not none
            bounds = np.asarray(density_bounds if density_bounds is not None else [NO_CLAMP] * thresholds.size,
                                np.float32).reshape(thresholds.size, 2)
        state = {"mask": attention_mask.astype(np.int64), "thresholds": thresholds, "bounds": bounds,
                 "past": self._empty_past(input_ids.shape[0])}
        logits = self._run(state, input_ids.astype(np.int64), position_ids(state["mask"]))
        return logits, state

    def decode(self, state, tokens):
        mask = state["mask"]
        positions = mask.sum(1, keepdims=True).astype(np.int64)  # next position of each row
        state["mask"] = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
        return self._run(state, tokens.astype(np.int64)[:, None], positions)

    # --- continuous batching ---
    def open_slots(self) -> "_Slots":
        return _Slots()

    def join(self, state: "_Slots", slots, input_ids, attention_mask, thresholds, density_bounds=None):
        slots = [int(x) for x in slots]
        thresholds = np.asarray(thresholds, np.float32)
        bounds = None if density_bounds is None else np.asarray(density_bounds, np.float32)
        taken = [x for x in slots if x in state.where]
        if taken or len(set(slots)) != len(slots):
            raise ValueError(f"join: slots {taken or slots} are in use or named twice")
        logits = np.empty((len(slots), self.manifest["vocab_size"]), np.float32)
        keys: dict[bytes, list[int]] = {}
        for b in range(len(slots)):
            keys.setdefault(thresholds[b].tobytes() + (b"" if bounds is None else bounds[b].tobytes()), []).append(b)
        for key, rows in keys.items():
            ids, mask = _trim(input_ids[rows], attention_mask[rows])
            out, new = self.prefill(ids, mask, thresholds[rows[0]], None if bounds is None else bounds[rows[0]])
            logits[rows] = out
            group = state.groups.get(key)
            if group is None:
                state.groups[key] = group = {"rows": [], **new}
            else:
                _append(group, new)
            group["rows"] += [slots[b] for b in rows]
            for b in rows:
                state.where[slots[b]] = key
        return logits

    def step(self, state: "_Slots", slots, tokens):
        slots, tokens = [int(x) for x in slots], np.asarray(tokens, np.int64)
        if sorted(slots) != sorted(state.where):
            raise ValueError(f"step: the ONNX Runtime backend steps all its joined slots {sorted(state.where)} "
                             f"together, got {slots}")
        logits = np.empty((len(slots), self.manifest["vocab_size"]), np.float32)
        at = {x: i for i, x in enumerate(slots)}
        for group in state.groups.values():
            order = [at[x] for x in group["rows"]]
            logits[order] = OrtBackend.decode(self, group, tokens[order])  # not an instance override (tests)
        return logits

    def release(self, state: "_Slots", slot: int) -> None:
        key = state.where.pop(int(slot), None)
        if key is None:
            return
        group = state.groups[key]
        keep = [i for i, x in enumerate(group["rows"]) if x != slot]
        if not keep:
            del state.groups[key]
            return
        group["rows"] = [group["rows"][i] for i in keep]
        group["mask"] = group["mask"][keep]
        group["past"] = {k: v[keep] for k, v in group["past"].items()}
        lead = int((group["mask"].cumsum(1) == 0).sum(1).min())  # columns only padding fills
        if lead:
            group["mask"] = group["mask"][:, lead:]
            group["past"] = {k: v[:, :, lead:] if k.startswith("past_key_values.") else v
                             for k, v in group["past"].items()}

    def slot_active_counts(self, state: "_Slots", slot: int) -> np.ndarray:
        group = state.groups[state.where[int(slot)]]
        return self.active_counts(group)[:, group["rows"].index(int(slot))]

    def active_counts(self, state):
        return np.stack([state["past"][f"past_tda.{layer}.active_count"]
                         for layer in range(self.manifest["num_layers"])])


class _Slots:
    """The running sequences of a continuous batch: groups (one per thresholds table) of prefill states whose
    rows are the slots in group["rows"]; where: slot -> its group's key."""

    def __init__(self):
        self.groups: dict[bytes, dict] = {}
        self.where: dict[int, bytes] = {}


def _trim(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the columns that are padding in every row (keeping at least 2: a prefill's width)."""
    lead = min(int((mask.cumsum(1) == 0).sum(1).min()), mask.shape[1] - 2)
    return ids[:, lead:], mask[:, lead:]


def _append(group: dict, new: dict) -> None:
    """Append a prefill state's rows to a group's, left-padding the shorter one's mask and KV cache."""
    a, b = group["mask"].shape[1], new["mask"].shape[1]
    width = max(a, b)

    def pad(x: np.ndarray, by: int, axis: int) -> np.ndarray:
        if not by:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (by, 0)
        return np.pad(x, widths)

    group["mask"] = np.concatenate([pad(group["mask"], width - a, 1), pad(new["mask"], width - b, 1)])
    group["past"] = {k: np.concatenate([pad(v, width - a, 2), pad(new["past"][k], width - b, 2)])
                     if k.startswith("past_key_values.") else np.concatenate([v, new["past"][k]])
                     for k, v in group["past"].items()}
