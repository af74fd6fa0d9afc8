"""TDA on real pretrained models shipped in PyPI wheels (GGUF loading, end-to-end eval)."""
import json

import pytest
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.models import resolve

pytestmark = pytest.mark.slow


def test_smollm2_gguf_loads_from_wheel(smollm2):
    src = resolve("smollm2-135m")
    assert src.gguf_file.endswith(".gguf") and src.recipe.name == "smollm2-135m"
    assert smollm2.family == "llama" and smollm2.activation == "silu"
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.intermediate_size == 1536
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_eval_smollm2_density_half_json():
    """The issue's acceptance command: realised density within +-0.03 of the request."""
    r = CliRunner().invoke(main, ["eval", "--model", "smollm2-135m", "--density", "0.5", "--json", "-q",
                                  "--sequences", "8", "--generate-prompts", "4", "--generate-tokens", "16",
                                  "--calibration-sequences", "24"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert abs(report["realised_density"]["mean"] - 0.5) <= 0.03
    assert 5 < report["dense"]["perplexity"] < report["tda"]["perplexity"]


def test_gemma3_gguf_assembled_from_chunks():
    from tda_export.models import load

    lm = load(resolve("gemma3-270m"))
    assert lm.family == "gemma3_text" and lm.activation == "gelu_tanh"
    assert lm.config.num_hidden_layers == 18
