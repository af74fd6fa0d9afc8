"""bench/native_decode.py end to end on a tiny engine (its --quick smoke test), with stand-ins for
llama.cpp's llama-bench / llama-batched-bench that print their output formats, and eval reports; and
the one copy-bandwidth probe that it and `tda-run --bench` share."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tda_export.native import build_native
from tda_export.native.binding import copy_bandwidth
from test_runtime import build_engine

ROOT = Path(__file__).resolve().parents[1]

LLAMA_BENCH = """import json, sys
a = sys.argv
assert a[a.index("-p") + 1] == "0" and a[a.index("-d") + 1] == "16", a
print(json.dumps([{"model_filename": a[a.index("-m") + 1], "avg_ts": 123.4}]))
"""
BATCHED_BENCH = """import sys
a = sys.argv
pl = int(a[a.index("-npl") + 1])
print("main: n_kv_max = 2048")
print('{"n_kv_max": 2048, "pp": 16, "tg": 4, "pl": %d, "t_tg": 0.1, "speed_tg": %.1f, "speed": 1.0}' % (pl, 400.0 + pl))
"""


def _stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


def _eval_report(density, increase, ci, kept, as_engine):
    return {"model": "tiny", "requested_density": density, "selection": {"as_engine": as_engine},
            "tda": {"perplexity_increase": increase, "increase_ci95": ci}, "realised_density": {"mean": kept},
            "text": {"source": "held out", "sequences": 4, "prompt_tokens": 16, "continuation_tokens": 8}}


@pytest.fixture(scope="module")
def engine(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("native_decode")
    return build_engine(tiny_dirs["llama"], root / "engine", root)[0]


def test_copy_bandwidth_probe():
    assert copy_bandwidth(1 << 20, 2) > 1e6  # bytes/s of a 1 MiB copy, read + write


def test_quick_table(engine, tmp_path):
    bins = tmp_path / "bin"
    bins.mkdir()
    _stand_in(bins / "llama-bench", LLAMA_BENCH)
    _stand_in(bins / "llama-batched-bench", BATCHED_BENCH)
    gguf = tmp_path / "f32.gguf"
    gguf.write_bytes(b"\0" * 4096)
    good, bad = tmp_path / "q05.json", tmp_path / "q09.json"
    good.write_text(json.dumps(_eval_report(0.5, 1.5, [1.2, 1.9], 0.501, True)))
    bad.write_text(json.dumps(_eval_report(0.9, 0.2, [0.1, 0.3], 0.85, False)))
    cmd = [sys.executable, str(ROOT / "bench" / "native_decode.py"), "-e", str(engine), "--quick", "--threads", "1",
           "--batches", "1,2", "--densities", "0.9,0.5", "--llama-bin", str(bins), "--gguf", f"F32={gguf}",
           "--quality", f"{good},{bad}"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this checkout's tda_export, as `python bench/...` from its root
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.startswith("command: python ") and "--quick" in out.splitlines()[0]
    assert "QUICK" in out and "load average" in out and "tda_rt_copy_bandwidth: best of 5" in out
    for batch in ("1", "2"):
        table = out.split(f"\nbatch {batch}\n")[1].split("\nbatch ")[0]
        for row in ("onnxruntime dense", "native d=1.00", "native d=0.90", "native d=0.50", "llama.cpp F32"):
            assert f"| {row} |" in table, (row, table)
    assert "| 123.4 | 123.4 | 123.4 |" in out.split("\nbatch 1\n")[1].split("\nbatch 2\n")[0]
    assert "| 402.0 | 402.0 | 402.0 |" in out.split("\nbatch 2\n")[1]
    assert "+150.0% (+120.0%, +190.0%), kept 0.501 |" in out
    assert "NOT the engines' selection" in out  # the d=0.9 report was not the engines' clamp


def test_tda_run_bench_names_the_probe(engine):
    r = subprocess.run([str(build_native().cli), "-e", str(engine), "--no-verify", "--bench", "--repeats", "1",
                        "--new-tokens", "2", "--prompt-tokens", "8", "--densities", "0.5", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tda_rt_copy_bandwidth: best of 5 single-thread memcpy of 512 MiB" in r.stdout, r.stdout


def test_quant_decode_quick_table(engine, tiny_dirs, tmp_path):
    """bench/quant_decode.py: float and block engines, densities, threads and batches in one interleaved run,
    each engine beside the stand-in llama.cpp of its format, sizes beside the GGUF's."""
    from click.testing import CliRunner

    from tda_export.cli import main
    q4 = tmp_path / "q4_0-engine"
    r = CliRunner().invoke(main, ["build", "-m", str(tiny_dirs["llama"]), "--weight-format", "q4_0", "-c",
                                  str(engine / "calibration.json"), "-o", str(q4)])
    assert r.exit_code == 0, r.output
    bins = tmp_path / "bin"
    bins.mkdir()
    _stand_in(bins / "llama-bench", LLAMA_BENCH)
    _stand_in(bins / "llama-batched-bench", BATCHED_BENCH)
    gguf = tmp_path / "q4_0.gguf"
    gguf.write_bytes(b"\0" * 4096)
    cmd = [sys.executable, str(ROOT / "bench" / "quant_decode.py"), "--engines",
           f"fp32={engine},q4_0={q4},q4_0@generic={q4}",
           "--quick", "--threads", "1,2", "--batches", "1,2", "--densities", "0.5", "--sparse-engines", "q4_0",
           "--llama-bin", str(bins), "--gguf", f"q4_0={gguf}", "--reference", "q4_0"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "QUICK" in out and "tda_rt_copy_bandwidth: best of 5" in out
    sizes = out.split("| engine |")[1].split("\nthreads ")[0]
    assert "| fp32 (" in sizes and f"| q4_0 ({q4}) | q4_0 |" in sizes and "| 0.0 MiB |" in sizes  # the 4 KiB GGUF
    for t in ("1", "2"):
        for b in ("1", "2"):
            table = out.split(f"\nthreads {t}, batch {b}\n")[1].split("\nthreads ")[0]
            for row in ("native fp32 d=1.00", "native q4_0 d=1.00", "native q4_0 d=0.50", "llama.cpp q4_0"):
                assert f"| {row} |" in table, (row, table)
            assert "| native fp32 d=0.50 |" not in table  # --sparse-engines
            # @generic: the same engine on the portable kernels, still paired with the q4_0 GGUF
            generic = next(line for line in table.splitlines() if line.startswith("| native q4_0@generic d=1.00 |"))
            assert generic.split(" | ")[5].endswith("x"), generic
            speed = "123.4" if b == "1" else "402.0"
            assert f"| llama.cpp q4_0 | 100% (file) | {speed} | {speed} | {speed} | - | 1.00x |" in table, table
