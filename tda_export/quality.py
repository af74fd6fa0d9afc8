"""Calibration and quality evaluation of TDA on a loaded model.

Perplexity protocol (matches generation): each window of P + C tokens is split
into a prompt (first P tokens, run dense, scores collected) and a continuation
(C tokens, teacher forced). The first continuation token is predicted by the
dense prefill; the rest are predicted with the sequence's fixed TDA mask.
Because the prompt is dense, its KV cache and scores are shared by every mask
configuration, which makes per-layer sensitivity sweeps cheap.

Selection is an engine's (tda.TDAHooks.set_masks: the contract's SelectActive):
thresholds from the calibration table of the prompt's length, each sequence's
count clamped per layer to (d - margin, d + margin), margin = the engines'
DEFAULT_DENSITY_MARGIN, unless a caller passes margin None (thresholds alone,
for studying them). So eval's density and perplexity are an exported engine's.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import Calibration, density_key
from .models import LoadedModel, forward
from .ops.contract import DEFAULT_DENSITY_MARGIN, density_bounds
from .tda import TDAHooks, mlp_bytes_per_token, relative_scores, thresholds_for_density
from .recipes import engine_dtype
from .text import HELD_IN_FRACTION

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BUDGET_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def _progress(iterable, desc: str, quiet: bool, total=None):
    return tqdm(iterable, desc=desc, total=total, disable=quiet, file=sys.stderr, leave=False)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]


def token_windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens, spread evenly over `ids`."""
    slots = ids.numel() // length
    if slots < count:
        raise ValueError(f"text has {ids.numel()} tokens: too short for {count} windows of {length} tokens")
    stride = slots // count
    return torch.stack([ids[i * stride * length: (i * stride + 1) * length] for i in range(count)])


PASSAGE_TOKENS = 16  # passages this long shared by calibration and evaluation windows count as overlap
PASSAGE_SAMPLE = 8  # keep one passage hash in PASSAGE_SAMPLE (content-defined, so alignment-free)


def passage_hashes(windows: torch.Tensor) -> np.ndarray:
    """[N, L] token ids -> [N, L - PASSAGE_TOKENS + 1] uint64 hashes of every PASSAGE_TOKENS-token passage."""
    a = windows.numpy().astype(np.uint64)
    win = np.lib.stride_tricks.sliding_window_view(a, PASSAGE_TOKENS, axis=-1)
    powers = np.uint64(0x100000001B3) ** np.arange(PASSAGE_TOKENS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (win * powers).sum(-1, dtype=np.uint64)
        h ^= h >> np.uint64(30)  # splitmix64 finaliser: low bits depend on every token
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def passage_sketch(windows: torch.Tensor) -> list[str]:
    """A compact record of the text windows calibration read (stored in the calibration file)."""
    h = passage_hashes(windows).ravel()
    return sorted({f"{v:016x}" for v in h[h % np.uint64(PASSAGE_SAMPLE) == 0]})


def overlapping_windows(windows: torch.Tensor, sketch) -> list[int]:
    """Indices of windows sharing at least two sampled passages with a calibration sketch."""
    if not sketch:
        return []
    seen = {int(v, 16) for v in sketch}
    out = []
    for i, row in enumerate(passage_hashes(windows)):
        sampled = row[row % np.uint64(PASSAGE_SAMPLE) == 0]
        if sum(int(v) in seen for v in sampled) >= 2:
            out.append(i)
    return out


@dataclass
class Prefilled:
    """A batch after its dense prompt pass: shared by every mask configuration."""
    ids: torch.Tensor           # [B, P + C]
    cache: object               # the prompt's KV cache (copied before each continuation)
    first_logits: torch.Tensor  # [B, V] logits predicting token P
    scores: list                # per layer [B, I]
    prefix_scores: list         # per layer {n: [B, I] scores over the first n tokens} (if requested)
    dense_top1: torch.Tensor | None = None  # [B, C] dense argmax per continuation position, once measured


@dataclass
class Continuation:
    """One mask configuration over all windows: what the statistics below are computed from."""
    nll: np.ndarray             # [W] summed NLL of each window's continuation tokens
    tokens: int                 # continuation tokens per window
    density: np.ndarray         # [W, L] static mask density per window and layer
    top1: np.ndarray | None     # [W] agreement of the teacher-forced argmax with dense (positions 1..C-1)
    byte_fractions: list        # [L] MLP weight bytes streamed per token, as a fraction of dense

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.sum() / (self.nll.size * self.tokens))


def bootstrap_increase(dense: Continuation, other: Continuation, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Relative perplexity increase of `other` over `dense` on the same windows and its paired bootstrap
    percentile interval over windows: (point, low, high)."""
    rng = np.random.default_rng(seed)
    diff = (other.nll - dense.nll) / dense.tokens
    idx = rng.integers(0, diff.size, (resamples, diff.size))
    boot = np.exp(diff[idx].mean(1)) - 1.0
    tail = (1.0 - level) / 2
    return float(np.exp(diff.mean()) - 1.0), float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))


def bootstrap_mean(values: np.ndarray, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-window values and its bootstrap percentile interval."""
    rng = np.random.default_rng(seed)
    boot = values[rng.integers(0, values.size, (resamples, values.size))].mean(1)
    tail = (1.0 - level) / 2
    return float(values.mean()), float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))


def selection_bounds(mode: str, densities, margin: float | None):
    """Per-layer SelectActive density bounds an engine feeds for per-layer target `densities` (None: no
    clamp, for mode tda with margin None and for the modes that do not threshold)."""
    if mode != "tda" or margin is None:
        return None
    return density_bounds(densities, margin)


class Evaluator:
    """`hooks_type`: TDAHooks, or a research extension of it (bench/gating_modes.py)."""

    def __init__(self, lm: LoadedModel, score_norm: str = "token_l2", batch_size: int = 8, quiet: bool = False,
                 hooks_type=TDAHooks):
        self.lm, self.batch_size, self.quiet = lm, batch_size, quiet
        self.hooks = hooks_type(lm.model, score_norm)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, prompt_len: int, keep_cache: bool = True) -> list[Prefilled]:
        """Dense prompt passes collecting scores; without `keep_cache` (calibration) the KV cache is dropped."""
        out = []
        batches = list(ids.split(self.batch_size))
        with self.hooks:
            for b in _progress(batches, "prefill", self.quiet):
                self.hooks.reset_scores()
                with self.hooks.phase_("score"):
                    # only the last position's logits are used: skip the LM head over the rest of the prompt
                    logits, cache = forward(self.lm.model, b[:, :prompt_len], logits_to_keep=1)
                # clone: a slice of fp32 logits is a view that would keep its whole base tensor alive
                out.append(Prefilled(b, cache if keep_cache else None, logits[:, -1].float().clone(),
                                     list(self.hooks.scores), list(self.hooks.prefix_scores)))
                del logits, cache
        return out

    @torch.no_grad()
    def continuation(self, batches: list[Prefilled], prompt_len: int, mode: str, thresholds=None, densities=None,
                     bounds=None) -> "Continuation":
        """Teacher-forced continuation of every window under one mask configuration (`bounds`: per-layer
        density bounds, None for thresholds alone; see TDAHooks.set_masks)."""
        nll, top1, dens = [], [], []
        self.hooks.reset_bytes()
        with self.hooks:
            for p in batches:
                self.hooks.scores = p.scores
                self.hooks.set_masks(mode, thresholds, densities, bounds)
                dens.append(torch.stack([m.float().mean(-1) for m in self.hooks.masks], 1).cpu())  # [B, L]
                with self.hooks.phase_("masked"):
                    logits, _ = forward(self.lm.model, p.ids[:, prompt_len:-1], copy.deepcopy(p.cache))
                logits = torch.cat([p.first_logits[:, None].to(logits.device), logits.float()], 1)
                targets = p.ids[:, prompt_len:].to(logits.device)  # --device cuda: the model's device
                nll.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double().sum(1).cpu())
                argmax = logits.argmax(-1)
                if p.dense_top1 is None and mode == "dense" and self.hooks.exact:
                    p.dense_top1 = argmax
                if p.dense_top1 is not None:
                    top1.append((argmax == p.dense_top1)[:, 1:].double().mean(1).cpu())  # token 0 is dense
                del logits
        return Continuation(torch.cat(nll).numpy(), targets.shape[1], torch.cat(dens).numpy(),
                            torch.cat(top1).numpy() if top1 else None, self.hooks.byte_fractions())

    def continuation_nll(self, batches: list[Prefilled], prompt_len: int, mode: str, thresholds=None,
                         densities=None, bounds=None) -> tuple[float, int, list[float]]:
        """(summed NLL over continuation tokens, token count, realised density per layer)."""
        c = self.continuation(batches, prompt_len, mode, thresholds, densities, bounds)
        return float(c.nll.sum()), c.nll.size * c.tokens, c.density.mean(0).tolist()

    def perplexity(self, batches, prompt_len, mode, thresholds=None, densities=None,
                   bounds=None) -> tuple[float, list[float]]:
        nll, n, dens = self.continuation_nll(batches, prompt_len, mode, thresholds, densities, bounds)
        return math.exp(nll / n), dens

    @torch.no_grad()
    def greedy(self, prompts: torch.Tensor, new_tokens: int, mode: str, thresholds=None, densities=None,
               bounds=None):
        """Greedy generation with a dense prompt pass and a fixed mask: [N, new_tokens] token ids."""
        outs = []
        with self.hooks:
            for b in prompts.split(self.batch_size):
                self.hooks.reset_scores()
                with self.hooks.phase_("score"):
                    logits, cache = forward(self.lm.model, b, logits_to_keep=1)
                self.hooks.set_masks(mode, thresholds, densities, bounds)
                tok = logits[:, -1].argmax(-1)
                gen = [tok]
                with self.hooks.phase_("masked"):
                    for _ in range(new_tokens - 1):
                        logits, cache = forward(self.lm.model, tok[:, None], cache)
                        tok = logits[:, -1].argmax(-1)
                        gen.append(tok)
                outs.append(torch.stack(gen, 1))
        return torch.cat(outs)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Position-wise token agreement and mean index of the first divergence (= length if none)."""
    same = reference == other
    first = torch.where(same.all(1), torch.full_like(same[:, 0], same.shape[1], dtype=torch.long),
                        (~same).float().argmax(1))
    return {"token_agreement": same.float().mean().item(), "first_divergence": first.float().mean().item(),
            "identical_sequences": same.all(1).float().mean().item()}


PROMPT_LENGTHS = (2, 4, 8, 16, 32, 64, 128, 256)


def calibrate_thresholds(ev: Evaluator, prompts: torch.Tensor, densities,
                         lengths=()) -> dict[str, list[float]] | dict[int, dict[str, list[float]]]:
    """Per-layer thresholds for each density from pooled relative scores of calibration prompts.

    With `lengths`, one table per prompt length n, from the first n tokens of each prompt (one pass).
    """
    ev.hooks.prefix_lengths = tuple(lengths)
    try:
        batches = ev.prefill(prompts, prompts.shape[1], keep_cache=False)
    finally:
        ev.hooks.prefix_lengths = ()

    def table(scores_of):
        rel = [torch.cat([relative_scores(scores_of(p, layer)) for p in batches])
               for layer in range(ev.hooks.num_layers)]
        return {density_key(d): [thresholds_for_density(r, d) for r in rel] for d in densities}

    if not lengths:
        return table(lambda p, layer: p.scores[layer])
    return {n: table(lambda p, layer: p.prefix_scores[layer][n]) for n in lengths}


def allocate_budget(ev: Evaluator, batches: list[Prefilled], prompt_len: int, thresholds: dict[str, list[float]],
                    max_increase: float, levels=BUDGET_LEVELS, margin: float | None = DEFAULT_DENSITY_MARGIN) -> dict:
    """Greedy per-layer densities maximising MLP bytes saved with perplexity within budget.

    Sensitivity of each (layer, level) is measured alone; steps are taken in
    order of bytes saved per predicted perplexity cost assuming additivity, then
    the combination is measured and the last steps undone until it fits.
    Every measurement selects as engines do: each layer clamped to its level +- `margin` (None: thresholds alone).
    """
    n_layers = ev.hooks.num_layers
    base, _ = ev.perplexity(batches, prompt_len, "dense")

    def ppl_for(level_idx: list[int]) -> float:
        dens = [levels[i] for i in level_idx]
        ths = [thresholds[density_key(d)][layer] for layer, d in enumerate(dens)]
        return ev.perplexity(batches, prompt_len, "tda", ths, bounds=selection_bounds("tda", dens, margin))[0]

    cost = [[0.0] for _ in range(n_layers)]  # cost[layer][level index] = relative ppl increase alone
    sweep = _progress(range(n_layers), "sensitivity", ev.quiet)
    for layer in sweep:
        for li in range(1, len(levels)):
            idx = [0] * n_layers
            idx[layer] = li
            cost[layer].append(ppl_for(idx) / base - 1.0)
            if cost[layer][-1] > 4 * max_increase:  # deeper levels only cost more; stop measuring
                break
    greedy = greedy_layer_steps(cost, [[1.0 - levels[i] for i in range(len(c))] for c in cost], max_increase)
    steps = [layer for layer, _ in greedy]
    predicted = greedy[-1][1] if greedy else 0.0
    current = [steps.count(layer) for layer in range(n_layers)]
    measured = ppl_for(current) / base - 1.0
    while measured > max_increase and steps:
        current[steps.pop()] -= 1
        measured = ppl_for(current) / base - 1.0
    densities = [levels[i] for i in current]
    return {"max_ppl_increase": max_increase, "densities": densities,
            "thresholds": [thresholds[density_key(d)][layer] for layer, d in enumerate(densities)],
            "predicted_increase": predicted, "measured_increase": measured, "dense_ppl": base,
            "mean_density": sum(densities) / n_layers, "sensitivity": cost, "steps": steps,
            "levels": list(levels), "density_margin": margin}


def greedy_layer_steps(cost, saved, max_cost: float = math.inf) -> list[tuple[int, float]]:
    """Greedy path through per-layer levels: each step deepens the layer whose next level saves the most
    per unit of cost, costs assumed additive (cost[layer][i], saved[layer][i]: of level i alone; level 0
    is off, 0 and 0) and their sum kept within `max_cost`. Returns [(layer, predicted cost after the step)]."""
    current, predicted, steps = [0] * len(cost), 0.0, []
    while True:
        best = None
        for layer, li in enumerate(current):
            if li + 1 >= len(cost[layer]):
                continue
            step_cost = max(cost[layer][li + 1] - cost[layer][li], 1e-6)
            if predicted + step_cost > max_cost:
                continue
            gain = (saved[layer][li + 1] - saved[layer][li]) / step_cost
            if best is None or gain > best[0]:
                best = (gain, layer, step_cost)
        if best is None:
            return steps
        _, layer, step_cost = best
        current[layer] += 1
        predicted += step_cost
        steps.append((layer, predicted))


def hold_budget(ev: Evaluator, batches: list[Prefilled], prompt_len: int, thresholds: dict[str, list[float]],
                budget: dict, confidence: float = 0.9) -> dict:
    """Back a tuned allocation off until it holds on validation windows disjoint from tuning.

    The allocation after its first k greedy steps is accepted when the one-sided `confidence` upper
    bound of its perplexity increase (paired bootstrap over validation windows) is within the budget;
    the largest such k is found by bisection (more steps never cost less, up to noise). k = 0 is dense.
    Selection is clamped as in `allocate_budget`, with the budget's density_margin.
    """
    levels, steps, n_layers = budget["levels"], budget["steps"], ev.hooks.num_layers
    dense = ev.continuation(batches, prompt_len, "dense")

    def allocation(k: int) -> list[float]:
        idx = [0] * n_layers
        for layer in steps[:k]:
            idx[layer] += 1
        return [levels[i] for i in idx]

    checked = {}

    def check(k: int) -> bool:
        dens = allocation(k)
        run = ev.continuation(batches, prompt_len, "tda", [thresholds[density_key(d)][layer]
                                                            for layer, d in enumerate(dens)],
                              bounds=selection_bounds("tda", dens, budget.get("density_margin")))
        upper = bootstrap_increase(dense, run, level=2 * confidence - 1)[2]
        checked[k] = (bootstrap_increase(dense, run), upper)
        return upper <= budget["max_ppl_increase"]

    good, bad = 0, len(steps) + 1
    if check(len(steps)):
        good = len(steps)
    else:
        bad = len(steps)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if check(mid) else (good, mid)
    if good not in checked:
        check(good)  # k = 0 (dense) holds by construction; measure it for the report
    (point, low, high), upper = checked[good]
    densities = allocation(good)
    return {**budget, "densities": densities,
            "thresholds": [thresholds[density_key(d)][layer] for layer, d in enumerate(densities)],
            "mean_density": sum(densities) / n_layers, "tuned_steps": len(steps), "kept_steps": good,
            "validation": {"windows": len(dense.nll), "tokens_per_window": dense.tokens, "confidence": confidence,
                           "increase": point, "ci95": [low, high], "upper_bound": upper,
                           "checks": {str(k): {"increase": v[0][0], "upper_bound": v[1]}
                                      for k, v in sorted(checked.items())}}}


def build_calibration(lm: LoadedModel, text: str, text_desc: str, densities, sequences: int, prompt_len: int,
                      score_norm: str, max_ppl_increase: float | None, default_density: float,
                      batch_size: int = 8, quiet: bool = False, tune_sequences: int = 16,
                      continuation: int = 64, validation_sequences: int = 32, confidence: float = 0.9,
                      levels=BUDGET_LEVELS, margin: float | None = DEFAULT_DENSITY_MARGIN) -> Calibration:
    """Thresholds per prompt length for each density; with `max_ppl_increase`, a per-layer budget tuned and
    validated under the engines' selection (clamp +- `margin`; None: thresholds alone)."""
    ev = Evaluator(lm, score_norm, batch_size, quiet)
    grid = sorted(set(DEFAULT_GRID) | set(densities) | set(levels) | {default_density})
    ids = tokenize(lm.tokenizer, text)
    # Thresholds come from the first 60% of the text; a budget is tuned on the next 20% and must
    # hold on the disjoint last 20%.
    cuts = [ids.numel() * 6 // 10, ids.numel() * 8 // 10]
    lengths = sorted(set(PROMPT_LENGTHS) | {prompt_len})
    calib = token_windows(ids[:cuts[0]], sequences, max(lengths))
    read = [calib]
    by_length = calibrate_thresholds(ev, calib, grid, lengths)
    thresholds = by_length[prompt_len]
    budget = None
    if max_ppl_increase is not None:
        tune = token_windows(ids[cuts[0]:cuts[1]], tune_sequences, prompt_len + continuation)
        val = token_windows(ids[cuts[1]:], validation_sequences, prompt_len + continuation)
        read += [tune, val]
        budget = allocate_budget(ev, ev.prefill(tune, prompt_len), prompt_len, thresholds, max_ppl_increase,
                                 levels, margin)
        budget = hold_budget(ev, ev.prefill(val, prompt_len), prompt_len, thresholds, budget, confidence)
        default = {"kind": "budget", "densities": budget["densities"], "thresholds": budget["thresholds"]}
    else:
        key = density_key(default_density)
        default = {"kind": "density", "densities": [default_density] * ev.hooks.num_layers,
                   "thresholds": thresholds[key]}
    c = lm.config
    return Calibration(model=lm.name, fingerprint=lm.fingerprint(), num_layers=c.num_hidden_layers,
                       intermediate_size=c.intermediate_size, score_norm=score_norm,
                       text={"source": text_desc, "sequences": sequences, "prompt_tokens": prompt_len,
                             "passages": sorted(set().union(*(passage_sketch(w) for w in read)))},
                       thresholds=thresholds, default=default, budget=budget,
                       by_prompt_length={str(n): t for n, t in by_length.items()})


def engine_dtype_of(lm: LoadedModel, dtype: str | None = None) -> str:
    """The dtype of the engine whose MLP bytes are counted: `dtype`, else what `build` would use."""
    return dtype or engine_dtype(lm.source.recipe)


def bytes_per_param(lm: LoadedModel, dtype: str | None = None) -> float:
    """Bytes of one MLP weight in the engine: its float dtype, or a block format's bytes per 32 weights / 32."""
    from .ops.contract import BLOCK_FORMATS, QUANT_BLOCK

    dtype = engine_dtype_of(lm, dtype)
    if "+" in dtype:  # export/quantize.mlp_label: gate/up in one block format, down in another
        gate_up, down = dtype.split("+")
        return (2 * bytes_per_param(lm, gate_up) + bytes_per_param(lm, down)) / 3
    if dtype in BLOCK_FORMATS:
        return BLOCK_FORMATS[dtype].block_bytes / QUANT_BLOCK
    return 4 if dtype == "float32" else 2


def evaluate_configs(lm: LoadedModel, text: str, text_desc: str, configs: list[dict], sequences: int = 32,
                     prompt_len: int = 128, continuation: int = 64, generate_prompts: int = 8,
                     generate_tokens: int = 32, score_norm: str = "token_l2", batch_size: int = 8,
                     quiet: bool = False, calibration_passages=None, on_prefilled=None,
                     hooks_type=TDAHooks) -> list[dict]:
    """Evaluate several mask configurations against one dense baseline on the same held-out windows.

    Each config: {"mode", "thresholds", "densities", "requested_density", "clamp" (the density margin of
    the engines' clamp; absent or None: thresholds alone), "threshold_table" (the calibration's prompt
    length the thresholds are for)}. The dense prompt passes and the dense greedy generations are shared,
    so a sweep costs little more than one evaluation. `calibration_passages` (a calibration file's
    text.passages) makes overlapping text an error; `on_prefilled(evaluator, batches)` sees the dense
    prompt passes (e.g. to study mask densities).
    """
    ev = Evaluator(lm, score_norm, batch_size, quiet, hooks_type)
    ids = tokenize(lm.tokenizer, text)
    windows = token_windows(ids, sequences + generate_prompts, prompt_len + continuation)
    overlap = overlapping_windows(windows, calibration_passages)
    if overlap:
        raise ValueError(f"evaluation text {text_desc} is not held out: {len(overlap)} of its {len(windows)} "
                         f"windows overlap the text the thresholds were calibrated on. Evaluate on other text, "
                         f"or calibrate and evaluate with the same --text FILE (calibration reads its first "
                         f"{HELD_IN_FRACTION:.0%}, eval the rest)")
    batches = ev.prefill(windows[:sequences], prompt_len)
    if on_prefilled is not None:
        on_prefilled(ev, batches)
    dense = ev.continuation(batches, prompt_len, "dense")
    prompts = windows[sequences:, :prompt_len]
    gen_dense = ev.greedy(prompts, generate_tokens, "dense") if generate_prompts else None
    text_meta = {"source": text_desc, "sequences": sequences, "prompt_tokens": prompt_len,
                 "continuation_tokens": continuation}
    return [config_report(ev, batches, prompt_len, dense, cfg, text_meta, prompts, gen_dense, generate_tokens)
            for cfg in _progress(configs, "configs", quiet or len(configs) == 1)]


def config_report(ev: Evaluator, batches: list[Prefilled], prompt_len: int, dense: Continuation, cfg: dict,
                  text_meta: dict, prompts=None, gen_dense=None, generate_tokens: int = 0) -> dict:
    """One mask configuration against the dense baseline `dense` of the same prefilled windows."""
    lm = ev.lm
    c = lm.config
    dtype = engine_dtype_of(lm, cfg.get("dtype"))
    per_layer_bytes = mlp_bytes_per_token(c, bytes_per_param(lm, dtype))
    dense_bytes = per_layer_bytes * c.num_hidden_layers
    mode, thresholds, densities, clamp = cfg["mode"], cfg.get("thresholds"), cfg.get("densities"), cfg.get("clamp")
    bounds = selection_bounds(mode, densities, clamp)
    with ev.hooks.configured(cfg) as extra:
        exact = ev.hooks.exact  # no research gating on top of the static mask
        run = ev.continuation(batches, prompt_len, mode, thresholds, densities, bounds)
        gen = (ev.greedy(prompts, generate_tokens, mode, thresholds, densities, bounds)
               if gen_dense is not None else None)
    increase = bootstrap_increase(dense, run)
    realised = run.density.mean(0).tolist()
    per_seq = run.density.mean(1)
    skipped = sum((1.0 - f) * per_layer_bytes for f in run.byte_fractions)
    report = {
        "model": lm.name, "mode": mode, "requested_density": cfg.get("requested_density"),
        "score_norm": ev.hooks.score_norm, "clamp": clamp,
        "selection": {"op": "SelectActive", "density_margin": clamp if mode == "tda" else None,
                      "density_bounds": None if bounds is None else [list(b) for b in bounds],
                      "threshold_table_prompt_tokens": cfg.get("threshold_table"),
                      "as_engine": mode == "tda" and clamp == DEFAULT_DENSITY_MARGIN and exact},
        **extra,
        "text": text_meta,
        "dense": {"perplexity": dense.perplexity},
        "tda": {"perplexity": run.perplexity, "perplexity_increase": increase[0],
                "increase_ci95": list(increase[1:])},
        "teacher_forced_top1": dict(zip(("mean", "low", "high"), bootstrap_mean(run.top1))),
        "realised_density": {"mean": sum(realised) / len(realised), "per_layer": realised,
                             "per_sequence_min": float(per_seq.min()), "per_sequence_max": float(per_seq.max()),
                             "per_layer_min": min(realised), "per_layer_max": max(realised)},
        "mlp_bytes": {"dense_per_token": dense_bytes, "skipped_per_token": skipped,
                      "skipped_fraction": skipped / dense_bytes, "bytes_per_param": bytes_per_param(lm, dtype),
                      "dtype": dtype,
                      "per_layer_streamed_fraction": list(run.byte_fractions)},
    }
    if gen is not None:
        report["greedy"] = {"prompts": len(prompts), "new_tokens": generate_tokens, **agreement(gen_dense, gen)}
    return report


def evaluate(lm: LoadedModel, text: str, text_desc: str, mode: str, thresholds=None, densities=None,
             requested_density: float | None = None, margin: float | None = DEFAULT_DENSITY_MARGIN,
             threshold_table: int | None = None, dtype: str | None = None, **kw) -> dict:
    """Dense vs TDA perplexity, greedy agreement, realised density and MLP bytes skipped per token, with
    an engine's selection (mode tda, each sequence and layer clamped to density +- `margin`; None:
    thresholds alone); bytes counted for an engine in `dtype` (default the one `build` makes: the
    recipe's dtype, else float32). `threshold_table`: the calibration prompt length the thresholds are
    for (reported)."""
    config = {"mode": mode, "thresholds": thresholds, "densities": densities, "requested_density": requested_density,
              "clamp": margin if mode == "tda" else None, "threshold_table": threshold_table, "dtype": dtype}
    return evaluate_configs(lm, text, text_desc, [config], **kw)[0]
