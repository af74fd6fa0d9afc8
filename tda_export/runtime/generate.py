"""The generation loop: tokenize, prefill (dense, TDA selection), decode with each sequence's mask.

One loop serves every backend, the CLI, the server and the benchmark. It
streams: `stream()` yields an Event per sequence whenever new text is safe to
show (held back while it could still be the start of a stop string or an
incomplete UTF-8 character), with the token ids (and, when asked, logprobs) it came from.
A failure while choosing or decoding one sequence's token ends only that sequence
(finish_reason "error"); the rest of the batch goes on.

`prompt_logprobs()` scores prompt tokens (OpenAI `echo`, lm-eval loglikelihood)
through the same two backend calls, so every backend serves it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .engine import Engine
from .sampling import SamplingParams, TokenLogprob, choose, token_logprob


class ContextTooLong(ValueError):
    pass


@dataclass
class Event:
    index: int                      # which prompt of the batch
    text: str                       # newly safe text ("" on a pure finish event)
    finish_reason: str | None = None  # "stop" | "length" | "error" once the sequence ends
    tokens: list[int] = field(default_factory=list)  # ids chosen since the previous event (EOS included)
    logprobs: list[TokenLogprob] | None = None  # one per token when the params ask for logprobs
    error: str | None = None        # what went wrong when finish_reason is "error"


@dataclass
class Stats:
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    active_fraction: float | None = None   # mean fraction of MLP neurons computed in decode


class _Sequence:
    def __init__(self, params: SamplingParams, eos: set[int]):
        self.params, self.eos = params, eos
        self.rng = np.random.default_rng(params.seed)
        self.tokens: list[int] = []     # generated ids that are text (EOS excluded)
        self.pending: list[int] = []    # ids chosen since the last event
        self.pending_logprobs: list[TokenLogprob] = []
        self.generated = 0              # every id chosen, EOS included: the usage count
        self.emitted = 0
        self.finish: str | None = None

    def take(self) -> tuple[list[int], list[TokenLogprob] | None]:
        tokens, logprobs = self.pending, self.pending_logprobs
        self.pending, self.pending_logprobs = [], []
        return tokens, (logprobs if self.params.logprobs is not None else None)


def encode(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenizer(prompt).input_ids
    return list(prompt)


def _eos_ids(engine: Engine) -> set[int]:
    ids = engine.manifest.get("eos_token_id")
    return set(ids if isinstance(ids, list) else [ids]) - {None}


def check_prompts(engine: Engine, prompts: list, params: list[SamplingParams]) -> list[list[int]]:
    """Token ids of each prompt, refusing an empty one or one that cannot fit its max_new_tokens."""
    ids = [encode(engine, p) for p in prompts]
    for i, (seq, p) in enumerate(zip(ids, params)):
        if not seq:
            raise ValueError(f"prompt {i} is empty")
        if len(seq) + p.max_new_tokens > engine.max_context:
            raise ContextTooLong(f"prompt {i} has {len(seq)} tokens; with max_new_tokens={p.max_new_tokens} "
                                 f"that exceeds the engine's context of {engine.max_context}")
    return ids


def pad_id(engine: Engine) -> int:
    pad = engine.manifest.get("pad_token_id")
    return pad if pad is not None else 0


def left_pad(engine: Engine, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, max(2, longest)] of a prefill (a 1-token call would be a decode step)."""
    width = max(2, max(map(len, ids)))
    input_ids = np.full((len(ids), width), pad_id(engine), np.int64)
    mask = np.zeros((len(ids), width), np.int64)
    for b, seq in enumerate(ids):
        input_ids[b, width - len(seq):] = seq
        mask[b, width - len(seq):] = 1
    return input_ids, mask


def new_sequence(engine: Engine, params: SamplingParams) -> _Sequence:
    return _Sequence(params, _eos_ids(engine))


def advance(engine: Engine, index: int, s: _Sequence, logits: np.ndarray) -> tuple[int, list[Event]]:
    """Choose sequence `s`'s next token from its [V] logits row: (the token to feed next, the events it makes,
    with `index`). A failure while choosing or detokenizing ends only this sequence (finish_reason "error";
    the token fed is then the pad id, which nothing reads)."""
    try:
        tok = choose(logits, s.params, s.rng)
        s.generated += 1
        s.pending.append(tok)
        if s.params.logprobs is not None:
            s.pending_logprobs.append(token_logprob(logits, tok, s.params.logprobs))
        if tok in s.eos:
            s.finish = "stop"
        else:
            s.tokens.append(tok)
            if len(s.tokens) >= s.params.max_new_tokens:
                s.finish = "length"
        return tok, list(_emit(engine, index, s))
    except Exception as e:  # noqa: BLE001 - one sequence's failure must not end its batch
        s.finish = "error"
        tokens, logprobs = s.take()
        return pad_id(engine), [Event(index, "", "error", tokens, logprobs, f"{type(e).__name__}: {e}")]


def stream(engine: Engine, prompts: list, params: SamplingParams | list[SamplingParams],
           density: float | None = None, stats: Stats | None = None,
           cancelled: Callable[[int], bool] | None = None) -> Iterator[Event]:
    """Events for a batch of prompts (each with its own sampling params; one density for the batch).

    `cancelled(i)` is asked before every step: a sequence whose consumer went away stops at once (no more
    events), and the batch stops when every sequence has."""
    params = [p.check() for p in (params if isinstance(params, list) else [params] * len(prompts))]
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    stats = stats if stats is not None else Stats()
    ids = check_prompts(engine, prompts, params)
    # Short prompts give peakier scores; the shortest prompt's table keeps at least the requested density
    # for every sequence of the batch.
    thresholds = engine.thresholds(density, min(map(len, ids)))
    bounds = engine.density_bounds(density)
    pad = pad_id(engine)
    input_ids, mask = left_pad(engine, ids)
    stats.prompt_tokens = [len(s) for s in ids]
    seqs = [new_sequence(engine, p) for p in params]

    t0 = time.perf_counter()
    logits, state = engine.backend.prefill(input_ids, mask, thresholds, bounds)
    stats.time_to_first_token = time.perf_counter() - t0
    counts = engine.backend.active_counts(state)
    stats.active_fraction = float(counts.mean() / engine.manifest["intermediate_size"])
    t_decode = time.perf_counter()
    for step in range(max(p.max_new_tokens for p in params)):
        next_tokens = np.full(len(seqs), pad, np.int64)
        for b, s in enumerate(seqs):
            if not s.finish and cancelled is not None and cancelled(b):
                s.finish = "cancelled"
            if s.finish:
                continue
            next_tokens[b], events = advance(engine, b, s, logits[b])
            yield from events
        if all(s.finish for s in seqs):
            break
        logits = engine.backend.decode(state, next_tokens)
        stats.decode_steps += 1
    stats.decode_seconds = time.perf_counter() - t_decode
    stats.completion_tokens = [s.generated for s in seqs]


def _emit(engine: Engine, index: int, s: _Sequence) -> Iterator[Event]:
    text = engine.tokenizer.decode(s.tokens, skip_special_tokens=True)
    stops = s.params.stop
    cut = min((text.find(x) for x in stops if x in text), default=-1)
    if cut >= 0:
        text, s.finish = text[:cut], "stop"
    if s.finish:
        safe = len(text)
    else:
        hold = max((len(x) - 1 for x in stops), default=0)
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
    if safe > s.emitted or s.finish:
        tokens, logprobs = s.take()
        yield Event(index, text[s.emitted: max(safe, s.emitted)], s.finish, tokens, logprobs)
        s.emitted = max(safe, s.emitted)


def generate(engine: Engine, prompts: list, params: SamplingParams | list[SamplingParams], density: float | None = None,
             stats: Stats | None = None) -> list[str]:
    """The full completion of each prompt."""
    out = [""] * len(prompts)
    for ev in stream(engine, prompts, params, density, stats):
        out[ev.index] += ev.text
    return out


def prompt_logprobs(engine: Engine, prompts: list[list[int]], top: int = 0) -> list[list[TokenLogprob | None]]:
    """For each prompt, the logprob of every token given the ones before it (None for the first token, which
    has no context), with the `top` most likely alternatives.

    The prompt is always processed densely (prefill is dense; TDA only thins decode), so these are the dense
    model's causal logprobs. They come from a prefill of the first token (left padded to the backend's minimum
    width) and one dense decode step per further token: only `prefill`/`decode`, so every backend serves it,
    in time linear in the prompt length.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompt_logprobs needs non-empty prompts")
    longest = max(map(len, prompts))
    if longest > engine.max_context:
        raise ContextTooLong(f"a prompt has {longest} tokens, more than the engine's context of "
                             f"{engine.max_context}")
    pad = pad_id(engine)
    dense = np.zeros(engine.num_layers, np.float32)
    input_ids = np.array([[pad, p[0]] for p in prompts], np.int64)
    mask = np.array([[0, 1]] * len(prompts), np.int64)
    out: list[list[TokenLogprob | None]] = [[None] for _ in prompts]
    if longest == 1:
        return out
    logits, state = engine.backend.prefill(input_ids, mask, dense)
    for t in range(1, longest):
        for b, p in enumerate(prompts):
            if t < len(p):
                out[b].append(token_logprob(logits[b], p[t], top))
        if t + 1 == longest:
            break
        logits = engine.backend.decode(state, np.array([p[t] if t < len(p) else pad for p in prompts], np.int64))
    return out
