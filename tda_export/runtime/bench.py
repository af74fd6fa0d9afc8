"""Engine benchmark: time to first token and decode throughput, dense vs TDA densities, same run."""
from __future__ import annotations

import numpy as np

from .engine import Engine
from .generate import Stats, stream
from .sampling import SamplingParams


def _time_once(engine: Engine, prompt_ids: list[list[int]], new_tokens: int, density) -> Stats:
    stats = Stats()
    # Never stops early: EOS is not special here, so every run decodes exactly new_tokens steps.
    for _ in stream(engine, prompt_ids, SamplingParams(max_new_tokens=new_tokens), density, stats):
        pass
    return stats


def run_bench(engine: Engine, densities: list[float] | None, prompt_tokens: int, new_tokens: int, batch: int,
              repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    vocab = engine.manifest["vocab_size"]
    prompts = [rng.integers(10, vocab - 1, prompt_tokens).tolist() for _ in range(batch)]
    labels: list = [1.0]
    if densities is None:
        labels += [float(d) for d in engine.densities() if float(d) < 1.0] or [None]
    else:
        labels += [d for d in densities if d != 1.0]
    # Interleaved: every density once per round, so a noisy neighbour slows them alike.
    runs: dict = {i: [] for i in range(len(labels))}
    for _ in range(repeats):
        for i, density in enumerate(labels):
            runs[i].append(_time_once(engine, prompts, new_tokens, density))
    rows = []
    for i, density in enumerate(labels):
        rates = sorted(batch * s.decode_steps / s.decode_seconds for s in runs[i])
        s = runs[i][0]
        rows.append({"density": "built default" if density is None else f"{density:.2f}",
                     "active_fraction": s.active_fraction,
                     "ttft_ms": float(np.median([r.time_to_first_token for r in runs[i]])) * 1e3,
                     "decode_tok_s": float(np.median(rates)), "decode_tok_s_min": rates[0],
                     "decode_tok_s_max": rates[-1]})
    for r in rows:
        r["speedup_vs_dense"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows
