"""Aligning strangers on mini-Pearl, for three training seeds: barriers and item scores.

    .venv/bin/python bench/seeds_alignment.py [--seeds 0 1 2] [--out FILE]

For each seed, the base of that seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`)
and a *stranger*: a base pre-trained on the very same data in the very same order from
other random initial weights (``init_seed = seed + 1``). Weight matching
(`pearl_edu.teaching.alignment.weight_matching`) reorders the stranger's units to line them
up with the base's, and writes the aligned stranger as a model folder. Then both pairs, the
stranger as trained and as aligned, are merged with the engine at ``t = 0.5`` (SLERP and
linear recipes), and the straight path of each pair is measured at `TS` with its barrier
(`pearl_edu.teaching.connectivity`). Every model is scored on every validation and test
item. Writes ``pearl_edu/data/seeds/alignment.json``, which the chapter "Aligning
strangers" prints; it runs seed 0 itself. Each stranger is pre-trained once (two to four
minutes on one core) and cached; then about two minutes per seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml

import pearl_edu
from pearl_edu.teaching import alignment, connectivity, evaluation, minipearl

NAME = "alignment"
TS = tuple(float(t) for t in np.linspace(0, 1, 9))
PAIRS = {"": "stranger", " aligned": "stranger aligned"}  # merge-name suffix: second model


def stranger_settings(seed: int) -> minipearl.MiniPearlSettings:
    """The stranger of one seed: the sibling settings, other initial weights."""
    return dataclasses.replace(minipearl.SIBLING_SETTINGS, seed=seed, init_seed=seed + 1)


def stranger(seed: int) -> Path:
    """The folder of one seed's stranger, pre-trained once and then read from the cache."""
    return minipearl.load_or_pretrain_base(settings=stranger_settings(seed))


def recipe(method: str, first: str | Path, second: str | Path) -> str:
    """The engine's recipe for the midpoint of two models: SLERP at ``t = 0.5`` or the mean."""
    if method == "SLERP":
        return minipearl.uniform_recipe(first, second, minipearl.ModelShape().num_layers, 0.5)
    config = {
        "models": [
            {"model": str(first), "parameters": {"weight": 0.5}},
            {"model": str(second), "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "bfloat16",
    }
    return yaml.safe_dump(config, sort_keys=False)


def align(base: Path, other: Path, scratch: Path) -> tuple[alignment.Matching, Path]:
    """Weight-match ``other`` to ``base``; the matching and the aligned model's folder."""
    first, second = minipearl.load_weights(base), minipearl.load_weights(other)
    shape = alignment.Shape.of(minipearl.load_model(base).config)
    found = alignment.weight_matching(first, second, shape)
    return found, alignment.write_permuted(other, found.permutations, scratch / "aligned")


def path_summary(points: list[connectivity.PathPoint]) -> dict:
    """A path's barrier with its interval, and its losses and skills at each point."""
    found = connectivity.path_barrier(points)
    return {
        "barrier": found.height,
        "low": found.low,
        "high": found.high,
        "at_t": found.at_t,
        "loss": [p.loss for p in points],
        "text": [p.skills.text for p in points],
        "addition": [p.skills.addition for p in points],
    }


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    paths: dict[str, dict] = {}
    matchings: dict[str, dict] = {}

    def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
        seed = mini.settings.seed
        other = stranger(seed)
        found, aligned = align(mini.base, other, scratch)
        matchings[str(seed)] = {
            "objectives": list(found.objectives),
            "sweeps": found.sweeps,
            "permutations": {k: v.tolist() for k, v in found.permutations.items()},
        }
        folders: dict[str, Path] = {"stranger": other, "stranger aligned": aligned}
        tokenizer = minipearl.load_tokenizer(mini.base)
        corpus = mini.settings.corpus()
        base_weights = minipearl.load_weights(mini.base)
        paths[str(seed)] = {}
        for suffix, second in PAIRS.items():
            for method in ("SLERP", "linear"):
                out = scratch / f"{method}{suffix.replace(' ', '-')}"
                text = recipe(method, mini.base, folders[second])
                pearl_edu.merge(pearl_edu.load_config(text), out, progress=False)
                folders[method + suffix] = out
            points = connectivity.measure_path(
                mini.base,
                base_weights,
                minipearl.load_weights(folders[second]),
                TS,
                tokenizer,
                corpus,
            )
            paths[str(seed)][second] = path_summary(points)
        return folders

    return evaluation.record(
        make,
        seeds=seeds,
        meta={
            "ts": list(TS),
            "strangers": {str(s): repr(stranger_settings(s)) for s in seeds},
            "paths": paths,
            "matchings": matchings,
        },
    )


def summary(record: evaluation.Record) -> str:
    """The barriers before and after alignment, and the midpoints' skills."""
    lines = []
    for seed in record.seeds:
        found = record.meta["paths"][str(seed)]
        lines.append(
            f"seed {seed}: barrier {found['stranger']['barrier']:.2f} nats as trained, "
            f"{found['stranger aligned']['barrier']:.2f} aligned"
        )
    for skill in evaluation.SKILLS:
        lines.append(str(record.compare("SLERP aligned", "SLERP", skill)))
        lines.append(str(record.compare("SLERP aligned", "base", skill)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and the machine is shared
    main()
