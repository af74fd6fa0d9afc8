"""TDA on a Hugging Face model in torch: prompt scores, the contract's selection, and masked MLPs.

`TDAHooks` swaps each gated MLP's forward for one that computes
z = act(gate(x)) * up(x) once and then, by phase:
  "dense"  -> down(z)
  "score"  -> down(z), and accumulates the contract's prompt scores
  "masked" -> down(z * mask)   (same values as computing only active neurons)
The score formula is the contract's (ops/contract.py), and masks come from its
SelectActive op (the torch op, ops/torch_ops.py) with the thresholds and density
bounds an engine feeds, so eval and calibration measure the selection engines
make. `byte_fractions` counts the MLP weight bytes a decode step streams.

Research modes that engines do not run (per-token gating, predictors, rotations)
extend `TDAHooks` beside the bench scripts that study them (bench/gating_modes.py).
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager

import torch

from . import arch
from .ops import torch_ops
from .ops.contract import NO_CLAMP, NORM_FLOOR, SCORE_NORMS

MODES = ("tda", "topk", "dense")


def token_contributions(z: torch.Tensor, token_valid: torch.Tensor | None, score_norm: str) -> torch.Tensor:
    """[B,S,I] intermediate activations -> [B,S,I] float32 (normalised) squares, 0 for padding tokens."""
    sq = z.float().square()
    if score_norm == "token_l2":
        sq = sq / sq.sum(-1, keepdim=True).clamp_min(NORM_FLOOR)
    elif score_norm != "none":
        raise ValueError(f"score_norm {score_norm!r} not in {list(SCORE_NORMS)}")
    if token_valid is not None:
        sq = sq * token_valid.to(sq.dtype)[..., None]
    return sq


def prompt_scores(z: torch.Tensor, token_valid: torch.Tensor | None, score_norm: str) -> torch.Tensor:
    """[B,S,I] intermediate activations -> [B,I] float32 sum of (normalised) squares over valid tokens."""
    return token_contributions(z, token_valid, score_norm).sum(1)


def select_mask(scores: torch.Tensor, threshold: float, bounds=NO_CLAMP) -> torch.Tensor:
    """The contract's SelectActive (the torch op) on [B, I] scores as a dense bool mask [B, I].

    bounds (lo, hi) clamp each sequence's kept count; (d, d) keeps the top ceil(d*I) (the topk control)."""
    dev = scores.device
    idx, count = torch_ops.select_active(scores.float(), torch.tensor(float(threshold), dtype=torch.float32, device=dev),
                                         torch.tensor([float(b) for b in bounds], dtype=torch.float32, device=dev))
    return torch_ops.mask_from_state(idx, count, scores.shape[-1])


def relative_scores(scores: torch.Tensor) -> torch.Tensor:
    """r_j = sqrt(s_j / max_k s_k) in [0, 1] (1 everywhere if all scores are 0)."""
    m = scores.amax(-1, keepdim=True)
    return torch.where(m > 0, (scores / m.clamp_min(NORM_FLOOR)).sqrt(), torch.ones_like(scores))


class TDAHooks:
    """Context manager that puts every gated MLP of `model` under TDA control."""

    def __init__(self, model, score_norm: str = "token_l2"):
        if score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm {score_norm!r} not in {list(SCORE_NORMS)}")
        self.mlps = arch.mlp_modules(model)
        self.score_norm = score_norm
        self.phase = "dense"
        self.token_valid: torch.Tensor | None = None
        self.scores: list[torch.Tensor | None] = [None] * len(self.mlps)
        # With prefix_lengths set, a score pass also records each layer's scores over the first n
        # tokens for every n (causal attention makes them equal to a pass over just that prefix).
        self.prefix_lengths: tuple[int, ...] = ()
        self.prefix_scores: list[dict[int, torch.Tensor]] = [{} for _ in self.mlps]
        self.masks: list[torch.Tensor | None] = [None] * len(self.mlps)
        # per layer: [tokens, sums of gate, up and down weight fractions streamed, and of other weights
        # streamed (in units of one H x I matrix)] over masked-phase tokens
        self.bytes_seen = [[0.0] * 5 for _ in self.mlps]

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    @property
    def exact(self) -> bool:
        """The masked phase computes exactly the static mask (extensions that gate further say False)."""
        return True

    @contextmanager
    def configured(self, config: dict):
        """Extension point: read more of an evaluation config while it runs; yields extra report fields."""
        yield {}

    def __enter__(self):
        for layer, mlp in enumerate(self.mlps):
            mlp.forward = types.MethodType(self._forward_fn(layer), mlp)
        return self

    def __exit__(self, *exc):
        for mlp in self.mlps:
            del mlp.forward
        return False

    def _forward_fn(self, layer: int):
        hooks = self

        def forward(mlp, x):
            if hooks.phase == "masked":
                return hooks.masked_forward(layer, mlp, x)
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            if hooks.phase == "score":
                sq = token_contributions(z, hooks.token_valid, hooks.score_norm)
                if hooks.prefix_lengths:
                    cum = sq.cumsum(1)
                    # clones: a view keeps the whole [B, S, I] fp32 cumsum alive, per layer and batch (117 MB
                    # each at Mistral-7B width and 8 x 256 tokens: 30 GB for a 64-prompt 7B calibration)
                    hooks.prefix_scores[layer] = {n: cum[:, n - 1].clone() for n in hooks.prefix_lengths
                                                  if n <= z.shape[1]}
                    s = cum[:, -1].clone()
                    del cum
                else:
                    s = sq.sum(1)
                prev = hooks.scores[layer]
                hooks.scores[layer] = s if prev is None else prev + s
            return mlp.down_proj(z)

        return forward

    def masked_forward(self, layer: int, mlp, x: torch.Tensor) -> torch.Tensor:
        """down(z * mask) with the layer's static [B, I] mask, counting the bytes it streams."""
        mask = self.masks[layer]
        z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        z = z * mask[:, None, :].to(z.dtype)
        frac = mask.float().mean(-1, keepdim=True).expand(z.shape[:2])
        self._count_bytes(layer, frac, frac, frac)
        return mlp.down_proj(z)

    def _count_bytes(self, layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     extra: float = 0.0):
        """Fractions of gate, up and down weights streamed by each [B, S] token of a masked pass (`extra`:
        other weights streamed per token, in units of one H x I matrix, e.g. a predictor's)."""
        if self.token_valid is not None:
            v = self.token_valid.float()
            gate, up, down = gate * v, up * v, down * v
            n = float(v.sum())
        else:
            n = float(gate.numel())
        acc = self.bytes_seen[layer]
        acc[0] += n
        acc[1] += float(gate.sum())
        acc[2] += float(up.sum())
        acc[3] += float(down.sum())
        acc[4] += extra * n

    def reset_bytes(self):
        self.bytes_seen = [[0.0] * 5 for _ in self.mlps]

    def byte_fractions(self) -> list[float]:
        """Per layer, the fraction of its MLP weight bytes streamed per masked-phase token so far."""
        return [(g + u + d + e) / (3 * n) if n else 1.0 for n, g, u, d, e in self.bytes_seen]

    def reset_scores(self):
        self.scores = [None] * len(self.mlps)
        self.prefix_scores = [{} for _ in self.mlps]

    def set_masks(self, mode: str, thresholds=None, densities=None, bounds=None):
        """Masks from the accumulated scores through the contract's SelectActive, as an engine selects.

        tda: per-layer `thresholds`, each sequence's count clamped per layer to `bounds` (per-layer (lo, hi),
        as engines feed: contract.density_bounds(densities, margin); None: thresholds alone);
        topk: per-layer `densities` d as bounds (d, d), the top ceil(d*I) of each sequence (GRIFFIN control);
        dense: every neuron.
        """
        n = len(self.scores)
        if mode == "tda":
            bounds = [NO_CLAMP] * n if bounds is None else bounds
            self.masks = [select_mask(s, t, b) for s, t, b in zip(self.scores, thresholds, bounds)]
        elif mode == "topk":
            self.masks = [select_mask(s, 1.0, (d, d)) for s, d in zip(self.scores, densities)]
        elif mode == "dense":
            self.masks = [torch.ones_like(s, dtype=torch.bool) for s in self.scores]
        else:
            raise ValueError(f"mode {mode!r} not in {list(MODES)}")

    @contextmanager
    def phase_(self, phase: str, token_valid: torch.Tensor | None = None):
        self.phase, self.token_valid = phase, token_valid
        try:
            yield
        finally:
            self.phase, self.token_valid = "dense", None


def thresholds_for_density(relative: torch.Tensor, density: float) -> float:
    """Per-layer threshold such that a fraction `density` of the pooled calibration r-values is kept.

    density 1.0 gives 0 (keep everything, exactly dense) rather than the
    smallest calibration value, which unseen prompts would undercut.
    """
    if density >= 1.0:
        return 0.0
    flat = relative.flatten().float()
    k = max(1, math.ceil(density * flat.numel()))
    return float(flat.topk(k).values[-1])


def mlp_bytes_per_token(config, bytes_per_param: float) -> float:
    """Bytes of MLP weights one decode step streams per layer when dense."""
    return 3 * config.hidden_size * config.intermediate_size * bytes_per_param
