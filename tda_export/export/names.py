"""Initializer names of the exported decoder: written by decoder.py, read back by runtimes that load the
weights from the ONNX file itself (runtime/torch_backend.py), so both sides spell them in one place."""
from __future__ import annotations

EMBED = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# Block-quantized engines (build --weight-format q8_0|q4_0|q4_1): uint8 [rows, in/32*block_bytes], rows = output
# features (the token embedding: [V, H/32*block_bytes]); the tensor's format is in the manifest's weight_formats.
BLOCKS_SUFFIX = "_blocks"
EMBED_BLOCKS = EMBED + BLOCKS_SUFFIX
LM_HEAD_BLOCKS = LM_HEAD + BLOCKS_SUFFIX
FINAL_NORM = "final_norm"
# Per-layer RMSNorms; the pre-/post-feedforward pair exists only with DecoderSpec.sandwich_norms.
LAYER_NORMS = ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


def layer(n: int) -> str:
    return f"layers.{n}"


def attn(n: int) -> str:
    return f"{layer(n)}.attn"


def attn_proj(n: int, which: str) -> str:
    """which: q, k, v or o."""
    return f"{attn(n)}.{which}_proj"


def qk_norm(n: int, which: str) -> str:
    """which: q or k (DecoderSpec.qk_norm)."""
    return f"{attn(n)}.{which}_norm"


def layer_norm(n: int, which: str) -> str:
    assert which in LAYER_NORMS, which
    return f"{layer(n)}.{which}"


def mlp(n: int) -> str:
    return f"{layer(n)}.mlp"


def weight(prefix: str) -> str:
    """A norm's scale (Gemma's +1 already folded in)."""
    return f"{prefix}.weight"


def linear_weight_t(prefix: str) -> str:
    """A linear layer's weight stored transposed, [in, out]."""
    return f"{prefix}.weight_t"


def linear_weight_blocks(prefix: str) -> str:
    """A linear layer's weight as blocks, [out, in/32*block_bytes] (GGUF's own layout, not transposed)."""
    return f"{prefix}.weight{BLOCKS_SUFFIX}"


def linear_bias(prefix: str) -> str:
    return f"{prefix}.bias"


def gate_up(n: int) -> str:
    """[I, 2, H], neuron-major (contract.SPARSE_GATED_MLP); blocks: uint8 [I, 2, H/32*block_bytes]."""
    return f"{mlp(n)}.gate_up_weight"


def down_t(n: int) -> str:
    """[I, H]; blocks: uint8 [I, H/32*block_bytes] (quantized along H)."""
    return f"{mlp(n)}.down_weight_t"


def rope(rope_type: str, which: str) -> str:
    """which: cos or sin, [max_context, head_dim / 2] in the compute dtype."""
    return f"rope.{rope_type}.{which}"
