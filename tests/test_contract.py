"""docs/ops.md is generated from the op contract and must not drift from it."""
from pathlib import Path

from tda_export.ops.contract import OPS, PLUGIN_FIELDS, render_markdown


def test_docs_ops_md_is_current():
    committed = (Path(__file__).parent.parent / "docs" / "ops.md").read_text()
    assert committed == render_markdown(), "regenerate: python -m tda_export.ops.contract > docs/ops.md"


def test_plugin_fields_are_the_attributes():
    for op in OPS:
        assert PLUGIN_FIELDS[op.name] == tuple(a.name for a in op.attributes)
        assert op.check_attrs({}) == {a.name: a.default for a in op.attributes}
