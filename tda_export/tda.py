"""TDA on a Hugging Face model in torch: prompt scores, masks, and masked MLPs.

`TDAHooks` swaps each gated MLP's forward for one that computes
z = act(gate(x)) * up(x) once and then, by phase:
  "dense"  -> down(z)
  "score"  -> down(z), and accumulates the contract's prompt scores
  "masked" -> down(z * mask)   (same values as computing only active neurons)
The score and mask formulas are the contract's (ops/contract.py); this module
is the quality reference that eval and calibration use.
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager

import torch

from . import arch
from .ops.contract import NORM_FLOOR, SCORE_NORMS

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


def threshold_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Contract SelectActive as a dense bool mask [B,I]: keep r = sqrt(s/max s) >= tau."""
    scores = scores.float()
    m = scores.amax(-1, keepdim=True)
    tau32 = torch.tensor(tau, dtype=torch.float32)
    keep = scores >= (tau32 * tau32) * m
    return keep | (m == 0) | (tau32 <= 0)


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """GRIFFIN-style control: keep the ceil(d*I) highest-scoring neurons per sequence."""
    inter = scores.shape[-1]
    k = min(inter, max(0, math.ceil(density * inter - 1e-9)))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return keep


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

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

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
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            if hooks.phase == "score":
                sq = token_contributions(z, hooks.token_valid, hooks.score_norm)
                if hooks.prefix_lengths:
                    cum = sq.cumsum(1)
                    # clones: a slice would keep this layer's whole [B, S, I] cumsum alive
                    hooks.prefix_scores[layer] = {n: cum[:, n - 1].clone() for n in hooks.prefix_lengths
                                                  if n <= z.shape[1]}
                    s = cum[:, -1].clone()
                    del cum
                else:
                    s = sq.sum(1)
                prev = hooks.scores[layer]
                hooks.scores[layer] = s if prev is None else prev + s
            elif hooks.phase == "masked":
                z = z * hooks.masks[layer][:, None, :].to(z.dtype)
            return mlp.down_proj(z)

        return forward

    def reset_scores(self):
        self.scores = [None] * len(self.mlps)
        self.prefix_scores = [{} for _ in self.mlps]

    def set_masks(self, mode: str, thresholds=None, densities=None):
        """Masks from the accumulated scores: per-layer thresholds (tda) or densities (topk)."""
        if mode == "tda":
            self.masks = [threshold_mask(s, float(t)) for s, t in zip(self.scores, thresholds)]
        elif mode == "topk":
            self.masks = [topk_mask(s, float(d)) for s, d in zip(self.scores, densities)]
        elif mode == "dense":
            self.masks = [torch.ones_like(s, dtype=torch.bool) for s in self.scores]
        else:
            raise ValueError(f"mode {mode!r} not in {list(MODES)}")

    def realised_density(self) -> list[float]:
        return [m.float().mean().item() for m in self.masks]

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


def mlp_bytes_per_token(config, bytes_per_param: int) -> int:
    """Bytes of MLP weights one decode step streams per layer when dense."""
    return 3 * config.hidden_size * config.intermediate_size * bytes_per_param
