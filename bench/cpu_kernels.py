"""CPU library decode vs a dense torch MLP at several densities.

Usage: python bench/cpu_kernels.py [--threads N] [--repeat R] [--batch B] [--weights FORMAT] [--down-format FORMAT]
                                  [--x-format dtype|q8_0] [--shape NAME]

With --batch B > 1 every sequence gets its own random mask of the given
density (the union read is then larger than d*I). --weights q8_0|q4_0|q4_1
times the sparse kernel on block-quantized weights (the same random weights,
quantized round-to-nearest); x, the output and the dense torch MLP stay fp32.
--down-format q8_0 (with --weights q4_0/q4_1) stores the down rows in q8_0, as the
exporter does by default under the 4-bit formats (down_weight_format).
--x-format q8_0 (with block --weights) has gate/up read x quantized per block of
32 (x_format: integer block dot products, as llama.cpp); the dense torch MLP
still reads x as is. --shape times one of SHAPES only.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import sys
import time
from pathlib import Path

# Before any OpenMP runtime starts: on a shared CI box spinning worker
# threads get descheduled and a 0.3 ms MLP takes 25 ms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from tda_export.kernels import abi, testing  # noqa: E402
from tda_export.kernels.torch_ops import workspace  # noqa: E402
from tda_export.ops import blocks  # noqa: E402
from tda_export.ops.contract import (DOWN_WEIGHT_FORMATS, WEIGHT_FORMATS, X_FORMATS, down_format,  # noqa: E402
                                     x_format_check)

SHAPES = {"SmolLM2-135M": (576, 1536), "2048x8192": (2048, 8192)}
DENSITIES = (1.0, 0.5, 0.3, 0.1)


def _time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def _decode_call(x, gu, wd, idx, cnt, weights="dtype", down="same", x_format="dtype"):
    """The bare library call with arguments and workspace built once (as the
    torch runtime does per layer), so Python-side allocation is not timed.
    For a block format, gu and wd are its uint8 blocks."""
    lib = abi.cpu_library()
    out = torch.empty_like(x)
    a = abi.DecodeArgs(dtype=abi.DTYPE_CODE[str(x.dtype).removeprefix("torch.")], activation=0, batch=x.shape[0],
                       hidden=x.shape[-1], intermediate=gu.shape[0], deterministic=1, hidden_states=x.data_ptr(),
                       gate_up_weight=gu.data_ptr(), down_weight_t=wd.data_ptr(), active_idx=idx.data_ptr(),
                       active_count=cnt.data_ptr(), output=out.data_ptr(),
                       weight_format=abi.WEIGHT_FORMAT_CODE[weights],
                       down_weight_format=abi.DOWN_WEIGHT_FORMAT_CODE[down],
                       x_format=abi.X_FORMAT_CODE[x_format])
    size = lib.workspace_size("tda_sparse_gated_mlp_decode", a)
    ws, ws_ptr = workspace(size, torch.device("cpu"))  # 256-byte aligned, as the header asks
    fn, ref = lib._lib.tda_sparse_gated_mlp_decode, ctypes.byref(a)

    def call():
        status = fn(ref, ws_ptr, size, 0)
        assert status == abi.TDA_OK, abi.cpu_library().status_string(status)
        return out, ws  # keep the buffers alive
    return call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="dtype",
                   help="storage of the sparse kernel's weights (dtype: fp32)")
    p.add_argument("--down-format", choices=DOWN_WEIGHT_FORMATS, default="same",
                   help="storage of the down rows when not --weights' (a block format under block --weights)")
    p.add_argument("--x-format", choices=X_FORMATS, default="dtype",
                   help="how gate/up read x: as is, or q8_0 (quantized per block of 32; block --weights only)")
    p.add_argument("--shape", choices=list(SHAPES), help="time this shape only (default: all)")
    args = p.parse_args()
    try:
        down = down_format(args.weights, args.down_format)
        x_format_check(args.weights, args.x_format)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({args.threads} threads), fp32, weights {args.weights}, down rows {down}, "
          f"x {args.x_format}, "
          f"batch {args.batch}, "
          f"best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n")
    print("| shape (H, I) | density | sparse (µs) | dense torch (µs) | speed-up |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, (h, i) in SHAPES.items():
        if args.shape and name != args.shape:
            continue
        x, gu, wd, _, _ = testing.decode_problem(args.batch, h, i, torch.float32, [np.zeros(0, np.int32)] * args.batch,
                                                 0)
        w_gate, w_up, w_down = gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd.t().contiguous()
        if args.weights != "dtype":
            gu, wd = (torch.from_numpy(blocks.quantize(f, t.numpy())) for f, t in ((args.weights, gu), (down, wd)))

        def dense():
            return torch.nn.functional.linear(
                torch.nn.functional.silu(torch.nn.functional.linear(x, w_gate)) * torch.nn.functional.linear(x, w_up),
                w_down)

        t_dense = _time(dense, args.repeat)
        for d in DENSITIES:
            idx, cnt = testing.state_from_masks([testing.make_mask("full", i, rng) if d == 1.0 else
                                                 np.sort(rng.choice(i, int(d * i), replace=False)).astype(np.int32)
                                                 for _ in range(args.batch)], i)
            idx, cnt = torch.from_numpy(idx), torch.from_numpy(cnt)
            call = _decode_call(x, gu, wd, idx, cnt, args.weights, args.down_format, args.x_format)
            t_sparse = _time(call, args.repeat)
            print(f"| {name} ({h}, {i}) | {d:.1f} | {t_sparse:.0f} | {t_dense:.0f} | {t_dense / t_sparse:.2f}x |")


if __name__ == "__main__":
    main()
