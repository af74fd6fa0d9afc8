"""The C++ runtime (cpp/): greedy tokens equal ONNX Runtime's for every family at density 1.0 and 0.5,
through the Python binding (backend="native") and through tda-run; the C++ threshold rule equals
Engine.thresholds(); bad engine directories and C API misuse give error codes and messages, also under
AddressSanitizer + UndefinedBehaviorSanitizer."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from tda_export.native import build_native
from tda_export.native.binding import NativeBackend, NativeEngine, NativeError
from tda_export.runtime.engine import Engine, EngineError
from tda_export.runtime.generate import generate
from tda_export.runtime.sampling import SamplingParams
from test_runtime import build_engine
from tiny_models import FAMILIES

STEPS = 8


@pytest.fixture(scope="module")
def native():
    return build_native()


@pytest.fixture(scope="module")
def engines(tiny_dirs, tmp_path_factory):
    """family -> engine directory calibrated at density 0.5."""
    root = tmp_path_factory.mktemp("native")
    return {f: build_engine(tiny_dirs[f], root / f"{f}-engine", root, family=f)[0] for f in FAMILIES}


def greedy(backend, ids, mask, thresholds, steps=STEPS, bounds=None):
    logits, state = backend.prefill(ids, mask, thresholds, bounds)
    counts = backend.active_counts(state)
    out = []
    for _ in range(steps):
        tok = logits.argmax(-1)
        out.append(tok)
        logits = backend.decode(state, tok)
    return np.stack(out, 1), counts


def prompts(vocab, seed=0):
    """Two prompts of different lengths, left padded: rows attend with their own masks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_onnxruntime(native, engines, family):
    ort = Engine.load(engines[family], backend="onnxruntime", threads=1)
    nat = Engine.load(engines[family], backend="native", threads=1)
    assert nat.backend.name == "native"
    ids, mask = prompts(ort.manifest["vocab_size"])
    for density in (1.0, 0.5):
        th = ort.thresholds(density, 7)
        for bounds in (None, ort.density_bounds(density), np.asarray([[0.3, 0.35]] * ort.num_layers, np.float32)):
            want, want_counts = greedy(ort.backend, ids, mask, th, bounds=bounds)
            got, got_counts = greedy(nat.backend, ids, mask, th, bounds=bounds)
            np.testing.assert_array_equal(got, want, err_msg=f"{family} density {density} bounds {bounds}")
            np.testing.assert_array_equal(got_counts, want_counts)
            if density < 1.0:
                assert (got_counts < ort.manifest["intermediate_size"]).any()  # TDA really sparse here
            if bounds is not None and density < 1.0:  # the clamp holds every sequence and layer
                inter = ort.manifest["intermediate_size"]
                lo, hi = np.ceil(bounds[:, :1] * inter), np.floor(bounds[:, 1:] * inter)
                assert ((got_counts >= lo) & (got_counts <= np.maximum(lo, hi))).all()
    # the generation loop on top of the backend: same text
    params = SamplingParams(max_new_tokens=6)
    for density in (None, 0.5):
        assert generate(nat, ["ab", [5, 6, 7]], params, density) == generate(ort, ["ab", [5, 6, 7]], params, density)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_threaded_slices_equal_onnxruntime(native, engines, family, monkeypatch):
    """Every GEMV/GEMM split over two threads (TDA_NATIVE_SLICE_BYTES=1 forks even the tiny models'
    calls): per-thread output slices, biases on slices, attention heads split, batch 2 with padding."""
    monkeypatch.setenv("TDA_NATIVE_SLICE_BYTES", "1")
    ort = Engine.load(engines[family], backend="onnxruntime", threads=1)
    nat = Engine.load(engines[family], backend="native", threads=2)
    ids, mask = prompts(ort.manifest["vocab_size"], seed=1)
    for density in (1.0, 0.5):
        th = ort.thresholds(density, 7)
        want, _ = greedy(ort.backend, ids, mask, th)
        got, _ = greedy(nat.backend, ids, mask, th)
        np.testing.assert_array_equal(got, want, err_msg=f"{family} density {density}")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tda_run_streams_onnxruntime_tokens(native, engines, family):
    ort = Engine.load(engines[family], backend="onnxruntime", threads=1)
    prompt = [7, 8, 9, 10, 11]
    for density in ("1.0", "0.5"):
        ids = np.asarray([prompt], np.int64)
        th = ort.thresholds(float(density), len(prompt))
        want, _ = greedy(ort.backend, ids, np.ones_like(ids), th, steps=10, bounds=ort.density_bounds(float(density)))
        eos = ort.manifest["eos_token_id"]
        want = want[0].tolist()
        want = want[:want.index(eos)] if eos in want else want
        r = subprocess.run([str(native.cli), "-e", str(engines[family]), "--prompt-ids", ",".join(map(str, prompt)),
                            "-n", "10", "-d", density, "--threads", "1", "--print-ids"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert [int(t) for t in r.stdout.split()] == want, (family, density, r.stdout)
        assert f"ids: {json.dumps(want)}" in r.stderr


def test_thresholds_rule_equals_python(native, engines):
    for family in ("llama", "gemma3_text"):
        py = Engine.load(engines[family], backend="onnxruntime", threads=1)
        cpp = NativeEngine(engines[family], verify=False, threads=1)
        for density in (None, 0.5, 1.0):
            for prompt_len in (None, 1, 2, 3, 5, 11, 16, 17, 40, 1000):
                np.testing.assert_array_equal(cpp.thresholds(density, prompt_len), py.thresholds(density, prompt_len))
            np.testing.assert_array_equal(cpp.density_bounds(density), py.density_bounds(density))
        np.testing.assert_array_equal(cpp.density_bounds(0.7), np.asarray([[0.65, 0.75]] * py.num_layers, np.float32))
        with pytest.raises(NativeError, match="no thresholds for density 0.33"):
            cpp.thresholds(0.33, None)


def test_runtime_tests_binary(native, engines):
    r = subprocess.run([str(native.tests), str(engines["gemma3_text"])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_sources_build_warning_free():
    """The runtime's sources (as cpp/CMakeLists.txt lists them) under its -Wall -Wextra, as errors: the
    C ABI's structs grow fields (tda_decode_args_t.weight_format), and a brace initializer that misses
    one warns instead of failing."""
    import re

    from tda_export.native.build import CPP, KERNELS, blas_dir

    listed = re.search(r"add_library\(tda_runtime SHARED ([^$)]*)", (CPP / "CMakeLists.txt").read_text())
    sources = [CPP / s for s in listed.group(1).split()]
    assert CPP / "src" / "cpu_executor.cpp" in sources and all(s.exists() for s in sources), sources
    for src in sources:
        r = subprocess.run([os.environ.get("CXX", "g++"), "-std=c++17", "-fopenmp", "-DTDA_BLAS_SCIPY_PREFIX",
                            "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{CPP / 'include'}", f"-I{CPP / 'src'}",
                            f"-I{KERNELS / 'include'}", f"-I{blas_dir() / 'include'}", str(src)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{src.name}:\n{r.stderr}"


def _bad_engine(src, tmp_path, case):
    bad = tmp_path / case
    shutil.copytree(src, bad)
    if case == "tampered_weights":
        with open(bad / "model.safetensors", "r+b") as f:
            f.seek(-8, 2)
            f.write(b"\x01" * 8)
        return bad, "model.safetensors: sha256 does not match"
    if case == "missing_weights":
        (bad / "model.safetensors").unlink()
        return bad, "model.safetensors: listed in manifest.json but missing"
    if case == "no_manifest":
        (bad / "manifest.json").unlink()
        return bad, "manifest.json: no such file"
    if case == "manifest_not_json":
        (bad / "manifest.json").write_text("{not json")
        return bad, "manifest.json: not valid JSON"
    if case == "bad_spec":
        m = json.loads((bad / "manifest.json").read_text())
        m["decoder_spec"]["hidden"] = -4
        (bad / "manifest.json").write_text(json.dumps(m))
        return bad, "hidden must be positive"
    if case == "weights_header":  # consistent hashes (an attacker or a broken tool), garbage header
        with open(bad / "model.safetensors", "r+b") as f:
            f.write((10**12).to_bytes(8, "little"))
        m = json.loads((bad / "manifest.json").read_text())
        from tda_export.manifest import sha256_file
        m["files"]["model.safetensors"]["sha256"] = sha256_file(bad / "model.safetensors")
        (bad / "manifest.json").write_text(json.dumps(m))
        return bad, "header length"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["tampered_weights", "missing_weights", "no_manifest", "manifest_not_json",
                                  "bad_spec", "weights_header"])
def test_bad_engine_dirs_clear_errors(native, engines, tmp_path, case):
    bad, message = _bad_engine(engines["llama"], tmp_path, case)
    with pytest.raises(NativeError, match=message) as e:
        NativeEngine(bad, verify=True, threads=1)
    assert e.value.status == 2  # TDA_RT_ERR_ENGINE
    r = subprocess.run([str(native.cli), "-e", str(bad), "--prompt-ids", "1,2", "-n", "2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "tda-run: error:" in r.stderr, r.stderr


def test_auto_picks_native_on_cpu(native, engines, monkeypatch, tmp_path):
    monkeypatch.setenv("TDA_EXPORT_CACHE", str(tmp_path))
    said = []
    e = Engine.load(engines["qwen2"], backend="auto", device="cpu", threads=1, report=said.append)
    assert e.backend.name == "native" and e.choice is None  # no load-time probe
    assert said == []  # auto got its first preference: nothing to explain


def test_old_engine_without_safetensors(engines, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(engines["llama"], old)
    m = json.loads((old / "manifest.json").read_text())
    del m["weights_file"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="rebuild it for the native backend"):
        Engine.load(old, backend="native", verify=False)


def test_cli_errors_and_help(native, engines):
    r = subprocess.run([str(native.cli), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--density" in r.stdout and "--bench" in r.stdout
    for args, message in ((["-e", str(engines["llama"]), "--prompt-ids", "1,2", "-d", "1.5"], "--density"),
                          (["-e", str(engines["llama"]), "--prompt-ids", "1,99999"], "outside the vocabulary"),
                          (["-e", str(engines["llama"]), "--prompt-ids", "1,2", "-d", "0.33"], "0.33"),
                          (["--bogus"], "unknown"), ([], "--engine")):
        r = subprocess.run([str(native.cli), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_sanitizers(engines):
    """The C API tests and a tda-run generation under ASan + UBSan on two tiny families."""
    san = build_native(sanitize=True)
    for family in ("llama", "gemma2"):
        r = subprocess.run([str(san.tests), str(engines[family])], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([str(san.cli), "-e", str(engines[family]), "--prompt-ids", "3,4,5,6", "-n", "6", "-d", "0.5",
                            "--threads", "2"], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "TDA_NATIVE_SLICE_BYTES": "1"})  # the threaded slices too
        assert r.returncode == 0 and "ERROR" not in r.stderr and "runtime error" not in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_real_model_greedy_equals_onnxruntime(native, tmp_path, model):
    """A real model end to end: calibrate (small), build, then tda-run on text and the native backend give
    ONNX Runtime's greedy tokens at density 1.0 and 0.5."""
    from click.testing import CliRunner

    from tda_export.cli import main
    from tda_export.runtime.generate import Stats, stream

    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"Paragraph {i}: the river runs to the sea and the sea returns as rain." for i in range(200)))
    cal, out = tmp_path / "cal.json", tmp_path / "engine"
    r = CliRunner().invoke(main, ["calibrate", "-m", model, "--text", str(text), "--densities", "0.5", "--sequences",
                                  "4", "--prompt-tokens", "32", "-q", "-o", str(cal)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["build", "-m", model, "-c", str(cal), "--density", "0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    ort = Engine.load(out, backend="onnxruntime")
    nat = Engine.load(out, backend="native")
    prompt = "The capital of France is"
    params = SamplingParams(max_new_tokens=12)
    for density in (1.0, 0.5):
        want = generate(ort, [prompt], params, density)
        assert generate(nat, [prompt], params, density) == want
        r = subprocess.run([str(native.cli), "-e", str(out), "-p", prompt, "-n", "12", "-d", str(density),
                            "--no-verify"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert r.stdout == want[0], (r.stdout, want)
    stats = Stats()
    for _ in stream(nat, [prompt], params, 0.5, stats):
        pass
    assert stats.active_fraction < 0.9
