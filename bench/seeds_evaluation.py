"""The merges of chapter 'Is this merge better?' for several training seeds, item by item.

    .venv/bin/python bench/seeds_evaluation.py [--seeds 0 1 2]

For each training seed, `evaluation.record` takes that seed's mini-Pearl (the sibling
regime, trained once, then read from the cache), merges its two parents with SLERP at nine
uniform values of t, with Pearl's schedule, and with a grid of 25 recipes that give the
attention blocks one t and the MLP blocks another, all through `pearl_edu.merge`, and scores
every model on every validation and test item. The chapter reads the comparisons, their
spread over seeds and the many-recipes sweep from the record it writes,
``pearl_edu/data/seeds/evaluation.json``.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

UNIFORM_T = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GRID_T = (0.0, 0.25, 0.5, 0.75, 1.0)


def uniform_name(t: float) -> str:
    return f"slerp t={t:g}"


def grid_name(attention: float, mlp: float) -> str:
    return f"attention {attention:g} / mlp {mlp:g}"


def block_recipe(mini: minipearl.MiniPearl, attention: float, mlp: float) -> str:
    """Pearl's recipe with one t for every attention block and another for every MLP block
    (the norms, embeddings and output head keep the catch-all t = 0.5)."""
    layers = mini.settings.shape.num_layers
    recipe = yaml.safe_load(minipearl.scaled_pearl_recipe(mini.generalist, mini.math, layers))
    recipe["parameters"] = {
        "t": [
            {"filter": "self_attn", "value": float(attention)},
            {"filter": "mlp", "value": float(mlp)},
            {"value": 0.5},
        ]
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def recipes(mini: minipearl.MiniPearl) -> dict[str, str]:
    """Every recipe the chapter compares, by the name the record keeps."""
    layers = mini.settings.shape.num_layers
    named = {
        uniform_name(t): minipearl.uniform_recipe(mini.generalist, mini.math, layers, t)
        for t in UNIFORM_T
    }
    named["pearl schedule"] = minipearl.scaled_pearl_recipe(mini.generalist, mini.math, layers)
    for attention in GRID_T:
        for mlp in GRID_T:
            named[grid_name(attention, mlp)] = block_recipe(mini, attention, mlp)
    return named


def merge_all(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    return {
        name: pearl_edu.merge(
            pearl_edu.load_config(text), scratch / f"merge-{i}", progress=False
        ).output_dir
        for i, (name, text) in enumerate(recipes(mini).items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    meta = {
        "what": "uniform SLERP, Pearl's schedule and an attention/MLP grid, sibling regime",
        "date": datetime.date.today().isoformat(),
        "pearl_edu": pearl_edu.__version__,
        "torch": torch.__version__,
    }
    record = evaluation.record(merge_all, seeds=tuple(args.seeds), meta=meta)
    path = record.save(evaluation.DATA_DIR / "evaluation.json")
    print(f"{len(record.names)} models, seeds {record.seeds}, written to {path}")
    for model in record.names:
        skills = [record.get(s, model).skills() for s in record.seeds]
        cells = "  ".join(f"{s.text:6.1%} {s.addition:6.1%}" for s in skills)
        print(f"  {model:28s} {cells}")


if __name__ == "__main__":
    main()
