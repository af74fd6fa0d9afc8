"""7B-scale loading: checkpoint tensors read one at a time, fingerprints, --device/--compute-dtype."""
import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from tda_export import arch
from tda_export.export import names
from tda_export.export.build import build
from tda_export.models import load, load_structure, resolve
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

SMOLLM2_FINGERPRINT = "4a6f1a5703c54359"  # what every SmolLM2 calibration file made before 2026-12-01 carries


def float32_fingerprint(lm) -> str:
    """The fingerprint as computed when models were always loaded in float32 (before streaming)."""
    c = lm.config
    shape = (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)
    h = hashlib.sha256(repr(shape).encode())
    for mlp in arch.mlp_modules(lm.model)[:2]:
        h.update(mlp.down_proj.weight.detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny llama checkpoint stored in bfloat16 (as 7B checkpoints are)."""
    d = tmp_path_factory.mktemp("bf16") / "llama"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return save_tiny("gemma3_text", tmp_path_factory.mktemp("g3") / "gemma3")


@pytest.mark.parametrize("which", ["bf16", "gemma3"])
def test_fingerprint_is_the_float32_one_in_every_load(which, bf16_dir, gemma3_dir):
    """Old calibration files stay valid: the same value, whatever dtype the model runs in."""
    source = resolve(str(bf16_dir if which == "bf16" else gemma3_dir))
    expected = float32_fingerprint(load(source, "float32"))
    assert load_structure(source).fingerprint() == expected
    assert load(source, "bfloat16").fingerprint() == expected


def test_smollm2_fingerprint_unchanged():
    """GGUF tensors dequantised one at a time give the fingerprint of the float32 full load."""
    lm = load_structure(resolve("smollm2-135m"))
    assert lm.fingerprint() == SMOLLM2_FINGERPRINT


def test_structure_holds_no_weights(bf16_dir):
    lm = load_structure(resolve(str(bf16_dir)))
    assert {p.device.type for p in lm.model.parameters()} == {"meta"}
    assert lm.tensor(lm.model.model.embed_tokens).dtype == torch.bfloat16  # read as stored


def test_bf16_export_writes_the_stored_tensors(tmp_path, bf16_dir):
    """Each initializer is the checkpoint's tensor, laid out for the graph, never rounded through fp16."""
    out = build(str(bf16_dir), tmp_path / "e", "bfloat16", progress=False)
    init = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    stored = load_file(bf16_dir / "model.safetensors")

    def as_bf16(name):
        t = init[name]
        bits = np.frombuffer(t.raw_data, np.int16).reshape(list(t.dims))
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)

    for n in range(2):
        p = f"model.layers.{n}.mlp."
        gate_up = torch.stack([stored[p + "gate_proj.weight"], stored[p + "up_proj.weight"]], 1)
        assert torch.equal(as_bf16(names.gate_up(n)), gate_up)
        assert torch.equal(as_bf16(names.down_t(n)), stored[p + "down_proj.weight"].T)
    assert torch.equal(as_bf16(names.EMBED), stored["model.embed_tokens.weight"])


def _cli(*args):
    cmd = [sys.executable, "-c", "from tda_export.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("command", ["calibrate", "eval", "build"])
def test_device_cuda_without_gpu_is_a_clear_error(tmp_path, bf16_dir, command):
    extra = {"calibrate": ["-o", tmp_path / "c.json"], "eval": ["--density", "0.5"],
             "build": ["-o", tmp_path / "e"]}[command]
    r = _cli(command, "-m", bf16_dir, "--device", "cuda", *extra)
    assert r.returncode == 2 and "--device cuda: torch sees no CUDA GPU" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "e").exists() and not (tmp_path / "c.json").exists()


def test_fp16_compute_on_cpu_is_refused(tmp_path, bf16_dir):
    r = _cli("calibrate", "-m", bf16_dir, "--device", "cpu", "--compute-dtype", "fp16", "-o", tmp_path / "c.json")
    assert r.returncode == 2 and "--compute-dtype float16: not supported on cpu" in r.stderr, r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_on_cuda_matches_cpu(gemma3_dir):
    """The device path end to end: thresholds from a GPU bf16 calibration are those of the CPU one."""
    from tda_export.quality import build_calibration

    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 400)
    tables = []
    for device in ("cpu", "cuda"):
        lm = load(resolve(str(gemma3_dir)), "bfloat16", device)
        assert lm.device.type == device
        cal = build_calibration(lm, text, "test", [0.5], 8, 16, "token_l2", None, 0.5, quiet=True)
        tables.append(np.array(cal.thresholds["0.50"]))
    assert np.abs(tables[0] - tables[1]).max() < 0.05


# ---- memory: the per-layer cost of an export (bench/build_scale.py measures it at 7B width) -------------------

WIDE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256)


def _wide_checkpoint(path, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **WIDE)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _peak_rss_of(code: str) -> int:
    """Peak RSS in bytes of a fresh interpreter running `code`: its own VmHWM, read as it exits (wait4's
    ru_maxrss would also count this pytest process's RSS at fork, which Linux carries across exec)."""
    r = subprocess.run([sys.executable, "-c", code + "\nprint(open('/proc/self/status').read()"
                        ".split('VmHWM:')[1].split()[0])"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) * 1024


def test_export_memory_does_not_grow_with_layers(tmp_path):
    """Streaming export: two more layers (2 x 60 MB of float32 weights) must add well under their size to the
    peak RSS. A float32 load of the whole model (the old build) adds at least the weights' bytes."""
    layer_bytes = 4 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 4096)
    peaks = {}
    for layers in (2, 4):
        ckpt = _wide_checkpoint(tmp_path / f"L{layers}", layers)
        peaks[layers] = _peak_rss_of(
            "import warnings; warnings.simplefilter('ignore');"
            "from tda_export.export.build import build;"
            f"build({str(ckpt)!r}, {str(tmp_path / f'e{layers}')!r}, 'float32', progress=False)")
    per_layer = (peaks[4] - peaks[2]) / 2
    assert per_layer < 0.5 * layer_bytes, (f"peak RSS grew {per_layer / 2**20:.0f} MiB per layer of "
                                           f"{layer_bytes / 2**20:.0f} MiB; peaks {peaks}")


def test_calibration_scores_do_not_pin_the_activations(gemma3_dir):
    """Scores kept per batch must own their storage: a view of the [B, S, I] cumsum would keep 117 MB per layer
    and batch alive at 7B width (30 GB over a 64-prompt calibration)."""
    from tda_export.models import forward
    from tda_export.tda import TDAHooks

    lm = load(resolve(str(gemma3_dir)), "float32")
    ids = torch.randint(0, lm.config.vocab_size, (2, 32))
    with TDAHooks(lm.model) as hooks:
        hooks.prefix_lengths = (4, 16)
        with hooks.phase_("score"):
            forward(lm.model, ids)
    kept = list(hooks.scores) + [t for d in hooks.prefix_scores for t in d.values()]
    assert kept and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in kept)
