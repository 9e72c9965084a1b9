"""A searched SLERP schedule for mini-Pearl, for three training seeds: item scores of every trial.

    .venv/bin/python bench/seeds_search.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), CMA-ES (the ``cma``
package) searches SLERP's ``t`` for the attention and the MLP of each layer and one ``t``
for every other tensor, nine numbers in [0, 1], to raise the mean share of the two
parents' gains that the merge keeps on the **validation** split: `GENERATIONS` rounds of
the library's default population (10), from ``t = 0.5`` everywhere with step size
`SIGMA`, the library's random numbers seeded with `SEARCH_SEED`. Every trial, Pearl's own
schedule (scaled to mini-Pearl's layers) and one ``t = 0.5`` for every tensor are then
scored on every validation and test item. Writes ``pearl_edu/data/seeds/search.json``,
which the chapter "Searching for a recipe" reads; it runs seed 0's search itself. A few
minutes per seed on one core.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import cma
import torch
import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

NAME = "search"
LAYERS = 4  # mini-Pearl's layers (minipearl.ModelShape)
GENERATIONS = 5
SIGMA = 0.2
SEARCH_SEED = 1
DIMENSIONS = 2 * LAYERS + 1


def schedule_recipe(t: list[float]) -> str:
    """A SLERP recipe of the generalist (``t = 0``) and the specialist (``t = 1``).

    ``t`` holds the attention's ``t`` of each layer, then the MLP's, then one ``t`` for every
    other tensor (embeddings, norms, output head), each rounded to three decimals. The
    models are named by the words generalist and math (`evaluation.with_folders`).
    """
    t = [round(float(v), 3) for v in t]
    recipe = {
        "slices": [
            {
                "sources": [
                    {"model": "generalist", "layer_range": [0, LAYERS]},
                    {"model": "math", "layer_range": [0, LAYERS]},
                ]
            }
        ],
        "merge_method": "slerp",
        "base_model": "generalist",
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": t[:LAYERS]},
                {"filter": "mlp", "value": t[LAYERS : 2 * LAYERS]},
                {"value": t[2 * LAYERS]},
            ]
        },
        "dtype": "bfloat16",
    }
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def pearl_schedule_recipe() -> str:
    """Pearl-7B-slerp's own recipe, its five-point schedules spread over mini-Pearl's layers."""
    return minipearl.scaled_pearl_recipe("generalist", "math", LAYERS)


def uniform_recipe(t: float = 0.5) -> str:
    """One ``t`` for every tensor."""
    return schedule_recipe([t] * DIMENSIONS)


def shares(scores: evaluation.ItemScores, parents: dict[str, evaluation.ItemScores]) -> list[float]:
    """The share of the generalist's text gain and of the specialist's addition gain kept."""
    base = parents["base"]
    return [
        (scores.text - base.text) / (parents["generalist"].text - base.text),
        (scores.addition - base.addition) / (parents["math"].addition - base.addition),
    ]


def objective(scores: evaluation.ItemScores, parents: dict[str, evaluation.ItemScores]) -> float:
    """What the search raises: the mean of the two shares of gain."""
    return statistics.fmean(shares(scores, parents))


def search(mini: minipearl.MiniPearl, scratch: Path) -> tuple[list[str], list[Path]]:
    """Run CMA-ES on the validation split; every trial's recipe and merged folder, in order."""
    corpus = mini.settings.corpus()
    parents = {
        p: evaluation.score_folder(getattr(mini, p), corpus, "validation")
        for p in ("base", "generalist", "math")
    }
    options = {"bounds": [0, 1], "seed": SEARCH_SEED, "verbose": -9, "verb_log": 0}
    strategy = cma.CMAEvolutionStrategy([0.5] * DIMENSIONS, SIGMA, options)
    recipes, folders = [], []
    for _ in range(GENERATIONS):
        candidates = strategy.ask()
        losses = []
        for t in candidates:
            recipes.append(schedule_recipe(t))
            folders.append(scratch / f"trial-{len(folders)}")
            config = pearl_edu.load_config(evaluation.with_folders(recipes[-1], mini))
            pearl_edu.merge(config, folders[-1], progress=False)
            scores = evaluation.score_folder(folders[-1], corpus, "validation")
            losses.append(-objective(scores, parents))  # cma minimises
        strategy.tell(candidates, losses)
    return recipes, folders


RECIPES: dict[int, dict[str, str]] = {}


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Search for one seed's mini-Pearl in ``scratch``; also merge the two fixed schedules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma's notes on its own numerics
        recipes, folders = search(mini, scratch)
    named = {f"trial {i}": text for i, text in enumerate(recipes)}
    out = dict(zip(named, folders, strict=True))
    for name, text in (("Pearl schedule", pearl_schedule_recipe()), ("t 0.5", uniform_recipe())):
        named[name] = text
        out[name] = scratch / name.replace(" ", "-")
        config = pearl_edu.load_config(evaluation.with_folders(text, mini))
        pearl_edu.merge(config, out[name], progress=False)
    RECIPES[mini.settings.seed] = named
    return out


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "pearl_edu": pearl_edu.__version__,
        "torch": torch.__version__,
        "cma": cma.__version__,
        "generations": GENERATIONS,
        "sigma": SIGMA,
        "search_seed": SEARCH_SEED,
        "recipes": RECIPES,  # filled by make, seed by seed: {seed: {name: recipe}}
    }
    record = evaluation.record(make, seeds=seeds, meta=meta)
    record.meta["recipes"] = {str(s): r for s, r in RECIPES.items()}
    return record


def trials(record: evaluation.Record) -> list[str]:
    return [n for n in record.names if n.startswith("trial ")]


def winner(record: evaluation.Record, seed: int) -> str:
    """The trial with the highest validation objective (the first of equals)."""
    parents = {p: record.get(seed, p, "validation") for p in ("base", "generalist", "math")}
    return max(trials(record), key=lambda n: objective(record.get(seed, n, "validation"), parents))


def summary(record: evaluation.Record) -> str:
    """Each seed's winner, its validation and test objective, and its comparisons."""
    lines = []
    for seed in record.seeds:
        best = winner(record, seed)
        on = {
            split: objective(
                record.get(seed, best, split),
                {p: record.get(seed, p, split) for p in ("base", "generalist", "math")},
            )
            for split in ("validation", "test")
        }
        lines.append(
            f"seed {seed}: {best}, objective {on['validation']:.3f} on validation, "
            f"{on['test']:.3f} on test"
        )
        for other in ("Pearl schedule", "t 0.5"):
            for skill in evaluation.SKILLS:
                difference = evaluation.paired(
                    record.get(seed, best), record.get(seed, other), skill
                )
                lines.append(f"  - {other}: {difference}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    main()
