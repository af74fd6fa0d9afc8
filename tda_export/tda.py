"""TDA on a Hugging Face model in torch: prompt scores, masks, and masked MLPs.

`TDAHooks` swaps each gated MLP's forward for one that computes
z = act(gate(x)) * up(x) once and then, by phase:
  "dense"  -> down(z)
  "score"  -> down(z), and accumulates the contract's prompt scores
  "masked" -> down(z * mask)   (same values as computing only active neurons)
The score and mask formulas are the contract's (ops/contract.py); this module
is the quality reference that eval and calibration use.

Beyond the contract's static mask (research modes, evaluator only): `clamp`
bounds a threshold mask's kept count per sequence and layer, and a
`TokenGating` adds per-token choices inside the prompt's mask during the
masked phase (input columns of gate/up by |x|*||W column||, up rows and down
columns by |act(gate)|, down columns by |z|*||W_down column||). Masking gives
the same values as computing only the kept rows and columns; `byte_fractions`
counts the weight bytes a decode step would then stream.

Frontier studies (research, evaluator only): `neuron_density` is a per-token
hindsight oracle that computes z exactly and then keeps the neurons with the
largest true contribution |z_i|*||W_down[:,i]|| (their gate and up rows and down
columns counted as streamed, the others as skipped); `pooled` replaces per-token
top-k by one hindsight threshold per layer over every token of the batch (the
best a calibrated per-layer threshold could do); `rotated` sparsifies x and z in
a per-layer orthogonal basis (LaRoSA: eigenvectors of the calibration inputs'
second moment, folded into the weights offline); `predictor_rank`/`predictor_bits`
make the oracle's ranking deployable from truncated-SVD or low-bit copies of gate
and up (their bytes counted). `TDAHooks.gating` may be one TokenGating for all
layers or one per layer (per-layer allocation).
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from dataclasses import dataclass

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


def clamped_threshold_mask(scores: torch.Tensor, tau: float, d_min: float, d_max: float) -> torch.Tensor:
    """threshold_mask with each sequence's kept count clamped to [ceil(d_min*I), ceil(d_max*I)].

    A threshold keeps the highest scores, so the clamped mask is the top-k with k = clamp(count).
    """
    inter = scores.shape[-1]
    count = threshold_mask(scores, tau).sum(-1)
    lo, hi = (min(inter, max(0, math.ceil(d * inter - 1e-9))) for d in (d_min, d_max))
    return keep_top(scores.float(), count.clamp(lo, max(lo, hi)))


def keep_top(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k[...] highest entries along the last axis (k broadcasts over the leading axes)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < k[..., None]


# uniform quantizer step per bit width, in units of a weight row's standard deviation (close to the
# mean-squared-error optimum for Gaussian weights with 2^b - 1 levels)
QUANT_STEP = {2: 1.2, 3: 0.6, 4: 0.34}


def quantize_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row uniform symmetric quantization to 2^bits - 1 levels (dequantized, float32)."""
    w = w.float()
    step = QUANT_STEP[bits] * w.std(dim=-1, keepdim=True).clamp_min(1e-12)
    top = 2 ** (bits - 1) - 1
    return (w / step).round().clamp(-top, top) * step


@dataclass(frozen=True)
class TokenGating:
    """Per-token gating inside the prompt's mask, for every decode token (fractions kept, 1.0 = off).

    x_density: of the hidden inputs to gate/up (skips weight columns), scored |x_j|*||[W_gate;W_up][:,j]||
      ("wina") or |x_j| ("teal");
    gate_density: of the masked neurons, by |act(gate)| (skips up rows and down columns; CATS-like);
    z_density: of the neurons still kept, by |z_i|*||W_down[:,i]|| ("wina") or |z_i| ("teal")
      (skips down columns);
    neuron_density (hindsight oracle): of the neurons still kept, by the true contribution
      |z_i|*||W_down[:,i]|| of the exact z (skips gate and up rows and down columns);
    pooled: each fraction is kept over all tokens of the batch and layer at once (one hindsight
      threshold per layer) instead of per token;
    rotated: x and z are sparsified after the layer's orthogonal rotations (`TDAHooks.rotations`,
      LaRoSA); the rotated weights stream the same bytes per kept column;
    predictor_rank r (with neuron_density): choose the neurons by a rank-r SVD estimate
      |act(gate_r(x)) * up_r(x)|*||W_down[:,i]|| instead of the exact z (a training-free predictor one can
      deploy); its 2r(H+I) weights are counted as streamed;
    predictor_bits b (with neuron_density): the same estimate from b-bit copies of W_gate and W_up (per-row
      uniform symmetric quantization, 2^b - 1 levels); counted as 2b/16 of one matrix per token (16-bit weights).
    """
    x_density: float = 1.0
    gate_density: float = 1.0
    z_density: float = 1.0
    score: str = "wina"
    neuron_density: float = 1.0
    pooled: bool = False
    rotated: bool = False
    predictor_rank: int = 0
    predictor_bits: int = 0

    def __post_init__(self):
        if self.score not in ("wina", "teal"):
            raise ValueError(f"TokenGating score {self.score!r} not in ['wina', 'teal']")
        if self.predictor_rank < 0 or (self.predictor_rank and self.neuron_density >= 1.0):
            raise ValueError("TokenGating predictor_rank must be >= 0 and needs neuron_density < 1")
        if self.predictor_bits not in QUANT_STEP and self.predictor_bits != 0 or (
                self.predictor_bits and (self.neuron_density >= 1.0 or self.predictor_rank)):
            raise ValueError(f"TokenGating predictor_bits must be 0 or one of {sorted(QUANT_STEP)}, needs "
                             f"neuron_density < 1 and excludes predictor_rank")
        if self.rotated and (self.gate_density < 1.0 or self.neuron_density < 1.0):
            raise ValueError("TokenGating rotated applies to x and z only: gate_density and neuron_density "
                             "select neurons, which a rotation of z mixes")
        for name in ("x_density", "gate_density", "z_density", "neuron_density"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"TokenGating {name} must be in (0, 1], got {getattr(self, name)}")


def keep_fraction(scores: torch.Tensor, allowed: torch.Tensor | None, fraction: float,
                  pooled: bool = False) -> torch.Tensor:
    """Per row of the last axis, keep the ceil(fraction * #allowed) highest scores among the allowed.

    `pooled`: one selection over all rows at once (a single threshold), so rows keep different counts.
    """
    if allowed is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    if pooled:
        flat = keep_fraction(scores.reshape(1, -1), allowed.reshape(1, -1), fraction)
        return flat.reshape(scores.shape)
    count = allowed.sum(-1)
    k = torch.ceil(count * fraction - 1e-9).long()
    return keep_top(scores.float().masked_fill(~allowed, -math.inf), k) & allowed


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
        self.gating: TokenGating | list[TokenGating | None] | None = None  # one for all layers, or per layer
        # per layer: [tokens, sums of gate, up and down weight fractions streamed, and of other weights
        # streamed (a predictor's, in units of one H x I matrix)] over masked-phase tokens
        self.bytes_seen = [[0.0] * 5 for _ in self.mlps]
        self._norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # per layer (Q_x [H, H], Q_z [I, I]) orthogonal, for TokenGating.rotated (see `set_rotations`)
        self.rotations: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.mlps)
        self._rotated_norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._low_rank: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._quantized: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def column_norms(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(||[W_gate; W_up][:, j]|| over hidden j, ||W_down[:, i]|| over intermediate i) of a layer."""
        if layer not in self._norms:
            mlp = self.mlps[layer]
            gu = (mlp.gate_proj.weight.float().square().sum(0) + mlp.up_proj.weight.float().square().sum(0)).sqrt()
            self._norms[layer] = (gu, mlp.down_proj.weight.float().norm(dim=0))
        return self._norms[layer]

    def set_rotations(self, rotations):
        """Per-layer (Q_x, Q_z) orthogonal matrices: x is sparsified as x @ Q_x (weights W_gate Q_x, W_up Q_x),
        z as z @ Q_z (weights W_down Q_z)."""
        self.rotations = list(rotations)
        self._rotated_norms = {}

    def rotated_column_norms(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """column_norms of the rotated weights [W_gate; W_up] Q_x and W_down Q_z."""
        if layer not in self._rotated_norms:
            mlp, (qx, qz) = self.mlps[layer], self.rotations[layer]
            gu = torch.cat([mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()]) @ qx
            self._rotated_norms[layer] = (gu.norm(dim=0), (mlp.down_proj.weight.float() @ qz).norm(dim=0))
        return self._rotated_norms[layer]

    def low_rank(self, layer: int, rank: int):
        """Rank-`rank` factors (A [I, r], B [r, H]) of W_gate and W_up, A = U S, B = V^T (truncated SVD)."""
        if layer not in self._low_rank:
            mlp = self.mlps[layer]
            out = []
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
                out.append((u * sv, vh))
            self._low_rank[layer] = out
        return [(a[:, :rank], b[:rank]) for a, b in self._low_rank[layer]]

    def quantized(self, layer: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, bits)
        if key not in self._quantized:
            mlp = self.mlps[layer]
            self._quantized[key] = (quantize_rows(mlp.gate_proj.weight, bits), quantize_rows(mlp.up_proj.weight, bits))
        return self._quantized[key]

    def gating_for(self, layer: int) -> "TokenGating | None":
        g = self.gating
        return g[layer] if isinstance(g, (list, tuple)) else g

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
            if hooks.phase == "masked" and hooks.gating_for(layer) is not None:
                return hooks._gated_forward(layer, mlp, x)
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
            elif hooks.phase == "masked":
                mask = hooks.masks[layer]
                z = z * mask[:, None, :].to(z.dtype)
                frac = mask.float().mean(-1, keepdim=True).expand(z.shape[:2])
                hooks._count_bytes(layer, frac, frac, frac)
            return mlp.down_proj(z)

        return forward

    def _gated_forward(self, layer: int, mlp, x: torch.Tensor) -> torch.Tensor:
        g, static = self.gating_for(layer), self.masks[layer][:, None, :]   # [B, 1, I]
        if g.rotated:
            if self.rotations[layer] is None:
                raise ValueError(f"TokenGating rotated needs TDAHooks.rotations for layer {layer}")
            (qx, qz), (gu_norm, down_norm) = self.rotations[layer], self.rotated_column_norms(layer)
        else:
            gu_norm, down_norm = self.column_norms(layer)
        wina = g.score == "wina"
        hidden, inter = x.shape[-1], static.shape[-1]
        x_frac = torch.ones(x.shape[:2], device=x.device)
        if g.x_density < 1.0:
            xr = x.float() @ qx if g.rotated else x
            keep_x = keep_fraction(xr.abs().float() * (gu_norm if wina else 1.0), None, g.x_density, g.pooled)
            x = ((xr * keep_x) @ qx.T).to(x.dtype) if g.rotated else x * keep_x.to(x.dtype)
            x_frac = keep_x.sum(-1) / hidden
        a = mlp.act_fn(mlp.gate_proj(x))
        kept = static.expand(a.shape)
        gate_rows = kept.sum(-1) / inter
        if g.gate_density < 1.0:
            kept = keep_fraction(a.abs(), kept, g.gate_density, g.pooled)
        up_rows = kept.sum(-1) / inter
        z = a * mlp.up_proj(x) * kept.to(a.dtype)
        extra = 0.0
        if g.neuron_density < 1.0:
            if g.predictor_rank:
                (ag, bg), (au, bu) = self.low_rank(layer, g.predictor_rank)
                xf = x.float()
                estimate = mlp.act_fn((xf @ bg.T) @ ag.T) * ((xf @ bu.T) @ au.T)
                extra = 2 * g.predictor_rank * (hidden + inter) / (hidden * inter)
            elif g.predictor_bits:
                qg, qu = self.quantized(layer, g.predictor_bits)
                xf = x.float()
                estimate = mlp.act_fn(xf @ qg.T) * (xf @ qu.T)
                extra = 2 * g.predictor_bits / 16
            else:
                # hindsight: the exact z is known before choosing, so skipped neurons skip gate and up rows too
                estimate = z
            kept = keep_fraction(estimate.abs().float() * down_norm, kept, g.neuron_density, g.pooled)
            z = z * kept.to(z.dtype)
            gate_rows = up_rows = kept.sum(-1) / inter
        if g.z_density < 1.0:
            zr = z.float() @ qz if g.rotated else z
            allowed = None if g.rotated else kept
            kept = keep_fraction(zr.abs().float() * (down_norm if wina else 1.0), allowed, g.z_density, g.pooled)
            z = ((zr * kept) @ qz.T).to(z.dtype) if g.rotated else z * kept.to(z.dtype)
        self._count_bytes(layer, gate_rows * x_frac, up_rows * x_frac, kept.sum(-1) / inter, extra)
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

    def set_masks(self, mode: str, thresholds=None, densities=None, clamp: float | None = None):
        """Masks from the accumulated scores: per-layer thresholds (tda) or densities (topk).

        With `clamp` c, a tda mask keeps between (d - c) and (d + c) of each sequence's neurons, d the
        layer's entry of `densities`.
        """
        if mode == "tda" and clamp is not None:
            self.masks = [clamped_threshold_mask(s, float(t), float(d) - clamp, float(d) + clamp)
                          for s, t, d in zip(self.scores, thresholds, densities)]
        elif mode == "tda":
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
