"""Exported graphs: ONNX checker, ORT parity with the HF model under the same TDA masks, CLI behaviour."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tda_export import manifest
from tda_export.export.build import build
from tda_export.models import load_model
from tiny_models import FAMILIES, save_tiny

import parity

STEPS = 8
LENS = (12, 9)  # left padding on the second sequence; 12 + 8 > the tiny sliding window of 8


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


def _export_and_compare(tmp_path, model_dir, dtype):
    loaded = load_model(str(model_dir))
    ids, mask, pos = parity.prompt(LENS, loaded.config.vocab_size)
    taus = parity.half_density_thresholds(loaded.model, loaded.activation, ids, mask, pos)
    parity.write_calibration(tmp_path / "cal.json", loaded, taus)
    out = build(str(model_dir), tmp_path / "export", dtype, str(tmp_path / "cal.json"), progress=False)
    # the graph's tda_density_bounds initializer holds the built density's clamp, so the reference applies it too
    bounds = json.loads((out / "manifest.json").read_text())["calibration"]["density_bounds"]
    assert bounds == [[0.45, 0.55]] * len(taus)
    ref = parity.reference_run(loaded.model, loaded.activation, taus, ids, mask, pos, STEPS, bounds)
    got = parity.onnx_run(out / "model.onnx", ids, mask, pos, STEPS, ref)
    return out, ref, got, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_with_tda_masks(tmp_path, tiny_dirs, family):
    out, ref, got, mask = _export_and_compare(tmp_path, tiny_dirs[family], "float32")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    valid = mask.astype(bool)
    densities = []
    for step, ((ref_logits, ref_state), g) in enumerate(zip(ref, got)):
        sel = valid if step == 0 else np.ones(ref_logits.shape[:2], bool)
        assert parity.rel(g["logits"][sel], ref_logits[sel]) < 1e-4, f"{family} step {step}"
        for n, (idx, cnt, _) in enumerate(ref_state):
            np.testing.assert_array_equal(g[f"present_tda.{n}.active_count"], cnt, err_msg=f"layer {n} step {step}")
            np.testing.assert_array_equal(g[f"present_tda.{n}.active_idx"], idx, err_msg=f"layer {n} step {step}")
            densities.append(cnt / idx.shape[1])
    assert 0.3 < np.mean(densities) < 0.7  # the masks really are sparse, so they matter


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp16_parity(tmp_path, tiny_dirs, family):
    _, ref, got, mask = _export_and_compare(tmp_path, tiny_dirs[family], "float16")
    assert got[0]["present.0.key"].dtype == np.float16
    for step, ((ref_logits, _), g) in enumerate(zip(ref, got)):
        sel = mask.astype(bool) if step == 0 else np.ones(ref_logits.shape[:2], bool)
        assert parity.rel(g["logits"][sel], ref_logits[sel]) < 2e-2, f"{family} step {step}"


def _cli(*args):
    cmd = [sys.executable, "-c", "from tda_export.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cli_build_calibrates_by_default(tmp_path, tiny_dirs):
    out = tmp_path / "export"
    r = _cli("build", "-m", tiny_dirs["llama"], "-o", out)
    assert r.returncode == 0, r.stderr
    data = manifest.verify(out)
    assert data["calibration"]["selected"]["kind"] == "density"
    assert "calibration.json" in data["files"] and max(data["calibration"]["thresholds"]) > 0


def test_cli_build_inspect_and_tamper(tmp_path, tiny_dirs):
    out = tmp_path / "export"
    r = _cli("build", "--model", tiny_dirs["gemma3_text"], "--out", out, "--dtype", "bf16", "--no-calibrate")
    assert r.returncode == 0, r.stderr
    assert "dense" in r.stderr  # no calibration: says so
    data = manifest.verify(out)
    assert data["dtype"] == "bfloat16" and data["calibration"]["kind"] == "none"
    assert {"model.onnx", "tokenizer.json"} <= set(data["files"])
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    r = _cli("inspect", out)
    assert r.returncode == 0, r.stderr
    assert "plugin_namespace=tda" in r.stdout and "tda::SparseGatedMLP" in r.stdout and "verified" in r.stdout
    # a reader that left (`inspect DIR | head`): the shell's SIGPIPE status, no error or traceback
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = [sys.executable, "-c", "from tda_export.cli import main; main()", "inspect", str(out)]
    r = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert r.returncode == 141 and "rror" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    with open(out / "tokenizer.json", "a") as f:
        f.write(" ")
    r = _cli("inspect", out)
    assert r.returncode != 0 and "tokenizer.json" in r.stderr


def test_weights_once_in_safetensors(tmp_path, tiny_dirs):
    """model.onnx holds no weight bytes: it references model.safetensors, which the safetensors library
    loads on its own (no holes, aligned tensors), and ONNX Runtime runs the pair."""
    from safetensors.numpy import load_file

    from tda_export.export.weights import ALIGN, HEADER_BYTES, PAD_PREFIX

    out = build(str(tiny_dirs["qwen2"]), tmp_path / "e", "float32", progress=False)
    data = manifest.verify(out)
    assert data["weights_file"] == "model.safetensors" and "model.safetensors" in data["files"]
    tensors = load_file(out / "model.safetensors")
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = {i.name: {e.key: e.value for e in i.external_data} for i in proto.graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL}
    assert set(external) == {n for n in tensors if not n.startswith(PAD_PREFIX)}
    assert (out / "model.onnx").stat().st_size < 200_000  # graph only
    full = onnx.load(str(out / "model.onnx"))
    for init in full.graph.initializer:
        if init.name in external:
            info = external[init.name]
            assert info["location"] == "model.safetensors"
            assert (int(info["offset"]) - HEADER_BYTES) % ALIGN == 0
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), tensors[init.name])
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    loaded = load_model(str(tiny_dirs["qwen2"]))
    ids, mask, pos = parity.prompt((6,), 320)
    ref = parity.reference_run(loaded.model, loaded.activation, [0.0] * 3, ids, mask, pos, 1)
    got = parity.onnx_run(out / "model.onnx", ids, mask, pos, 1, ref)
    assert parity.rel(got[1]["logits"], ref[1][0]) < 1e-4


def _nothing_written(tmp_path, before):
    return sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", ["unsupported", "fp16_gemma", "exists", "other_calibration", "bad_calibration",
                                  "density_without_calibration", "misaligned_intermediate"])
def test_bad_input_clear_error_nothing_written(tmp_path, tiny_dirs, case):
    out = tmp_path / "out"
    args = ["build", "--model", tiny_dirs["llama"], "--out", out]
    if case == "unsupported":
        bad = tmp_path / "phi"
        shutil.copytree(tiny_dirs["llama"], bad)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="phi3")))
        args[2], expect = bad, "phi3"
    elif case == "fp16_gemma":
        args[2], expect = tiny_dirs["gemma2"], "fp16"
        args += ["--dtype", "fp16"]
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
        expect = "already exists"
    elif case == "other_calibration":
        parity.write_calibration(tmp_path / "cal.json", load_model(str(tiny_dirs["mistral"])), [0.1] * 3)
        args += ["--calibration", tmp_path / "cal.json"]
        expect = "cal.json"
    elif case == "bad_calibration":
        (tmp_path / "cal.json").write_text("{}")
        args += ["--calibration", tmp_path / "cal.json"]
        expect = "cal.json"
    elif case == "misaligned_intermediate":  # runs in ONNX Runtime, but the kernels need multiples of 8
        from tiny_models import tiny_config, tiny_tokenizer
        from transformers import AutoModelForCausalLM

        bad = tmp_path / "i132"
        config = tiny_config("llama")
        config.intermediate_size = 132
        AutoModelForCausalLM.from_config(config).save_pretrained(bad)
        tiny_tokenizer().save_pretrained(bad)
        args[2], expect = bad, "i132: config.intermediate_size=132 is not a positive multiple of 8"
    else:
        args += ["--density", "0.5", "--no-calibrate"]
        expect = "--calibration"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _cli(*args)
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _nothing_written(tmp_path, before)
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_polygraphy_inspect(tmp_path, tiny_dirs):
    pytest.importorskip("polygraphy")
    tool = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    out = build(str(tiny_dirs["llama"]), tmp_path / "e", "float16", progress=False)
    r = subprocess.run([tool, "inspect", "model", str(out / "model.onnx"),
                        "--show", "layers"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SparseGatedMLP" in r.stdout and "Attention" in r.stdout


@pytest.mark.slow
def test_smollm2_fp32_parity(tmp_path):
    loaded = load_model("smollm2-135m")
    ids, mask, pos = parity.prompt((24, 17), loaded.config.vocab_size, seed=1)
    taus = parity.half_density_thresholds(loaded.model, loaded.activation, ids, mask, pos)
    parity.write_calibration(tmp_path / "cal.json", loaded, taus)
    out = build("smollm2-135m", tmp_path / "export", "float32", str(tmp_path / "cal.json"), progress=False)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    bounds = json.loads((out / "manifest.json").read_text())["calibration"]["density_bounds"]
    ref = parity.reference_run(loaded.model, loaded.activation, taus, ids, mask, pos, STEPS, bounds)
    got = parity.onnx_run(out / "model.onnx", ids, mask, pos, STEPS, ref)
    for step, ((ref_logits, ref_state), g) in enumerate(zip(ref, got)):
        sel = mask.astype(bool) if step == 0 else np.ones(ref_logits.shape[:2], bool)
        assert parity.rel(g["logits"][sel], ref_logits[sel]) < 1e-3, f"step {step}"
        # 30 layers x 1536 neurons: allow the odd neuron sitting exactly on its threshold to flip
        counts = np.array([g[f"present_tda.{n}.active_count"] for n in range(len(ref_state))])
        ref_counts = np.array([c for _, c, _ in ref_state])
        assert np.abs(counts - ref_counts).max() <= 2, f"step {step}"


def test_failed_build_leaves_nothing(tmp_path, tiny_dirs, monkeypatch):
    import tda_export.export.build as build_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod.manifest, "write", interrupted)  # the very last step
    with pytest.raises(KeyboardInterrupt):
        build(str(tiny_dirs["llama"]), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
