"""The GPU session's scripts, run as far as a CPU allows, so that the one device run works the first time:
bench/gpu_check.sh (syntax and its dry-run plan), bench/gpu_kernels.py (argument parsing and its whole
correctness stage at small shapes on the CPU library, against the torch float64 reference, which is also
checked against the numpy reference here) and bench/gpu_report.py (tables from fake inputs)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tda_export.kernels import testing

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu", "relu"])
def test_torch_reference_matches_numpy_reference(activation):
    rng = np.random.default_rng(0)
    masks = [testing.make_mask(k, 72, rng) for k in ("random", "empty", "full", "single", "last")]
    args = testing.decode_problem(5, 40, 72, torch.bfloat16, masks, 3)
    ref_np = testing.decode_reference(*args, activation=activation)
    ref_t = testing.decode_reference_torch(*args, activation=activation)
    assert ref_t.dtype == torch.float64 and ref_t.shape == (5, 40)
    np.testing.assert_allclose(ref_t.numpy(), ref_np, rtol=1e-12, atol=1e-12)
    assert not ref_t[1].any()  # empty mask


def test_gpu_kernels_args():
    gk = _module("gpu_kernels")
    a = gk.parse_args(["--out", "x.json", "--versions", "2", "--batches", "1,8", "--densities", "0.5"])
    assert a.versions == [2] and a.batches == [1, 8] and a.densities == [0.5] and a.device == "cuda"
    with pytest.raises(SystemExit):
        gk.parse_args(["--out", "x.json", "--versions", "3"])
    with pytest.raises(SystemExit):  # timing on a CPU is refused
        gk.parse_args(["--out", "x.json", "--device", "cpu"])


def test_gpu_kernels_cases_cover_the_brief():
    gk = _module("gpu_kernels")
    cases = gk.correctness_cases()
    assert {c["batch"] for c in cases} == {0, 1, 3, 8, 64}
    assert {c["version"] for c in cases} == {1, 2} and {c["deterministic"] for c in cases} == {True, False}
    assert {(c["hidden"], c["inter"]) for c in cases} == set(gk.SHAPES_FULL)
    single = {c["kinds"][0] for c in cases if c["batch"] == 1}
    assert single == set(testing.MASK_KINDS)  # empty, full, single, first, last, odd random
    assert all(len(c["kinds"]) == c["batch"] for c in cases)


def test_gpu_kernels_check_stage_on_cpu(tmp_path):
    """The correctness stage end to end on the CPU library: every small case passes, the JSON is complete."""
    gk = _module("gpu_kernels")
    out = tmp_path / "c.json"
    result = gk.main(["--check-only", "--device", "cpu", "--small", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["failed_checks"] == [] and len(saved["checks"]) == len(result["checks"]) > 100
    assert any(c["check"].startswith("decode v2") for c in saved["checks"])
    assert any(c["check"].startswith("select") for c in saved["checks"])


def test_gpu_quant_check_stage_on_cpu(tmp_path):
    """bench/gpu_quant.py's correctness stage end to end on the CPU library at small shapes (the GPU run adds the
    7B shape): every format's decode and block linear pass against the float64 reference, the JSON is complete,
    and its argument checks name what is wrong."""
    gq = _module("gpu_quant")
    out = tmp_path / "q.json"
    result = gq.main(["--check-only", "--device", "cpu", "--small", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["failed_checks"] == [] and len(saved["checks"]) == len(result["checks"]) > 200
    for what in ("decode q8_0", "decode q4_0", "decode q4_1", "block_linear q4_1", "block_dequantize q8_0",
                 "decode q4_1+q8_0 float32", "decode q4_0+q8_0 bfloat16"):  # q8_0 down rows under 4-bit gate/up
        assert any(c["check"].startswith(what) for c in saved["checks"]), what
    with pytest.raises(SystemExit):
        gq.parse_args(["--out", str(out), "--formats", "q5_k"])
    with pytest.raises(SystemExit):
        gq.parse_args(["--out", str(out), "--formats", "q8_0+q5_k"])
    assert gq.parse_args(["--out", str(out), "--formats", "q4_1+q8_0,q8_0"]).formats == ["q4_1+q8_0", "q8_0"]
    assert gq.formats_of("q4_1+q8_0") == ("q4_1", "q8_0") and gq.formats_of("q4_0") == ("q4_0", "q4_0")
    with pytest.raises(SystemExit):
        gq.parse_args(["--out", str(out), "--device", "cpu"])  # timing needs a GPU


def _fake_quant() -> dict:
    us = {"ours": {"min": 9.0, "median": 10.0}, "cublas_bf16_dense": {"min": 80.0, "median": 81.0},
          "block_gemv_same_bytes": {"min": 9.5, "median": 11.0}}
    return {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "torch": "2.13", "checks": [{"check": "x"}],
            "failed_checks": [], "copy_GBps": 3000.0, "shape": {"H": 4096, "I": 14336},
            "rows": [{"format": "q4_0", "batch": 1, "density": 0.5, "union_rows": 7168, "us": us,
                      "frac_copy_bw": 0.83, "vs_cublas_bf16_dense": 8.1, "vs_block_gemv_same_bytes": 1.1}],
            "targets": {"q4_0 batch1 d=0.5 >= 80% copy bw on active bytes": True}}


def _fake_kernels() -> dict:
    rows = []
    for batch, d, union in ((1, 0.1, 1434), (1, 1.0, 14336), (8, 0.5, 14280)):
        us = {"v1": {"min": 20.0, "median": 21.0}, "v2": {"min": 11.0, "median": 12.0},
              "cublas_dense": {"min": 80.0, "median": 81.0}, "cublas_compact": {"min": 15.0, "median": 15.5}}
        rows.append({"batch": batch, "density": d, "union_rows": union, "needed_MB": union * 24576 / 1e6,
                     "target_us": 10.1, "us": us, "best_version": 2, "GBps": 2900.0, "frac_copy_bw": 0.7,
                     "cublas_dense_us": 81.0, "cublas_compact_us": 15.5, "speedup_vs_dense": 6.75})
    return {"device": "NVIDIA H200", "date": "2026-12-01", "torch": "2.11.0", "versions": [1, 2],
            "checks": [{"check": "decode v1", "ok": True}, {"check": "decode v2", "ok": True}],
            "failed_checks": [], "copy_GBps": 4150.0, "rows": rows,
            "shape": {"H": 4096, "I": 14336, "dtype": "bfloat16", "layers": 16},
            "targets": {"batch1 d=0.1 >= 85% copy bw": False}}


def _fake_e2e() -> dict:
    rows = [{"batch": 1, "mlp": "cublas", "density": 1.0, "union": 1.0, "tok_s": 190.0, "step_ms": 5.26,
             "floor_ms": 3.6, "frac_of_floor": 0.68, "vs_cublas_dense": 1.0, "hf_tok_s": 40.0},
            {"batch": 1, "mlp": "v2", "density": 0.5, "union": 0.5, "tok_s": 280.0, "step_ms": 3.57,
             "floor_ms": 2.4, "frac_of_floor": 0.67, "vs_cublas_dense": 1.47, "hf_tok_s": 40.0}]
    return {"device": "NVIDIA H200", "shape": "mistral-7b", "dtype": "bfloat16", "torch": "2.11.0",
            "max_context": 4096, "prompt_tokens": 128, "new_tokens": 64, "copy_gbs": 4150.0, "rows": rows,
            "verdicts": {"batch1 v2 d0.5 vs cublas dense >= 1.5": False}}


def test_gpu_report_tables_and_merge(tmp_path):
    rep = _module("gpu_report")
    k, e = tmp_path / "k.json", tmp_path / "e.json"
    k.write_text(json.dumps(_fake_kernels()))
    e.write_text(json.dumps(_fake_e2e()))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Kernel benchmark results\n\nsomeone else's section\n")
    out = tmp_path / "out.md"
    text = rep.main(["--kernels", str(k), "--e2e", str(e), "--results", str(results), "--out", str(out),
                     "--log-line", "2026-12-01 NVIDIA H200: build: ok"])
    assert text == out.read_text() and text.startswith("# Kernel benchmark results\n\nsomeone else's section")
    assert "| 1 | 0.1 | 10% | 21.0 | 12.0 | 10.1 | 70% (v2) | 81.0 | 15.5 | 6.75x |" in text
    assert "| 1 | v2 | 0.5 | 50% | 280.0 | 3.57 | 2.40 | 67% | 1.47x | 40.0 |" in text
    assert "- MISSED: batch1 d=0.1 >= 85% copy bw" in text and "- FAIL: batch1 v2 d0.5" in text
    assert "2/2 checks passed" in text and "2026-12-01 NVIDIA H200: build: ok" in text
    assert "Not measured: the quantized stage did not write its JSON" in text
    qj = tmp_path / "q.json"
    qj.write_text(json.dumps(_fake_quant()))
    with_q = rep.main(["--kernels", str(k), "--e2e", str(e), "--quant", str(qj), "--results", str(results),
                       "--out", str(out)])
    assert "| q4_0 | 1 | 0.5 | 50% | 10.0 | 83% | 81.0 | 8.10x | 11.0 | 1.10x |" in with_q
    assert "- met: q4_0 batch1 d=0.5 >= 80% copy bw on active bytes" in with_q
    # a second run replaces its own section and keeps the rest
    results.write_text(text + "\nlater section\n")
    k.unlink()
    again = rep.main(["--kernels", str(k), "--e2e", str(e), "--results", str(results), "--out", str(out)])
    assert again.count(rep.BEGIN) == 1 and "later section" in again and "someone else's section" in again
    assert "Not measured: the kernel stage did not write its JSON" in again


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_syntax_and_dry_run(tmp_path):
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake = tmp_path / "bin"  # a lent machine may be an H100 or an H200: files are named after the card found
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "GPU_CHECK_DRY_RUN": "1",
                               "PYTHON": shutil.which("python") or "python3", "HOME": str(tmp_path)}, timeout=120)
    out = proc.stdout
    assert "--out " + str(tmp_path / "gpu_kernels_h100_80gb_hbm3.json") in out and "h200" not in out
    assert "--e2e " + str(tmp_path / "gpu_e2e_h100_80gb_hbm3.json") in out
    assert "--out " + str(tmp_path / "gpu_quant_h100_80gb_hbm3.json") in out
    assert "--quant " + str(tmp_path / "gpu_quant_h100_80gb_hbm3.json") in out
    for name in ("info", "build", "sanitizer-build", "memcheck", "correctness-v1", "correctness-v2",
                 "quant-correctness", "kernel-timings", "quant-timings", "e2e", "racecheck", "pytest-gpu",
                 "pytest-gpu-v2", "pytest-backend", "report"):
        assert f"=== [{name}]" in out, (name, out, proc.stderr)
    assert "--arch=sm_90" in out or "-arch=sm_90" in out
    assert "--max-context 4096" in out and "--versions 1,2" in out
    report = (tmp_path / "RESULTS.md").read_text()  # the report stage really ran, on no JSON at all
    assert "Not measured: the kernel stage" in report and "Not measured: the end-to-end stage" in report
    assert proc.returncode == 0, proc.stderr
