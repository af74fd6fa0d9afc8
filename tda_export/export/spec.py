"""What to build for a model: dimensions and per-family details, read once from the HF config and modules.

Everything family-specific the graph needs is decided here, so decoder.py holds
no `if family == ...` branches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import arch
from ..kernels.abi import SIZE_MULTIPLE

DTYPES = ("float32", "float16", "bfloat16")
# Gemma activations and residuals exceed float16's range (HF warns the same); bf16 keeps fp32's exponent.
NO_FP16 = ("gemma", "gemma2", "gemma3_text")
CLI_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ExportError(ValueError):
    """The model or the options cannot be exported; the message names the field and value."""


@dataclass(frozen=True)
class LayerSpec:
    window: int | None       # sliding-window length in tokens, None for global attention
    rope: str                # key into DecoderSpec.rope_types: which cos/sin cache this layer uses


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    activation: str
    dtype: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    rms_eps: float
    layers: tuple[LayerSpec, ...]
    rope_types: tuple[str, ...]
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float | None          # Gemma: sqrt(hidden), applied in the compute dtype
    norm_offset: float                 # Gemma: RMSNorm weight is (1 + w); folded into the exported weight
    sandwich_norms: bool               # Gemma 2/3: post-attention and pre/post-feedforward norms
    qk_norm: bool                      # Gemma 3
    tied_embeddings: bool

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["layers"] = [l.__dict__ for l in self.layers]
        d["rope_types"] = list(self.rope_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderSpec":
        """Inverse of as_dict (the manifest stores it, so a runtime rebuilds the network without HF)."""
        return cls(**dict(d, layers=tuple(LayerSpec(**l) for l in d["layers"]), rope_types=tuple(d["rope_types"])))


def decoder_spec(loaded, dtype: str) -> DecoderSpec:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} not in {list(CLI_DTYPES)}")
    c = loaded.config
    family = loaded.family
    if dtype == "float16" and family in NO_FP16:
        raise ExportError(f"--dtype fp16: {loaded.name} is a {family} model whose activations overflow float16; "
                          f"use bf16 or fp32")
    for field in ("hidden_size", "intermediate_size"):  # H and I of the SparseGatedMLP op
        value = getattr(c, field)
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ExportError(f"{loaded.name}: config.{field}={value} is not a positive multiple of {SIZE_MULTIPLE}, "
                              f"which the sparse-MLP kernels need (TDA_SIZE_MULTIPLE, cuda/include/tda_kernels.h: "
                              f"16-byte vectors of 16-bit types); the native, CUDA and TensorRT runtimes would refuse "
                              f"it at the first decode step")
    if getattr(c, "use_bidirectional_attention", False):
        raise ExportError(f"{loaded.name}: config.use_bidirectional_attention=True is not a causal decoder")
    layers_mod = arch.decoder_layers(loaded.model)
    attn = layers_mod[0].self_attn
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    if family == "mistral" and window:  # Mistral slides on every layer when a window is set
        layer_types = ["sliding_attention"] * c.num_hidden_layers
    rope_params = getattr(c, "rope_parameters", None) or {}
    per_type_rope = all(t in rope_params for t in set(layer_types))  # Gemma 3: local vs global theta
    layers = tuple(LayerSpec(window if t == "sliding_attention" else None, t if per_type_rope else "default")
                   for t in layer_types)
    if any(l.window for l in layers) and not window:
        raise ExportError(f"{loaded.name}: sliding_attention layers but config.sliding_window={window!r}")
    fam = arch.FAMILIES[family]
    final_norm = loaded.model.model.norm if hasattr(loaded.model, "model") else None
    eps = getattr(final_norm, "variance_epsilon", None) or getattr(final_norm, "eps", None) or c.rms_norm_eps
    return DecoderSpec(
        family=family, activation=loaded.activation, dtype=dtype, num_layers=c.num_hidden_layers,
        hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads, head_dim=head_dim, vocab=c.vocab_size,
        max_context=c.max_position_embeddings, rms_eps=float(eps), layers=layers,
        rope_types=tuple(sorted({l.rope for l in layers})), attn_scale=float(attn.scaling),
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        final_softcap=getattr(c, "final_logit_softcapping", None),
        embed_scale=math.sqrt(c.hidden_size) if fam.embed_scale else None, norm_offset=fam.norm_offset,
        sandwich_norms=hasattr(layers_mod[0], "pre_feedforward_layernorm"),
        qk_norm=hasattr(attn, "q_norm"), tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
