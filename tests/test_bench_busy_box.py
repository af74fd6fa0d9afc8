"""bench/busy_box.py end to end on a tiny engine (its --quick smoke test), with test_bench_native_decode's
stand-in for llama.cpp's llama-bench: the chosen candidates quiet and next to one busy process, the ratio per
system, the governor's steps per thread count, and the load average."""
import os
import subprocess
import sys

from test_bench_native_decode import LLAMA_BENCH, ROOT, _stand_in, engine  # noqa: F401  (engine: a fixture)


def test_quick_table(engine, tmp_path):  # noqa: F811
    bins = tmp_path / "bin"
    bins.mkdir()
    _stand_in(bins / "llama-bench", LLAMA_BENCH)
    gguf = tmp_path / "f32.gguf"
    gguf.write_bytes(b"\0" * 4096)
    cmd = [sys.executable, str(ROOT / "bench" / "busy_box.py"), "-e", str(engine), "--quick", "--llama-bin", str(bins),
           "--gguf", f"F32={gguf}", "--llama-passive", "--candidates", "adaptive,fixed,llama.cpp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.startswith("command: python ") and "QUICK" in out and out.count("load average") >= 3
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = ["native adaptive", "native fixed", "llama.cpp F32", "llama.cpp F32 passive"]  # --candidates' subset
    assert [(row.split(" | ")[0][2:], row.split(" | ")[1]) for row in rows] == [(n, b) for n in names for b in "01"]
    for row in rows:
        cells = row.split(" | ")
        assert cells[5].endswith("x") and float(cells[2]) > 0, row
    assert all("| 123.4 | 123.4 | 123.4 | 1.00x |" in row for row in rows if row.startswith("| llama.cpp"))
    adaptive = [row for row in rows if row.startswith("| native adaptive")]
    assert all("2: 4" in row.split(" | ")[-1] or "1: " in row for row in adaptive), adaptive  # 4 steps, governed
    assert all(row.endswith("| - |") for row in rows if not row.startswith("| native adaptive"))
