"""bench/quality.py's config sets (what `--phases` runs): no model needed."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality  # noqa: E402


class FakeCalibration:
    num_layers = 3

    def thresholds_for(self, density, prompt_len=None):
        return [density / 10] * self.num_layers


def names(name):
    return [c["name"] for c in quality.config_set(FakeCalibration(), name)]


def test_static_sets_take_their_densities():
    assert names("static@0.5") == ["tda d=0.5", "tda clamp±0.05 d=0.5", "topk d=0.5"]
    six = quality.config_set(FakeCalibration(), "static@0.5/0.9")
    assert [c["requested_density"] for c in six] == [0.5] * 3 + [0.9] * 3
    assert six[3]["thresholds"] == [0.09] * 3 and six[4]["clamp"] == quality.CLAMP
    assert names("static") == names("static@0.5/0.9")


def test_pertoken_and_combos_split_gating():
    pertoken, combos = names("pertoken"), names("combos")
    assert pertoken and combos and not set(pertoken) & set(combos)
    assert pertoken + combos == names("gating")
    assert all(n.startswith(quality.COMBO_PREFIX) for n in combos)


def test_unknown_set_names_the_choices():
    with pytest.raises(SystemExit, match="unknown config set 'statik'.*pertoken"):
        quality.config_set(FakeCalibration(), "statik")
