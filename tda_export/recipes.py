"""Per-model recipes (recipes/*.yaml): where the weights come from and TDA defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .ops.contract import DTYPES

SOURCE_KINDS = ("pip-gguf", "pip-gguf-chunks", "hf")
REQUIRED = ("name", "architecture", "activation", "dtype", "source")


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: str
    activation: str
    dtype: str  # the engine dtype: build's default --dtype and the dtype eval counts MLP bytes in
    source: dict
    description: str = ""
    density: float = 0.9
    calibration: dict = field(default_factory=dict)
    path: str = ""


def recipe_dir() -> Path:
    """recipes/ of a source checkout, else the copy installed as package data."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("tda_export.recipe_files")))


def _parse(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at top level")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    kind = data["source"].get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{path}: source.kind {kind!r} not in {list(SOURCE_KINDS)}")
    if data["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype {data['dtype']!r} not in {list(DTYPES)}")
    density = float(data.get("tda", {}).get("density", 0.9))
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{path}: tda.density {density} must be in (0, 1]")
    return Recipe(name=data["name"], architecture=data["architecture"], activation=data["activation"],
                  dtype=data["dtype"], source=data["source"], description=data.get("description", ""),
                  density=density, calibration=data.get("calibration", {}), path=str(path))


def engine_dtype(recipe: Recipe | None) -> str:
    """The dtype an engine is built in, and eval counts bytes in, unless --dtype says otherwise: the
    recipe's, else float32 (a model given as a directory or .gguf)."""
    return recipe.dtype if recipe is not None else "float32"


def list_recipes() -> dict[str, Recipe]:
    out = {}
    for path in sorted(recipe_dir().glob("*.yaml")):
        r = _parse(path)
        out[r.name] = r
    return out


def get_recipe(name: str) -> Recipe:
    recipes = list_recipes()
    if name not in recipes:
        raise KeyError(name)
    return recipes[name]
