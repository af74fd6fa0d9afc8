"""CPU library decode vs a dense torch MLP at several densities (batch 1).

Usage: python bench/cpu_kernels.py [--threads N] [--repeat R]
"""
from __future__ import annotations

import argparse
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
from tda_export.kernels import testing  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({args.threads} threads), fp32, batch 1, best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n")
    print("| shape (H, I) | density | sparse (µs) | dense torch (µs) | speed-up |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, (h, i) in SHAPES.items():
        x, gu, wd, _, _ = testing.decode_problem(1, h, i, torch.float32, [np.zeros(0, np.int32)], 0)
        w_gate, w_up, w_down = gu[:, 0].contiguous(), gu[:, 1].contiguous(), wd.t().contiguous()

        def dense():
            return torch.nn.functional.linear(
                torch.nn.functional.silu(torch.nn.functional.linear(x, w_gate)) * torch.nn.functional.linear(x, w_up),
                w_down)

        t_dense = _time(dense, args.repeat)
        for d in DENSITIES:
            idx, cnt = testing.state_from_masks([testing.make_mask("full", i, rng) if d == 1.0 else
                                                 np.sort(rng.choice(i, int(d * i), replace=False)).astype(np.int32)],
                                                i)
            idx, cnt = torch.from_numpy(idx), torch.from_numpy(cnt)
            out = torch.empty_like(x)
            t_sparse = _time(lambda: testing.run_decode(x, gu, wd, idx, cnt, out=out), args.repeat)
            print(f"| {name} ({h}, {i}) | {d:.1f} | {t_sparse:.0f} | {t_dense:.0f} | {t_dense / t_sparse:.2f}x |")


if __name__ == "__main__":
    main()
