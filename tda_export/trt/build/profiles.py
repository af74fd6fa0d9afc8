"""Optimization profiles of a TensorRT plan, decided from the exported graph's I/O signature alone.

Entry 0 is the prefill profile (past empty, 2..max_prompt new tokens), entry 1 the decode profile
(one new token, 1..max_seq_len-1 past tokens); both span batch 1..max_batch. Each input's
min/opt/max follows from its symbolic dims (batch, sequence, past_sequence, total_sequence),
so the table is plain data a test can check and the manifest can record.
"""
from __future__ import annotations

from dataclasses import dataclass

PREFILL, DECODE = "prefill", "decode"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_seq_len: int
    max_prompt: int

    @classmethod
    def checked(cls, max_batch: int, max_seq_len: int | None, max_prompt: int | None, max_context: int) -> "Limits":
        """Defaults and bounds: max_seq_len <= the model's context, 2 <= max_prompt <= max_seq_len."""
        max_seq_len = min(max_context, 4096) if max_seq_len is None else max_seq_len
        max_prompt = max_seq_len if max_prompt is None else max_prompt
        if max_batch < 1:
            raise ProfileError(f"--max-batch {max_batch}: must be >= 1")
        if not 2 <= max_seq_len <= max_context:
            raise ProfileError(f"--max-seq-len {max_seq_len}: must be in 2..{max_context} (the model's context)")
        if not 2 <= max_prompt <= max_seq_len:
            raise ProfileError(f"--max-prompt {max_prompt}: must be in 2..{max_seq_len} (--max-seq-len); "
                               "a prompt is at least 2 tokens")
        return cls(max_batch, max_seq_len, max_prompt)


def symbol_ranges(limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{profile: {dim symbol: (min, opt, max)}}."""
    b = (1, max(1, limits.max_batch // 2), limits.max_batch)
    prompt = (2, max(2, limits.max_prompt // 2), limits.max_prompt)
    past = (1, max(1, limits.max_seq_len // 2), limits.max_seq_len - 1)
    return {
        PREFILL: {"batch": b, "sequence": prompt, "past_sequence": (0, 0, 0), "total_sequence": prompt},
        DECODE: {"batch": b, "sequence": (1, 1, 1), "past_sequence": past,
                 "total_sequence": tuple(p + 1 for p in past)},
    }


def profiles(inputs: list[dict], limits: Limits) -> list[dict]:
    """inputs: the manifest's io["inputs"] ({name, dtype, shape} with str symbols or ints).
    Returns [{"name", "shapes": {input: {"min", "opt", "max"}}}] for inputs with a symbolic dim."""
    out = []
    for name, ranges in symbol_ranges(limits).items():
        shapes = {}
        for v in inputs:
            if all(isinstance(d, int) for d in v["shape"]):
                continue
            per = {}
            for k, which in enumerate(("min", "opt", "max")):
                dims = []
                for d in v["shape"]:
                    if isinstance(d, int):
                        dims.append(d)
                    elif d in ranges:
                        dims.append(ranges[d][k])
                    else:
                        raise ProfileError(f"input {v['name']}: dimension {d!r} has no profile rule "
                                           f"(known: {', '.join(ranges)})")
                per[which] = dims
            shapes[v["name"]] = per
        out.append({"name": name, "shapes": shapes})
    return out
