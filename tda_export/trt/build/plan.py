"""`build --target tensorrt-rtx|tensorrt`: the plan next to the exported ONNX, and its manifest section.

Decides everything in plain Python (limits, profiles, compute capabilities), then hands a job to
the builder child process (builder.py) started with the environment TensorRT needs (flavour.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...manifest import sha256_file
from ...ops.contract import OPS, PLUGIN_FIELDS, PLUGIN_NAMESPACE, PLUGIN_VERSION, SPARSE_GATED_MLP
from .. import flavour as fl
from .profiles import Limits, profiles

PLAN_FILE = "model.plan"
PLUGIN_LIBRARY = "libtda_trt_plugins.so"
# TensorRT-RTX's targets (all it supports); "8.6" or "sm86" on the command line.
RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120")
# Targets TensorRT-RTX 1.7 cannot compile int4 weight-only layers for: "Cannot compile for target(s) sm75, because
# the model contains HW-specific datatypes: int4" (found building a q4_0 Mistral-7B-shaped plan for all five).
NO_INT4 = ("SM75",)


class PlanError(ValueError):
    pass


@dataclass
class PlanOptions:
    target: str = "tensorrt-rtx"
    max_batch: int = 8
    max_seq_len: int | None = None
    max_prompt: int | None = None
    timing_cache: Path | None = None
    optimization_level: int | None = None
    compute_capabilities: tuple[str, ...] = field(default_factory=tuple)
    plugin_library: Path | None = None  # the C++ libtda_trt_plugins.so instead of the Python plugins


def compute_capabilities(target: str, values, int4: bool = False) -> list[str]:
    """'8.6', '86', 'sm86', 'SM86' -> 'SM86'; RTX only, default all RTX targets (int4: all that take int4
    weights, i.e. not SM75)."""
    if target != "tensorrt-rtx":
        if values:
            raise PlanError("--compute-capability applies to --target tensorrt-rtx only "
                            "(datacenter TensorRT builds for the GPU it runs on)")
        return []
    out = []
    for v in values or [c for c in RTX_COMPUTE_CAPABILITIES if not (int4 and c in NO_INT4)]:
        name = "SM" + str(v).upper().removeprefix("SM").replace(".", "")
        if name not in RTX_COMPUTE_CAPABILITIES:
            raise PlanError(f"--compute-capability {v}: TensorRT-RTX supports "
                            f"{', '.join(_dotted(c) for c in RTX_COMPUTE_CAPABILITIES)}")
        if int4 and name in NO_INT4:
            rest = ", ".join(_dotted(c) for c in RTX_COMPUTE_CAPABILITIES if c not in NO_INT4)
            raise PlanError(f"--compute-capability {v}: TensorRT-RTX cannot compile int4 weights for it, and this "
                            f"plan's dense linears are int4 weight-only (a 4-bit --weight-format); leave {v} out "
                            f"(the default then is {rest}) or build from a q8_0 engine")
        if name not in out:
            out.append(name)
    return out


def _dotted(cc: str) -> str:
    return cc[2:-1] + "." + cc[-1]  # SM120 -> 12.0


def _x_format_refusal(x_format: str, where: str) -> str:
    return (f"{where}x_format {x_format} (quantized activations) runs on the CPU kernel library only: a "
            f"TensorRT plan runs the CUDA kernels and plugins, which read x as is; rebuild the engine with "
            f"x_format dtype for TensorRT")


def check_options(options: PlanOptions, max_context: int | None, dtype: str,
                  int4: bool = False, x_format: str = "dtype") -> tuple[Limits | None, list[str]]:
    """Every option checked before anything is built; raises PlanError/ProfileError naming the option.
    max_context None (the model not loaded yet) checks all but the sequence limits. int4: the network holds
    int4 weights (weight_only.int_bits), which not every compute capability takes. x_format: the engine's
    (contract X_FORMATS); a plan runs dtype only."""
    if options.target not in fl.FLAVOURS:
        raise PlanError(f"--target {options.target}: not one of {', '.join(fl.TARGETS)}")
    if x_format != "dtype":
        raise PlanError(f"--target {options.target}: " + _x_format_refusal(x_format, ""))
    if dtype not in ("float16", "bfloat16"):
        raise PlanError(f"--target {options.target} builds a strongly typed fp16/bf16 network: use --dtype fp16 or "
                        f"bf16 (got {dtype})")
    if options.optimization_level is not None and not 0 <= options.optimization_level <= 5:
        raise PlanError(f"--builder-optimization-level {options.optimization_level}: must be in 0..5")
    if options.plugin_library is not None and not Path(options.plugin_library).is_file():
        raise PlanError(f"--plugin-library {options.plugin_library}: no such file")
    if options.timing_cache is not None and Path(options.timing_cache).is_dir():
        raise PlanError(f"--timing-cache {options.timing_cache}: is a directory (expected a file)")
    ccs = compute_capabilities(options.target, options.compute_capabilities, int4)
    fl.require(options.target)
    if max_context is None:
        return None, ccs
    return Limits.checked(options.max_batch, options.max_seq_len, options.max_prompt, max_context), ccs


def check_graph(onnx_path: Path, target: str) -> None:
    """Refuses a graph a plan cannot run before TensorRT starts (nothing is written): a SparseGatedMLP node with
    x_format other than dtype (the Python and C++ plugins refuse it too, less clearly, inside TensorRT's parser)."""
    import onnx
    from onnx.helper import get_attribute_value

    model = onnx.load(str(onnx_path), load_external_data=False)
    quantized = []
    for n in model.graph.node:
        if n.domain == PLUGIN_NAMESPACE and n.op_type == SPARSE_GATED_MLP.name:
            x = {a.name: get_attribute_value(a) for a in n.attribute}.get("x_format", b"dtype")
            x = x.decode() if isinstance(x, bytes) else str(x)
            if x != "dtype":
                quantized.append((n.name, x))
    if quantized:
        (name, x), more = quantized[0], len(quantized) - 1
        raise PlanError(f"--target {target}: " + _x_format_refusal(
            x, f"{onnx_path.name}: node {name}" + (f" (and {more} more)" if more else "") + " has "))


def build_plan(onnx_path: Path, out_dir: Path, io_inputs: list[dict], max_context: int, dtype: str,
               options: PlanOptions, progress: bool = True, int4: bool = False) -> dict:
    """Build out_dir/model.plan; returns the manifest's "tensorrt" section. Raises PlanError on failure."""
    limits, ccs = check_options(options, max_context, dtype, int4)
    check_graph(Path(onnx_path), options.target)
    profs = profiles(io_inputs, limits)
    f = fl.flavour(options.target)
    with tempfile.TemporaryDirectory(prefix="tda-trt-") as tmp:
        job = {"target": options.target, "onnx": str(onnx_path), "plan": str(Path(out_dir) / PLAN_FILE),
               "profiles": profs, "optimization_level": options.optimization_level, "compute_capabilities": ccs,
               "timing_cache": str(options.timing_cache) if options.timing_cache else None,
               "plugin_library": str(Path(options.plugin_library).resolve()) if options.plugin_library else None,
               "report": str(Path(tmp) / "report.json")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "tda_export.trt.build.builder", str(Path(tmp) / "job.json")],
                              env=fl.child_env(f), stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              text=True)
        report_path = Path(job["report"])
        if not report_path.is_file():
            tail = (proc.stderr or "")[-2000:]
            raise PlanError(f"the {options.target} build process died (exit {proc.returncode}) before reporting"
                            + (f":\n{tail}" if tail else ""))
        report = json.loads(report_path.read_text())
    if not report["ok"]:
        raise PlanError(f"--target {options.target}: {report['error']}")
    plan = Path(out_dir) / PLAN_FILE
    return {
        "flavour": options.target, "module": report["module"], "version": report["version"],
        "plan_file": PLAN_FILE, "plan_sha256": sha256_file(plan), "plan_bytes": report["plan_bytes"],
        "plugin": {"library": PLUGIN_LIBRARY, "built_with": report["plugin_source"],
                   "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
                   "decode_version": report["decode_version"],
                   "creators": {op.name: {"fields": list(PLUGIN_FIELDS[op.name])} for op in OPS}},
        "limits": {"max_batch": limits.max_batch, "max_seq_len": limits.max_seq_len, "max_prompt": limits.max_prompt},
        "profiles": profs, "compute_capabilities": ccs, "optimization_level": report["optimization_level"],
        "build_seconds": report["build_seconds"], "layers": report["layers"],
        "strongly_typed": True, "dtype": dtype,
    }
