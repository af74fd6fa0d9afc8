"""Torch backend: the exported decoder run by torch on CPU or CUDA with our TDA kernels.

It loads the weights from the engine's ONNX file (one artifact for every backend) and rebuilds the
network from the manifest's DecoderSpec (torch_decoder.py); the TDA MLP is torch_tda.py. The KV cache
and TDA state are static buffers for max_batch x max_context, so one backend serves one batch at a
time: a prefill takes the cache over, and decoding an older state is refused rather than answered with
another batch's keys. On CUDA each decode batch size and context bucket is captured once as a CUDA graph
and replayed; a step attends over its bucket (the filled part of the cache rounded up), not all slots.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..export.spec import DecoderSpec
from ..kernels.abi import MAX_BATCH
from .backend import position_ids
from .onnx_weights import load_initializers
from .torch_decoder import TorchDecoder
from .torch_tda import TdaMLP

DEFAULT_MAX_BATCH = 8
# the cache is allocated for this many slots unless asked otherwise (a 128k-context model's full
# cache would not fit next to its weights)
DEFAULT_MAX_CONTEXT = 4096


class TorchBackendError(ValueError):
    pass


class _State:
    def __init__(self, batch: int, length: int, positions: np.ndarray, counts: np.ndarray):
        self.batch, self.length = batch, length    # length: cache slots used so far
        self.next_positions = positions            # [B] rotary position of each row's next token
        self.counts = counts                       # [L, B] active neurons, fixed after prefill


class TorchBackend:
    name = "torch"

    @classmethod
    def from_engine(cls, model_path: Path, manifest: dict, **options) -> "TorchBackend":
        """The engine's own ONNX initializers, network rebuilt from the manifest's DecoderSpec."""
        if "decoder_spec" not in manifest:
            raise TorchBackendError(f"{model_path.parent}: manifest has no decoder_spec (built by an older "
                                    f"tda-export); rebuild the engine to use the torch backend")
        return cls(DecoderSpec.from_dict(manifest["decoder_spec"]), load_initializers(model_path),
                   weight_formats=manifest.get("weight_formats"), x_format=manifest.get("x_format", "dtype"),
                   **options)

    def __init__(self, spec: DecoderSpec, weights: dict[str, torch.Tensor], device: str | torch.device | None = None,
                 threads: int | None = None, max_batch: int = DEFAULT_MAX_BATCH, max_context: int | None = None,
                 cuda_graphs: bool = True, weight_formats: dict[str, str] | None = None, x_format: str = "dtype"):
        """weights: initializer name -> tensor (consumed: moved to the device and dropped from the dict);
        weight_formats: the manifest's (block-quantized tensors are dequantized at load, torch_decoder.py)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TorchBackendError("device cuda requested but torch sees no GPU")
        if not 1 <= max_batch <= MAX_BATCH:
            raise TorchBackendError(f"max_batch {max_batch} not in 1..{MAX_BATCH} (the decode kernel's limit)")
        max_context = min(max_context or DEFAULT_MAX_CONTEXT, spec.max_context)
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        self.device, self.max_batch, self.max_context = device, max_batch, max_context
        try:
            self.net = TorchDecoder(spec, weights, device, max_batch, max_context, weight_formats, x_format)
        except ValueError as e:
            raise TorchBackendError(str(e)) from None
        self.mlp = TdaMLP(self.net, spec.activation)
        self.pad_mask = torch.zeros(max_batch, max_context, dtype=torch.bool, device=device)
        self._owner: _State | None = None
        self._graphs = _DecodeGraphs(self) if device.type == "cuda" and cuda_graphs else None

    @torch.inference_mode()
    def prefill(self, input_ids, attention_mask, thresholds, density_bounds=None):
        B, S = input_ids.shape
        if B > self.max_batch:
            raise TorchBackendError(f"batch {B} > max_batch {self.max_batch} of this torch backend")
        if S >= self.max_context:
            raise TorchBackendError(f"prompt of {S} tokens leaves no room in the {self.max_context}-slot cache")
        dev = self.device
        mask = torch.from_numpy(attention_mask.astype(bool)).to(dev)
        self.pad_mask[:B].zero_()
        self.pad_mask[:B, :S] = mask
        self.mlp.token_valid = mask.float()
        self.mlp.thresholds = torch.as_tensor(np.asarray(thresholds, np.float32), device=dev)
        self.mlp.density_bounds = (None if density_bounds is None else
                                   torch.as_tensor(np.asarray(density_bounds, np.float32).reshape(-1, 2), device=dev))
        ids = torch.from_numpy(input_ids.astype(np.int64)).to(dev)
        pos = torch.from_numpy(position_ids(attention_mask)).to(dev)
        logits = self.net.forward(ids, pos, torch.zeros(1, dtype=torch.int64, device=dev), S, self.pad_mask[:B, :S],
                                  self.mlp.prefill)
        counts = torch.stack([c[:B] for c in self.mlp.count]).cpu().numpy()
        state = _State(B, S, attention_mask.sum(1).astype(np.int64), counts)
        self._owner = state
        return logits.cpu().numpy(), state

    @torch.inference_mode()
    def decode(self, state: _State, tokens):
        if state is not self._owner:
            raise TorchBackendError("this state's KV cache was taken over by a later prefill; a torch backend "
                                    "holds one batch at a time")
        if state.length >= self.max_context:
            raise TorchBackendError(f"context full: {self.max_context} cache slots (max_context)")
        B, slot = state.batch, state.length
        self.pad_mask[:B, slot] = True
        tokens_t = torch.from_numpy(np.asarray(tokens, np.int64).reshape(B, 1))
        pos_t = torch.from_numpy(state.next_positions.reshape(B, 1))
        if self._graphs is not None:
            logits = self._graphs.run(B, tokens_t, pos_t, slot)
        else:
            dev = self.device
            logits = self.net.forward(tokens_t.to(dev), pos_t.to(dev), torch.tensor([slot], device=dev), slot + 1,
                                      self.pad_mask[:B, :slot + 1], self.mlp.decode)
        state.length += 1
        state.next_positions = state.next_positions + 1
        return logits.cpu().numpy()

    def active_counts(self, state: _State) -> np.ndarray:
        return state.counts


# Smallest context bucket of a captured decode step; buckets double up to max_context.
MIN_CONTEXT_BUCKET = 256


def context_buckets(max_context: int, smallest: int | None = None) -> list[int]:
    """Attention lengths decode graphs are captured for: smallest, 2x, 4x, ... below max_context, then
    max_context. A step at cache slot s uses the first bucket > s, so it reads at most about twice the
    filled cache (and never less than `smallest` slots) instead of all max_context slots."""
    out, b = [], smallest or MIN_CONTEXT_BUCKET
    while b < max_context:
        out.append(b)
        b *= 2
    return out + [max_context]


def bucket_for(slot: int, buckets: list[int]) -> int:
    """The first bucket that holds cache slot `slot` (0-based)."""
    for b in buckets:
        if slot < b:
            return b
    raise ValueError(f"slot {slot} beyond the largest bucket {buckets[-1]}")


class _DecodeGraphs:
    """One CUDA graph per (decode batch size, context bucket), reading static input buffers. Shapes are
    static within a bucket (pad_mask hides its unused slots, which hold zeros), and on CUDA the MLP always
    runs the kernel, so a graph is valid for any thresholds and any step of its bucket. All graphs share
    one memory pool: they replay one at a time on one stream."""

    def __init__(self, backend: TorchBackend):
        dev = backend.device
        self.backend = backend
        self.tokens = torch.zeros(backend.max_batch, 1, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(backend.max_batch, 1, dtype=torch.int64, device=dev)
        self.slot = torch.zeros(1, dtype=torch.int64, device=dev)
        self.buckets = context_buckets(backend.max_context)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _step(self, B: int, kv_len: int) -> torch.Tensor:
        b = self.backend
        return b.net.forward(self.tokens[:B], self.positions[:B], self.slot, kv_len, b.pad_mask[:B, :kv_len],
                             b.mlp.decode)

    def run(self, B: int, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        self.tokens[:B].copy_(tokens, non_blocking=True)
        self.positions[:B].copy_(positions, non_blocking=True)
        self.slot.fill_(slot)
        key = (B, bucket_for(slot, self.buckets))
        if key not in self.graphs:
            # warm-up on a side stream (lazy inits, allocator) then capture; both rewrite this step's
            # cache slot with the same values the replay writes, so they leave no trace
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(*key)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._step(*key)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out
