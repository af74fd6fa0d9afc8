"""export/weight_only.py: a block engine's dense weights as TensorRT's weight-only pattern (numpy only)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tda_export.export.weight_only import RULES, Rule, convert, dequantized, pack_int4, requantize
from tda_export.ops.blocks import dequantize, quantize


def weights(rows=24, width=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, width)).astype(np.float32) * 0.05
    w[3] = 0.0          # an all-zero row: scale 0, no NaN
    w[5, :32] = 7.5     # a constant block
    return w


@pytest.mark.parametrize("fmt,bits", [("q8_0", 8), ("q4_0", 4)])
def test_rtx_carries_the_engines_blocks_exactly(fmt, bits):
    blocks = quantize(fmt, weights())
    c = convert(fmt, blocks, RULES["tensorrt-rtx"])
    assert c.exact and c.bits == bits and c.block == 32 and c.q.dtype == np.int8
    assert c.q.min() >= -(1 << (bits - 1)) and c.q.max() <= (1 << (bits - 1)) - 1
    np.testing.assert_array_equal(dequantized(c), dequantize(fmt, blocks))  # bit for bit
    assert c.describe(fmt)["bytes"] == c.q.size * bits // 8 + c.scale.size * 2


@pytest.mark.parametrize("fmt,rule", [("q4_1", "tensorrt-rtx"), ("q4_0", "tensorrt"), ("q4_1", "tensorrt"),
                                      ("q8_0", "tensorrt")])
def test_requantized_where_the_target_needs_it(fmt, rule):
    """q4_1's minimum is no integer zero point; datacenter TensorRT takes int4 block 128 and int8 per channel."""
    w = weights()
    blocks = quantize(fmt, w)
    exact = dequantize(fmt, blocks)
    c = convert(fmt, blocks, RULES[rule])
    assert not c.exact
    want_block = None if (fmt == "q8_0" and rule == "tensorrt") else RULES[rule].int4_blocks[0]
    assert c.block == want_block and c.bits == (8 if fmt == "q8_0" else 4)
    got = dequantized(c)
    # symmetric round to nearest: at most half a step (absmax / levels, fp16 scale) per weight
    g = exact.reshape(exact.shape[0], -1, c.block or exact.shape[1])
    step = np.abs(g).max(axis=2, keepdims=True) / ((1 << (c.bits - 1)) - 1)
    err = np.abs(got.reshape(g.shape) - g)
    assert (err <= 0.5 * step * 1.01 + 1e-7).all()
    assert np.isfinite(got).all() and (got[3] == 0).all()


def test_requantize_checks_blocks_and_clips():
    with pytest.raises(ValueError, match="not whole blocks of 128"):
        requantize(np.zeros((2, 96), np.float32), 4, 128)
    c = requantize(np.array([[1.0, -1.0] * 32], np.float32), 4, 64)
    assert set(np.unique(c.q)) == {-7, 7}


def test_pack_int4_is_onnx_layout():
    """The packed bytes read back through ONNX's own INT4 decoding."""
    q = np.random.default_rng(1).integers(-8, 8, size=(6, 64)).astype(np.int8)
    t = helper.make_tensor("q", TensorProto.INT4, list(q.shape), pack_int4(q), raw=True)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(t).astype(np.int8), q)


def test_rule_describes_itself():
    assert RULES["tensorrt-rtx"].describe() == "int4 block 32, int8 block 32"
    assert RULES["tensorrt"].describe() == "int4 block 128 or 64, int8 per output channel"
    assert Rule((64,), None).describe() == "int4 block 64, int8 per output channel"
    assert RULES["tensorrt"].int4_block(576) == 64 and RULES["tensorrt"].int4_block(4096) == 128  # SmolLM2, 7B
    with pytest.raises(ValueError, match="a row of 96 weights is not a multiple of any int4 block"):
        RULES["tensorrt"].int4_block(96)


def test_reblock_quality_bench_runs(tiny_dirs, capsys):
    """bench/trt_reblock_quality.py on a tiny model: the engine row is the baseline, RTX carries q4_0's dense
    tensors exactly (same perplexity), datacenter TensorRT re-quantizes all of them."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "trt_reblock_quality.py"
    spec = importlib.util.spec_from_file_location("trt_reblock_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["-m", str(tiny_dirs["llama"]), "--weight-format", "q4_0", "--sequences", "2",
                       "--prompt-tokens", "16", "--continuation-tokens", "8", "--json"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"engine", "tensorrt-rtx", "tensorrt", "int4 block 64"}
    assert rows["engine"]["dense_increase"] == 0 and rows["tensorrt-rtx"]["requantized"] == "0/14"
    assert rows["tensorrt-rtx"]["dense_ppl"] == rows["engine"]["dense_ppl"]  # carried exactly
    assert rows["tensorrt"]["requantized"] == "14/14" and np.isfinite(rows["tensorrt"]["dense_ppl"])
