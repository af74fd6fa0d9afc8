"""Tiny random-weight models of every supported family, saved as real HF directories.

Sizes are multiples of 8 but not of 64 (as the kernels require and to catch
tiling assumptions); weights are seeded so runs are reproducible.
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")
COMMON = dict(hidden_size=64, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, vocab_size=320)


def tiny_config(family: str):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig,
                              Qwen2Config)
    if family == "llama":
        return LlamaConfig(**COMMON, hidden_act="silu")
    if family == "mistral":
        return MistralConfig(**COMMON, hidden_act="silu", sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**COMMON, hidden_act="silu", use_sliding_window=False)
    if family == "gemma":
        return GemmaConfig(**COMMON, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":
        return Gemma2Config(**COMMON, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    if family == "gemma3_text":
        return Gemma3TextConfig(**COMMON, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                query_pre_attn_scalar=16, layer_types=["sliding_attention", "sliding_attention",
                                                                       "full_attention"])
    raise ValueError(family)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question."] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # default init is tiny; scale up so activations and masks are non-trivial
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    tiny_model(family, seed).save_pretrained(out_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
