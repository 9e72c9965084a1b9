"""Merge recipes shipped with the package, starting with Pearl-7B-slerp's own."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

PEARL_7B_SLERP = "pearl-7b-slerp"


def recipe_path(name: str = PEARL_7B_SLERP) -> Path:
    """Path of a shipped recipe, e.g. ``recipe_path("pearl-7b-slerp")``."""
    path = Path(str(resources.files(__name__).joinpath(f"{name}.yml")))
    if not path.is_file():
        known = sorted(p.name[:-4] for p in path.parent.glob("*.yml"))
        raise FileNotFoundError(f"no shipped recipe named {name!r}; known: {', '.join(known)}")
    return path


def recipe_text(name: str = PEARL_7B_SLERP) -> str:
    """The YAML text of a shipped recipe."""
    return recipe_path(name).read_text(encoding="utf-8")


def pearl_recipe(base: str | Path, other: str | Path, *, num_layers: int | None = None) -> str:
    """Pearl-7B-slerp's recipe with its two models replaced, as YAML text.

    ``base`` takes the place of Pearl's base model, OmniBeagle-7B (``t = 0``), and
    ``other`` that of WizardMath-7B-V1.1 (``t = 1``); ``num_layers``, when given, replaces
    the 32 layers of both layer ranges, for stand-ins with fewer layers. The filters, the
    ``t`` value lists and the dtype stay Pearl's own, read from the shipped recipe.
    """
    recipe = yaml.safe_load(recipe_text(PEARL_7B_SLERP))
    real_base = recipe["base_model"]
    for source in recipe["slices"][0]["sources"]:
        source["model"] = str(base) if source["model"] == real_base else str(other)
        if num_layers is not None:
            source["layer_range"] = [0, num_layers]
    recipe["base_model"] = str(base)
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
