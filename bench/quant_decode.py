"""Decode tok/s of the native runtime on block-quantized engines next to llama.cpp on the same bits:
every engine, density, batch size and thread count in one run, interleaved round by round
(min / median / max), with % of each format's bandwidth floor and engine size next to the GGUF's.

  python bench/quant_decode.py --engines fp32=E32,q8_0=E8,q4_0=E40,q4_1=E41 \\
      --llama-bin DIR --gguf q8_0=q8_0.gguf,q4_0=q4_0.gguf,q4_1=q4_1.gguf \\
      [--densities 0.9,0.7,0.5] [--sparse-engines q4_1] [--batches 1,4] [--threads 1,2] [--repeats 3] [--steps 32]
      [--quick]

Engines are `tda-export build --weight-format F` directories (NAME=DIR; NAME a format name pairs the
engine with the GGUF of the same NAME). NAME@ISA (generic, avx2, avx512) runs that engine with
TDA_CPU_ISA=ISA, capping the CPU kernels' variant (q8_0@avx512: AVX-512 without its VNNI dot products),
so two variants of one engine are timed in the same interleaved rounds; the suffix is not part of the
GGUF pairing. Rows per (threads, batch): each engine dense (d=1.00), the
engines named in --sparse-engines (default: all) at each density with the clamp users get
(Engine.thresholds + Engine.density_bounds, what `run`/`serve` do), then llama.cpp per GGUF (batch 1:
`llama-bench -p 0 -n STEPS -d PROMPT`; batch > 1: `llama-batched-bench`, as bench/native_decode.py).

"vs llama.cpp" divides by the median of llama.cpp on the GGUF of the engine's NAME (q4_1 engine vs
llama.cpp q4_1), else on --reference. % of floor = tok/s / (B x copy bandwidth / bytes one step reads);
native: the engine's dense weight bytes (tda_rt weight_bytes: blocks where blocks are stored) with the
MLP tensors scaled by the realised per-sequence share (a lower bound of the % at B > 1, as in
native_decode.py); llama.cpp: its GGUF file's bytes. Copy bandwidth: tda_rt_copy_bandwidth, probed
before every round, the best used. Engine size: model.safetensors (the weights, one copy) and the whole
directory (model.onnx holds no weights). Timings on a busy box mean little: the script prints the load
average at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_decode import decode_rate, llama_rate, probe_description  # noqa: E402

from tda_export.native.binding import copy_bandwidth  # noqa: E402
from tda_export.runtime.engine import Engine  # noqa: E402


def safetensors_sizes(path: Path) -> dict[str, int]:
    """tensor name -> bytes, from the file's header alone."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def pairs(text: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise SystemExit(f"{what}: expected NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if not Path(path).exists():
            raise SystemExit(f"{what} {name}: {path} does not exist")
        out.append((name, path))
    return out


def isa_of(name: str) -> str | None:
    """The TDA_CPU_ISA cap an engine NAME@ISA asks for (None: the best this CPU has)."""
    isa = name.partition("@")[2] or None
    if isa not in (None, "generic", "avx2", "avx512"):
        raise SystemExit(f"--engines {name}: @{isa} is not generic, avx2 or avx512")
    return isa


def with_isa(isa: str | None, run):
    """run() with TDA_CPU_ISA=isa (read by the kernels per call), restored after."""
    old = os.environ.pop("TDA_CPU_ISA", None)
    if isa:
        os.environ["TDA_CPU_ISA"] = isa
    try:
        return run()
    finally:
        os.environ.pop("TDA_CPU_ISA", None)
        if old is not None:
            os.environ["TDA_CPU_ISA"] = old


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", required=True, help="NAME=ENGINE_DIR,... (NAME: fp32, q8_0, q4_0, q4_1, ...)")
    ap.add_argument("--densities", default="0.9,0.7,0.5")
    ap.add_argument("--sparse-engines", default=None, help="engine NAMEs run at --densities [all]")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", default="1,2", help="thread counts, every candidate at each")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per candidate and round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--llama-bin", default=None, help="llama.cpp's bin directory (llama-bench, llama-batched-bench)")
    ap.add_argument("--gguf", default="", help="NAME=file.gguf,... (NAME pairs it with the engine of that NAME)")
    ap.add_argument("--reference", default="q4_1", help="GGUF NAME every row is also compared with [q4_1]")
    ap.add_argument("--poll", type=int, default=None, help="llama-bench --poll [its default]")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, 4 steps, 16-token prompts")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.prompt_tokens = 1, 4, 16
    print("command: " + shlex.join(["python", *sys.argv]))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  load average {load}"
          f"  {platform.processor() or platform.machine()}  {os.cpu_count()} cores"
          + ("  QUICK: smoke test, numbers mean nothing" if args.quick else ""))
    sys.stdout.flush()

    engines = pairs(args.engines, "--engines")
    ggufs = pairs(args.gguf, "--gguf") if args.llama_bin else []
    batches = [int(b) for b in args.batches.split(",") if b]
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    densities = [float(d) for d in args.densities.split(",") if d and float(d) != 1.0]
    sparse = set(args.sparse_engines.split(",")) if args.sparse_engines else {n for n, _ in engines}
    if args.llama_bin:
        bin_dir = Path(args.llama_bin)
        need = ["llama-bench"] + (["llama-batched-bench"] if max(batches) > 1 else [])
        missing = [n for n in need if not (bin_dir / n).exists()]
        if missing:
            raise SystemExit(f"--llama-bin {bin_dir}: no {', '.join(missing)}")

    info = {}  # engine NAME -> (weight_bytes, mlp_bytes, safetensors bytes, dir bytes, intermediate, manifest)
    loaded = {}  # (NAME, threads) -> Engine
    for name, d in engines:
        for t in thread_counts:
            loaded[name, t] = Engine.load(d, backend="native", threads=t)
        e = loaded[name, thread_counts[0]]
        m = e.manifest
        sizes = safetensors_sizes(Path(d) / "model.safetensors")
        mlp = e.backend.engine.info.mlp_weight_bytes
        total = sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file())
        info[name] = (e.backend.engine.info.weight_bytes, mlp, (Path(d) / "model.safetensors").stat().st_size, total,
                      m["intermediate_size"], m)

    cands = []  # (threads, batch, row name, engine NAME or None, run, density)
    for t in thread_counts:
        for B in batches:
            for name, _ in engines:
                e = loaded[name, t]
                m = info[name][5]
                prompt = np.random.default_rng(B).integers(10, m["vocab_size"] - 1, (B, args.prompt_tokens))
                prompt = prompt.astype(np.int64)
                for d in [1.0] + (densities if name in sparse else []):
                    th = e.thresholds(d, args.prompt_tokens)
                    bd = e.density_bounds(d) if d < 1.0 else None
                    cands.append((t, B, f"native {name} d={d:.2f}", name,
                                  lambda e=e, p=prompt, th=th, bd=bd, isa=isa_of(name):
                                  with_isa(isa, lambda: decode_rate(e.backend, p, th, args.steps, bd)), d))
            for gname, path in ggufs:
                cands.append((t, B, f"llama.cpp {gname}", None,
                              lambda B=B, path=path, t=t: (llama_rate(bin_dir, path, B, args.prompt_tokens, args.steps,
                                                                      t, args.poll), None), None))

    for _, _, _, name, run, _ in cands:  # warm-up: page the weights in (llama.cpp warms up itself)
        if name is not None:
            run()
    rates = {(t, B, row): [] for t, B, row, _, _, _ in cands}
    kept = {}
    bw = []
    for _ in range(args.repeats):
        bw.append(copy_bandwidth())
        for t, B, row, name, run, _ in cands:
            r, counts = run()
            rates[t, B, row].append(r)
            if counts is not None:
                kept[t, B, row] = float(counts.mean()) / info[name][4]
    bandwidth = max(bw)

    print(f"threads {args.threads}  batches {args.batches}  prompt {args.prompt_tokens} tokens  steps {args.steps}  "
          f"rounds {args.repeats} (interleaved)  ended {time.strftime('%H:%M:%S')}  load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (best of the rounds; worst {min(bw) / 1e9:.1f}) by "
          f"{probe_description()}")
    gsize = {g: os.path.getsize(p) for g, p in ggufs}
    print("\n| engine | weights | dense bytes/step | model.safetensors | directory | GGUF of the same NAME | "
          "safetensors / GGUF |\n|---|---|---|---|---|---|---|")
    for name, d in engines:
        wb, mlp, st, total, _, m = info[name]
        g = gsize.get(name.split("@")[0])
        print(f"| {name} ({d}) | {m.get('weights', m.get('dtype'))} | {wb / 2**20:.1f} MiB (MLP {mlp / 2**20:.1f}) "
              f"| {st / 2**20:.1f} MiB | {total / 2**20:.1f} MiB | {f'{g / 2**20:.1f} MiB' if g else '-'} "
              f"| {f'{st / g:.3f}x' if g else '-'} |")
    for t in thread_counts:
        for B in batches:
            print(f"\nthreads {t}, batch {B}\n\n| candidate | MLP rows kept | tok/s min | median | max | "
                  f"vs llama.cpp same format | vs llama.cpp {args.reference} | % of floor |\n"
                  "|---|---|---|---|---|---|---|---|")
            med = {row: statistics.median(rs) for (tt, b, row), rs in rates.items() if tt == t and b == B and rs}
            ref = med.get(f"llama.cpp {args.reference}")
            for tt, b, row, name, _, d in cands:
                if (tt, b) != (t, B):
                    continue
                rs = rates[t, B, row]
                if name is None:
                    gname = row.removeprefix("llama.cpp ")
                    step, share, same = gsize[gname], None, None
                else:
                    wb, mlp = info[name][:2]
                    share = kept.get((t, B, row), 1.0)
                    step = wb - mlp + mlp * share
                    same = med.get(f"llama.cpp {name.split('@')[0]}")
                floor = B * bandwidth / step
                print(f"| {row} | {f'{share:.1%}' if share is not None else '100% (file)'} | {min(rs):.1f} "
                      f"| {med[row]:.1f} | {max(rs):.1f} | {f'{med[row] / same:.2f}x' if same else '-'} "
                      f"| {f'{med[row] / ref:.2f}x' if ref else '-'} | {100 * med[row] / floor:.0f}% |")


if __name__ == "__main__":
    main()
