"""GPU check + benchmark of the block-quantized kernels (q8_0 / q4_0 / q4_1, issue 19): the sparse decode on
block weights and the dense block GEMV tda_block_linear of libtda_kernels_cuda.so.

    python bench/gpu_quant.py --out bench/gpu_quant_GPU.json                 # check, then time
    python bench/gpu_quant.py --check-only --device cpu --small --out x.json  # CPU dry run (tests)

Formats: q8_0, q4_0, q4_1 (both weights in that format) and the 4-bit engines' q8_0 down rows, written
"q4_1+q8_0" (weight_format q4_1, down_weight_format q8_0; the exporter's default under q4_0/q4_1).

1. Correctness (--check-only stops here), every format: the decode at fp32/fp16/bf16, batches 0/1/3/8/33, mixed
   empty/full/single/odd masks, deterministic or not, NaN-poisoned outputs, against the float64 reference of
   the blocks' exact dequantized weights (ops/torch_blocks.py on the same device: the 7B shapes cost
   milliseconds on a GPU); tda_block_linear at M = 1/3/8/17 with strided x and y and a row range (the columns
   outside stay NaN) against a float64 matmul; tda_block_dequantize bit for bit. The "+q8_0" formats: the decode
   at fp32/bf16, batches 0/1/8/33 (7B shape: bf16 at batches 1 and 8; the kernels are the single formats',
   paired). Blocks are random bytes with finite, modest fp16 scales, so every nibble and int8 value occurs.
   Exits non-zero on any failure.
2. Timing (GPU only): CUDA graphs walking --layers distinct Mistral-7B MLP layers (H=4096, I=14336) per format,
   interleaved over --rounds rounds, per (format, batch, density):
   - ours: tda_sparse_gated_mlp_decode on the blocks (bf16 activations);
   - cuBLAS bf16 dense: the same MLP as torch matmuls on bf16 weights (what a float engine does);
   - dense block GEMV at the same bytes: tda_block_linear over the union rows' gate/up blocks (N = 2U, K = H)
     plus a down projection stored as GGUF does (N = H, K = U rounded up to 32), i.e. our own dense quantized
     kernel reading as many bytes as the sparse decode needs: the gap is the cost of gathering rows.
   Bandwidth is on the bytes needed (3 * U rows of H/32 blocks, gate/up rows in the first format, down rows in
   the second) against the device-to-device copy bandwidth of the same run; issue 19's target: q4 sparse MLP
   at >= 80% of copy bandwidth at batch 1.
Prints markdown tables; writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from tda_export.kernels import abi, testing  # noqa: E402
from tda_export.kernels import torch_ops as K  # noqa: E402
from tda_export.ops import torch_blocks  # noqa: E402
from tda_export.ops.contract import BLOCK_FORMATS, QUANT_BLOCK  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_kernels", Path(__file__).with_name("gpu_kernels.py"))
gk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gk)  # GraphTimer, interleaved_us, copy_bandwidth_gbs: one timing method for both

H, I = 4096, 14336
FORMATS = tuple(BLOCK_FORMATS)
# "F+G": gate/up rows in F, down rows in G (down_weight_format); a plain F is both in F.
OWN_DOWN = ("q4_1+q8_0", "q4_0+q8_0")
COMBOS = FORMATS + OWN_DOWN
TARGET_FRAC_COPY_BW = 0.80  # issue 19: the int4 sparse MLP at batch 1, on active bytes
SHAPES_FULL = ((32, 8), (1056, 2051), (H, I))  # 1056: 33 blocks, past a warp's 32-block step; 2051: odd I
SHAPES_SMALL = ((32, 8), (1056, 2051))
BATCHES = (0, 1, 3, 8, 33)


def formats_of(combo: str) -> tuple[str, str]:
    """(weight_format, the down rows' format) of "q4_1+q8_0" or "q4_1"."""
    wf, _, down = combo.partition("+")
    return wf, down or wf


def _down_attr(combo: str) -> str:
    """The down_weight_format attribute of a combo ("same" for a plain format)."""
    return "same" if "+" not in combo else formats_of(combo)[1]


def _row(check: str, err: float, tol: float, problems: list[str]) -> dict:
    return {"check": check, "rel_err": err, "tol": tol, "ok": not problems, "problems": problems}


def check_decode(combo: str, dtype, hidden: int, inter: int, batch: int, device: str, seed: int) -> list[dict]:
    name, down = formats_of(combo)
    gu_q = testing.random_blocks(name, 2 * inter, hidden, device, seed, 0.5 / hidden ** 0.5).view(inter, 2, -1)
    wd_q = testing.random_blocks(down, inter, hidden, device, seed + 1, 0.5 / inter ** 0.5)
    gu, wd = torch_blocks.dequantize(name, gu_q), torch_blocks.dequantize(down, wd_q)
    rng = np.random.default_rng(seed)
    kinds = [testing.MASK_KINDS[(b * 5 + batch) % len(testing.MASK_KINDS)] for b in range(max(batch, 1))][:batch]
    masks = [testing.make_mask(k, inter, rng, rng.uniform(0.05, 0.9)) for k in kinds]
    idx, cnt = (torch.from_numpy(a).to(device) for a in testing.state_from_masks(masks, inter))
    x = torch.randn(batch, hidden, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    x = x.to(dtype)
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
    tol = testing.TOLERANCE[dtype]
    rows = []
    for det in (True, False):
        status, out = testing.run_decode(x, gu_q, wd_q, idx, cnt, deterministic=det, weight_format=name,
                                         down_weight_format=_down_attr(combo))
        problems, err = [], float("inf")
        if status != abi.TDA_OK:
            problems.append(f"status {status}")
        else:
            err = testing.rel_error(out, ref) if batch else 0.0
            problems += [f"sequence {b}: empty mask gave a nonzero row" for b, k in enumerate(kinds)
                         if k == "empty" and not bool(torch.all(out[b] == 0))]
            if not err < tol:
                problems.append(f"rel err {err:.2e} >= {tol:.0e}")
        rows.append(_row(f"decode {combo} {str(dtype)[6:]} H={hidden} I={inter} B={batch} det={int(det)}",
                         err, tol, problems))
    return rows


def check_linear(name: str, n: int, k: int, m: int, device: str, seed: int) -> list[dict]:
    w_q = testing.random_blocks(name, n, k, device, seed, 1.0 / k ** 0.5)
    w = torch_blocks.dequantize(name, w_q)
    x = torch.randn(m, k + 3, generator=torch.Generator(device=device).manual_seed(seed), device=device)[:, :k]
    y = torch.full((m, n + 5), float("nan"), device=device)  # ldy > N: the columns past N must stay NaN
    n0, n1 = (1, n - 1) if n > 2 else (0, n)
    status, y = testing.run_block_linear(x, w_q, name, n0, n1, out=y)
    problems, err = [], float("inf")
    if status != abi.TDA_OK:
        problems.append(f"status {status}")
    else:
        ref = x.double() @ w.double().T
        err = testing.rel_error(y[:, n0:n1], ref[:, n0:n1])
        if not err < 1e-6:
            problems.append(f"rel err {err:.2e}")
        if not (torch.isnan(y[:, :n0]).all() and torch.isnan(y[:, n1:]).all()):
            problems.append("wrote outside [n_begin, n_end)")
    out = [_row(f"block_linear {name} N={n} K={k} M={m}", err, 1e-6, problems)]
    lib = testing.library_for(device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    deq = torch.full((n, k), float("nan"), device=device)
    status = lib.block_dequantize_status(abi.WEIGHT_FORMAT_CODE[name], k, n, w_q.data_ptr(), deq.data_ptr(), k, stream)
    same = status == abi.TDA_OK and torch.equal(deq, w)
    out.append(_row(f"block_dequantize {name} N={n} K={k}", 0.0 if same else float("inf"), 0.5,
                    [] if same else [f"status {status}" if status else "bits differ"]))
    return out


def check_correctness(device: str, shapes) -> list[dict]:
    results, seed = [], 0
    for name in FORMATS:
        for hidden, inter in shapes:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for batch in BATCHES:
                    if hidden == H and batch == 33:
                        continue  # the 7B shape at batch 33: the same tiles as batch 8 plus L2 re-reads
                    seed += 1
                    results += check_decode(name, dtype, hidden, inter, batch, device, seed)
            for m in (1, 3, 8, 17):
                seed += 1
                results += check_linear(name, min(inter, 4096), hidden, m, device, seed)
    for combo in OWN_DOWN:  # the same kernels paired: fewer cases keep the stage's time (7B: bf16, batch 1 and 8)
        for hidden, inter in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                for batch in (0, 1, 8, 33):
                    if hidden == H and (batch in (0, 33) or dtype != torch.bfloat16):
                        continue
                    seed += 1
                    results += check_decode(combo, dtype, hidden, inter, batch, device, seed)
    for r in results:
        if not r["ok"]:
            print(f"FAIL {r['check']}: {'; '.join(r['problems'])}", flush=True)
    bad = sum(not r["ok"] for r in results)
    print(f"quantized correctness: {len(results) - bad}/{len(results)} ok", flush=True)
    return results


def bench(combo: str, layers: int, densities, batches, reps: int, rounds: int, copy_gbs: float,
          deadline: float) -> list[dict]:
    name, down = formats_of(combo)
    row_bytes = H // QUANT_BLOCK * BLOCK_FORMATS[name].block_bytes
    down_row_bytes = H // QUANT_BLOCK * BLOCK_FORMATS[down].block_bytes
    gu = [testing.random_blocks(name, 2 * I, H, "cuda", 10 * l, 0.01).view(I, 2, -1) for l in range(layers)]
    wd = [testing.random_blocks(down, I, H, "cuda", 10 * l + 1, 0.01) for l in range(layers)]
    gu16 = [torch.randn(I, 2, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5 for _ in range(min(layers, 8))]
    wd16 = [torch.randn(I, H, device="cuda", dtype=torch.bfloat16) / I ** 0.5 for _ in range(min(layers, 8))]
    lib = abi.cuda_library()
    rng = np.random.default_rng(0)
    per = max(1, reps // layers)
    rows = []
    for batch in batches:
        x = torch.randn(batch, H, device="cuda", dtype=torch.bfloat16)
        xf = x.float()

        def dense_bf16():
            for l in range(len(gu16)):
                g = (x @ gu16[l].view(2 * I, H).t()).view(batch, I, 2)
                torch.nn.functional.silu(g[..., 0]).mul(g[..., 1]) @ wd16[l]

        dense_timer = gk.GraphTimer(dense_bf16, max(1, reps // len(gu16)))
        for d in densities:
            if time.time() > deadline:
                print(f"time budget spent: skipping {combo} batch {batch} density {d} and later", flush=True)
                return rows
            states, unions = [], []
            for _ in range(layers):
                masks = [np.arange(I, dtype=np.int32) if d >= 1.0 else
                         np.sort(rng.choice(I, int(round(d * I)), replace=False)).astype(np.int32)
                         for _ in range(batch)]
                idx, cnt = testing.state_from_masks(masks, I)
                states.append((torch.from_numpy(idx).cuda(), torch.from_numpy(cnt).cuda()))
                unions.append(np.unique(np.concatenate(masks)).size)
            u = int(round(np.mean(unions)))
            u32 = (u + 31) // 32 * 32
            needed = u * (2 * row_bytes + down_row_bytes)
            # The dense GEMV at the same bytes: gate/up [2U, H] blocks and a down [H, U32] stored along U (each in
            # its format).
            gu_c = [testing.random_blocks(name, 2 * u, H, "cuda", 7 + l, 0.01) for l in range(layers)]
            wd_c = [testing.random_blocks(down, H, u32, "cuda", 9 + l, 0.01) for l in range(layers)]
            z = torch.zeros(batch, u32, device="cuda")
            y_gu = torch.empty(batch, 2 * u, device="cuda")
            y = torch.empty(batch, H, device="cuda")
            def linear(w, code, n, k, xin, out):
                a = abi.BlockLinearArgs(weight_format=code, m=batch, n=n, k=k, n_begin=0, n_end=n, ldx=xin.stride(0),
                                        ldy=out.stride(0), x=xin.data_ptr(), weight=w.data_ptr(), y=out.data_ptr())
                lib.call("tda_block_linear", a, 0, 0, torch.cuda.current_stream().cuda_stream)

            def dense_q():
                for l in range(layers):
                    linear(gu_c[l], abi.WEIGHT_FORMAT_CODE[name], 2 * u, H, xf, y_gu)
                    linear(wd_c[l], abi.WEIGHT_FORMAT_CODE[down], H, u32, z, y)

            def ours():
                for l in range(layers):
                    K.sparse_gated_mlp_decode(x, gu[l], wd[l], *states[l], "silu", True, 1, weight_format=name,
                                              down_weight_format=_down_attr(combo))

            timers = {"ours": gk.GraphTimer(ours, per), "cublas_bf16_dense": dense_timer,
                      "block_gemv_same_bytes": gk.GraphTimer(dense_q, per)}
            t = gk.interleaved_us(timers, rounds)
            del timers  # the graphs (the compact copies are replaced by the next row)
            us = t["ours"]["median"]
            gbs = needed / (us * 1e-6) / 1e9
            row = {"format": combo, "batch": batch, "density": d, "union_rows": u, "needed_MB": needed / 1e6,
                   "us": t, "GBps": gbs, "frac_copy_bw": gbs / copy_gbs,
                   "vs_cublas_bf16_dense": t["cublas_bf16_dense"]["median"] / us,
                   "vs_block_gemv_same_bytes": t["block_gemv_same_bytes"]["median"] / us}
            rows.append(row)
            print(f"| {combo} | {batch} | {d:.2f} | {u / I:.2f} | {us:.1f} | {gbs:.0f} | {gbs / copy_gbs:.0%} | "
                  f"{t['cublas_bf16_dense']['median']:.1f} | {row['vs_cublas_bf16_dense']:.2f}x | "
                  f"{t['block_gemv_same_bytes']['median']:.1f} | {row['vs_block_gemv_same_bytes']:.2f}x |",
                  flush=True)
    return rows


def verdicts(rows: list[dict]) -> dict:
    return {f"{r['format']} batch1 d={r['density']} >= 80% copy bw on active bytes":
            r["frac_copy_bw"] >= TARGET_FRAC_COPY_BW
            for r in rows if r["batch"] == 1 and formats_of(r["format"])[0] in ("q4_0", "q4_1")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON output path")
    p.add_argument("--device", default="cuda", help="cuda; cpu only with --check-only (dry run)")
    p.add_argument("--formats", default=",".join(COMBOS),
                   help=f"comma-separated, of {', '.join(COMBOS)} (F+G: gate/up rows in F, down rows in G)")
    p.add_argument("--layers", type=int, default=16, help="distinct weight layers per format the timing rotates over")
    p.add_argument("--densities", default="0.1,0.5,1.0")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--reps", type=int, default=64, help="layer calls per graph replay")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per candidate")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--small", action="store_true", help="correctness at small shapes only")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop timing new rows after this many seconds (results so far are kept)")
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in args.formats if f not in COMBOS]
    if bad:
        p.error(f"--formats: {bad} not in {', '.join(COMBOS)}")
    args.densities = [float(d) for d in args.densities.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device != "cuda" and not args.check_only:
        p.error("timing needs --device cuda; use --check-only for a CPU dry run")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_quant.py: no CUDA device (torch sees none); use --check-only --device cpu")
    checks = [] if args.skip_check else check_correctness(args.device, SHAPES_SMALL if args.small else SHAPES_FULL)
    failed = [c["check"] for c in checks if not c["ok"]]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "checks": checks,
              "failed_checks": failed, "rows": [], "targets": {}, "copy_GBps": None,
              "shape": {"H": H, "I": I, "activations": "bfloat16", "layers": args.layers}}
    if not args.check_only and not failed:
        copy_gbs = gk.copy_bandwidth_gbs()
        print(f"\ndevice-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)\n", flush=True)
        print("| format | batch | density | union | ours µs | GB/s | of copy bw | cuBLAS bf16 dense µs | vs it | "
              "block GEMV same bytes µs | vs it |\n" + "|---" * 11 + "|", flush=True)
        rows = []
        for name in args.formats:
            rows += bench(name, args.layers, args.densities, args.batches, args.reps, args.rounds, copy_gbs,
                          t0 + args.budget_s)
            torch.cuda.empty_cache()
        result.update(copy_GBps=copy_gbs, rows=rows, targets=verdicts(rows))
        print("\n" + "\n".join(f"- {'met' if ok else 'MISSED'}: {k}" for k, ok in result["targets"].items()))
    elif failed:
        print("correctness failed: timing skipped (a wrong kernel's speed means nothing)", flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if failed:
        sys.exit(f"{len(failed)} correctness checks failed, first: {failed[:3]}")
    return result


if __name__ == "__main__":
    main()
