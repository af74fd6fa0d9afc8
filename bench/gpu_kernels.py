"""GPU check + benchmark of libtda_kernels_cuda.so, both decode versions in one run.

    python bench/gpu_kernels.py --out bench/gpu_kernels_h200.json              # check, then time
    python bench/gpu_kernels.py --check-only --device cpu --small --out x.json  # CPU dry run (tests)

1. Correctness (--check-only stops here): every decode version against a float64 reference with the
   same masks (computed with torch on the same device, so the 7B shapes cost milliseconds on a GPU):
   random nonzero inputs, NaN-poisoned outputs, a garbage-filled workspace, empty/full/single/first/last
   and odd-sized random masks, batches 0/1/3/8/64, fp32/fp16/bf16, deterministic or not; v2 also twice
   with bitwise-equal results; plus select_active (exact) and prefill_scores. Exits non-zero on any
   failure, after writing the JSON.
2. Timing (GPU only): CUDA events around CUDA-graph replays that walk over --layers distinct layers of
   Mistral-7B MLP weights (H=4096, I=14336, bf16; 16 layers = 5.6 GB, ~90x the H200's 60 MB L2), per
   (batch, density): decode v1 and v2, cuBLAS dense (torch matmuls on the same weights) and cuBLAS on
   a pre-gathered compact copy of the union rows, interleaved over --rounds rounds (min and median
   reported). Bandwidth is computed on the bytes needed (3*H*2 bytes per union row) against the
   device-to-device copy bandwidth measured in the same run.
Prints markdown tables; writes everything as JSON to --out (bench/gpu_report.py renders it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from tda_export.kernels import abi, testing  # noqa: E402
from tda_export.kernels import torch_ops as K  # noqa: E402
from tda_export.ops import reference  # noqa: E402

H, I = 4096, 14336
TARGETS = {"batch1_frac_copy_bw": 0.85, "dense_vs_cublas": 1.05, "batch8_frac_copy_bw": 0.80}
SHAPES_FULL = ((40, 72), (264, 1032), (H, I))   # 264: not a multiple of 32; 1032: a partial union segment
SHAPES_SMALL = ((40, 72), (264, 1032))
BATCHES = (0, 1, 3, 8, 64)


# ---------------------------------------------------------------- correctness
def correctness_cases(shapes=SHAPES_FULL, versions=(1, 2), batches=BATCHES) -> list[dict]:
    """The decode cases, as plain dicts (mask kinds per sequence): batch 1 once per mask kind, larger
    batches cycling through the kinds so every batch mixes empty, full, single and odd masks."""
    cases = []
    for dtype in ("float32", "float16", "bfloat16"):
        for hidden, inter in shapes:
            for batch in batches:
                if batch == 64 and hidden == H and dtype == "float32":
                    continue  # 7 GB of fp64 weights for one case; the fp32 path is the same code at smaller shapes
                kind_sets = [[k] for k in testing.MASK_KINDS] if batch == 1 else \
                    [[testing.MASK_KINDS[(b * 5 + batch) % len(testing.MASK_KINDS)] for b in range(batch)]]
                for kinds in kind_sets:
                    for version in versions:
                        for det in (True, False):
                            cases.append({"dtype": dtype, "hidden": hidden, "inter": inter, "batch": batch,
                                          "kinds": kinds, "version": version, "deterministic": det})
    return cases


def _weights(dtype, hidden: int, inter: int, device: str, seed: int):
    """Random nonzero weights made on the device (a 7B layer drawn on the CPU takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    gu = (torch.randn(inter, 2, hidden, generator=g, device=device) / hidden ** 0.5).to(dtype)
    wd = (torch.randn(inter, hidden, generator=g, device=device) / inter ** 0.5).to(dtype)
    return gu, wd


def check_group(cases: list[dict], gu, wd, device: str, seed: int) -> list[dict]:
    """Cases that share dtype, shape, batch and mask kinds: one problem and one fp64 reference, then every
    (version, deterministic) run on it with a poisoned output and a garbage workspace."""
    c0 = cases[0]
    dtype = getattr(torch, c0["dtype"])
    rng = np.random.default_rng(seed)
    masks = [testing.make_mask(k, c0["inter"], rng, rng.uniform(0.05, 0.9)) for k in c0["kinds"]]
    idx, cnt = (torch.from_numpy(a).to(device) for a in testing.state_from_masks(masks, c0["inter"]))
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(c0["batch"], c0["hidden"], generator=g, device=device).to(dtype)
    ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
    tol = testing.TOLERANCE[dtype]
    out_rows = []
    for case in cases:
        status, out = testing.run_decode(x, gu, wd, idx, cnt, deterministic=case["deterministic"],
                                         version=case["version"])
        problems = []
        err = float("inf")
        if status != abi.TDA_OK:
            problems.append(f"status {status}")
        else:
            err = testing.rel_error(out, ref)
            for b, kind in enumerate(case["kinds"]):
                if kind == "empty" and not bool(torch.all(out[b] == 0)):
                    problems.append(f"sequence {b}: empty mask gave a nonzero row")
            if not err < tol:
                problems.append(f"rel err {err:.2e} >= {tol:.0e}")
            if case["version"] == 2 or case["deterministic"]:  # v2 is always deterministic
                again = testing.run_decode(x, gu, wd, idx, cnt, deterministic=case["deterministic"],
                                           version=case["version"])[1]
                if not torch.equal(torch.nan_to_num(out, 7.0), torch.nan_to_num(again, 7.0)):
                    problems.append("two runs differ bitwise")
        name = (f"decode v{case['version']} {case['dtype']} H={case['hidden']} I={case['inter']} "
                f"B={case['batch']} det={int(case['deterministic'])} {','.join(sorted(set(case['kinds'])))}")
        out_rows.append({"check": name, "rel_err": err, "tol": tol, "ok": not problems, "problems": problems})
    return out_rows


def check_other_ops(device: str, inters=(13, 72, I)) -> list[dict]:
    rng = np.random.default_rng(5)
    out = []
    for inter in inters:
        scores = rng.gamma(0.3, size=(8, inter)).astype(np.float32)
        scores[1] = 0
        for tau in (0.0, 0.2, 0.5, 1.0):
            idx, cnt = K.select_active(torch.from_numpy(scores).to(device), torch.tensor(tau, device=device))
            ref_idx, ref_cnt = reference.select_active(scores, tau)
            same = np.array_equal(idx.cpu().numpy(), ref_idx) and np.array_equal(cnt.cpu().numpy(), ref_cnt)
            out.append({"check": f"select I={inter} tau={tau}", "rel_err": 0.0 if same else float("inf"),
                        "tol": 0.5, "ok": same, "problems": [] if same else ["lists differ"]})
    for dtype in (torch.float32, torch.bfloat16):
        for norm in ("token_l2", "none"):
            z = torch.randn(2, 37, 1536).to(dtype)
            valid = (torch.rand(2, 37) > 0.2).float()
            s_in = torch.rand(2, 1536)
            got = K.prefill_scores(z.to(device), valid.to(device), s_in.to(device), norm)
            ref = s_in.double().numpy() + reference.prompt_scores(z.double().numpy(), valid.numpy(), norm)
            err = testing.rel_error(got, ref)
            out.append({"check": f"prefill_scores {str(dtype)[6:]} {norm}", "rel_err": err, "tol": 1e-5,
                        "ok": err < 1e-5, "problems": [] if err < 1e-5 else [f"rel err {err:.2e}"]})
    return out


def check_correctness(device: str, cases: list[dict], other_inters=(13, 72, I)) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        key = (case["dtype"], case["hidden"], case["inter"], case["batch"], tuple(case["kinds"]))
        groups.setdefault(key, []).append(case)
    results, weights_key, weights = [], None, None
    for n, (key, group) in enumerate(groups.items()):
        if key[:3] != weights_key:  # cases come ordered by dtype and shape: one weight set alive at a time
            weights_key, weights = key[:3], None
            weights = _weights(getattr(torch, key[0]), key[1], key[2], device, n)
        for r in check_group(group, *weights, device, seed=n):
            results.append(r)
            if not r["ok"]:
                print(f"FAIL {r['check']}: {'; '.join(r['problems'])}", flush=True)
    results += check_other_ops(device, other_inters)
    bad = [r for r in results if not r["ok"]]
    worst = {}
    for r in results:
        if r["check"].startswith("decode") and np.isfinite(r["rel_err"]):
            key = r["check"].split(" H=")[0]
            worst[key] = max(worst.get(key, 0.0), r["rel_err"] / r["tol"])
    print(f"correctness: {len(results) - len(bad)}/{len(results)} ok; worst error/tolerance per version and "
          f"dtype: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(worst.items())), flush=True)
    return results


# ---------------------------------------------------------------- timing
class GraphTimer:
    """fn captured `reps` times in one CUDA graph; time() gives µs per fn call of one replay."""

    def __init__(self, fn, reps: int):
        self.reps = reps
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            for _ in range(reps):
                fn()
        self.graph.replay()
        torch.cuda.synchronize()

    def time(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / self.reps


def interleaved_us(timers: dict[str, GraphTimer], rounds: int) -> dict[str, dict]:
    """Replays the candidates in alternation, `rounds` times each: min and median µs per call."""
    samples = {k: [] for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            samples[k].append(t.time())
    return {k: {"min": float(np.min(v)), "median": float(np.median(v))} for k, v in samples.items()}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy: read + written bytes per second (best of 5 graph replays)."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = GraphTimer(lambda: dst.copy_(src), 4)
    return 2 * n / (min(t.time() for _ in range(5)) * 1e-6) / 1e9


def bench(layers: int, densities, batches, versions, reps: int, rounds: int, copy_gbs: float,
          deadline: float) -> list[dict]:
    dt = torch.bfloat16
    print(f"allocating {layers} layers of Mistral-7B MLP weights ({layers * 3 * H * I * 2 / 1e9:.1f} GB)", flush=True)
    gu = [torch.randn(I, 2, H, device="cuda", dtype=dt) / H ** 0.5 for _ in range(layers)]
    wd = [torch.randn(I, H, device="cuda", dtype=dt) / I ** 0.5 for _ in range(layers)]
    rng = np.random.default_rng(0)
    per = max(1, reps // layers)
    rows = []
    print("| batch | density | union | " + " | ".join(f"v{v} µs (med)" for v in versions) +
          " | best GB/s | of copy bw | cuBLAS dense µs | cuBLAS compact µs | best vs dense |", flush=True)
    print("|---" * (8 + len(versions)) + "|", flush=True)
    for batch in batches:
        x = torch.randn(batch, H, device="cuda", dtype=dt)

        def dense_all():
            for l in range(layers):
                gate_up = (x @ gu[l].view(2 * I, H).t()).view(batch, I, 2)
                torch.nn.functional.silu(gate_up[..., 0]).mul(gate_up[..., 1]) @ wd[l]

        dense_timer = GraphTimer(dense_all, per)
        for d in densities:
            if time.time() > deadline:
                print(f"time budget spent: skipping batch {batch} density {d} and later", flush=True)
                return rows
            states, union_rows = [], []
            for _ in range(layers):
                masks = [np.arange(I, dtype=np.int32) if d >= 1.0 else
                         np.sort(rng.choice(I, int(round(d * I)), replace=False)).astype(np.int32)
                         for _ in range(batch)]
                idx, cnt = testing.state_from_masks(masks, I)
                states.append((torch.from_numpy(idx).cuda(), torch.from_numpy(cnt).cuda()))
                union_rows.append(np.unique(np.concatenate(masks)))
            n_union = float(np.mean([u.size for u in union_rows]))
            needed = n_union * 3 * H * 2
            sel = [torch.from_numpy(u).cuda() for u in union_rows]
            gu_c = [gu[l][sel[l]].contiguous() for l in range(layers)]
            wd_c = [wd[l][sel[l]].contiguous() for l in range(layers)]

            def compact_all():
                for l in range(layers):
                    u = gu_c[l].shape[0]
                    gate_up = (x @ gu_c[l].view(2 * u, H).t()).view(batch, u, 2)
                    torch.nn.functional.silu(gate_up[..., 0]).mul(gate_up[..., 1]) @ wd_c[l]

            def ours(version):
                def run():
                    for l in range(layers):
                        K.sparse_gated_mlp_decode(x, gu[l], wd[l], *states[l], "silu", True, version)
                return run

            timers = {"cublas_dense": dense_timer, "cublas_compact": GraphTimer(compact_all, per)}
            timers.update({f"v{v}": GraphTimer(ours(v), per) for v in versions})
            t = interleaved_us(timers, rounds)
            del gu_c, wd_c, timers
            best_v = min(versions, key=lambda v: t[f"v{v}"]["median"])
            best = t[f"v{best_v}"]["median"]
            gbs = needed / (best * 1e-6) / 1e9
            row = {"batch": batch, "density": d, "union_rows": n_union, "needed_MB": needed / 1e6,
                   "target_us": needed / (TARGETS["batch1_frac_copy_bw"] * copy_gbs * 1e9) * 1e6,
                   "us": t, "best_version": best_v, "GBps": gbs, "frac_copy_bw": gbs / copy_gbs,
                   "cublas_dense_us": t["cublas_dense"]["median"], "cublas_compact_us": t["cublas_compact"]["median"],
                   "speedup_vs_dense": t["cublas_dense"]["median"] / best}
            for v in versions:
                row[f"v{v}_frac_copy_bw"] = needed / (t[f"v{v}"]["median"] * 1e-6) / 1e9 / copy_gbs
            rows.append(row)
            print(f"| {batch} | {d:.1f} | {n_union / I:.2f} | " +
                  " | ".join(f"{t[f'v{v}']['median']:.1f}" for v in versions) +
                  f" | {gbs:.0f} | {gbs / copy_gbs:.0%} | {row['cublas_dense_us']:.1f} | "
                  f"{row['cublas_compact_us']:.1f} | {row['speedup_vs_dense']:.2f}x |", flush=True)
    return rows


def verdicts(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["batch"] == 1 and r["density"] < 1.0:
            out[f"batch1 d={r['density']} >= 85% copy bw"] = r["frac_copy_bw"] >= TARGETS["batch1_frac_copy_bw"]
        if r["batch"] == 1 and r["density"] >= 1.0:
            out["batch1 d=1.0 within 5% of cuBLAS dense"] = \
                r["us"][f"v{r['best_version']}"]["median"] <= TARGETS["dense_vs_cublas"] * r["cublas_dense_us"]
        if r["batch"] == 8:
            out[f"batch8 d={r['density']} >= 80% copy bw (union)"] = \
                r["frac_copy_bw"] >= TARGETS["batch8_frac_copy_bw"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON output path")
    p.add_argument("--device", default="cuda", help="cuda; cpu only with --check-only (dry run)")
    p.add_argument("--versions", default="1,2", help="decode versions to check and time")
    p.add_argument("--layers", type=int, default=16, help="distinct weight layers the timing rotates over")
    p.add_argument("--densities", default="0.1,0.3,0.5,1.0")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--reps", type=int, default=64, help="layer calls per graph replay")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per candidate")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--checks-from", type=Path, nargs="*", default=[],
                   help="with --skip-check: JSON files of earlier --check-only runs, whose checks are copied "
                        "into --out (timing refuses a version that failed them)")
    p.add_argument("--small", action="store_true", help="correctness at small shapes only")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop timing new rows after this many seconds (results so far are kept)")
    args = p.parse_args(argv)
    args.versions = [int(v) for v in args.versions.split(",")]
    args.densities = [float(d) for d in args.densities.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    bad = [v for v in args.versions if v not in (1, 2)]
    if bad:
        p.error(f"--versions: {bad} not in 1, 2")
    if args.device != "cuda" and not args.check_only:
        p.error("timing needs --device cuda; use --check-only for a CPU dry run")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_kernels.py: no CUDA device (torch sees none); use --check-only --device cpu")
        lib = abi.cuda_library()
        print(f"library {lib.path} ready in {time.time() - t0:.0f} s; device {torch.cuda.get_device_name()}",
              flush=True)
    shapes = SHAPES_SMALL if args.small else SHAPES_FULL
    if args.skip_check:
        checks = [c for f in args.checks_from for c in json.loads(f.read_text())["checks"]]
    else:
        checks = check_correctness(args.device, correctness_cases(shapes, args.versions),
                                   (13, 72) if args.small else (13, 72, I))
    failed = [c["check"] for c in checks if not c["ok"] and (
        not c["check"].startswith("decode v") or int(c["check"].split()[1][1:]) in args.versions)]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "versions": args.versions,
              "checks": checks, "failed_checks": failed, "rows": [], "targets": {}, "copy_GBps": None,
              "shape": {"H": H, "I": I, "dtype": "bfloat16", "layers": args.layers}}
    if not args.check_only and not failed:
        copy_gbs = copy_bandwidth_gbs()
        print(f"\ndevice-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)\n", flush=True)
        rows = bench(args.layers, args.densities, args.batches, args.versions, args.reps, args.rounds, copy_gbs,
                     t0 + args.budget_s)
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
