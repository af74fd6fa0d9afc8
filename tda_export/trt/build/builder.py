"""The TensorRT side of `build --target tensorrt-rtx|tensorrt`: parse, check, configure, build, serialize.

Runs in a child process started by plan.py (`python -m tda_export.trt.build.builder JOB.json`), whose
environment works around the TensorRT-RTX library-name trap (flavour.py). The job and the report
are JSON files; the decisions (profiles, layer accounting) were made in plain Python before.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .layers import Layer, check_coverage, plugin_id, summary


class BuildFailed(RuntimeError):
    pass


def _file_writer(trt, f):
    """A trt.IStreamWriter appending to the open file `f`: the plan goes to disk as TensorRT serializes
    it, instead of one host copy of the whole plan (weights included: 1.1x the weight bytes) held beside
    the builder's own copies (build_serialized_network)."""

    class FileWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.error = None  # TensorRT logs and swallows an exception raised here: kept to re-raise

        def write(self, data):
            try:
                return f.write(data)
            except BaseException as e:
                self.error = e
                return 0

    return FileWriter()


def _logger(trt):
    """A trt.ILogger keeping TensorRT's errors, so a failed build reports its reason (trt.Logger printed them to
    stdout, which plan.py does not show). Not printed as they come: every build on a machine without a GPU
    logs one (cudaError 35) and still succeeds."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):  # ERROR or INTERNAL_ERROR
                self.errors.append(msg)

    return Logger()


def _plugin_of(trt, layer) -> str | None:
    if layer.type != trt.LayerType.PLUGIN_V3:
        return None
    layer.__class__ = trt.IPluginV3Layer  # the Python API's downcast
    plugin = layer.plugin
    core = plugin if hasattr(plugin, "plugin_name") else plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    return plugin_id(core.plugin_namespace, core.plugin_name, core.plugin_version)


def run(job: dict) -> dict:
    import onnx

    from ..flavour import import_module
    from ..logic import logic

    trt = import_module(job["target"])
    t0 = time.time()
    logger = _logger(trt)
    registry = trt.get_plugin_registry()
    if job.get("plugin_library"):
        registry.load_library(job["plugin_library"])
        plugin_source = job["plugin_library"]
    else:
        from ...kernels.build import BuildError
        from ..plugins import _queries, register

        try:  # here, not inside TensorRT's getWorkspaceSize callback, which would hide the reason
            _queries()
        except (BuildError, OSError) as e:
            raise BuildFailed("the Python plugins size their workspace with the CUDA kernel library's own queries, "
                              f"which could not be built or loaded: {e}") from None
        register(trt)
        plugin_source = "python (tda_export.trt.plugins)"
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(job["onnx"]):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailed(f"{job['onnx']}: TensorRT's ONNX parser failed: {errors}")
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        layers.append(Layer(layer.name, layer.type.name, _plugin_of(trt, layer)))
    model = onnx.load(job["onnx"], load_external_data=False)
    tda_nodes = [(n.name, n.op_type) for n in model.graph.node if n.domain == "tda"]
    del model
    L = logic()
    check_coverage(tda_nodes, layers, L.namespace, L.version)

    config = builder.create_builder_config()
    for p in job["profiles"]:
        profile = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    if job.get("optimization_level") is not None:
        config.builder_optimization_level = int(job["optimization_level"])
    ccs = job.get("compute_capabilities") or []
    if ccs:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, cc), i):
                raise BuildFailed(f"compute capability {cc} rejected by {trt.__name__}")
    cache_path = job.get("timing_cache")
    if cache_path:
        blob = Path(cache_path).read_bytes() if Path(cache_path).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    print(f"building the {job['target']} plan ({len(job['profiles'])} profiles, "
          f"{sum(1 for l in layers if l.plugin)} plugin layers)", file=sys.stderr, flush=True)
    out = Path(job["plan"])
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _file_writer(trt, f)
            ok = builder.build_serialized_network_to_stream(network, config, writer)
        if writer.error is not None:
            raise BuildFailed(f"writing {tmp}: {writer.error}") from writer.error
        if not ok:
            raise BuildFailed("TensorRT could not build the plan: " + ("; ".join(logger.errors) or "no error logged"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if cache_path:
        ser = config.get_timing_cache().serialize()
        tmp = Path(f"{cache_path}.{os.getpid()}.tmp")
        tmp.write_bytes(memoryview(ser))
        os.replace(tmp, cache_path)
    return {"version": trt.__version__, "module": trt.__name__, "plugin_source": plugin_source,
            "decode_version": logic().build_decode_version(),  # what the plugins recorded in the plan
            "build_seconds": round(time.time() - t0, 2), "plan_bytes": out.stat().st_size,
            "compute_capabilities": ccs, "optimization_level": job.get("optimization_level"),
            "layers": summary(layers)}


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    try:
        report = {"ok": True, **run(job)}
    except Exception as e:  # reported to the parent, which raises it as a clear error
        report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    Path(job["report"]).write_text(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
