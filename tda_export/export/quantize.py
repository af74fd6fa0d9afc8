"""build --weight-format: the choice, and for each weight tensor whether it is carried from a GGUF or quantized.

numpy only (no torch, no ONNX), so the decisions are testable alone; export/engine_weights.py applies them to a
model's tensors for the exporter and for calibration (which must see the engine's weights).

Rules (docs/export.md "Block-quantized weights"):
- every linear layer (attention q/k/v/o, gate/up/down of the MLP, lm_head when not tied) and the token
  embedding become blocks of the chosen format F (contract.BLOCK_FORMATS); norms, biases and rotary caches stay
  in the engine dtype;
- a GGUF tensor already in F whose rows are the engine's rows (gate, up, q/k/v/o with llama.cpp's q/k row
  permutation undone on whole rows, embedding, untied lm_head) is carried byte for byte; ffn_down is not
  (GGUF blocks it along I, the sparse kernels need it along H): it is dequantized exactly and requantized
  along H, in q8_0 under the 4-bit formats unless --down-weight-format says otherwise (down_choice);
- the embedding and an untied lm_head keep a GGUF's block format when it is one of ours even when it is not
  F: llama.cpp's quantizer keeps them at higher precision (SmolLM2's Q4_1 GGUF: token_embd is Q8_0), and the
  engine should be the GGUF's model, not a coarser one;
- everything else is quantized round-to-nearest per block by ops/blocks.quantize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..ops.blocks import quantize
from ..ops.contract import BLOCK_FORMATS, QUANT_BLOCK

FLOAT = "float"
CHOICES = (FLOAT,) + tuple(BLOCK_FORMATS)
# what one weight costs on disk and in each token's reads, for --help
COST = {FLOAT: "the --dtype (fp32: 32 bits, fp16/bf16: 16 bits per weight)",
        "q8_0": "8.5 bits per weight (int8 + fp16 scale per 32), near-lossless",
        "q4_0": "4.5 bits per weight (4-bit + fp16 scale per 32), smallest, most loss",
        "q4_1": "5 bits per weight (4-bit + fp16 scale and minimum per 32), less loss than q4_0"}
assert set(COST) == set(CHOICES)


class WeightFormatError(ValueError):
    """A model or option that cannot be stored in the chosen format; the message names tensor and dims."""


# --down-weight-format: the MLP's down_weight_t in a format of its own (contract down_weight_format). A GGUF
# blocks ffn_down along I, so it is always re-quantized along H; 4 bits from 4-bit values again costs quality
# (SmolLM2's Q4_1: +9% held-out perplexity), 8 bits almost none, hence q8_0 under 4-bit formats by default.
AUTO = "auto"
DOWN_CHOICES = (AUTO,) + tuple(BLOCK_FORMATS)


def down_choice(choice: str, down: str = AUTO) -> str:
    """The block format down_weight_t is stored in for --weight-format `choice` and --down-weight-format `down`
    (FLOAT for a float engine, whose MLP is all in --dtype)."""
    if down not in DOWN_CHOICES:
        raise WeightFormatError(f"--down-weight-format {down!r}: not one of {', '.join(DOWN_CHOICES)}")
    if not is_blocks(choice):
        if down != AUTO:
            raise WeightFormatError(f"--down-weight-format {down} needs a block --weight-format, not {choice}")
        return FLOAT
    if down != AUTO:
        return down
    return "q8_0" if BLOCK_FORMATS[choice].block_bytes < BLOCK_FORMATS["q8_0"].block_bytes else choice


# --x-format (contract x_format): how the MLP's gate/up and every other block-format linear read their input.
# q8_0 quantizes it per 32 values as llama.cpp does, so the CPU kernels take int8 dot products.
X_CHOICES = (FLOAT, "q8_0")


def x_choice(choice: str, x: str = FLOAT) -> str:
    """The contract's x_format ("dtype" | "q8_0") for --weight-format `choice` and --x-format `x`."""
    if x not in X_CHOICES:
        raise WeightFormatError(f"--x-format {x!r}: not one of {', '.join(X_CHOICES)}")
    if x == FLOAT:
        return "dtype"
    if not is_blocks(choice):
        raise WeightFormatError(f"--x-format {x} needs a block --weight-format (q8_0, q4_0, q4_1), not {choice}: "
                                f"float weights always read x as is")
    return x


def mlp_label(choice: str, down: str = AUTO) -> str:
    """How an engine's MLP is stored, for reports: "q8_0", or "q4_1+q8_0" (gate/up q4_1, down q8_0)."""
    d = down_choice(choice, down)
    return choice if d in (choice, FLOAT) else f"{choice}+{d}"


def check_choice(choice: str) -> str:
    if choice not in CHOICES:
        raise WeightFormatError(f"--weight-format {choice!r}: not one of {', '.join(CHOICES)}")
    return choice


def is_blocks(choice: str) -> bool:
    return check_choice(choice) != FLOAT


def check_rows(choice: str, tensor: str, shape: tuple[int, ...]) -> None:
    """A block format needs each row (the last axis, a linear's input dimension) in whole blocks."""
    width = shape[-1] if shape else 0
    if width <= 0 or width % QUANT_BLOCK:
        raise WeightFormatError(f"--weight-format {choice}: {tensor} has shape {list(shape)}; its input dimension "
                                f"{width} is not a positive multiple of {QUANT_BLOCK} (one block), so it cannot be "
                                f"stored in {choice}; use --weight-format {FLOAT}")


@dataclass(frozen=True)
class Encoded:
    fmt: str              # a BLOCK_FORMATS name
    blocks: np.ndarray    # uint8 [..., in/32*block_bytes]
    carried: bool         # the source's bytes, unchanged

    def __post_init__(self):
        assert self.blocks.dtype == np.uint8 and self.fmt in BLOCK_FORMATS, (self.fmt, self.blocks.dtype)


# the source's own blocks: (format name, uint8 [rows, row_bytes]) or None when it has none of ours
SourceBlocks = "tuple[str, np.ndarray] | None"


def encode(choice: str, tensor: str, weight: Callable[[], np.ndarray], source: SourceBlocks = None,
           keep_source_format: bool = False) -> Encoded:
    """One weight as blocks of `choice` (rows along the last axis): the source's blocks when they are in
    `choice` (or, with keep_source_format, in any block format of ours), else round-to-nearest quantization of
    weight() (float, called only then)."""
    if source is not None:
        fmt, raw = source
        if fmt == choice or (keep_source_format and fmt in BLOCK_FORMATS):
            return Encoded(fmt, np.ascontiguousarray(raw, dtype=np.uint8), True)
    w = np.asarray(weight(), dtype=np.float32)
    check_rows(choice, tensor, w.shape)
    try:
        return Encoded(choice, quantize(choice, w), False)
    except ValueError as e:  # NaN/inf weights, a block whose scale overflows fp16
        raise WeightFormatError(f"{tensor}: {e}") from None


def stack(choice: str, tensor: str, parts: list[Encoded]) -> Encoded:
    """gate/up rows side by side ([I, 2, row_bytes]): one format for the pair (the op's weight_format)."""
    formats = {p.fmt for p in parts}
    if formats != {choice}:
        raise WeightFormatError(f"{tensor}: parts in formats {sorted(formats)}, expected {choice}")
    return Encoded(choice, np.stack([p.blocks for p in parts], 1), all(p.carried for p in parts))


def check_dims(choice: str, model: str, dims: dict[str, tuple[str, int]]) -> None:
    """Before anything is read or written: each row width of the engine's block tensors in whole blocks.
    dims: tensor name -> (what the width is, its value)."""
    if not is_blocks(choice):
        return
    for tensor, (what, width) in dims.items():
        if width <= 0 or width % QUANT_BLOCK:
            raise WeightFormatError(f"--weight-format {choice}: {model}: {tensor} rows are {what} = {width} weights, "
                                    f"not a multiple of the {QUANT_BLOCK}-weight block; use --weight-format {FLOAT}")
