"""Memory and time of `build`, `calibrate` and `eval` at Mistral-7B width, extrapolated to 32 layers.

Synthetic checkpoints (random bf16, Mistral-7B-v0.1 shape: hidden 4096, intermediate
14336, 32/8 heads, vocab 32000) are written one tensor group at a time with
safetensors, one shard per layer, so making them needs about one layer of RAM;
the 2- and 4-layer checkpoints link the 8-layer one's shards. Each command runs
as `python -m tda_export ... -m mistral-7b --weights DIR` (the headline command)
in a child process; its peak RSS comes from wait4() and a watchdog kills it if
the machine's MemAvailable falls below --min-available-gb (the box is shared).
wait4's ru_maxrss also counts the parent's RSS at fork time (Linux keeps the
pre-exec high-water mark), so this parent never imports torch: checkpoints are
made by a child too.

    python bench/build_scale.py --layers 2,4,8 [--steps build,calibrate,eval] [--work /tmp/scale]
    python bench/build_scale.py --layers 32 --steps build --keep-going   # the full-size export
    python bench/build_scale.py --layers 1,2,4 --steps trt --trt-dtype fp16   # + the TensorRT-RTX plan
    python bench/build_scale.py --layers 1,2,4 --steps trt --weight-format q4_0 --down-weight-format q4_0

The `trt` step is `build --target tensorrt-rtx --no-calibrate`; the plan is built in a grandchild
(`python -m tda_export.trt.build.builder`) running while the export process is still alive, so besides
wait4's peak (the largest single process) the watchdog samples the RSS of every process in the
child's session and reports the peak of their sum, the export process's and the builder's
(fp16 also runs ONNX Runtime for the goldens, in the export process, after the plan); the export
process's peak is also split before the builder (the export), beside it (idle) and after it (goldens).
`--weight-format q4_0|q4_1|q8_0` (and `--down-weight-format`) are passed to `build` for the `build`
and `trt` steps: a block-quantized engine, whose plan holds the dense linears as int4/int8 weight-only
and the MLP blocks for the plugin (default: float, the engine in --dtype as before).

Prints one row per (step, layers), the least-squares per-layer fit and its value at 32 layers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                  sliding_window=None, hidden_act="silu", tie_word_embeddings=False)
FULL_LAYERS = 32


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _layer_tensors(n: int, c: dict) -> dict:
    import torch

    h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    g = torch.Generator().manual_seed(n)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    p = f"model.layers.{n}."
    return {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}


def _write_dir(out: Path, layers: int, shards: dict[str, Path]) -> Path:
    """config.json, tokenizer and a safetensors index over `shards` (file name -> existing file)."""
    from transformers import MistralConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_tokenizer  # a small byte-level BPE: ids stay far below the 32000 vocab

    from safetensors import safe_open

    out.mkdir(parents=True, exist_ok=True)
    cfg = MistralConfig(num_hidden_layers=layers, **MISTRAL_7B)
    cfg.architectures = ["MistralForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    weight_map = {}
    for name, path in shards.items():
        if not (out / name).exists():
            (out / name).symlink_to(path.resolve())
        with safe_open(path, "pt") as f:
            weight_map.update({k: name for k in f.keys()})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def make_checkpoint(work: Path, layers: int) -> Path:
    """A `layers`-layer synthetic checkpoint in work/mistral7b-L<layers>; shards shared across sizes."""
    import torch
    from safetensors.torch import save_file

    store = work / "shards"
    store.mkdir(parents=True, exist_ok=True)
    c = MISTRAL_7B
    shards = {}
    for name, make in [("embed.safetensors", lambda: {"model.embed_tokens.weight": (torch.randn(
                            c["vocab_size"], c["hidden_size"], generator=torch.Generator().manual_seed(10_000))
                            * 0.02).to(torch.bfloat16)}),
                       ("head.safetensors", lambda: {"lm_head.weight": (torch.randn(
                           c["vocab_size"], c["hidden_size"], generator=torch.Generator().manual_seed(10_001))
                           * 0.02).to(torch.bfloat16), "model.norm.weight": torch.ones(c["hidden_size"],
                                                                                          dtype=torch.bfloat16)})] + \
            [(f"layer-{n:05d}.safetensors", lambda n=n: _layer_tensors(n, c)) for n in range(layers)]:
        path = store / name
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            save_file(make(), tmp, metadata={"format": "pt"})
            tmp.rename(path)
        shards[name] = path
    return _write_dir(work / f"mistral7b-L{layers}", layers, shards)


def _session_rss_gb(sid: int) -> dict[int, tuple[str, float]]:
    """pid -> (command line, RSS GB) of every process in session `sid`."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != sid:
                continue
            rss = next(int(l.split()[1]) for l in (d / "status").read_text().splitlines() if l.startswith("VmRSS:"))
            out[int(d.name)] = ((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"), rss / 2**20)
        except (OSError, StopIteration, ProcessLookupError):
            continue
    return out


def run_measured(cmd: list[str], min_available_gb: float, log: Path) -> dict:
    """Run `cmd`; peak RSS (wait4: largest process; sampled: sum over its session, and the TensorRT
    builder's), wall time and when the builder ran; killed (and reported) if MemAvailable gets too low."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    killed = threading.Event()
    lowest = [mem_available_gb()]
    tree = {"tree_rss_gb": 0.0, "main_rss_gb": 0.0, "builder_rss_gb": 0.0, "builder_start_s": None,
            "builder_end_s": None, "main_before_gb": 0.0, "main_during_gb": 0.0, "main_after_gb": 0.0}

    def watch():
        while proc.returncode is None and not killed.is_set():
            avail = mem_available_gb()
            lowest[0] = min(lowest[0], avail)
            procs = _session_rss_gb(proc.pid)
            tree["tree_rss_gb"] = max(tree["tree_rss_gb"], sum(r for _, r in procs.values()))
            if proc.pid in procs:
                tree["main_rss_gb"] = max(tree["main_rss_gb"], procs[proc.pid][1])
            builder = [r for c, r in procs.values() if "tda_export.trt.build.builder" in c]
            if builder:
                now = time.perf_counter() - start
                tree["builder_start_s"] = tree["builder_start_s"] or now
                tree["builder_end_s"] = now
                tree["builder_rss_gb"] = max(tree["builder_rss_gb"], builder[0])
            if proc.pid in procs:  # the export process before the builder (export), beside it, after it (goldens)
                phase = "during" if builder else "before" if tree["builder_start_s"] is None else "after"
                tree[f"main_{phase}_gb"] = max(tree[f"main_{phase}_gb"], procs[proc.pid][1])
            if avail < min_available_gb:
                killed.set()
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.25)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "peak_rss_gb": usage.ru_maxrss / 2**20, "wall_s": time.perf_counter() - start,
            "killed_low_memory": killed.is_set(), "min_mem_available_gb": lowest[0], **tree}


def commands(step: str, ckpt: Path, work: Path, layers: int, args) -> list[str]:
    base = [sys.executable, "-m", "tda_export", step, "-m", "mistral-7b", "--weights", str(ckpt)]
    cal = work / f"cal-L{layers}.json"
    quant = ["--weight-format", args.weight_format, "--down-weight-format", args.down_weight_format] \
        if args.weight_format != "float" else []
    if step == "build":
        return base + ["--dtype", "bf16", "--no-calibrate", "--force", *quant, "-o", str(work / f"engine-L{layers}")]
    if step == "trt":
        return [sys.executable, "-m", "tda_export", "build", "-m", "mistral-7b", "--weights", str(ckpt),
                "--dtype", args.trt_dtype, "--no-calibrate", "--force", *quant, "--target", "tensorrt-rtx",
                "--max-batch", str(args.trt_max_batch), "--max-seq-len", str(args.trt_max_seq_len),
                "-o", str(work / f"engine-trt-L{layers}")]
    if step == "calibrate":
        return base + ["--sequences", str(args.sequences), "--device", args.device, "-q", "-o", str(cal)]
    if step == "eval":
        return base + ["-c", str(cal), "--sequences", str(args.sequences), "--generate-prompts", "2",
                       "--generate-tokens", "8", "--device", args.device, "-q", "--json"]
    raise ValueError(step)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares y = a + b * layers."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def report(rows: list[dict], steps: list[str]) -> None:
    """The table of runs and the per-layer fits (rows of an older --json-out lack the phases: nan)."""
    nan = float("nan")
    print("\n| step | layers | peak RSS GB | tree RSS GB | export proc GB (before / beside / after the builder) "
          "| builder GB | wall s | builder s | written GB | min MemAvailable GB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = f"{r['written_gb']:.2f}" if r["written_gb"] else ""
        b = f"{r['builder_end_s'] - r['builder_start_s']:.0f}" if r["builder_start_s"] is not None else ""
        print(f"| {r['step']} | {r['layers']} | {r['peak_rss_gb']:.2f} | {r['tree_rss_gb']:.2f} | "
              f"{r['main_rss_gb']:.2f} ({r.get('main_before_gb', nan):.2f} / {r.get('main_during_gb', nan):.2f} / "
              f"{r.get('main_after_gb', nan):.2f}) | "
              f"{r['builder_rss_gb']:.2f} | {r['wall_s']:.0f} | {b} | {w} | "
              f"{r['min_mem_available_gb']:.1f} |" + (" killed: low memory" if r["killed_low_memory"] else "")
              + ("" if r["rc"] == 0 else f" rc {r['rc']}"))
    ok = [r for r in rows if r["rc"] == 0]
    if len({r["layers"] for r in ok}) > 1:
        print(f"\n| step | RSS GB = a + b*layers | at {FULL_LAYERS} layers | wall s = a + b*layers | at {FULL_LAYERS} |"
              f"\n|---|---|---|---|---|")
        for step in steps:
            pts = [r for r in ok if r["step"] == step]
            if len(pts) < 2:
                continue
            a, b = fit([(r["layers"], max(r["peak_rss_gb"], r["tree_rss_gb"])) for r in pts])
            ta, tb = fit([(r["layers"], r["wall_s"]) for r in pts])
            print(f"| {step} | {a:.2f} + {b:.3f}*L | {a + b * FULL_LAYERS:.1f} | {ta:.1f} + {tb:.2f}*L | "
                  f"{ta + tb * FULL_LAYERS:.0f} |")
            if step == "trt" and "main_after_gb" in pts[0]:
                # Which process and phase the peak comes from, each fitted alone. The fit of the peaks above
                # follows whichever phase peaks at 1-4 layers (the export's flat ~2 GB there), so the 32-layer
                # peak is the largest phase at 32: the builder plus the idle export process beside it, the
                # export, or the goldens.
                at = {}
                for key, what in [("builder_rss_gb", "builder"), ("main_before_gb", "export proc: export"),
                                  ("main_during_gb", "export proc: beside the builder"),
                                  ("main_after_gb", "export proc: goldens")]:
                    a, b = fit([(r["layers"], r[key]) for r in pts])
                    at[key] = a + b * FULL_LAYERS
                    print(f"| {step}: {what} | {a:.2f} + {b:.3f}*L | {at[key]:.1f} | | |")
                peak = max(at["builder_rss_gb"] + at["main_during_gb"], at["main_before_gb"], at["main_after_gb"])
                print(f"| {step}: largest phase (builder + beside it, export, goldens) | | **{peak:.1f}** | | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--steps", default="build,calibrate,eval")
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--sequences", type=int, default=8, help="calibrate prompts / eval windows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-available-gb", type=float, default=2.0)
    ap.add_argument("--trt-dtype", default="fp16", choices=["fp16", "bf16"], help="trt step: build --dtype")
    ap.add_argument("--trt-max-batch", type=int, default=1, help="trt step: build --max-batch")
    ap.add_argument("--trt-max-seq-len", type=int, default=512, help="trt step: build --max-seq-len")
    ap.add_argument("--weight-format", default="float", choices=["float", "q8_0", "q4_0", "q4_1"],
                    help="build and trt steps: build --weight-format (float: the weights in the dtype)")
    ap.add_argument("--down-weight-format", default="auto", choices=["auto", "q8_0", "q4_0", "q4_1"],
                    help="build and trt steps with a block --weight-format: build --down-weight-format")
    ap.add_argument("--clean", action="store_true", help="delete checkpoints and engines afterwards")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="print the tables of an earlier --json-out; run nothing")
    args = ap.parse_args()
    if args.report:
        rows = json.loads(args.report.read_text())
        report(rows, list(dict.fromkeys(r["step"] for r in rows)))
        return
    layer_counts = sorted(int(x) for x in args.layers.split(","))
    steps = args.steps.split(",")
    if args.make_only:
        for L in sorted(layer_counts, reverse=True):
            make_checkpoint(args.work, L)
        return
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--make-only", "--layers", args.layers, "--work", str(args.work)],
                   check=True)
    ckpts = {L: args.work / f"mistral7b-L{L}" for L in layer_counts}
    print(f"checkpoints ready in {time.perf_counter() - t:.0f} s; MemAvailable {mem_available_gb():.1f} GB",
          file=sys.stderr)
    rows = []
    for L in layer_counts:
        for step in steps:
            log = args.work / f"{step}-L{L}.log"
            r = run_measured(commands(step, ckpts[L], args.work, L, args), args.min_available_gb, log)
            engine = args.work / (f"engine-trt-L{L}" if step == "trt" else f"engine-L{L}")
            weights = sum(p.stat().st_size for p in engine.glob("*")
                          if p.suffix in (".data", ".safetensors", ".plan")) if step in ("build", "trt") else None
            if step == "trt" and r["rc"] == 0:
                r["plan_build_s"] = json.loads((engine / "manifest.json").read_text())["tensorrt"]["build_seconds"]
            rows.append(dict(step=step, layers=L, written_gb=weights and weights / 2**30, **r))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if r["rc"] != 0:
                print(f"{step} L{L} failed (rc {r['rc']}); log {log}:\n{log.read_text()[-2000:]}", file=sys.stderr)
    report(rows, steps)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
