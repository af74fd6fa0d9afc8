"""Exported graphs: ONNX checker, ORT parity with the HF model under the same TDA masks, CLI behaviour."""
import json
import shutil
import subprocess
import sys

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
    ref = parity.reference_run(loaded.model, loaded.activation, taus, ids, mask, pos, STEPS)
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
