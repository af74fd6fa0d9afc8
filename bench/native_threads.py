"""How the native runtime's one thread pool waits, measured at both extremes and in between.

libgomp reads its spin count once, when it loads, so every policy is its own `tda-run --bench`
process; the policies are interleaved, round after round:
  passive  GOMP_SPINCOUNT=0            an idle worker sleeps at once (futex wake-up per region)
  bounded  GOMP_SPINCOUNT=TDA_RT_GOMP_SPINCOUNT (tda-run's default below 2x load per core): ~5 us
  spin     OMP_WAIT_POLICY=ACTIVE      spins ~minutes before sleeping
`--busy 0,1` also runs with N competing busy-loop processes (a shared box) and reports the cores each
side got (CPU time / wall time, tda-run's whole process: load, prefill and decode): a pool that spins
takes them from the others. `--also NAME=PATH` adds another tda-run binary (e.g. an older build) under
its own defaults.

  python bench/native_threads.py -e smollm2-engine [--rounds 3] [--busy 0,1] [--densities 0.5]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tda_export.native import build_native

RUNTIME_H = Path(__file__).resolve().parents[1] / "cpp" / "include" / "tda" / "runtime.h"
BOUNDED = re.search(r'#define TDA_RT_GOMP_SPINCOUNT "(\d+)"', RUNTIME_H.read_text()).group(1)
# explicit, so tda-run's busy-box rule (no spin above 2x load per core) does not pick for us
POLICIES = {"passive": {"GOMP_SPINCOUNT": "0"}, "bounded": {"GOMP_SPINCOUNT": BOUNDED},
            "spin": {"OMP_WAIT_POLICY": "ACTIVE"}}


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def bench_once(cli: str, env_extra: dict, args, busy: int) -> tuple[dict, float, float]:
    """density -> decode tok/s of one tda-run --bench process; the cores it used on average (CPU time /
    wall time); the cores its busy competitors got. Only tda-run is reaped between the two os.times()
    readings (the busy processes after), so their difference is its CPU time alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | env_extra
    cmd = [cli, "-e", args.engine, "--no-verify", "--bench", "--repeats", "1", "--new-tokens", str(args.steps),
           "--prompt-tokens", str(args.prompt_tokens), "--densities", args.densities, "--batch", str(args.batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    time.sleep(0.2 if busy else 0)
    hog0 = [cpu_seconds(h.pid) for h in hogs]
    t, before = time.perf_counter(), os.times()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    dt = time.perf_counter() - t
    after = os.times()
    hog_cores = sum(cpu_seconds(h.pid) - c for h, c in zip(hogs, hog0)) / dt
    for h in hogs:
        h.kill()
        h.wait()
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {err}")
    rates = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[1].endswith("%") and parts[0][0].isdigit():
            rates[parts[0]] = float(parts[3])  # tok/s median (of one repeat: the rate)
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return rates, cpu / dt, hog_cores


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--engine", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", default="0,1", help="numbers of competing busy processes to try")
    ap.add_argument("--densities", default="0.5")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--spincounts", default="", help="more pools to try: GOMP_SPINCOUNT values, e.g. 300,1000")
    ap.add_argument("--cli", default=None, help="the tda-run to measure [this checkout's, built on demand]")
    ap.add_argument("--also", action="append", default=[], help="NAME=path/to/tda-run, run under its own defaults")
    args = ap.parse_args()
    cli = args.cli or str(build_native().cli)
    policies = dict(POLICIES)
    for n in filter(None, args.spincounts.split(",")):
        policies[f"GOMP_SPINCOUNT={n}"] = {"GOMP_SPINCOUNT": n}
    cands = [(name, cli, env) for name, env in policies.items()]
    cands += [(a.split("=", 1)[0], a.split("=", 1)[1], {}) for a in args.also]
    rows, cores, hogs = {}, {}, {}
    for busy in [int(b) for b in args.busy.split(",")]:
        for _ in range(args.rounds):
            for name, path, env in cands:
                rates, used, hog = bench_once(path, env, args, busy)
                cores.setdefault((busy, name), []).append(used)
                hogs.setdefault((busy, name), []).append(hog)
                for d, r in rates.items():
                    rows.setdefault((busy, name, d), []).append(r)
    print(f"engine {args.engine}  batch {args.batch}  threads {args.threads or os.cpu_count()}  steps {args.steps}  "
          f"rounds {args.rounds} (interleaved)  load {os.getloadavg()[0]:.2f}")
    print("| busy processes | pool | density | tok/s min | tok/s median | tok/s max | cores used by tda-run "
          "| cores the busy processes got |\n|---|---|---|---|---|---|---|---|")
    for (busy, name, d), rs in rows.items():
        print(f"| {busy} | {name} | {d} | {min(rs):.1f} | {statistics.median(rs):.1f} | {max(rs):.1f} "
              f"| {statistics.median(cores[busy, name]):.2f} | {statistics.median(hogs[busy, name]):.2f} |")


if __name__ == "__main__":
    main()
