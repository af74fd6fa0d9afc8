"""What ONNX Runtime's CPU provider costs on a block-quantized engine: session creation time, peak and steady
RSS, and decode ms/token, with constant folding (what the onnxruntime backend does: the dequantization of
every constant is folded into float32 weights at load, then the freed heap is handed back) and without it
(every step dequantizes every weight). Each configuration runs in a fresh process, so peaks don't mix.

    python bench/ort_block_memory.py ENGINE_DIR [ENGINE_DIR ...]   # e.g. a q4_1 and an fp32 SmolLM2 engine

Prints one row per engine and configuration, with the load average (timings on a busy box mean little).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("backend", "no_folding")
STEPS = 8


def measure(engine: Path, config: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    from tda_export.runtime.ort_backend import OrtBackend

    data = json.loads((engine / "manifest.json").read_text())
    start = time.perf_counter()
    if config == "backend":
        backend = OrtBackend(engine / data["model_file"], data, threads=2)
    else:  # the backend's session, without ConstantFolding
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        backend = OrtBackend.__new__(OrtBackend)
        backend.session = ort.InferenceSession(str(engine / data["model_file"]), opts,
                                               providers=["CPUExecutionProvider"],
                                               disabled_optimizers=["ConstantFolding"])
        backend.manifest, backend.has_bounds = data, True
        backend.inputs = {i.name: i for i in backend.session.get_inputs()}
        backend.presents = [o.name for o in backend.session.get_outputs() if o.name.startswith("present")]
    load_s = time.perf_counter() - start
    ids = np.arange(10, 42, dtype=np.int64)[None]
    logits, state = backend.prefill(ids, np.ones_like(ids), np.zeros(data["num_layers"], np.float32))
    start = time.perf_counter()
    for _ in range(STEPS):
        logits = backend.decode(state, logits.argmax(-1))
    decode_ms = (time.perf_counter() - start) / STEPS * 1e3
    steady = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
    return {"engine": str(engine), "weights": data.get("weights", data.get("dtype")), "config": config,
            "load_s": load_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steady_rss_mib": steady, "decode_ms": decode_ms}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3])))
        return
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'engine':40s} {'weights':8s} {'config':11s} {'load s':>7s} {'peak MiB':>9s} {'steady MiB':>11s} "
          f"{'decode ms':>10s}")
    for engine in sys.argv[1:]:
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--one", engine, config], capture_output=True, text=True)
            if out.returncode:
                print(f"{engine}: {config} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{Path(r['engine']).name:40s} {r['weights']:8s} {r['config']:11s} {r['load_s']:7.1f} "
                  f"{r['peak_rss_mib']:9.0f} {r['steady_rss_mib']:11.0f} {r['decode_ms']:10.1f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
