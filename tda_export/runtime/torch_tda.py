"""TDA MLP for the torch backend: dense prefill that scores neurons, per-layer selection, sparse decode.

Prefill is compute-bound, so it runs as torch GEMMs and only the score reduction is ours
(tda_kernels::prefill_scores); tda_kernels::select_active turns scores, the layer's threshold and density
bounds into the sorted active list, and decode streams only those rows (tda_kernels::sparse_gated_mlp_decode).
The state lives in static [max_batch, ...] buffers so a captured CUDA graph can read it in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels  # noqa: F401  (registers the tda_kernels:: ops)
from ..ops.torch_ops import mask_from_state
from .torch_decoder import TorchDecoder

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
               "relu": F.relu}

# CPU only: above this fraction of neurons active (union over the batch), or for any batch > 1, a layer
# decodes as a dense torch MLP with the inactive neurons zeroed — the same result — because MKL's
# AVX2/512 GEMM beats our portable SSE2 kernel there: bench/RESULTS.md measured the kernel at 0.93x dense
# at density 0.5 on SmolLM2 shapes and 1.25x on 2048x8192, 0.5x at density 1.0; and SmolLM2 batch 4
# decoding at 0.49-0.85x its own dense with the kernel. The CUDA kernel is used at every density and batch.
CPU_DENSE_ABOVE = 0.5
CPU_KERNEL_MAX_BATCH = 1


class TdaMLP:
    def __init__(self, net: TorchDecoder, activation: str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} not in {list(ACTIVATIONS)}")
        self.net, self.activation, self.act = net, activation, ACTIVATIONS[activation]
        B, inter, dev = net.max_batch, net.spec.intermediate, net.device
        L = len(net.layers)
        self.idx = [torch.zeros(B, inter, dtype=torch.int32, device=dev) for _ in range(L)]
        self.count = [torch.zeros(B, dtype=torch.int32, device=dev) for _ in range(L)]
        # CPU dense-path layers: their 0/1 neuron mask in the compute dtype; None where the kernel runs
        self.dense_mask: list[torch.Tensor | None] = [None] * L
        self.token_valid: torch.Tensor | None = None
        self.thresholds: torch.Tensor | None = None
        self.density_bounds: torch.Tensor | None = None  # [L, 2], None = no clamp
        # decode kernel algorithm (tda_decode_args_t.version): 0 = the library's default; read when a
        # step runs or is captured, so a captured CUDA graph keeps the version it was captured with
        self.kernel_version = 0

    def _z(self, n: int, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up for every neuron: [B, S, I]."""
        layer = self.net.layers[n]
        gu = (self.net.xq(h) @ layer.gate_up.view(-1, layer.gate_up.shape[-1]).T).unflatten(-1, (-1, 2))
        return self.act(gu[..., 0]) * gu[..., 1]

    def prefill(self, n: int, h: torch.Tensor) -> torch.Tensor:
        """Dense MLP over the prompt; selects layer n's active neurons at thresholds[n] as a side effect."""
        z = self._z(n, h)
        B = h.shape[0]
        scores = torch.ops.tda_kernels.prefill_scores(z, self.token_valid, torch.zeros(B, z.shape[-1], device=z.device))
        bounds = self.density_bounds[n] if self.density_bounds is not None else None
        idx, cnt = torch.ops.tda_kernels.select_active(scores, self.thresholds[n], bounds)
        self.idx[n][:B].copy_(idx)
        self.count[n][:B].copy_(cnt)
        self.dense_mask[n] = self._dense_mask(idx, cnt) if self.net.device.type == "cpu" else None
        return z @ self.net.layers[n].down_t

    def _dense_mask(self, idx: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor | None:
        B, inter = idx.shape
        mask = mask_from_state(idx, cnt, inter)
        if B <= CPU_KERNEL_MAX_BATCH and mask.any(0).float().mean() <= CPU_DENSE_ABOVE:
            return None
        return mask.to(self.net.dtype)[:, None, :]

    def decode(self, n: int, h: torch.Tensor) -> torch.Tensor:
        """One token per sequence, computing only the active neurons (or, on CPU above CPU_DENSE_ABOVE,
        all of them with the inactive ones zeroed)."""
        layer, B = self.net.layers[n], h.shape[0]
        if self.dense_mask[n] is not None:
            return (self._z(n, h) * self.dense_mask[n]) @ layer.down_t
        # gate/up read x as the engine's x_format says; the weights are dequantized floats here
        return torch.ops.tda_kernels.sparse_gated_mlp_decode(self.net.xq(h), layer.gate_up, layer.down_t, self.idx[n][:B],
                                                            self.count[n][:B], self.activation, True,
                                                            self.kernel_version)
