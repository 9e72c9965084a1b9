"""Stacking mini-Pearl's layers, over training seeds: every model chapter 12 compares, scored.

    .venv/bin/python bench/seeds_stacking.py [--seeds 0 1 2] [--out FILE]

For each seed's sibling mini-Pearl (`evaluation.mini_pearl`, trained once and cached), builds
what the chapter builds for seed 0 and records each model's result on every held-out item of
both splits (`evaluation.record`), into ``pearl_edu/data/seeds/stacking.json``:

- the five stacks (`STACKS`) and the reversed frankenmerge of the chapter's exercise;
- the depth up-scaled generalist with its repeated layers' output projections scaled by
  ``s`` (`SCALES`; ``s = 0`` is the generalist, ``s = 1`` the depth up-scaled model);
- the repair: `REPAIR_STEPS` steps on the pre-training mix, of both parents and of two stacks;
- SLERP of the two parents at ``t = 0.5``;
- the generalist's lower two layers under the upper two of the sibling base, or of a
  stranger: a base pre-trained on the same data from other initial weights
  (``init_seed = seed + 1``; for seed 0 the stranger of chapters 08 and 12).

A stack is written as (model, first layer, end) triples whose model is a role (`ROLES`),
so the record's metadata says exactly what was built. About two minutes per seed on one
core, plus the stranger's pre-training the first time (about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

DATA_FILE = evaluation.DATA_DIR / "stacking.json"
ROLES = ("base", "generalist", "math", "stranger")

STACKS = {
    "depth up-scaled": [("generalist", 0, 3), ("generalist", 1, 4)],
    "generalist twice": [("generalist", 0, 4), ("generalist", 0, 4)],
    "frankenmerge": [("generalist", 0, 3), ("math", 1, 4)],
    "interleaved": [("generalist", 0, 2), ("math", 1, 3), ("generalist", 2, 4)],
    "layer 2 removed": [("generalist", 0, 2), ("generalist", 3, 4)],
    "reversed frankenmerge": [("math", 0, 3), ("generalist", 1, 4)],
    "sibling base on top": [("generalist", 0, 2), ("base", 2, 4)],
    "stranger on top": [("generalist", 0, 2), ("stranger", 2, 4)],
}
SCALES = (0.25, 0.5, 0.75)  # s = 0 and s = 1 are the generalist and the depth up-scaled model
REPAIRED = ("generalist", "math", "depth up-scaled", "frankenmerge")
REPAIR_STEPS = 80


def passthrough_recipe(ranges, parameters: Mapping | None = None) -> str:
    """A passthrough recipe from (model, start, end) triples, one slice each.

    ``parameters``, when given, maps a slice's index to that slice's ``parameters``.
    """
    slices = []
    for index, (model, start, end) in enumerate(ranges):
        entry = {"sources": [{"model": str(model), "layer_range": [start, end]}]}
        if parameters and index in parameters:
            entry["parameters"] = parameters[index]
        slices.append(entry)
    config = {"merge_method": "passthrough", "slices": slices}
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def scaled_ranges(s: float) -> tuple[list[tuple[str, int, int]], dict]:
    """The depth up-scaled generalist as three slices, its second copies of layers 1 and 2
    with ``o_proj`` and ``down_proj`` scaled by ``s`` (the slice parameters)."""
    scale = {"scale": [{"filter": "o_proj", "value": s}, {"filter": "down_proj", "value": s}]}
    return [("generalist", 0, 3), ("generalist", 1, 3), ("generalist", 3, 4)], {1: scale}


def stranger_settings(settings: minipearl.MiniPearlSettings) -> minipearl.MiniPearlSettings:
    """The same data and training as ``settings``, from other initial weights."""
    return dataclasses.replace(settings, init_seed=settings.seed + 1)


def repair(folder: Path, out: Path, settings: minipearl.MiniPearlSettings) -> Path:
    """`REPAIR_STEPS` steps of training on the pre-training mix, saved in float32 to ``out``.

    Float32, so that the saved model is the trained one exactly (a chapter scores it in
    memory).
    """
    tokenizer = minipearl.load_tokenizer(folder)
    corpus = settings.corpus()
    examples = minipearl.concatenate(
        minipearl.sentence_examples(tokenizer, corpus.pretrain_sentences),
        minipearl.addition_examples(tokenizer, corpus.pretrain_problems),
    )
    model = minipearl.load_model(folder)
    with minipearl.torch_threads(1):
        minipearl.train(
            model,
            examples,
            steps=REPAIR_STEPS,
            learning_rate=settings.finetune_learning_rate,
            batch_size=settings.batch_size,
            seed=settings.seed + 1,
        )
    return minipearl.save_model(model, tokenizer, out, dtype=torch.float32)


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Every model of the chapter for one seed's mini-Pearl, built under ``scratch``."""
    roles = {
        "base": mini.base,
        "generalist": mini.generalist,
        "math": mini.math,
        "stranger": minipearl.load_or_pretrain_base(settings=stranger_settings(mini.settings)),
    }

    def merged(name: str, recipe: str) -> Path:
        out = scratch / name.replace(" ", "-")
        pearl_edu.merge(pearl_edu.load_config(recipe), out, progress=False)
        return out

    def in_folders(ranges):
        return [(roles[role], start, end) for role, start, end in ranges]

    models = {name: merged(name, passthrough_recipe(in_folders(r))) for name, r in STACKS.items()}
    for s in SCALES:
        ranges, parameters = scaled_ranges(s)
        models[f"scaled {s}"] = merged(
            f"scaled-{s}", passthrough_recipe(in_folders(ranges), parameters)
        )
    layers = mini.settings.shape.num_layers
    halfway = minipearl.uniform_recipe(mini.generalist, mini.math, layers, 0.5)
    models["slerp 0.5"] = merged("slerp", halfway)
    for name in REPAIRED:
        folder = roles.get(name) or models[name]
        models[f"{name} repaired"] = repair(
            folder, scratch / f"repaired-{name.replace(' ', '-')}", mini.settings
        )
    return models


def meta() -> dict:
    """What the record was made with: the recipes by role, the scales and the repair."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "pearl_edu": pearl_edu.__version__,
        "torch": torch.__version__,
        "stacks": {name: [list(r) for r in ranges] for name, ranges in STACKS.items()},
        "scales": list(SCALES),
        "repaired": list(REPAIRED),
        "repair_steps": REPAIR_STEPS,
        "stranger_init_seed": "seed + 1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    record = evaluation.record(make, seeds=tuple(args.seeds), meta=meta())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record.save(args.out)
    print(f"{len(record.names)} models, seeds {record.seeds}:")
    for name in record.names:
        print(f"  {name:28s} {record.skill(name, 'text')}  |  {record.skill(name, 'addition')}")
    print(f"written to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
