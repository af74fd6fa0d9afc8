"""Next-token choice from logits (greedy, temperature, top-k, top-p) and the log-probabilities clients ask for.

Both work on the float32 [V] logits row every backend already returns, so any backend gets logprobs for free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Below this a temperature only amplifies rounding: logits / 1e-308 overflow to inf. Such a request means
# "as greedy as possible", so it is served greedily instead of failing.
MIN_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 (or below MIN_TEMPERATURE) -> greedy
    top_k: int = 0                # 0 -> no top-k cut
    top_p: float = 1.0            # 1 -> no nucleus cut
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None   # None: none; k >= 0: the sampled token's logprob and the k most likely

    def check(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        return self


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a [V] logits row."""
    logits = logits.astype(np.float64)
    if params.temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size:
        cut = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < cut, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        masked = np.zeros_like(probs)
        masked[keep] = probs[keep]
        probs = masked / masked.sum()
    return int(rng.choice(probs.size, p=probs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64 (the model's distribution, before temperature or cuts)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely tokens and their logprobs, most likely first


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The logprob of `token` under a [V] logits row, with the k most likely alternatives."""
    logp = log_softmax(logits)
    top = np.argpartition(-logp, k - 1)[:k] if 0 < k < logp.size else np.arange(logp.size)[:k]
    top = top[np.argsort(-logp[top], kind="stable")]
    return TokenLogprob(int(token), float(logp[token]), tuple((int(t), float(logp[t])) for t in top))
