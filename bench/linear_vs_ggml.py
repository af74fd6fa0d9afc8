"""Per-matrix time of our dense block-quantized linear (tda_block_linear, x in fp32, weights dequantized
exactly in registers) against llama.cpp's ggml mul_mat on the same bytes (x quantized to q8_0/q8_1,
int8 dot products), and a memcpy of those bytes: SmolLM2-135M's matrices, each format, batch (M) and
thread count, interleaved call by call (bench/linear_vs_ggml.cpp), min / median microseconds.

  python bench/linear_vs_ggml.py --llama-src DIR [--formats q8_0,q4_0,q4_1] [--m 1,4] [--threads 1,2]
      [--repeats 200]

DIR is a llama.cpp source tree built with CMake (DIR/ggml/include, DIR/build/bin/libggml*.so).
"ggml / tda" > 1 means ours is faster. "GB/s" is the weight bytes over our median time. The last
column is max |ours - ggml| / max |ours|: ggml's activation rounding (ours is the contract's float op).
The lm_head (49152 x 576) does not fit in the caches; the others do after the first call, so they
show compute, not DRAM bandwidth.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name, N, K) of SmolLM2-135M: H 576, I 1536, 9 heads x 64, 3 kv heads, vocab 49152
SHAPES = (("q_proj / o_proj", 576, 576), ("k_proj / v_proj", 192, 576), ("gate or up", 1536, 576),
          ("down (as a linear)", 576, 1536), ("lm_head", 49152, 576))


def build(llama_src: Path, out: Path) -> Path:
    from tda_export.kernels import build as kbuild
    lib = Path(kbuild.build_cpu())
    exe = out / "linear_vs_ggml"
    cmd = ["g++", "-std=c++17", "-O2", "-fopenmp", f"-I{llama_src / 'ggml' / 'include'}",
           f"-I{kbuild.SRC_ROOT / 'include'}", str(HERE / "linear_vs_ggml.cpp"), str(lib),
           f"-L{llama_src / 'build' / 'bin'}", "-lggml", "-lggml-base", "-lggml-cpu",
           f"-Wl,-rpath,{llama_src / 'build' / 'bin'}", f"-Wl,-rpath,{lib.parent}", "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-src", required=True, help="llama.cpp source tree with a CMake build in build/")
    ap.add_argument("--formats", default="q8_0,q4_0,q4_1")
    ap.add_argument("--m", default="1,4", help="rows of x (batch)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(args.llama_src), Path(tmp))
        print("| format | matrix | M | threads | KiB | tda min / median µs | ggml min / median µs | memcpy µs "
              "| ggml / tda | tda GB/s | ggml vs tda |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for fmt in args.formats.split(","):
            for name, n, k in SHAPES:
                for m in args.m.split(","):
                    for t in args.threads.split(","):
                        reps = max(5, args.repeats // 20) if n > 10000 else args.repeats
                        r = subprocess.run([str(exe), fmt, m, str(n), str(k), t, str(reps)], check=True,
                                           capture_output=True, text=True).stdout.split()
                        nbytes = int(r[5])
                        tmin, tmed, gmin, gmed, cmin, cmed = map(float, r[6:12])
                        print(f"| {fmt} | {name} | {m} | {t} | {nbytes / 1024:.0f} | {tmin:.1f} / {tmed:.1f} "
                              f"| {gmin:.1f} / {gmed:.1f} | {cmed:.1f} | {gmed / tmed:.2f}x "
                              f"| {nbytes / tmed / 1e3:.1f} | {r[12]} |")
                        sys.stdout.flush()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
