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
    rows = []
    for density in labels:
        best = None
        for _ in range(repeats):
            s = _time_once(engine, prompts, new_tokens, density)
            rate = batch * s.decode_steps / s.decode_seconds
            if best is None or rate > best[1]:
                best = (s, rate)
        s, rate = best
        rows.append({"density": "built default" if density is None else f"{density:.2f}",
                     "active_fraction": s.active_fraction, "ttft_ms": s.time_to_first_token * 1e3,
                     "decode_tok_s": rate})
    for r in rows:
        r["speedup_vs_dense"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows
