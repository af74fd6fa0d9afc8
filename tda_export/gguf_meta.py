"""What a load derives from a .gguf file's metadata -- the transformers config and tokenizer, the GGUF -> HF
tensor-name map and the GGUFReader itself -- parsed once, not on every load.

gguf-py reads metadata arrays element by element: one GGUFReader of SmolLM2's file (49k-token vocabulary and
merges) takes ~6 s, and loading the model structure built three of them (ours, transformers' config and
tokenizer) plus transformers' name map (~7 s), 18 s in all before any weight was read (2026-12-07, 2-core
EPYC). Now:
- the config and tokenizer are saved with save_pretrained under $TDA_GGUF_CACHE (default
  ~/.cache/tda-export/gguf)/<key>/ and read back from there; the key hashes the file's resolved path, size and
  mtime and the transformers and gguf versions, so an edited file or another transformers parses afresh. The
  directory is written to a temporary sibling and renamed, so a half-written one is never read; a cache that
  cannot be written is skipped (the file is parsed, as before);
- within one process the GGUFReader (its tensors stay memory-mapped) and the name map are kept.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FILES = ("config.json", "tokenizer_config.json")
NAME_MAP = "name_map.json"


def cache_root() -> Path:
    return Path(os.environ.get("TDA_GGUF_CACHE", Path.home() / ".cache" / "tda-export" / "gguf"))


def key(path: Path) -> str:
    """The file (resolved path, size, mtime) and the parsers' versions."""
    from importlib import metadata

    path = Path(path).resolve()
    st = path.stat()
    parts = [str(path), str(st.st_size), str(st.st_mtime_ns)]
    for package in ("transformers", "gguf"):
        try:
            parts.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package}==?")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _cached(path: Path) -> Path | None:
    d = cache_root() / key(path)
    return d if all((d / f).is_file() for f in FILES) else None


@functools.lru_cache(maxsize=8)
def _reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def reader(path: Path):
    """The file's GGUFReader, one per process (and per version of the file)."""
    path = Path(path).resolve()
    st = path.stat()
    return _reader(str(path), st.st_size, st.st_mtime_ns)


def _model_key(model) -> str:
    from .arch import text_config

    c = text_config(model.config)
    return f"{type(model).__name__}/{c.num_hidden_layers}"


_name_maps: dict[tuple[str, str], dict[str, str]] = {}


def name_map(path: Path, model, processor) -> dict[str, str]:
    """transformers' get_gguf_hf_weights_map(model, processor): GGUF tensor name -> HF parameter name (the
    module structure decides it, so `model` may be on the meta device)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    k = (key(path), _model_key(model))
    if k in _name_maps:
        return _name_maps[k]
    cached = _cached(path)
    saved = _read_json(cached / NAME_MAP) if cached else {}
    if k[1] not in saved:
        saved[k[1]] = get_gguf_hf_weights_map(model, processor)
        if cached:
            _write_atomic(cached / NAME_MAP, json.dumps(saved))
    _name_maps[k] = saved[k[1]]
    return _name_maps[k]


def config_and_tokenizer(directory: Path, gguf_file: str):
    """(config, tokenizer) of the GGUF: from the cache, else parsed by transformers and then cached."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(directory) / gguf_file
    cached = _cached(path)
    if cached is not None:
        try:
            return AutoConfig.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
        except (OSError, ValueError):
            pass  # a cache from something else: parse the file
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    _save(path, config, tokenizer)
    return config, tokenizer


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass


def _save(path: Path, config, tokenizer) -> None:
    """config + tokenizer (save_pretrained) into the cache, written to a temporary sibling and renamed."""
    final = cache_root() / key(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "source.txt").write_text(f"{Path(path).resolve()}\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a read-only home, a full disk: the next load parses the file again
