"""What an engine directory must pass beyond its hashes before a runtime uses it, one check per part, each
failure an EngineError naming the file: the tda-export version that built it, the thresholds (manifest and
calibration.json), the tokenizer files and the safetensors header. `problems()` runs them all, so `inspect`
refuses what `run` and `serve` refuse, even in a directory whose manifest was re-hashed after an edit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import __version__, manifest
from ..calibration import CALIBRATION_FILE, Calibration
from .errors import EngineError

TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")


def check_version(directory: Path, data: dict) -> None:
    built_with = data.get("versions", {}).get("tda-export")
    if built_with and built_with.split(".")[0] != __version__.split(".")[0]:
        raise EngineError(f"{directory / manifest.NAME}: built by tda-export {built_with}, this is "
                          f"{__version__} (major versions differ); rebuild the engine")


def load_calibration(directory: Path, data: dict) -> Calibration | None:
    """calibration.json (None when the engine has none), its thresholds and the manifest's checked."""
    path = directory / CALIBRATION_FILE
    try:
        calibration = Calibration.load(path) if path.is_file() else None
    except ValueError as e:
        raise EngineError(str(e)) from None
    check_thresholds(directory, data, calibration)
    return calibration


def load_tokenizer(directory: Path):
    """The engine's tokenizer; a file that is not JSON is named, and so are the files of one that fails."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_JSON:
        path = directory / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise EngineError(f"{path}: not a readable tokenizer file (invalid JSON: {e})") from None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many types for a bad file
        present = [n for n in TOKENIZER_JSON if (directory / n).is_file()] or ["no tokenizer files"]
        raise EngineError(f"{directory}: cannot load its tokenizer ({', '.join(present)}): "
                          f"{type(e).__name__}: {str(e)[:300]}") from None


def check_weights(directory: Path, data: dict) -> None:
    """The safetensors header parses and its tensors lie inside the file (what the native runtime reads), and
    every tensor's dtype and shape fit the format the manifest's weight_formats records for it."""
    from safetensors import safe_open

    name = data.get("weights_file")
    if not name:
        return  # weights inside model.onnx (older engines)
    path = directory / name
    try:
        with safe_open(path, "numpy") as f:
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise EngineError(f"{path}: not a readable safetensors file ({e})") from None
    if "weight_formats" in data:  # engines built before issue 18 have none: all in the engine dtype
        check_weight_formats(path, data, header)
    check_x_format(directory, data)


def check_x_format(directory: Path, data: dict) -> None:
    """manifest x_format (contract X_FORMATS; absent: "dtype"), and q8_0 only over block weights."""
    from ..ops.contract import BLOCK_FORMATS, X_FORMATS

    x = data.get("x_format", "dtype")
    if x not in X_FORMATS:
        raise EngineError(f"{directory}/manifest.json: x_format {x!r} is not one of {list(X_FORMATS)}")
    if x != "dtype" and not any(f in BLOCK_FORMATS for f in (data.get("weight_formats") or {}).values()):
        raise EngineError(f"{directory}/manifest.json: x_format {x!r} needs block-format weights (weight_formats "
                          f"lists none)")


_FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def block_shape(tensor: str, fmt: str, spec: dict) -> list[int] | None:
    """The shape a block tensor of the exported decoder must have (None: a name this check does not know)."""
    from ..export import names
    from ..ops.blocks import row_bytes

    H, q_out, kv_out = spec["hidden"], spec["heads"] * spec["head_dim"], spec["kv_heads"] * spec["head_dim"]
    rows = {names.EMBED_BLOCKS: ([spec["vocab"]], H), names.LM_HEAD_BLOCKS: ([spec["vocab"]], H)}
    for n in range(spec["num_layers"]):
        rows[names.gate_up(n)] = ([spec["intermediate"], 2], H)
        rows[names.down_t(n)] = ([spec["intermediate"]], H)
        for c, out in (("q", q_out), ("k", kv_out), ("v", kv_out), ("o", H)):
            rows[names.linear_weight_blocks(names.attn_proj(n, c))] = ([out], q_out if c == "o" else H)
    if tensor not in rows:
        return None
    lead, width = rows[tensor]
    return lead + [row_bytes(fmt, width)]


def check_weight_formats(path: Path, data: dict, header: dict[str, tuple[str, list[int]]]) -> None:
    """weight_formats names every tensor of the file (padding aside) with a format its dtype and shape fit."""
    from ..export.weights import PAD_PREFIX
    from ..ops.contract import BLOCK_FORMATS

    where = f"{manifest.NAME} weight_formats"
    formats = data["weight_formats"]
    if not isinstance(formats, dict):
        raise EngineError(f"{path.parent / manifest.NAME}: weight_formats must map tensor names to formats")
    tensors = {k: v for k, v in header.items() if not k.startswith(PAD_PREFIX)}
    unmatched = sorted(set(tensors) ^ set(formats))
    if unmatched:
        name = unmatched[0]
        raise EngineError(f"{path}: tensor {name!r} " + ("has no entry in " + where if name in tensors
                                                          else f"is in {where} but not in the file"))
    spec = data.get("decoder_spec")
    for name, fmt in formats.items():
        dtype, shape = tensors[name]
        if fmt in _FLOAT_DTYPES:
            if dtype != _FLOAT_DTYPES[fmt]:
                raise EngineError(f"{path}: tensor {name!r} is {dtype}, {where} says {fmt} ({_FLOAT_DTYPES[fmt]})")
        elif fmt in BLOCK_FORMATS:
            want = block_shape(name, fmt, spec) if isinstance(spec, dict) else None
            if dtype != "U8":
                raise EngineError(f"{path}: tensor {name!r} is {dtype}, but {fmt} blocks are U8 ({where})")
            if want is not None and list(shape) != want:
                raise EngineError(f"{path}: tensor {name!r} has shape {list(shape)}; {fmt} blocks of this model "
                                  f"need {want} ({BLOCK_FORMATS[fmt].block_bytes} bytes per 32 weights)")
            if want is None and (not shape or shape[-1] % BLOCK_FORMATS[fmt].block_bytes):
                raise EngineError(f"{path}: tensor {name!r} has shape {list(shape)}, not whole {fmt} blocks of "
                                  f"{BLOCK_FORMATS[fmt].block_bytes} bytes")
        else:
            raise EngineError(f"{path}: tensor {name!r} has format {fmt!r} in {where}; formats are "
                              f"{', '.join(list(_FLOAT_DTYPES) + list(BLOCK_FORMATS))}")


def problems(directory, data: dict) -> list[str]:
    """Every check's failure message (empty when the directory passes)."""
    directory = Path(directory)
    found = []
    for check in (check_version, load_calibration, lambda d, _: load_tokenizer(d), check_weights):
        try:
            check(directory, data)
        except EngineError as e:
            found.append(str(e))
    return found


def check_thresholds(directory: Path, data: dict, calibration: Calibration | None) -> None:
    """Every threshold the engine may use is a number in [0, 1] (relative to the top score; above 1 no
    neuron is active, NaN selects garbage), one per layer, and the calibration is this model's."""
    layers = data.get("num_layers")

    def check(where: str, values) -> None:
        if not isinstance(values, list) or len(values) != layers:
            raise EngineError(f"{where}: expected a list of {layers} thresholds (one per layer), got {values!r:.80}")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise EngineError(f"{where}: threshold of layer {i} is {v!r}; thresholds must be finite and in "
                                  f"[0, 1]; rebuild or recalibrate the engine")

    built = data.get("calibration") or {}
    if "thresholds" in built:
        check(f"{directory / manifest.NAME} calibration.thresholds", built["thresholds"])
    if calibration is None:
        return
    where = directory / CALIBRATION_FILE
    try:
        calibration.check_model(data.get("fingerprint", calibration.fingerprint), layers,
                                data.get("intermediate_size"), str(where))
    except ValueError as e:
        raise EngineError(str(e)) from None
    for key, ths in calibration.thresholds.items():
        check(f"{where} thresholds[{key}]", ths)
    for n, table in calibration.by_prompt_length.items():
        for key, ths in table.items():
            check(f"{where} by_prompt_length[{n}][{key}]", ths)
    if "thresholds" in calibration.default:
        check(f"{where} default.thresholds", calibration.default["thresholds"])
    densities = calibration.default.get("densities", [])
    if any(not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 < d <= 1) for d in densities):
        raise EngineError(f"{where}: default densities must be in (0, 1], got {densities}")
