"""Block-quantized engines (build --weight-format, issue 18): the carry/quantize rules, every tiny family in
q8_0 and q4_0 against the HF model running on the engine's dequantized weights (the engine computes what its
blocks mean, and what calibration saw), greedy tokens equal across the Python backends, the manifest's
weight_formats checked by inspect, bad CLI input; SmolLM2's own Q4_1 GGUF carried byte for byte (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors import safe_open

import parity
from tda_export import manifest
from tda_export.export import names, quantize
from tda_export.export.build import build
from tda_export.export.engine_weights import apply
from tda_export.models import load_model
from tda_export.ops import blocks
from tda_export.ops.contract import BLOCK_FORMATS
from tda_export.runtime.engine import Engine, EngineError
from tiny_models import FAMILIES, save_tiny

FORMATS = ("q8_0", "q4_0")
# The backends whose greedy tokens must agree.
BACKENDS = ("torch", "onnxruntime", "native")
STEPS = 8
LENS = (12, 9)


# ---- the rules, without a model -------------------------------------------------------------------------------

def _floats(rows, width, seed=0):
    return np.random.default_rng(seed).normal(0, 0.1, (rows, width)).astype(np.float32)


def test_encode_carries_same_format_and_quantizes_otherwise():
    w = _floats(4, 64)
    src = ("q4_1", blocks.quantize("q4_1", w))
    carried = quantize.encode("q4_1", "t", lambda: pytest.fail("a carried tensor is never dequantized"), src)
    assert carried.carried and carried.fmt == "q4_1"
    np.testing.assert_array_equal(carried.blocks, src[1])
    requant = quantize.encode("q4_0", "t", lambda: blocks.dequantize(*src), src)
    assert not requant.carried and requant.fmt == "q4_0"
    np.testing.assert_array_equal(requant.blocks, blocks.quantize("q4_0", blocks.dequantize(*src)))
    # the embedding keeps a GGUF's own block format (SmolLM2's Q4_1 GGUF has a Q8_0 token_embd)
    q8 = ("q8_0", blocks.quantize("q8_0", w))
    kept = quantize.encode("q4_1", "embed", lambda: pytest.fail("kept"), q8, keep_source_format=True)
    assert kept.carried and kept.fmt == "q8_0"
    fresh = quantize.encode("q8_0", "t", lambda: w)
    np.testing.assert_array_equal(fresh.blocks, blocks.quantize("q8_0", w))


def test_rows_not_in_whole_blocks_are_named():
    with pytest.raises(quantize.WeightFormatError, match=r"layers\.0\.x has shape \[4, 48\].*48.*multiple of 32"):
        quantize.encode("q4_1", "layers.0.x", lambda: _floats(4, 48))
    with pytest.raises(quantize.WeightFormatError, match="embed_tokens.weight_blocks rows are hidden_size = 40"):
        quantize.check_dims("q8_0", "m", {"embed_tokens.weight_blocks": ("hidden_size", 40)})
    quantize.check_dims("float", "m", {"x": ("hidden_size", 40)})  # float engines have no blocks
    with pytest.raises(quantize.WeightFormatError, match="q3_k"):
        quantize.check_choice("q3_k")
    with pytest.raises(quantize.WeightFormatError, match=r"t: parts in formats \['q4_0', 'q4_1'\]"):
        quantize.stack("q4_1", "t", [quantize.encode("q4_1", "a", lambda: _floats(2, 32)),
                                     quantize.encode("q4_0", "b", lambda: _floats(2, 32))])
    with pytest.raises(quantize.WeightFormatError, match="x: cannot quantize to q8_0: the weights hold NaN"):
        quantize.encode("q8_0", "x", lambda: np.full((1, 32), np.nan, np.float32))


# ---- tiny families ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qengines(tiny_dirs, tmp_path_factory):
    """(family, fmt) -> (engine dir, the HF model on the engine's dequantized weights, thresholds at ~d=0.5 on it)."""
    root = tmp_path_factory.mktemp("qengines")
    out = {}
    for family in FAMILIES:
        for fmt in FORMATS:
            loaded = load_model(str(tiny_dirs[family]))
            formats = apply(loaded, fmt)  # q4_0: down_proj in q8_0 (--down-weight-format auto)
            assert set(formats.values()) == {fmt, quantize.down_choice(fmt)}
            other = [k for k, v in formats.items() if v != fmt]
            assert len(other) == (3 if fmt == "q4_0" else 0) and all(k.endswith("mlp.down_proj.weight") for k in other)
            assert len(formats) == 7 * 3 + 1 + (not loaded.config.tie_word_embeddings)
            ids, mask, pos = parity.prompt(LENS, loaded.config.vocab_size)
            taus = parity.half_density_thresholds(loaded.model, loaded.activation, ids, mask, pos)
            cal = root / f"{family}-{fmt}.json"
            parity.write_calibration(cal, loaded, taus)
            out[family, fmt] = (build(str(tiny_dirs[family]), root / f"{family}-{fmt}", "float32", str(cal),
                                      progress=False, weight_format=fmt), loaded, taus)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_computes_its_dequantized_weights(qengines, family, fmt):
    """ONNX Runtime on the engine == the HF model whose weights are the engine's blocks dequantized, under the
    same TDA masks: logits within fp32 noise, identical active sets at every step."""
    out, loaded, taus = qengines[family, fmt]
    data = manifest.verify(out)
    assert data["weights"] == fmt
    formats = data["weight_formats"]
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert {k for k in f.keys() if not k.startswith("__padding__")} == set(formats)  # one copy, all listed
        for name, want in formats.items():
            assert f.get_slice(name).get_dtype() == ("U8" if want in BLOCK_FORMATS else "F32"), name
    assert formats[names.gate_up(0)] == formats[names.EMBED_BLOCKS] == fmt
    assert formats[names.down_t(0)] == quantize.down_choice(fmt) == {"q8_0": "q8_0", "q4_0": "q8_0"}[fmt]
    assert formats[names.linear_weight_blocks(names.attn_proj(0, "o"))] == fmt
    assert not any(n.endswith(".weight_t") or n == names.EMBED for n in formats)  # no float copy beside
    assert formats[names.weight(names.FINAL_NORM)] == "float32"
    ids, mask, pos = parity.prompt(LENS, loaded.config.vocab_size)
    ref = parity.reference_run(loaded.model, loaded.activation, taus, ids, mask, pos, STEPS,
                               data["calibration"]["density_bounds"])
    got = parity.onnx_run(out / "model.onnx", ids, mask, pos, STEPS, ref)
    counts = []
    for step, ((ref_logits, ref_state), g) in enumerate(zip(ref, got)):
        sel = mask.astype(bool) if step == 0 else np.ones(ref_logits.shape[:2], bool)
        assert parity.rel(g["logits"][sel], ref_logits[sel]) < 1e-4, f"{family} {fmt} step {step}"
        for n, (idx, cnt, _) in enumerate(ref_state):
            np.testing.assert_array_equal(g[f"present_tda.{n}.active_idx"], idx, err_msg=f"layer {n} step {step}")
            counts.append(cnt)
    assert 0 < np.mean(counts) < loaded.config.intermediate_size  # sparse, so the masks matter


def _greedy(backend, ids, mask, thresholds, bounds):
    logits, state = backend.prefill(ids, mask, thresholds, bounds)
    counts, tokens = backend.active_counts(state), []
    for _ in range(STEPS):
        tokens.append(logits.argmax(-1))
        logits = backend.decode(state, tokens[-1])
    return np.stack(tokens, 1), counts


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_across_backends(qengines, family, fmt):
    out = qengines[family, fmt][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engines = {b: Engine.load(out, backend=b, threads=1, **({"max_context": 64} if b == "torch" else {}))
                   for b in BACKENDS}
    ids, mask, _ = parity.prompt(LENS, engines[BACKENDS[0]].manifest["vocab_size"])
    first = engines[BACKENDS[0]]
    for density in (None, 1.0):
        th, bounds = first.thresholds(density), first.density_bounds(density)
        results = {b: _greedy(e.backend, ids, mask, th, bounds) for b, e in engines.items()}
        for b, (tokens, counts) in results.items():
            np.testing.assert_array_equal(tokens, results[BACKENDS[0]][0], err_msg=f"{b} {family} {fmt} {density}")
            np.testing.assert_array_equal(counts, results[BACKENDS[0]][1], err_msg=f"{b} {family} {fmt}")


def test_built_in_calibration_runs_on_the_engines_weights(tmp_path, tiny_dirs, monkeypatch):
    """build's own calibration sees exactly the weights the engine stores (dequantized), not the checkpoint's."""
    from tda_export import quality

    seen, real = {}, quality.build_calibration

    def spy(loaded, *args, **kwargs):
        layer = loaded.model.model.layers[1]
        seen.update(gate=layer.mlp.gate_proj.weight.detach().clone(), down=layer.mlp.down_proj.weight.detach().clone(),
                    k=layer.self_attn.k_proj.weight.detach().clone(),
                    embed=loaded.model.get_input_embeddings().weight.detach().clone())
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(quality, "build_calibration", spy)
    out = build(str(tiny_dirs["qwen2"]), tmp_path / "e", "float32", None, progress=False, auto_calibrate=True,
                compute_dtype="float32", device="cpu", weight_format="q4_0")
    with safe_open(out / "model.safetensors", "numpy") as f:
        dq = lambda name, fmt="q4_0": blocks.dequantize(fmt, f.get_tensor(name))  # noqa: E731
        want = dict(gate=dq(names.gate_up(1))[:, 0], down=dq(names.down_t(1), "q8_0").T,  # q8_0: auto down
                    k=dq(names.linear_weight_blocks(names.attn_proj(1, "k"))), embed=dq(names.EMBED_BLOCKS))
    checkpoint = load_model(str(tiny_dirs["qwen2"])).model.model.layers[1].mlp.gate_proj.weight.detach()
    assert not np.array_equal(checkpoint.numpy(), want["gate"])  # the engine's weights are not the checkpoint's
    for name, value in want.items():
        np.testing.assert_array_equal(seen[name].numpy(), value, err_msg=name)


def test_torch_backend_refuses_half_block_engines(tmp_path, tiny_dirs):
    out = build(str(tiny_dirs["llama"]), tmp_path / "e", "float16", None, progress=False, weight_format="q8_0")
    with pytest.raises(EngineError, match=r"q8_0 blocks in a float16 engine: the torch backend runs block-quantized "
                                          r"engines built with --dtype fp32 only"):
        Engine.load(out, backend="torch")


# ---- manifest checks and the CLI ------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from tda_export.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True)


def _retamper(out, edit):
    data = manifest.read(out)
    edit(data["weight_formats"])
    data = {k: v for k, v in data.items() if k not in ("files", "format")}
    manifest.write(out, data)  # re-hashed: only the format check can catch it
    return _cli("inspect", out)


def test_inspect_shows_and_checks_formats(qengines, tmp_path):
    import shutil

    src = qengines["gemma2", "q4_0"][0]
    r = _cli("inspect", src)
    assert r.returncode == 0, r.stderr
    # 3 layers x (q, k, v, o, gate_up) + embedding; down_t in q8_0 (--down-weight-format auto)
    assert "weights    q4_0: q4_0 16 tensors, float32 " in r.stdout and ", q8_0 3 tensors" in r.stdout
    gate_up = names.gate_up(1)
    cases = [(lambda f: f.update({gate_up: "q8_0"}),
              rf"model.safetensors: tensor '{gate_up}' has shape \[136, 2, 36\]; q8_0 blocks of this model need "
              r"\[136, 2, 68\]"),
             (lambda f: f.update({gate_up: "float32"}), rf"tensor '{gate_up}' is U8, manifest.json weight_formats "
                                                        r"says float32"),
             (lambda f: f.update({"final_norm.weight": "q4_0"}), r"tensor 'final_norm.weight' is F32, but q4_0 blocks "
                                                                 r"are U8"),
             (lambda f: f.pop(gate_up), rf"tensor '{gate_up}' has no entry in manifest.json weight_formats"),
             (lambda f: f.update({gate_up: "int4"}), rf"tensor '{gate_up}' has format 'int4'")]
    for i, (edit, message) in enumerate(cases):
        out = tmp_path / f"e{i}"
        shutil.copytree(src, out)
        r = _retamper(out, edit)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        first = r.stderr.splitlines()[0]
        assert first.startswith(f"error: {out / 'model.safetensors'}") and __import__("re").search(message, first), \
            r.stderr


def test_cli_bad_inputs_one_line_nothing_written(tmp_path):
    """hidden 48 is a multiple of the kernels' 8 but not of a block's 32: q4_1 fails before anything is
    written, in one line naming the tensor and its width; TensorRT targets refuse block weights."""
    from transformers import LlamaConfig

    import tiny_models

    odd = tmp_path / "odd"
    config = LlamaConfig(**dict(tiny_models.COMMON, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                  head_dim=16))
    monkey = tiny_models.tiny_config
    tiny_models.tiny_config = lambda family: config
    try:
        save_tiny("llama", odd)
    finally:
        tiny_models.tiny_config = monkey
    from click.testing import CliRunner

    from tda_export.cli import main

    out = tmp_path / "engine"
    for args, message in (
            (("--weight-format", "q4_1"), f"Error: --weight-format q4_1: {odd.name}: embed_tokens.weight_blocks rows "
                                          f"are hidden_size = 48 weights, not a multiple of the 32-weight block; use "
                                          f"--weight-format float"),
            (("--weight-format", "q4_0", "--target", "tensorrt-rtx", "--dtype", "fp16"),  # before any plan work
             f"Error: --weight-format q4_0: {odd.name}: embed_tokens.weight_blocks rows are hidden_size = 48")):
        r = CliRunner().invoke(main, ["build", "-m", str(odd), "-o", str(out), "--no-calibrate", *args])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output  # cli.UserError, no traceback
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(message), r.stderr
        assert not out.exists() and not list(tmp_path.glob(".engine*"))
    r = CliRunner().invoke(main, ["build", "-m", str(odd), "-o", str(out), "--weight-format", "q5_0"])
    assert r.exit_code == 2 and "'q5_0' is not one of 'float', 'q8_0', 'q4_0', 'q4_1'" in r.stderr
    text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())  # --help teaches what each costs
    assert "q4_1: 5 bits per weight" in text and "q8_0: 8.5 bits per weight" in text
    assert "carried over byte for byte" in text


# ---- SmolLM2's shipped Q4_1 GGUF ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_q4_1(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "q4_1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build("smollm2-135m", out, None, None, progress=False, weight_format="q4_1")


def _gguf():
    from gguf import GGUFReader

    from tda_export.models import resolve

    src = resolve("smollm2-135m")
    path = src.directory / src.gguf_file
    return path, {t.name: t for t in GGUFReader(path).tensors}


@pytest.mark.slow
def test_smollm2_gguf_blocks_carried_byte_for_byte(smollm2_q4_1):
    """Every gate/up/q/k/v/o row and the (Q8_0, tied) embedding are the GGUF's bytes; q/k rows are the GGUF's
    rows in llama.cpp's un-permuted order; down is requantized along H, to q8_0 (--down-weight-format auto); the
    engine is <= 1.05x the GGUF plus what q8_0 down rows add over the GGUF's Q4_1 ones."""
    path, gguf = _gguf()
    data = manifest.verify(smollm2_q4_1)
    assert data["weights"] == "q4_1" and data["weight_formats"][names.EMBED_BLOCKS] == "q8_0"
    spec = data["decoder_spec"]
    with safe_open(smollm2_q4_1 / "model.safetensors", "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor(names.EMBED_BLOCKS), gguf["token_embd.weight"].data)
        assert names.LM_HEAD_BLOCKS not in f.keys()  # tied: the lm_head is the embedding's blocks
        for n in range(spec["num_layers"]):
            gate_up = f.get_tensor(names.gate_up(n))
            np.testing.assert_array_equal(gate_up[:, 0], gguf[f"blk.{n}.ffn_gate.weight"].data)
            np.testing.assert_array_equal(gate_up[:, 1], gguf[f"blk.{n}.ffn_up.weight"].data)
            for c, g in (("v", "attn_v"), ("o", "attn_output")):
                np.testing.assert_array_equal(f.get_tensor(names.linear_weight_blocks(names.attn_proj(n, c))),
                                              gguf[f"blk.{n}.{g}.weight"].data)
            for c, g, heads in (("q", "attn_q", spec["heads"]), ("k", "attn_k", spec["kv_heads"])):
                # llama.cpp's converter permuted each head's rows (pairs interleaved); undone on whole rows
                raw = np.asarray(gguf[f"blk.{n}.{g}.weight"].data)
                rows = raw.reshape(heads, spec["head_dim"] // 2, 2, -1).swapaxes(1, 2).reshape(raw.shape)
                np.testing.assert_array_equal(f.get_tensor(names.linear_weight_blocks(names.attn_proj(n, c))), rows)
            down = f.get_tensor(names.down_t(n))  # GGUF blocks along I: requantized along H from exact values
            assert data["weight_formats"][names.down_t(n)] == "q8_0"
            np.testing.assert_array_equal(
                down, blocks.quantize("q8_0", blocks.dequantize("q4_1", np.asarray(gguf[f"blk.{n}.ffn_down.weight"]
                                                                                   .data)).T))
    size, gguf_size = (smollm2_q4_1 / "model.safetensors").stat().st_size, path.stat().st_size
    assert size <= 1.05 * gguf_size + _down_extra(spec, "q4_1"), (size, gguf_size)


def _down_extra(spec, fmt: str) -> int:
    """Bytes q8_0 down rows add over `fmt` ones (the default --down-weight-format under 4-bit formats)."""
    per = spec["intermediate"] * spec["hidden"] // 32
    return spec["num_layers"] * per * (BLOCK_FORMATS["q8_0"].block_bytes - BLOCK_FORMATS[fmt].block_bytes)


def _requantized_gguf(src, dst, fmt: str):
    """A copy of the GGUF `src` whose Q4_1 tensors are requantized to `fmt` by ops/blocks (GGUF's byte layout,
    as llama-quantize writes it), every other tensor and metadata field as it is: a GGUF source already in
    `fmt` for the carry test, made here so CI needs no llama.cpp."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    target = GGMLQuantizationType[fmt.upper()]
    for t in reader.tensors:
        data, dtype = np.asarray(t.data), t.tensor_type
        if dtype == GGMLQuantizationType.Q4_1:
            data, dtype = blocks.quantize(fmt, blocks.dequantize("q4_1", data)), target
        writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.slow
def test_q4_0_gguf_blocks_carried_byte_for_byte(tmp_path):
    """A Q4_0 GGUF (SmolLM2's requantized): every gate/up/v/o row is its bytes, q/k rows its rows un-permuted."""
    path, _ = _gguf()
    gguf_path = _requantized_gguf(path, tmp_path / "q4_0.gguf", "q4_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = build("smollm2-135m", tmp_path / "engine", None, None, weights=str(gguf_path), progress=False,
                    weight_format="q4_0")
    from gguf import GGUFReader

    gguf = {t.name: t for t in GGUFReader(gguf_path).tensors}
    data = manifest.verify(out)
    assert data["weights"] == "q4_0" and data["weight_formats"][names.EMBED_BLOCKS] == "q8_0"
    spec = data["decoder_spec"]
    with safe_open(out / "model.safetensors", "numpy") as f:
        for n in (0, spec["num_layers"] - 1):
            gate_up = f.get_tensor(names.gate_up(n))
            np.testing.assert_array_equal(gate_up[:, 0], gguf[f"blk.{n}.ffn_gate.weight"].data)
            np.testing.assert_array_equal(gate_up[:, 1], gguf[f"blk.{n}.ffn_up.weight"].data)
            np.testing.assert_array_equal(f.get_tensor(names.linear_weight_blocks(names.attn_proj(n, "o"))),
                                          gguf[f"blk.{n}.attn_output.weight"].data)
            raw = np.asarray(gguf[f"blk.{n}.attn_k.weight"].data)
            rows = raw.reshape(spec["kv_heads"], spec["head_dim"] // 2, 2, -1).swapaxes(1, 2).reshape(raw.shape)
            np.testing.assert_array_equal(f.get_tensor(names.linear_weight_blocks(names.attn_proj(n, "k"))), rows)
    assert (out / "model.safetensors").stat().st_size <= 1.05 * gguf_path.stat().st_size + _down_extra(spec, "q4_0")


@pytest.mark.slow
def test_smollm2_q4_1_greedy_tokens_equal_across_backends(smollm2_q4_1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engines = {b: Engine.load(smollm2_q4_1, backend=b, **({"max_context": 128} if b == "torch" else {}))
                   for b in BACKENDS}
    tok = engines[BACKENDS[0]].tokenizer
    ids = np.asarray([tok("The capital of France is").input_ids], np.int64)
    th = np.zeros(engines[BACKENDS[0]].num_layers, np.float32)  # dense: the weights alone decide
    results = {b: _greedy(e.backend, ids, np.ones_like(ids), th, None)[0] for b, e in engines.items()}
    for b, tokens in results.items():
        np.testing.assert_array_equal(tokens, results[BACKENDS[0]], err_msg=b)
    assert "Paris" in tok.decode(results[BACKENDS[0]][0])
