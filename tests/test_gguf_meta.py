"""gguf_meta: a GGUF's config, tokenizer and tensor-name map read back from the cache are what parsing the file
gives (SmolLM2's shipped GGUF), and the cache key follows the file."""
from __future__ import annotations

import os

import pytest

from tda_export import gguf_meta
from tda_export.models import resolve


@pytest.mark.slow
def test_cached_config_tokenizer_and_name_map_equal_the_parsed(tmp_path, monkeypatch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from tda_export.tensors import GGUFSource
    from tda_export.text import corpus

    monkeypatch.setenv("TDA_GGUF_CACHE", str(tmp_path / "cache"))
    src = resolve("smollm2-135m")
    path = src.directory / src.gguf_file
    assert gguf_meta._cached(path) is None
    parsed_cfg = AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file)
    parsed_tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    gguf_meta.config_and_tokenizer(src.directory, src.gguf_file)  # parses and caches
    cached = gguf_meta._cached(path)
    assert cached is not None and not any(p.name.startswith(".") for p in cached.parent.iterdir())
    cfg, tok = gguf_meta.config_and_tokenizer(src.directory, src.gguf_file)  # from the cache
    drop = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in drop} == \
        {k: v for k, v in parsed_cfg.to_dict().items() if k not in drop}
    text = corpus("evaluation")[:20000]
    assert tok(text)["input_ids"] == parsed_tok(text)["input_ids"]
    assert tok.decode(parsed_tok(text)["input_ids"]) == parsed_tok.decode(parsed_tok(text)["input_ids"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token, len(tok)) == \
        (parsed_tok.bos_token, parsed_tok.eos_token, parsed_tok.pad_token, len(parsed_tok))
    chat = [{"role": "user", "content": "Name a river."}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        parsed_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    gguf_meta._name_maps.clear()  # an earlier test's load may have computed it in this process
    source = GGUFSource(path, model)  # computes the name map and stores it beside the config
    assert (cached / gguf_meta.NAME_MAP).is_file()
    gguf_meta._name_maps.clear()  # as a new process would: read back from the file
    assert gguf_meta.name_map(path, model, source._processor) == get_gguf_hf_weights_map(model, source._processor)


def test_key_follows_the_file_and_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    k = gguf_meta.key(f)
    assert gguf_meta.key(tmp_path / "." / "m.gguf") == k  # the resolved path
    os.utime(f, ns=(1, 2))
    assert gguf_meta.key(f) != k
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("TDA_GGUF_CACHE", str(blocker))

    class Saveable:
        def save_pretrained(self, d):
            (d / "config.json").write_text("{}")

    gguf_meta._save(f, Saveable(), Saveable())  # cannot create the cache: nothing raised, nothing written
    assert blocker.read_text() == "x" and gguf_meta._cached(f) is None
