"""Research modes of the quality reference that engines do not run (issue 12): per-token MLP gating inside
or instead of the prompt's static mask, hindsight oracles, low-rank and low-bit predictors, LaRoSA rotations
and per-layer allocation of a gating knob. bench/quality.py and bench/quality_modes.py study them; the
product evaluator (tda_export/quality.py) runs them through `GatedHooks`, an extension of its TDAHooks.

A `TokenGating` adds per-token choices inside the prompt's mask during the masked phase (input columns of
gate/up by |x|*||W column||, up rows and down columns by |act(gate)|, down columns by |z|*||W_down column||).
Masking gives the same values as computing only the kept rows and columns; `byte_fractions` counts the
weight bytes a decode step would then stream.

Frontier studies: `neuron_density` is a per-token hindsight oracle that computes z exactly and then keeps
the neurons with the largest true contribution |z_i|*||W_down[:,i]|| (their gate and up rows and down
columns counted as streamed, the others as skipped); `pooled` replaces per-token top-k by one hindsight
threshold per layer over every token of the batch (the best a calibrated per-layer threshold could do);
`rotated` sparsifies x and z in a per-layer orthogonal basis (LaRoSA: eigenvectors of the calibration
inputs' second moment, folded into the weights offline); `predictor_rank`/`predictor_bits` make the
oracle's ranking deployable from truncated-SVD or low-bit copies of gate and up (their bytes counted).
`GatedHooks.gating` may be one TokenGating for all layers or one per layer (per-layer allocation).

Configs for `config_report`/`evaluate_configs` (with hooks_type=GatedHooks) may carry "gating".
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tda_export import arch
from tda_export.models import LoadedModel, forward
from tda_export.ops.torch_ops import rank_of
from tda_export.quality import Evaluator, Prefilled, _progress, greedy_layer_steps
from tda_export.tda import TDAHooks

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
    # the contract's rank order (descending, ties by ascending index) over the allowed entries
    return (rank_of(scores.float().masked_fill(~allowed, -math.inf)) < k[..., None]) & allowed


def describe(gating) -> dict | list | None:
    """A TokenGating (or per-layer list of them) as JSON-ready data for reports."""
    if gating is None:
        return None
    if isinstance(gating, (list, tuple)):
        return [None if g is None else dataclasses.asdict(g) for g in gating]
    return dataclasses.asdict(gating)


class GatedHooks(TDAHooks):
    """TDAHooks whose masked phase also applies `gating` (None: exactly the static mask)."""

    def __init__(self, model, score_norm: str = "token_l2"):
        super().__init__(model, score_norm)
        self.gating: TokenGating | list[TokenGating | None] | None = None  # one for all layers, or per layer
        self._norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # per layer (Q_x [H, H], Q_z [I, I]) orthogonal, for TokenGating.rotated (see `set_rotations`)
        self.rotations: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.mlps)
        self._rotated_norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._low_rank: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._quantized: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def exact(self) -> bool:
        return self.gating is None

    @contextmanager
    def configured(self, config: dict):
        """Run an evaluation config's "gating" (if any); the report gets its description."""
        self.gating = config.get("gating")
        try:
            yield {"gating": describe(self.gating)}
        finally:
            self.gating = None

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

    def masked_forward(self, layer: int, mlp, x: torch.Tensor) -> torch.Tensor:
        if self.gating_for(layer) is None:
            return super().masked_forward(layer, mlp, x)
        return self._gated_forward(layer, mlp, x)

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


def gated_continuation(ev: Evaluator, batches: list[Prefilled], prompt_len: int, gating, mode: str = "dense",
                       thresholds=None, densities=None, bounds=None):
    """Evaluator.continuation with `gating` applied inside the static mask (ev built with GatedHooks)."""
    with ev.hooks.configured({"gating": gating}):
        return ev.continuation(batches, prompt_len, mode, thresholds, densities, bounds)


@torch.no_grad()
def activation_rotations(lm: LoadedModel, windows: torch.Tensor, batch_size: int = 8):
    """Per layer (Q_x, Q_z): eigenvectors, by decreasing eigenvalue, of the second moment of the MLP's input x
    and of down's input z over calibration windows (LaRoSA's PCA rotation; dense forward passes)."""
    mlps = arch.mlp_modules(lm.model)
    moments = [[None, None] for _ in mlps]

    def accumulate(layer, slot):
        def hook(_module, args):
            v = args[0].detach().double().reshape(-1, args[0].shape[-1])
            m = v.T @ v
            moments[layer][slot] = m if moments[layer][slot] is None else moments[layer][slot] + m
        return hook

    handles = [h for layer, mlp in enumerate(mlps)
               for h in (mlp.register_forward_pre_hook(accumulate(layer, 0)),
                         mlp.down_proj.register_forward_pre_hook(accumulate(layer, 1)))]
    try:
        for b in windows.split(batch_size):
            forward(lm.model, b, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()

    def basis(m):
        _, vecs = torch.linalg.eigh(m)
        return vecs.flip(-1).float().contiguous()

    return [(basis(mx), basis(mz)) for mx, mz in moments]


def allocate_gating(ev: Evaluator, batches: list[Prefilled], prompt_len: int, make_gating, levels,
                    stop_cost: float = 0.25) -> dict:
    """TEAL-style greedy per-layer allocation of one gating knob, as a path from dense to the deepest level.

    `make_gating(level)` gives a layer's TokenGating at `levels[i]` (levels[0] = off). The cost of each
    (layer, level) alone (increase of the mean NLL per token over dense, i.e. log perplexity ratio) and the
    MLP bytes it saves are measured on these (tuning) windows; steps are then taken greedily by bytes saved
    per unit of cost, assuming additivity. Returns the sensitivity table and the path: after each step the
    per-layer level indices with the predicted saving and cost. Evaluate the path's points on other text.
    """
    n_layers = ev.hooks.num_layers
    dense = ev.continuation(batches, prompt_len, "dense")
    tokens = dense.nll.size * dense.tokens

    def gating_of(idx):
        return [make_gating(levels[i]) if i else None for i in idx]

    cost = [[0.0] for _ in range(n_layers)]
    saved = [[0.0] for _ in range(n_layers)]
    for layer in _progress(range(n_layers), "sensitivity", ev.quiet):
        for li in range(1, len(levels)):
            idx = [0] * n_layers
            idx[layer] = li
            run = gated_continuation(ev, batches, prompt_len, gating_of(idx))
            cost[layer].append(float(run.nll.sum() - dense.nll.sum()) / tokens)
            saved[layer].append(1.0 - run.byte_fractions[layer])
            if cost[layer][-1] > stop_cost:  # deeper levels only cost more; stop measuring
                break
    current, path = [0] * n_layers, []
    for layer, predicted in greedy_layer_steps(cost, saved):
        current[layer] += 1
        path.append({"levels": [levels[i] for i in current], "level_index": list(current),
                     "predicted_saving": sum(saved[la][i] for la, i in enumerate(current)) / n_layers,
                     "predicted_log_ppl_increase": predicted})
    return {"levels": list(levels), "sensitivity_cost": cost, "sensitivity_saved": saved, "path": path,
            "tuning": {"windows": len(dense.nll), "tokens_per_window": dense.tokens}}
