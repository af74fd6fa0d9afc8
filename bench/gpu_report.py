"""Markdown tables for bench/RESULTS.md from the GPU check's JSON files (bench/gpu_check.sh runs it).

    python bench/gpu_report.py --kernels gpu_kernels_h200.json --e2e gpu_e2e_h200.json \
        [--quant gpu_quant_h200.json] --results bench/RESULTS.md --out RESULTS.md [--log-line "..."]

Writes --results with its GPU-check section (between the markers below) replaced, or appended when it
has none, to --out; other sections are left as they are. Either JSON may be missing (a stage that
failed): its part of the section says so instead of a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def _load(path: Path | None):
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return {"error": f"{path.name}: not JSON ({e})"}


def kernels_section(k: dict | None) -> list[str]:
    out = ["### Sparse MLP kernels (bench/gpu_kernels.py)", ""]
    if k is None:
        return out + ["Not measured: the kernel stage did not write its JSON (see the check log).", ""]
    if "error" in k:
        return out + [k["error"], ""]
    checks = k.get("checks", [])
    failed = k.get("failed_checks", [])
    out.append(f"{k.get('device', '?')}, torch {k.get('torch', '?')}, {k.get('date', '?')}. Correctness: "
               f"{len(checks) - len(failed)}/{len(checks)} checks passed against the float64 reference"
               + (f"; **failed**: {', '.join(failed[:5])}" + (" ..." if len(failed) > 5 else "") if failed else "")
               + ".")
    rows = k.get("rows", [])
    if not rows:
        out += ["", "No timings (correctness failed or the stage stopped early).", ""]
        return out
    versions = k.get("versions", [1, 2])
    out += ["", f"Copy bandwidth {k['copy_GBps']:.0f} GB/s (read + write). Mistral-7B MLP (H {k['shape']['H']}, "
            f"I {k['shape']['I']}, bf16), CUDA graphs over {k['shape']['layers']} layers of distinct weights; "
            "µs per layer, median of interleaved rounds; % of copy bandwidth on the union rows' bytes for the "
            "faster version; target = needed bytes / (85% of copy bandwidth).", "",
            "| batch | density | union | " + " | ".join(f"v{v} µs" for v in versions) +
            " | target µs | best % of copy bw | cuBLAS dense µs | cuBLAS compact µs | best vs dense |",
            "|---" * (8 + len(versions)) + "|"]
    for r in rows:
        out.append(f"| {r['batch']} | {r['density']:.1f} | {r['union_rows'] / k['shape']['I']:.0%} | " +
                   " | ".join(f"{r['us'][f'v{v}']['median']:.1f}" for v in versions) +
                   f" | {r['target_us']:.1f} | {r['frac_copy_bw']:.0%} (v{r['best_version']}) | "
                   f"{r['cublas_dense_us']:.1f} | {r['cublas_compact_us']:.1f} | {r['speedup_vs_dense']:.2f}x |")
    out += [""] + [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in k.get("targets", {}).items()] + [""]
    return out


def quant_section(q: dict | None) -> list[str]:
    out = ["### Block-quantized kernels (bench/gpu_quant.py)", ""]
    if q is None:
        return out + ["Not measured: the quantized stage did not write its JSON (see the check log).", ""]
    if "error" in q:
        return out + [q["error"], ""]
    checks, failed = q.get("checks", []), q.get("failed_checks", [])
    out.append(f"{q.get('device', '?')}, torch {q.get('torch', '?')}, {q.get('date', '?')}. "
               + (f"Correctness: {len(checks) - len(failed)}/{len(checks)} checks passed against the float64 "
                  "reference of the dequantized weights" if checks else "Correctness: checked in its own stage")
               + (f"; **failed**: {', '.join(failed[:5])}" if failed else "") + ".")
    rows = q.get("rows", [])
    if not rows:
        return out + ["", "No timings (correctness failed or the stage stopped early).", ""]
    out += ["", f"Copy bandwidth {q['copy_GBps']:.0f} GB/s. Mistral-7B MLP (H {q['shape']['H']}, I {q['shape']['I']}), "
            "bf16 activations, CUDA graphs over distinct layers; µs per layer (median); GB/s and % of copy bandwidth "
            "on the active rows' block bytes; anchors: cuBLAS bf16 dense MLP, and our dense block GEMV "
            "(tda_block_linear) reading the same bytes.", "",
            "| format | batch | density | union | ours µs | % of copy bw | cuBLAS bf16 dense µs | ours vs it | "
            "block GEMV same bytes µs | ours vs it |", "|---" * 10 + "|"]
    for r in rows:
        out.append(f"| {r['format']} | {r['batch']} | {r['density']:.1f} | {r['union_rows'] / q['shape']['I']:.0%} | "
                   f"{r['us']['ours']['median']:.1f} | {r['frac_copy_bw']:.0%} | "
                   f"{r['us']['cublas_bf16_dense']['median']:.1f} | {r['vs_cublas_bf16_dense']:.2f}x | "
                   f"{r['us']['block_gemv_same_bytes']['median']:.1f} | {r['vs_block_gemv_same_bytes']:.2f}x |")
    return out + [""] + [f"- {'met' if ok else 'MISSED'}: {n}" for n, ok in q.get("targets", {}).items()] + [""]


def e2e_section(e: dict | None) -> list[str]:
    out = ["### End-to-end decode (bench/gpu_e2e.py)", ""]
    if e is None:
        return out + ["Not measured: the end-to-end stage did not write its JSON (see the check log).", ""]
    if "error" in e:
        return out + [e["error"], ""]
    out += [f"{e.get('device', '?')}, {e.get('shape', '?')} {e.get('dtype', '?')}, torch {e.get('torch', '?')}, "
            f"max_context {e.get('max_context', '?')}, {e.get('prompt_tokens', '?')} prompt + "
            f"{e.get('new_tokens', '?')} new tokens, copy bandwidth {e.get('copy_gbs', 0):.0f} GB/s; the floor is "
            "the step's weight bytes over it. `cublas` is the same backend with a dense torch MLP (the anchor).", "",
            "| batch | MLP | density | union | tok/s | ms/step | floor ms | % of floor | vs cuBLAS dense | HF tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in e.get("rows", []):
        vs = f"{r['vs_cublas_dense']:.2f}x" if r.get("vs_cublas_dense") else "-"
        hf = f"{r['hf_tok_s']:.1f}" if r.get("hf_tok_s") else "-"
        out.append(f"| {r['batch']} | {r['mlp']} | {r['density']:.1f} | {r['union']:.0%} | {r['tok_s']:.1f} | "
                   f"{r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['frac_of_floor']:.0%} | {vs} | {hf} |")
    out += [""] + [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in e.get("verdicts", {}).items()] + [""]
    return out


def section(kernels: dict | None, e2e: dict | None, log_line: str = "", quant: dict | None = None) -> str:
    lines = [BEGIN, "## GPU check (bench/gpu_check.sh)", ""]
    if log_line:
        lines += [log_line, ""]
    lines += kernels_section(kernels) + quant_section(quant) + e2e_section(e2e) + [END]
    return "\n".join(lines) + "\n"


def merge(results_md: str, new_section: str) -> str:
    """results_md with its GPU-check section replaced by new_section (appended if it has none)."""
    if BEGIN in results_md and END in results_md:
        head, rest = results_md.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + new_section.rstrip("\n") + tail
    return results_md.rstrip("\n") + "\n\n" + new_section


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", type=Path)
    p.add_argument("--e2e", type=Path)
    p.add_argument("--quant", type=Path, help="bench/gpu_quant.py's JSON (block-quantized kernels)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--log-line", default="", help="a line about the run (date, GPU, stage statuses)")
    a = p.parse_args(argv)
    text = merge(a.results.read_text() if a.results.exists() else "",
                 section(_load(a.kernels), _load(a.e2e), a.log_line, _load(a.quant)))
    a.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
