"""Encode/decode throughput of the C++ tokenizer against HF tokenizers on the evaluation text.

    python cpp/tokenizer/tests/bench_tokenizer.py TOKENIZER_JSON [TOKENIZER_JSON ...] [--repeats 5]

Builds tda_tokenize with cmake (incrementally, in --build), then alternates C++ and HF runs on the same
text, single-threaded both (one encode of one string), and prints min/median seconds and chars/s.
Timings of the C++ side are taken inside the driver, so process start and file loading are excluded
(load time is reported apart).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SOURCE.parents[1]))


def build(build_dir: Path) -> Path:
    subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, capture_output=True)
    return build_dir / "tda_tokenize"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizers", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chars", type=int, default=0, help="first N characters of the text (0: all of it)")
    ap.add_argument("--build", type=Path, default=Path(tempfile.gettempdir()) / "tda-tokenizer-bench")
    args = ap.parse_args()

    import tokenizers

    from tda_export.text import corpus

    text = corpus("evaluation")
    if args.chars:
        text = text[: args.chars]
    driver = build(args.build)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(text)
    print(f"text: evaluation split, {len(text):,} chars, {len(text.encode()):,} bytes; {args.repeats} alternating runs")
    print(f"{'tokenizer':<28} {'impl':<6} {'load s':>7} {'encode min s':>13} {'median s':>9} {'Mchars/s':>9} "
          f"{'decode min s':>13}")
    for path in args.tokenizers:
        t0 = time.perf_counter()
        hf = tokenizers.Tokenizer.from_file(str(path))
        hf_load = time.perf_counter() - t0
        runs = {"C++": {"encode": [], "decode": [], "load": []}, "HF": {"encode": [], "decode": [], "load": [hf_load]}}
        for _ in range(args.repeats):
            r = subprocess.run([str(driver), str(path), "bench", f.name, "1"], check=True, capture_output=True)
            out = json.loads(r.stdout)
            runs["C++"]["encode"] += out["encode_s"]
            runs["C++"]["decode"] += out["decode_s"]
            runs["C++"]["load"].append(out["load_s"])
            t0 = time.perf_counter()
            ids = hf.encode(text, add_special_tokens=False).ids
            t1 = time.perf_counter()
            hf.decode(ids)
            runs["HF"]["encode"].append(t1 - t0)
            runs["HF"]["decode"].append(time.perf_counter() - t1)
            assert out["tokens"] == len(ids), "C++ and HF disagree on the token count"
        name = f"{path.parent.name}/{path.name}"
        for impl, r in runs.items():
            enc = min(r["encode"])
            print(f"{name:<28} {impl:<6} {min(r['load']):>7.2f} {enc:>13.3f} {statistics.median(r['encode']):>9.3f} "
                  f"{len(text) / enc / 1e6:>9.2f} {min(r['decode']):>13.3f}")
        print(f"{name:<28} C++/HF encode speed (min): {min(runs['HF']['encode']) / min(runs['C++']['encode']):.2f}x")
    Path(f.name).unlink()


if __name__ == "__main__":
    main()
