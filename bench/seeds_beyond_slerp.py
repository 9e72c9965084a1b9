"""Chapter 10's merges for several training seeds: every held-out item's score, recorded.

    .venv/bin/python bench/seeds_beyond_slerp.py [--seeds 0 1 2] [--regimes siblings far]

For each training seed, `evaluation.record` takes that seed's mini-Pearl (trained once, then
read from the cache), merges its parents with every method and setting chapter 10 compares
(SLERP and linear at t = 0.5, task arithmetic over lambda, TIES and DARE over density, task
negation), all through `pearl_edu.merge`, and scores each model on every validation and
test item. For the far regime, the three merges of the chapter's exercise. Writes
``pearl_edu/data/seeds/beyond_slerp.json`` and ``beyond_slerp_far.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
TIES_DENSITIES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
DARE_DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05)
NEGATIONS = {"minus half the math step": {"math": -0.5}, "minus the math step": {"math": -1.0}}
NEGATIONS["minus the generalist step"] = {"generalist": -1.0}
REGIMES = {
    "siblings": ("beyond_slerp", minipearl.SIBLING_SETTINGS),
    "far": ("beyond_slerp_far", minipearl.FAR_SETTINGS),
}


def recipe(
    mini: minipearl.MiniPearl,
    method: str,
    weights: dict[str, float] | None = None,
    density: float | None = None,
    **shared,
) -> str:
    """A mergekit recipe (`models:` form) adding the parents of ``mini`` to its base.

    The same recipe as chapter 10's `recipe`.
    """
    folders = {"generalist": mini.generalist, "math": mini.math}
    entries = []
    for parent, weight in (weights or {"generalist": 1.0, "math": 1.0}).items():
        parameters = {"weight": weight}
        if density is not None:
            parameters["density"] = density
        entries.append({"model": str(folders[parent]), "parameters": parameters})
    config = {"models": entries, "merge_method": method, "dtype": "bfloat16"}
    if method != "linear":
        config["base_model"] = str(mini.base)
    if shared:
        config["parameters"] = shared
    return yaml.safe_dump(config, sort_keys=False)


def recipes(mini: minipearl.MiniPearl) -> dict[str, str]:
    """Every recipe chapter 10 compares on the siblings, by the name the record keeps."""
    layers = mini.settings.shape.num_layers
    named = {
        "slerp t=0.5": minipearl.uniform_recipe(mini.generalist, mini.math, layers, 0.5),
        "linear": recipe(mini, "linear", {"generalist": 0.5, "math": 0.5}),
    }
    for lam in LAMBDAS:
        named[f"task arithmetic {lam}"] = recipe(mini, "task_arithmetic", **{"lambda": lam})
    for d in TIES_DENSITIES:
        named[f"ties {d}"] = recipe(mini, "ties", density=d)
    for d in DARE_DENSITIES:
        named[f"dare_linear {d}"] = recipe(mini, "dare_linear", density=d)
        named[f"dare_ties {d}"] = recipe(mini, "dare_ties", density=d)
    for label, weights in NEGATIONS.items():
        named[label] = recipe(mini, "task_arithmetic", weights)
    return named


def far_recipes(mini: minipearl.MiniPearl) -> dict[str, str]:
    """The three merges of the chapter's exercise on the far regime."""
    layers = mini.settings.shape.num_layers
    return {
        "slerp t=0.5": minipearl.uniform_recipe(mini.generalist, mini.math, layers, 0.5),
        "task arithmetic 1.0": recipe(mini, "task_arithmetic"),
        "ties 0.5": recipe(mini, "ties", density=0.5),
    }


def merge_all(named: dict[str, str], scratch: Path) -> dict[str, Path]:
    return {
        name: pearl_edu.merge(
            pearl_edu.load_config(text), scratch / f"merge-{i}", progress=False
        ).output_dir
        for i, (name, text) in enumerate(named.items())
    }


MAKERS = {
    "siblings": lambda mini, scratch: merge_all(recipes(mini), scratch),
    "far": lambda mini, scratch: merge_all(far_recipes(mini), scratch),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    args = parser.parse_args()
    for regime in args.regimes:
        name, settings = REGIMES[regime]
        meta = {
            "what": f"chapter 10's merges, {regime} regime",
            "pearl_edu": pearl_edu.__version__,
            "torch": torch.__version__,
        }
        record = evaluation.record(
            MAKERS[regime], seeds=tuple(args.seeds), settings=settings, meta=meta
        )
        path = record.save(evaluation.DATA_DIR / f"{name}.json")
        print(f"{regime}: {len(record.names)} models, seeds {record.seeds}, written to {path}")
        for model in record.names:
            skills = [record.get(s, model).skills() for s in record.seeds]
            cells = "  ".join(f"{s.text:6.1%} {s.addition:6.1%}" for s in skills)
            print(f"  {model:28s} {cells}")


if __name__ == "__main__":
    main()
