"""Architecture adapters: where each decoder layer's gated MLP lives and which activation it uses.

Everything downstream (TDA scoring, export, runtime) sees a model only through
`mlp_modules()` and `activation_of()`, so adding a family means adding a row here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .ops.contract import ACTIVATIONS


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    act_field: str           # config field naming the MLP activation
    embed_scale: bool        # Gemma multiplies embeddings by sqrt(hidden)
    norm_offset: float       # Gemma's RMSNorm uses (1 + weight)


FAMILIES = {
    "llama": Family(("llama",), "hidden_act", False, 0.0),
    "mistral": Family(("mistral",), "hidden_act", False, 0.0),
    "qwen2": Family(("qwen2",), "hidden_act", False, 0.0),
    "gemma": Family(("gemma",), "hidden_activation", True, 1.0),
    "gemma2": Family(("gemma2",), "hidden_activation", True, 1.0),
    "gemma3_text": Family(("gemma3_text", "gemma3"), "hidden_activation", True, 1.0),
}

# Hugging Face activation names -> contract activation names.
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu",
}


class UnsupportedModel(ValueError):
    pass


def family_of(config) -> str:
    mt = getattr(config, "model_type", None)
    for name, fam in FAMILIES.items():
        if mt in fam.model_types:
            return name
    raise UnsupportedModel(f"model_type {mt!r} is not supported; supported: "
                           f"{sorted({t for f in FAMILIES.values() for t in f.model_types})}")


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def activation_of(config) -> str:
    config = text_config(config)
    fam = FAMILIES[family_of(config)]
    hf = getattr(config, fam.act_field, None) or getattr(config, "hidden_act", None)
    if fam.act_field == "hidden_activation" and hf is None:
        hf = "gelu_pytorch_tanh"  # Gemma's default when the field is unset
    act = HF_ACTIVATIONS.get(hf)
    if act is None:
        raise UnsupportedModel(f"activation {hf!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    assert act in ACTIVATIONS
    return act


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.model if hasattr(model, "model") else model
    if hasattr(inner, "language_model"):
        inner = inner.language_model
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModel(f"{type(model).__name__}: no decoder layers found at .model.layers")
    return layers


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's MLP; each has gate_proj, up_proj, down_proj (nn.Linear, no bias)."""
    family_of(text_config(model.config))
    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        for part in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, part, None)
            if not isinstance(lin, nn.Linear):
                raise UnsupportedModel(f"layer {i}: mlp.{part} is not an nn.Linear")
            if lin.bias is not None:
                raise UnsupportedModel(f"layer {i}: mlp.{part} has a bias; TDA export assumes none")
        mlps.append(mlp)
    return mlps
