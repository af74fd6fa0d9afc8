"""The C++ runtime on block-quantized engines (build --weight-format): greedy tokens equal the torch backend's
(which dequantizes the same blocks at load) for every tiny family in q4_0 and for q8_0/q4_1 on two families,
dense and sparse, prefill sizes on both sides of the sgemm-tile switch; errors name the file and tensor;
the same engine under ASan + UBSan."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.native import build_native
from tda_export.native.binding import NativeEngine, NativeError
from tda_export.runtime.engine import Engine
from test_native import greedy
from tiny_models import FAMILIES

# "F" builds --weight-format F (4-bit: down_weight_t in q8_0), "F+G" adds --down-weight-format G.
CASES = ([(f, "q4_0") for f in FAMILIES] + [(f, w) for f in ("llama", "gemma2") for w in ("q8_0", "q4_1")]
         + [("llama", "q4_1+q4_1")])


@pytest.fixture(scope="module")
def native():
    return build_native()


@pytest.fixture(scope="module")
def qengines(tiny_dirs, tmp_path_factory):
    """(family, format) -> an uncalibrated block engine (thresholds are passed explicitly below)."""
    root = tmp_path_factory.mktemp("nq")
    out = {}
    for family, fmt in CASES:
        d = root / f"{family}-{fmt}"
        gate_up, _, down = fmt.partition("+")
        r = CliRunner().invoke(main, ["build", "-m", str(tiny_dirs[family]), "--weight-format", gate_up,
                                      "--no-calibrate", "-o", str(d)] + (["--down-weight-format", down] if down else []))
        assert r.exit_code == 0, r.output
        out[family, fmt] = d
    return out


@pytest.mark.parametrize("family, fmt", CASES)
def test_greedy_tokens_equal_torch(native, qengines, family, fmt):
    torch_e = Engine.load(qengines[family, fmt], backend="torch", threads=1)
    nat = Engine.load(qengines[family, fmt], backend="native", threads=2)
    assert nat.backend.name == "native"
    m = torch_e.manifest
    assert m["weights"] == fmt.partition("+")[0]
    assert m["weight_formats"]["layers.0.mlp.down_weight_t"] == {"q8_0": "q8_0", "q4_0": "q8_0", "q4_1": "q8_0",
                                                                  "q4_1+q4_1": "q4_1"}[fmt]
    layers, inter, vocab = torch_e.num_layers, m["intermediate_size"], m["vocab_size"]
    rng = np.random.default_rng(len(family))
    # batch 2 x 37 tokens (M = 74: fp32 tiles + sgemm) with left padding; batch 1 x 5 (M = 5: tda_block_linear)
    long_ids = rng.integers(3, vocab, (2, 37)).astype(np.int64)
    long_mask = np.ones_like(long_ids)
    long_ids[1, :6], long_mask[1, :6] = 0, 0
    short_ids = rng.integers(3, vocab, (1, 5)).astype(np.int64)
    for ids, mask in ((long_ids, long_mask), (short_ids, np.ones_like(short_ids))):
        for tau in (0.0, 0.35):  # dense, and TDA sparse (every layer's threshold tau)
            th = np.full(layers, tau, np.float32)
            want, want_counts = greedy(torch_e.backend, ids, mask, th)
            got, got_counts = greedy(nat.backend, ids, mask, th)
            np.testing.assert_array_equal(got, want, err_msg=f"{family} {fmt} tau {tau} batch {len(ids)}")
            np.testing.assert_array_equal(got_counts, want_counts)
            if tau > 0:
                assert (got_counts < inter).any()  # really sparse


def test_decode_bytes_are_the_block_bytes(native, qengines):
    """The runtime's bytes per dense step (what --bench divides by) count the blocks each step reads: every
    linear's and the lm_head's (an untied embedding is read one row per token, so not), plus float biases and
    the final norm (the per-layer norms and rope tables are not counted, as for float engines)."""
    from safetensors import safe_open
    for key in (("llama", "q4_0"), ("qwen2", "q4_0")):
        d = qengines[key]
        e = NativeEngine(d, verify=True, threads=1)
        want = mlp = 0
        with safe_open(str(d / "model.safetensors"), "np") as f:
            names = set(f.keys())
            for name in names:
                t = f.get_tensor(name)
                mlp += t.nbytes if ".mlp." in name else 0
                counted = (t.dtype == np.uint8 and not name.startswith("__padding__")) or name.endswith(".bias") \
                    or name == "final_norm.weight"
                if name == "embed_tokens.weight_blocks" and "lm_head.weight_blocks" in names:
                    counted = False
                want += t.nbytes if counted else 0
        assert e.info.weight_bytes == want, key
        assert e.info.mlp_weight_bytes == mlp > 0, key  # what TDA thins out (tda-run --bench's floor)


def _edit_manifest(src, tmp_path, name, edit):
    bad = tmp_path / name
    shutil.copytree(src, bad)
    m = json.loads((bad / "manifest.json").read_text())
    edit(m)
    (bad / "manifest.json").write_text(json.dumps(m))
    return bad


def test_bad_formats_name_the_tensor(native, qengines, tmp_path):
    src = qengines["llama", "q4_0"]
    t = "layers.1.attn.k_proj.weight_blocks"
    cases = [
        ("unknown", lambda m: m["weight_formats"].__setitem__(t, "q4_k"),
         f"tensor '{t}' has weight format 'q4_k'"),
        ("wrong_format", lambda m: m["weight_formats"].__setitem__(t, "q8_0"),  # q4_0 bytes read as q8_0 rows
         f"tensor '{t}' has shape"),
        ("float_down", lambda m: m["weight_formats"].__setitem__("layers.0.mlp.down_weight_t", "float32"),
         "the MLP kernels take float32 or blocks for both"),
        ("layer_formats", lambda m: m["weight_formats"].__setitem__("layers.1.mlp.down_weight_t", "q4_0"),
         "layer 1's MLP is q4_0/q4_0, layer 0's is another pair of formats"),
        ("float_listed", lambda m: m["weight_formats"].__setitem__(t, "float32"),
         "listed as float32"),
    ]
    for name, edit, message in cases:
        bad = _edit_manifest(src, tmp_path, name, edit)
        with pytest.raises(NativeError, match=message) as e:
            NativeEngine(bad, verify=True, threads=1)
        assert "model.safetensors" in str(e.value), str(e.value)
        r = subprocess.run([str(native.cli), "-e", str(bad), "--prompt-ids", "1,2", "-n", "2"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and message in r.stderr and "tda-run: error:" in r.stderr, r.stderr


def test_sanitizers(qengines):
    """tda-run on block engines under ASan + UBSan: prefill on both sides of the tile switch, threaded slices."""
    san = build_native(sanitize=True)
    for key in (("llama", "q4_0"), ("gemma2", "q4_1")):
        for ids in ("3,4,5,6", ",".join(str(3 + i % 200) for i in range(70))):  # M = 4 and 70
            r = subprocess.run([str(san.cli), "-e", str(qengines[key]), "--prompt-ids", ids, "-n", "4",
                                "--threads", "2"], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "TDA_NATIVE_SLICE_BYTES": "1"})
            assert r.returncode == 0 and "ERROR" not in r.stderr and "runtime error" not in r.stderr, r.stderr
