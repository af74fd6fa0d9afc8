"""Decode speed on a quiet box and next to busy processes: native dense (tda-run --bench) and llama.cpp
(llama-bench), the same threads and batch 1, quiet and busy rounds interleaved; per system the share of
its quiet speed it keeps when busy (issue 18's target: native keeps at least llama.cpp's share).

  python bench/busy_box.py -e ENGINE --llama-bin DIR --gguf F32=f32.gguf [--rounds 3] [--busy 0,1]

"Busy N" = N processes running `while True: pass`, started before and stopped after each measured run
(one per candidate run, so every candidate meets the same competition). Every candidate runs once per
round and busy level, in a fixed order, and the busy levels alternate within a round. Candidates:

  native adaptive   tda-run's defaults: the decode-step thread governor on (cpp/src/parallel.h)
  native fixed      TDA_NATIVE_ADAPTIVE_THREADS=0: every step on all threads (before the governor)
  native 1 thread   --threads 1 (what the governor can fall back to)
  native passive    fixed, and GOMP_SPINCOUNT=0: workers sleep at once (the load-average rule's pick)
  llama.cpp NAME    llama-bench -p 0 -n STEPS -d PROMPT -r 1 on each --gguf (--llama-poll: its --poll values;
                    --llama-passive: also with OMP_WAIT_POLICY=PASSIVE, for a llama.cpp built with OpenMP)

`--candidates` picks a subset (comma-separated names, or their first words). tda-run prints the
governor's steps per thread count (TDA_NATIVE_ADAPTIVE_THREADS_TRACE=1); the table shows their total.
A run past --timeout seconds is killed and counted at steps / timeout tok/s, marked "<=" (an upper bound).
Cores = CPU time / wall time of the measured process, and of the busy processes beside it. The load
average is printed before and after (the box must be quiet apart from the busy processes this starts).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from native_decode import llama_rate
from native_threads import cpu_seconds

from tda_export.native import build_native


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextmanager
def busy(n: int):
    """n busy-loop processes for the duration; yields a function giving the cores they got so far."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3 if n else 0)  # running before the candidate starts
        c0, t0 = [cpu_seconds(h.pid) for h in hogs], time.perf_counter()
        yield lambda: sum(cpu_seconds(h.pid) - c for h, c in zip(hogs, c0)) / (time.perf_counter() - t0)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@contextmanager
def environ(extra: dict):
    """os.environ with `extra` set, for the child processes started inside."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed(run) -> tuple[float, float]:
    """run() in this process's child; (its result, the cores the child used: CPU time / wall time)."""
    before, t = os.times(), time.perf_counter()
    out = run()
    dt, after = time.perf_counter() - t, os.times()
    return out, (after.children_user + after.children_system - before.children_user - before.children_system) / dt


def native_run(cli: str, args, threads: int, env_extra: dict) -> tuple[float, bool, dict[int, int]]:
    """tok/s of native dense decode (one tda-run --bench), whether it timed out, and the governor's
    decode steps per thread count (empty when off)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env |= {"TDA_NATIVE_ADAPTIVE_THREADS_TRACE": "1"} | env_extra
    cmd = [cli, "-e", args.engine, "--no-verify", "--bench", "--repeats", "1", "--densities", "1", "--threads",
           str(threads), "--new-tokens", str(args.steps), "--prompt-tokens", str(args.prompt_tokens)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return args.steps / args.timeout, True, {}
    if r.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed: {r.stderr}")
    rate = next(float(line.split()[3]) for line in r.stdout.splitlines() if line.startswith("1.00 "))
    m = re.search(r"decode steps by threads: (.*)", r.stderr)
    steps = {int(n): int(c) for c, n in re.findall(r"(\d+) on (\d+)", m.group(1))} if m else {}
    return rate, False, steps


def candidates(args, cli: str) -> list[tuple[str, object]]:
    """(name, run() -> (tok/s, timed out, steps per thread count))."""
    t = args.threads
    out = [("native adaptive", lambda: native_run(cli, args, t, {"TDA_NATIVE_ADAPTIVE_THREADS": "1"})),
           ("native fixed", lambda: native_run(cli, args, t, {"TDA_NATIVE_ADAPTIVE_THREADS": "0"})),
           ("native 1 thread", lambda: native_run(cli, args, 1, {})),
           ("native passive", lambda: native_run(cli, args, t, {"TDA_NATIVE_ADAPTIVE_THREADS": "0",
                                                                "GOMP_SPINCOUNT": "0"}))]
    if args.llama_bin:
        polls = [None] if not args.llama_poll else [int(p) for p in args.llama_poll.split(",")]
        for item in filter(None, args.gguf.split(",")):
            name, path = item.split("=", 1)
            if not Path(path).exists():
                raise SystemExit(f"--gguf {name}: {path} does not exist")
            for poll in polls:
                for passive in (False, True) if args.llama_passive else (False,):
                    label = f"llama.cpp {name}" + ("" if poll is None else f" poll {poll}") + (" passive" if passive else "")

                    def run(path=path, poll=poll, passive=passive):
                        with environ({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}):
                            try:
                                return llama_rate(Path(args.llama_bin), path, 1, args.prompt_tokens, args.steps, t,
                                                  poll, timeout=args.timeout), False, {}
                            except subprocess.TimeoutExpired:
                                return args.steps / args.timeout, True, {}
                    out.append((label, run))
    if args.candidates:
        want = [w.strip() for w in args.candidates.split(",")]
        out = [(n, r) for n, r in out if any(n == w or n.startswith(w + " ") or n == "native " + w for w in want)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--engine", required=True, help="a float32 engine directory (native dense)")
    ap.add_argument("--llama-bin", default=None, help="llama.cpp's bin directory (llama-bench)")
    ap.add_argument("--gguf", default="", help="NAME=file.gguf,... for --llama-bin")
    ap.add_argument("--llama-poll", default="", help="llama-bench --poll values to try, e.g. 50,0 [its default]")
    ap.add_argument("--llama-passive", action="store_true",
                    help="also llama.cpp with OMP_WAIT_POLICY=PASSIVE (its OpenMP build's workers sleep at once)")
    ap.add_argument("--busy", default="0,1", help="numbers of busy processes, each in every round [0,1]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per run")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=40.0, help="seconds before a run is killed")
    ap.add_argument("--candidates", default="", help="subset, e.g. 'adaptive,fixed,llama.cpp'")
    ap.add_argument("--cli", default=None, help="the tda-run to measure [this checkout's, built on demand]")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, 4 steps, 16-token prompts")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.prompt_tokens = 1, 4, 16
    cli = args.cli or str(build_native().cli)
    cands = candidates(args, cli)
    levels = [int(b) for b in args.busy.split(",")]
    print("command: " + shlex.join(["python", *sys.argv]))
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  load average {load()}  {os.cpu_count()} cores  "
          f"threads {args.threads}  batch 1  prompt {args.prompt_tokens}  steps {args.steps}  rounds {args.rounds}"
          + ("  QUICK: numbers mean nothing" if args.quick else ""), flush=True)
    rates, cores, hog_cores, timeouts, steps_at = {}, {}, {}, {}, {}
    for r in range(args.rounds):
        for b in (levels if r % 2 == 0 else levels[::-1]):
            for name, run in cands:
                with busy(b) as hogs:
                    (rate, timed_out, at), used = timed(run)
                    hog = hogs()
                key = (name, b)
                rates.setdefault(key, []).append(rate)
                cores.setdefault(key, []).append(used)
                hog_cores.setdefault(key, []).append(hog)
                timeouts[key] = timeouts.get(key, 0) + timed_out
                for n, c in at.items():
                    steps_at.setdefault(key, {}).setdefault(n, 0)
                    steps_at[key][n] += c
        print(f"round {r + 1}/{args.rounds} done {time.strftime('%H:%M:%S')}  load average {load()}", flush=True)

    print(f"ended {time.strftime('%H:%M:%S')}  load average {load()}")
    print("\n| candidate | busy processes | tok/s min | median | max | busy/quiet (medians) | cores used "
          "| cores the busy processes got | decode steps by threads |\n|---|---|---|---|---|---|---|---|---|")
    for name, _ in cands:
        quiet = statistics.median(rates[name, levels[0]])
        for b in levels:
            rs = rates[name, b]
            mark = "<=" if timeouts[name, b] else ""
            ratio = statistics.median(rs) / quiet if b != levels[0] else 1.0
            at = steps_at.get((name, b), {})
            print(f"| {name} | {b} | {mark}{min(rs):.1f} | {mark}{statistics.median(rs):.1f} | {max(rs):.1f} "
                  f"| {ratio:.2f}x | {statistics.median(cores[name, b]):.2f} "
                  f"| {statistics.median(hog_cores[name, b]) if b else 0:.2f} "
                  f"| {', '.join(f'{n}: {c}' for n, c in sorted(at.items())) or '-'} |")
    if any(timeouts.values()):
        print(f"\n<=: some runs passed --timeout {args.timeout:.0f} s and count at steps / timeout (an upper bound)")


if __name__ == "__main__":
    main()
