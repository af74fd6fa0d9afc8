"""TensorRT-RTX structural check: the exported graph parses (TDA functions inlined, standard
Attention/RotaryEmbedding/RMSNormalization native) and an engine builds, no plugin, no GPU needed."""
import time

import pytest

from tda_export.export.build import build

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")

pytestmark = pytest.mark.trt


def _profile_shapes(name, shape, max_batch=2, max_seq=64, max_past=127):
    if name in ("input_ids", "position_ids"):
        return (1, 1), (1, 8), (max_batch, max_seq)
    if name == "attention_mask":
        return (1, 1), (1, 16), (max_batch, max_past + max_seq)
    if name.startswith("past_key_values"):
        kv_heads, width = shape[1], shape[-1]
        return (1, kv_heads, 0, width), (1, kv_heads, 8, width), (max_batch, kv_heads, max_past, width)
    if name.endswith("active_count"):
        return (1,), (1,), (max_batch,)
    width = shape[-1]  # past_tda scores / active_idx: [batch, intermediate]
    return (1, width), (1, width), (max_batch, width)


def parse_and_build(path):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        pytest.fail("TensorRT-RTX could not parse the graph:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if -1 in tuple(inp.shape):
            profile.set_shape(inp.name, *_profile_shapes(inp.name, tuple(inp.shape)))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0
    return engine


# Not gemma2: TensorRT's Attention rejects softcap ("Setting softcap is not supported in TensorRT Attention").
@pytest.mark.parametrize("family,dtype", [("llama", "float16"), ("qwen2", "float16"), ("gemma3_text", "bfloat16")])
def test_tiny_parses_and_builds(tmp_path, family, dtype):
    from tiny_models import save_tiny

    out = build(str(save_tiny(family, tmp_path / "m")), tmp_path / "e", dtype, progress=False)
    parse_and_build(out / "model.onnx")


@pytest.mark.slow
def test_smollm2_fp16_parses_and_builds(tmp_path):
    t = time.time()
    out = build("smollm2-135m", tmp_path / "e", "float16", progress=False)
    parse_and_build(out / "model.onnx")
    print(f"smollm2 fp16 export + TensorRT-RTX build: {time.time() - t:.0f} s")
