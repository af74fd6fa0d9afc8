"""Real TensorRT-RTX plans with our plugins, built on a CPU (no GPU can run them here).

Every tiny family TensorRT supports is exported and built through `build --target tensorrt-rtx`:
each decoder layer's SparseGatedMLP and SelectActive must be a plugin layer, recorded in the
manifest and shown by `inspect`, and the plan must carry the plugins' serialized records.
"""
import json
import os
import re
import time
from collections import Counter

import pytest
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.export import names, quantize
from tda_export.export.build import build
from tda_export.ops.contract import BLOCK_FORMATS, PLUGIN_FIELDS
from tda_export.trt.build.plan import PlanOptions
from trt_records import plugin_records

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")

from tda_export.kernels.build import nvcc_path

# The Python plugins size their workspace with the CUDA kernel library's (host-side) queries.
pytestmark = [pytest.mark.trt, pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed")]

# One RTX target keeps CI time down (the CLI test builds two; the default is all five).
FAST = dict(target="tensorrt-rtx", max_batch=4, max_seq_len=128, max_prompt=64, compute_capabilities=("8.6",))


def check_plan(out, num_layers, activation):
    data = json.loads((out / "manifest.json").read_text())
    trt = data["tensorrt"]
    assert trt["flavour"] == "tensorrt-rtx" and trt["plan_file"] == "model.plan"
    assert data["files"]["model.plan"]["sha256"] == trt["plan_sha256"]
    assert trt["layers"]["plugins"] == {"tda::SparseGatedMLP/1": num_layers, "tda::SelectActive/1": num_layers}
    assert [p["name"] for p in trt["profiles"]] == ["prefill", "decode"]
    records = plugin_records((out / "model.plan").read_bytes())
    assert set(records["names"]) == {"SparseGatedMLP", "SelectActive"}
    assert {f for f, _, _ in records["fields"]} == set(PLUGIN_FIELDS["SparseGatedMLP"])  # SelectActive has none
    assert {v for f, _, v in records["fields"] if f == "decode_version"} == {b"1\0"}  # built without the variable
    assert trt["plugin"]["decode_version"] == 1
    assert {v for f, _, v in records["fields"] if f == "activation"} == {activation.encode() + b"\0"}
    return trt


# Not gemma2: TensorRT's Attention rejects softcap ("Setting softcap is not supported in TensorRT Attention").
@pytest.mark.parametrize("family,dtype,activation", [
    ("llama", "float16", "silu"), ("mistral", "float16", "silu"), ("qwen2", "float16", "silu"),
    ("gemma", "bfloat16", "gelu_tanh"), ("gemma3_text", "bfloat16", "gelu_tanh")])
def test_tiny_plan_has_one_plugin_layer_per_decoder_layer(tiny_dirs, tmp_path, family, dtype, activation):
    out = build(str(tiny_dirs[family]), tmp_path / "e", dtype, progress=False, plan=PlanOptions(**FAST))
    trt = check_plan(out, 3, activation)
    assert trt["compute_capabilities"] == ["SM86"] and trt["dtype"] == dtype
    # every plan gets goldens for `check`: bf16 ones are float32 logits (trt/goldens.py)
    import numpy as np

    golden = np.load(out / "trt_goldens.npz")
    assert str(golden["reference"]) == {"float16": "onnxruntime float16", "bfloat16": "torch float32"}[dtype]
    assert golden["prefill"].dtype == np.float32 and np.isfinite(golden["decode1"]).all()
    assert trt["profiles"][1]["shapes"]["past_key_values.0.key"]["max"][2] == 127


def test_cli_build_inspect_and_rebuild(tiny_dirs, tmp_path):
    """The user's path: two RTX targets, a timing cache, inspect, check; then the same build again."""
    cache = tmp_path / "timing.cache"
    args = ["build", "-m", str(tiny_dirs["llama"]), "--no-calibrate", "--target", "tensorrt-rtx", "--dtype", "fp16",
            "--max-batch", "2", "--max-seq-len", "64", "--timing-cache", str(cache),
            "--compute-capability", "8.6", "--compute-capability", "12.0"]
    runner = CliRunner()
    res = runner.invoke(main, args + ["-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert cache.is_file() and cache.stat().st_size > 0
    trt = check_plan(tmp_path / "a", 3, "silu")
    assert trt["compute_capabilities"] == ["SM86", "SM120"]
    shown = runner.invoke(main, ["inspect", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert "tensorrt   tensorrt-rtx" in shown.output and "decode kernel v1" in shown.output
    assert "tda::SparseGatedMLP/1 3 layers" in shown.output and "verified" in shown.output
    assert shown.output.count("plugin     layers.") == 6
    assert (tmp_path / "a" / "trt_goldens.npz").is_file()  # ONNX Runtime logits for `check`
    # `check` goes up to the GPU boundary here: goldens and plan verified, then deserialization needs a GPU.
    checked = runner.invoke(main, ["check", "-e", str(tmp_path / "a")])
    assert checked.exit_code == 1 and "plugin layers: tda::SelectActive/1 x3, tda::SparseGatedMLP/1 x3" in checked.output
    assert "cannot run" in checked.output and "Traceback" not in checked.output

    res = runner.invoke(main, args + ["-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    a, b = (tmp_path / "a" / "model.plan").read_bytes(), (tmp_path / "b" / "model.plan").read_bytes()
    # What is true of TensorRT-RTX 1.7 (docs/tensorrt.md): a rebuild of the same ONNX with the same
    # options gives a plan of the same size and the same plugin records, but not the same bytes
    # (a few hundred bytes differ, with or without our plugins), so CI cannot compare plans by hash.
    assert len(a) == len(b) and plugin_records(a) == plugin_records(b)
    differing = sum(x != y for x, y in zip(a, b))
    print(f"rebuild: {len(a)} bytes, byte-identical: {a == b} ({differing} bytes differ)")
    assert differing < len(a) // 100


def test_plugin_coverage_failure_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    """A tda node the parser did not turn into our plugin fails the build; --out is never created."""
    import onnx

    from tda_export.export import build as build_mod

    real_save = onnx.save

    def save_without_plugin_namespace(proto, path, *a, **k):  # the parser then inlines the function
        for n in proto.graph.node:
            if n.domain == "tda" and n.op_type == "SparseGatedMLP":
                keep = [x for x in n.attribute if x.name not in ("plugin_namespace", "plugin_version")]
                del n.attribute[:]
                n.attribute.extend(keep)
        return real_save(proto, path, *a, **k)

    monkeypatch.setattr(build_mod.onnx, "save", save_without_plugin_namespace)
    with pytest.raises(ValueError, match="3 of 6 tda nodes did not become plugin layers"):
        build(str(tiny_dirs["llama"]), tmp_path / "e", "float16", progress=False, plan=PlanOptions(**FAST))
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.building-*"))


@pytest.mark.skipif(not os.environ.get("TDA_TRT_PLUGIN_LIBRARY"),
                    reason="set TDA_TRT_PLUGIN_LIBRARY to a built libtda_trt_plugins.so (plugins/README.md; "
                           "CI cannot fetch TensorRT's headers)")
@pytest.mark.parametrize("family,dtype", [("llama", "float16"), ("gemma3_text", "bfloat16")])
def test_cpp_and_python_plugins_serialize_the_same_records(tiny_dirs, tmp_path, family, dtype):
    """A plan built with the C++ creators carries the same plugin records as one built with the Python creators."""
    from tda_export.trt.build.plan import build_plan

    onnx_dir = build(str(tiny_dirs[family]), tmp_path / "onnx", dtype, progress=False)
    data = json.loads((onnx_dir / "manifest.json").read_text())
    plans = {}
    for kind, lib in (("cpp", os.environ["TDA_TRT_PLUGIN_LIBRARY"]), ("python", None)):
        out = tmp_path / kind
        out.mkdir()
        section = build_plan(onnx_dir / "model.onnx", out, data["io"]["inputs"], data["max_context"], dtype,
                             PlanOptions(**dict(FAST, plugin_library=lib)), progress=False)
        plan = (out / "model.plan").read_bytes()
        # Each record's bytes from its name on: version, field count, TensorRT's per-record value, fields.
        windows = Counter(plan[m.start():m.end() + 96]
                          for m in re.finditer(rb"(SparseGatedMLP|SelectActive)\x001\x00", plan))
        plans[kind] = (section["layers"], len(plan), plugin_records(plan), windows)
    assert plans["cpp"][0]["plugins"] == plans["python"][0]["plugins"]
    assert plans["cpp"][1:] == plans["python"][1:]


@pytest.mark.skipif(not os.environ.get("TDA_TRT_PLUGIN_LIBRARY"),
                    reason="set TDA_TRT_PLUGIN_LIBRARY to a built libtda_trt_plugins.so (plugins/README.md; "
                           "CI cannot fetch TensorRT's headers)")
def test_cpp_and_python_plugins_agree_on_a_block_engine(tiny_dirs, tmp_path):
    """A q4_1 engine (q8_0 down rows, the exporter's default): the C++ creators accept the blocks (their shape
    checks take down_weight_t's bytes from down_weight_format) and record the same fields as the Python ones."""
    records = {}
    for kind, lib in (("cpp", os.environ["TDA_TRT_PLUGIN_LIBRARY"]), ("python", None)):
        out = build(str(tiny_dirs["llama"]), tmp_path / kind, "float16", progress=False, weight_format="q4_1",
                    plan=PlanOptions(**dict(FAST, plugin_library=lib)))
        records[kind] = plugin_records((out / "model.plan").read_bytes())
    assert {v for f, _, v in records["cpp"]["fields"] if f == "down_weight_format"} == {b"q8_0\0"}
    assert records["cpp"] == records["python"]


@pytest.mark.slow
def test_smollm2_fp16_plan(tmp_path):
    t = time.time()
    out = build("smollm2-135m", tmp_path / "e", "float16", progress=False, plan=PlanOptions(**FAST))
    trt = check_plan(out, 30, "silu")
    print(f"smollm2 fp16 export + TensorRT-RTX plan: {time.time() - t:.0f} s, {trt['plan_bytes'] / 2**20:.0f} MiB")


def _wide_llama(path):
    """A tiny Llama wide enough that the weights, not TensorRT's kernels, dominate a plan's bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiny_models import COMMON, tiny_tokenizer

    cfg = LlamaConfig(**dict(COMMON, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=64), hidden_act="silu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_fp16_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    src = _wide_llama(root / "src")
    out = build(str(src), root / "fp16", "float16", progress=False, plan=PlanOptions(**FAST))
    return src, json.loads((out / "manifest.json").read_text())["tensorrt"]["plan_bytes"]


@pytest.mark.slow
def test_4bit_plan_builds_for_every_target_that_takes_int4(tiny_dirs, tmp_path):
    """With no --compute-capability a q4_0 engine's plan targets 8.0 to 12.0: TensorRT-RTX 1.7 cannot compile its
    int4 weight-only linears for 7.5, so the default of all five failed (plan.NO_INT4). Slow: four targets of a
    tiny model took 97 s on the shared 2-core box (one takes 4 s)."""
    out = build(str(tiny_dirs["llama"]), tmp_path / "e", "float16", progress=False, weight_format="q4_0",
                plan=PlanOptions(**dict(FAST, compute_capabilities=())))
    trt = check_plan(out, 3, "silu")
    assert trt["compute_capabilities"] == ["SM80", "SM86", "SM89", "SM120"]


@pytest.mark.parametrize("fmt,bits", [("q4_0", 4), ("q8_0", 8), ("q4_1", 4)])
def test_plan_from_block_engine(wide_fp16_plan, tmp_path, fmt, bits):
    """An RTX plan from a block-quantized engine: our plugin layers take the engine's blocks (int8 inputs,
    weight_format recorded), the dense linears and the embedding are int4/int8 weight-only, and the plan
    is smaller than the fp16 plan of the same model by what the weights save, not by some other amount.
    q8_0/q4_0 blocks are carried exactly; q4_1's dense tensors are re-quantized (its minimum is no zero point).
    The 4-bit engines store the MLP's down rows in q8_0 (the exporter's default): the plugin records carry
    down_weight_format q8_0 and the plugin takes those rows as they are."""
    src, fp16_plan = wide_fp16_plan
    out = build(str(src), tmp_path / "e", "float16", progress=False, plan=PlanOptions(**FAST), weight_format=fmt)
    trt = check_plan(out, 2, "silu")
    records = plugin_records((out / "model.plan").read_bytes())
    assert {v for f, _, v in records["fields"] if f == "weight_format"} == {fmt.encode() + b"\0"}
    engine = json.loads((out / "manifest.json").read_text())["weight_formats"]
    down = quantize.down_choice(fmt)  # q8_0 under q4_0/q4_1
    assert {engine[names.down_t(n)] for n in range(2)} == {down}
    assert {v for f, _, v in records["fields"] if f == "down_weight_format"} == \
        {(b"same" if down == fmt else down.encode()) + b"\0"}
    wo = trt["weight_only"]
    heads = {"embed_tokens.weight_blocks", "lm_head.weight_blocks"} & set(wo["tensors"])  # untied: both
    assert trt["layers"]["by_type"]["DEQUANTIZE"] == 2 * 4 + len(heads) == 10  # q/k/v/o per layer
    tensors = wo["tensors"]
    dense = {k: v for k, v in tensors.items() if "mlp" not in k}
    requantized = sorted(dense) if fmt == "q4_1" else []
    assert wo["rule"] == "int4 block 32, int8 block 32" and wo["requantized"] == requantized
    assert all(v["exact"] for k, v in tensors.items() if k not in requantized)
    assert set(tensors) == {k for k, v in engine.items() if v in BLOCK_FORMATS}  # every block tensor accounted for
    assert {tensors[names.down_t(n)]["from"] for n in range(2)} == {down}  # the plugin's rows, carried exactly
    assert {v["to"] for v in dense.values()} == {f"int{bits}"}
    assert not (out / ".tensorrt-graph").exists()  # the scratch graph is gone
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "verified" in shown.output, shown.output
    assert (f"weights    {fmt} engine: MLP blocks in the plugin, dense linears weight-only int4 block 32, int8 block "
            f"32; {len(requantized)} of {len(tensors)} block tensors re-quantized") in shown.output
    fp16_bytes = sum(2 * v["weights"] for v in tensors.values())
    quant_bytes = sum(v["bytes"] for v in tensors.values())
    # what the plan holds beyond the fp16 plan's non-weight bytes (kernels, graph): the weights it carries
    in_plan = trt["plan_bytes"] - (fp16_plan - fp16_bytes)
    print(f"{fmt}: plan {trt['plan_bytes']} bytes, fp16 plan {fp16_plan}; weights in the plan about {in_plan} "
          f"= {in_plan / quant_bytes:.2f}x the quantized {quant_bytes} (fp16 {fp16_bytes})")
    # RTX 1.7 adds about a fifth to the quantized bytes; far from fp16's 16 bits per weight
    assert 0.9 * quant_bytes < in_plan < 1.3 * quant_bytes and in_plan < 0.75 * fp16_bytes


@pytest.mark.slow
def test_smollm2_q4_0_plan(tmp_path):
    """SmolLM2 quantized to q4_0 (embedding included): 30 plugin layers on the blocks, and a plan nearer the
    quantized bytes than fp16's (TensorRT-RTX adds about a fifth to weight-only bytes, plus its kernels)."""
    t = time.time()
    out = build("smollm2-135m", tmp_path / "e", "float16", progress=False, plan=PlanOptions(**FAST),
                weight_format="q4_0")
    trt = check_plan(out, 30, "silu")
    tensors = trt["weight_only"]["tensors"]
    assert trt["weight_only"]["requantized"] == [] and {v["block"] for v in tensors.values()} == {32}
    quant = sum(v["bytes"] for v in tensors.values())
    fp16 = sum(2 * v["weights"] for v in tensors.values())
    print(f"smollm2 q4_0 export + TensorRT-RTX plan: {time.time() - t:.0f} s, plan {trt['plan_bytes'] / 2**20:.1f} "
          f"MiB, weights q4_0 {quant / 2**20:.1f} MiB, fp16 {fp16 / 2**20:.1f} MiB")
    assert quant < trt["plan_bytes"] < (quant + fp16) / 2
