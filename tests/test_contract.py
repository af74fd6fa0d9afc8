"""docs/ops.md is generated from the op contract and must not drift from it."""
from pathlib import Path

import pytest

from tda_export.ops.contract import OPS, PLAN_FIELDS, PLUGIN_FIELDS, render_markdown


def test_docs_ops_md_is_current():
    committed = (Path(__file__).parent.parent / "docs" / "ops.md").read_text()
    assert committed == render_markdown(), "regenerate: python -m tda_export.ops.contract > docs/ops.md"


def test_plugin_fields_are_the_attributes_then_the_plan_fields():
    for op in OPS:
        plan = tuple(a.name for a in PLAN_FIELDS[op.name])
        assert PLUGIN_FIELDS[op.name] == tuple(a.name for a in op.attributes) + plan
        assert not set(plan) & {a.name for a in op.attributes}  # a plan field is never an ONNX attribute
        assert op.check_attrs({}) == {a.name: a.default for a in op.attributes}


def test_reference_clamp_by_hand():
    """The contract's clamp, on cases worked out by hand (not by another implementation)."""
    import numpy as np

    from tda_export.ops import reference

    s = np.array([[3.0, 1.0, 2.0, 2.0, 0.5]], np.float32)
    idx, cnt = reference.select_active(s, 0.9)                       # only 3.0 passes sqrt(s/3) >= 0.9
    assert cnt.tolist() == [1] and idx.tolist() == [[0, 0, 0, 0, 0]]
    idx, cnt = reference.select_active(s, 0.9, (0.6, 1.0))           # ceil(0.6*5) = 3 from below; tie 2,3
    assert cnt.tolist() == [3] and idx.tolist() == [[0, 2, 3, 0, 0]]
    idx, cnt = reference.select_active(s, 0.9, (0.5, 1.0))           # ceil(2.5) = 3: the tie goes to index 2
    assert cnt.tolist() == [3] and idx[0, :3].tolist() == [0, 2, 3]
    idx, cnt = reference.select_active(s, 0.9, (0.4, 1.0))           # 2: the lower index of the tie
    assert idx[0, :2].tolist() == [0, 2]
    idx, cnt = reference.select_active(s, 0.0, (0.0, 0.5))           # all pass; floor(2.5) = 2 from above
    assert cnt.tolist() == [2] and idx[0, :2].tolist() == [0, 2]
    idx, cnt = reference.select_active(s, 0.0, (0.5, 0.5))           # crossed (3 > 2): the lower bound wins
    assert cnt.tolist() == [3]
    idx, cnt = reference.select_active(np.zeros((1, 5), np.float32), 0.9, (0.0, 0.2))  # no evidence: dense
    assert cnt.tolist() == [5]
    idx, cnt = reference.select_active(np.ones((1, 4), np.float32), 0.5, (0.0, 0.5))  # all tied: lowest indices
    assert idx[0, :2].tolist() == [0, 1] and cnt.tolist() == [2]


def test_bound_cases_bind_from_both_sides():
    """The shared clamp cases (tests/op_cases.py) exercise both bounds and ties, so realizations tested on them
    are tested on the clamp."""
    import numpy as np

    from op_cases import bound_cases
    from tda_export.ops import reference

    below = above = 0
    for scores, tau, bounds in bound_cases(np.random.default_rng(5)):
        _, plain = reference.select_active(scores, tau)
        _, clamped = reference.select_active(scores, tau, bounds)
        below += int((clamped > plain).sum())
        above += int((clamped < plain).sum())
    assert below >= 5 and above >= 5


def test_weight_format_is_an_attribute_of_the_contracts_formats():
    """The format reaches every realization as SparseGatedMLP's weight_format attribute: the contract's
    WEIGHT_FORMATS, default the float weights; the block layouts name the op's weight inputs."""
    from tda_export.ops.contract import (BLOCK_FORMATS, QUANTIZED_WEIGHTS, SPARSE_GATED_MLP, WEIGHT_FORMATS)

    attr = SPARSE_GATED_MLP.attr("weight_format")
    assert attr.choices == WEIGHT_FORMATS and attr.default == "dtype" == WEIGHT_FORMATS[0]
    assert set(WEIGHT_FORMATS[1:]) == set(BLOCK_FORMATS)
    weights = {t.name: t for t in SPARSE_GATED_MLP.inputs}
    for t in QUANTIZED_WEIGHTS:
        assert t.dtype == "uint8" and t.shape[:-1] == weights[t.name].shape[:-1] and weights[t.name].dtype == "T"
    assert "weight_format" in PLUGIN_FIELDS[SPARSE_GATED_MLP.name]


def test_down_weight_format_pairs():
    """down_weight_format: "same", or a block format of its own under a block weight_format; its index is the
    ABI's down_weight_format code (0 = same)."""
    from tda_export.ops.contract import DOWN_WEIGHT_FORMATS, SPARSE_GATED_MLP, WEIGHT_FORMATS, down_format

    attr = SPARSE_GATED_MLP.attr("down_weight_format")
    assert attr.choices == DOWN_WEIGHT_FORMATS and attr.default == "same" == DOWN_WEIGHT_FORMATS[0]
    assert DOWN_WEIGHT_FORMATS[1:] == WEIGHT_FORMATS[1:]  # code i > 0 is the tda_weight_format_t i
    assert "down_weight_format" in PLUGIN_FIELDS[SPARSE_GATED_MLP.name]
    assert down_format("q4_1") == "q4_1" and down_format("q4_1", "q8_0") == "q8_0"
    assert down_format("dtype") == "dtype"
    with pytest.raises(ValueError, match="down_weight_format='q8_0' needs a block weight_format"):
        down_format("dtype", "q8_0")
    with pytest.raises(ValueError, match="down_weight_format='q5_0'"):
        down_format("q4_0", "q5_0")
