"""The sphere methods on mini-Pearl, for three training seeds: item scores and task-vector angles.

    .venv/bin/python bench/seeds_sphere.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), merge the two
parents with each recipe of `RECIPES` (uniform SLERP at t = 0.5 for reference, and the
sphere methods of the chapter "SLERP for more than two models" with their defaults), score
every merge and the three models of mini-Pearl on every validation and test item, and
measure the cosine between the generalist's and the specialist's task vectors, tensor by
tensor. Writes ``pearl_edu/data/seeds/sphere.json``, which the chapter prints; it runs
seed 0 itself. A minute or two per seed on one core.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

import pearl_edu
from pearl_edu.core import sphere
from pearl_edu.teaching import evaluation, minipearl

NAME = "sphere"

# Each recipe names mini-Pearl's models by the words base, generalist and math, as the
# capstone's recipes do; `with_folders` replaces them by a seed's folders.
RECIPES: dict[str, dict] = {
    "slerp": {
        "merge_method": "slerp",
        "base_model": "generalist",
        "models": [{"model": "generalist"}, {"model": "math"}],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [
            {"model": "generalist", "parameters": {"weight": 0.5}},
            {"model": "math", "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [
            {"model": "generalist", "parameters": {"weight": 0.5}},
            {"model": "math", "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    },
    "karcher": {
        "merge_method": "karcher",
        "base_model": "base",
        "models": [{"model": "generalist"}, {"model": "math"}],
        "dtype": "bfloat16",
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": "generalist"}, {"model": "math"}],
        "dtype": "bfloat16",
    },
}


with_folders = evaluation.with_folders


def recipe_text(name: str, mini: minipearl.MiniPearl) -> str:
    """The YAML of recipe ``name`` with the words replaced by ``mini``'s folders."""
    return with_folders(RECIPES[name], mini)


CHANGE_LENGTHS: dict[str, dict[str, float]] = {}  # seed -> merge -> length, filled by make


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Merge every recipe for one seed's mini-Pearl into ``scratch``.

    Also notes each merge's `change_length` in ``CHANGE_LENGTHS``.
    """
    folders = {}
    for name in RECIPES:
        out = scratch / name
        pearl_edu.merge(pearl_edu.load_config(recipe_text(name, mini)), out, progress=False)
        folders[name] = out
    CHANGE_LENGTHS[str(mini.settings.seed)] = {
        name: change_length(mini, folder) for name, folder in folders.items()
    }
    return folders


def change_length(mini: minipearl.MiniPearl, merged: Path) -> float:
    r"""How far a merge moved from the base, over the whole model, as a multiple of how far
    the plain average of the two parents moved.

    $$ \lVert \theta - \theta_0 \rVert / \lVert \tfrac12(\theta_g + \theta_m) - \theta_0 \rVert $$
    """
    base, general, special = (
        minipearl.load_weights(getattr(mini, part)) for part in ("base", "generalist", "math")
    )
    weights = minipearl.load_weights(merged)
    moved = average = 0.0
    for tensor, b in base.items():
        b = b.double()
        moved += float((weights[tensor].double() - b).square().sum())
        mean = (general[tensor].double() + special[tensor].double()) / 2
        average += float((mean - b).square().sum())
    return math.sqrt(moved / average)


def exact_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two tensors in float64, with no threshold: the exact result to compare with."""
    a, b = a.double(), b.double()
    ua, ub = a.flatten() / a.norm(), b.flatten() / b.norm()
    omega = 2 * math.atan2(float((ua - ub).norm()), float((ua + ub).norm()))
    if omega == 0:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def slerp_errors(mini: minipearl.MiniPearl, t: float = 0.5) -> dict[str, float]:
    """The mean relative error, entry by entry, of ``slerp`` (`pearl_edu.slerp`) and of
    ``nuslerp`` with weights $(1 - t, t)$ and no base, both in bfloat16, against
    `exact_slerp` of the same bfloat16 parents, over every entry of mini-Pearl whose
    exact value is not zero."""
    general, special = (minipearl.load_weights(getattr(mini, p)) for p in ("generalist", "math"))
    total = {"slerp": 0.0, "nuslerp": 0.0}
    count = 0
    for tensor, g in general.items():
        s = special[tensor]
        exact = exact_slerp(g, s, t)
        ours = {"slerp": pearl_edu.slerp(g, s, t), "nuslerp": sphere.nuslerp([g, s], [1 - t, t])}
        nonzero = exact != 0
        for method, merged in ours.items():
            error = (merged.double() - exact).abs() / exact.abs()
            total[method] += float(error[nonzero].sum())
        count += int(nonzero.sum())
    return {method: value / count for method, value in total.items()}


def task_vector_cosines(mini: minipearl.MiniPearl) -> dict[str, float]:
    """Per tensor, the cosine between the generalist's and the specialist's task vectors.

    In float64 from the stored bfloat16 weights; ``"(all)"`` is the whole model's vectors.
    """
    base, general, special = (
        minipearl.load_weights(getattr(mini, part)) for part in ("base", "generalist", "math")
    )
    cosines, dots, norms = {}, 0.0, [0.0, 0.0]
    for tensor, weight in base.items():
        g = (general[tensor].double() - weight.double()).flatten()
        s = (special[tensor].double() - weight.double()).flatten()
        cosines[tensor] = float(g @ s / (g.norm() * s.norm()))
        dots += float(g @ s)
        norms[0] += float(g @ g)
        norms[1] += float(s @ s)
    cosines["(all)"] = dots / (norms[0] * norms[1]) ** 0.5
    return cosines


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    """The record: item scores of every model, and the cosines per seed in its meta."""
    cosines = {str(seed): task_vector_cosines(evaluation.mini_pearl(seed)) for seed in seeds}
    errors = {str(seed): slerp_errors(evaluation.mini_pearl(seed)) for seed in seeds}
    CHANGE_LENGTHS.clear()
    record = evaluation.record(
        make,
        seeds=seeds,
        meta={
            "recipes": {name: yaml.safe_dump(r, sort_keys=False) for name, r in RECIPES.items()},
            "task_vector_cosines": cosines,
            "slerp_errors": errors,
        },
    )
    return dataclasses.replace(record, meta={**record.meta, "change_lengths": dict(CHANGE_LENGTHS)})


def summary(record: evaluation.Record) -> str:
    """Every method against SLERP, both skills, per seed and over seeds."""
    lines = []
    for name in RECIPES:
        if name == "slerp":
            continue
        for skill in evaluation.SKILLS:
            lines.append(str(record.compare(name, "slerp", skill)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Mapping:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv).meta


if __name__ == "__main__":
    main()
