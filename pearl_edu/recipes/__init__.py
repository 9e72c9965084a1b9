"""Merge recipes shipped with the package, starting with Pearl-7B-slerp's own."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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
