"""Chapter 07's models for several training seeds: every held-out item's score, recorded.

    .venv/bin/python bench/mini_pearl_seeds.py [--seeds 0 1 2] [--regimes siblings far]

For each regime (the default sibling regime and `FAR_SETTINGS`) and each training seed,
`evaluation.record` takes that seed's mini-Pearl (trained once, then read from the cache),
makes the models chapter 07 compares and scores each of them on every validation and test
item:

- siblings: SLERP with one t from 0.3 to 0.7, linear interpolation at t = 0.5, Pearl's
  schedule and its four variants, and the half task vector of each parent;
- far: SLERP at t = 0.5 and the half task vector of each parent.

Writes ``pearl_edu/data/seeds/mini_pearl.json`` and ``mini_pearl_far.json`` (chapter 07
prints them and runs seed 0 live), then prints each model's skills per seed. A build takes
one to three minutes per seed on one core; the scoring about a minute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

PEARL_ATTENTION, PEARL_MLP = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
SCHEDULES = {
    "Pearl's schedule": (PEARL_ATTENTION, PEARL_MLP),
    "lists swapped": (PEARL_MLP, PEARL_ATTENTION),
    "one list for both": (PEARL_ATTENTION, PEARL_ATTENTION),
    "ends moved in": ([0.25, 0.5, 0.3, 0.7, 0.75], [0.75, 0.5, 0.7, 0.3, 0.25]),
    "middle flattened": ([0, 0.5, 0.5, 0.5, 1], [1, 0.5, 0.5, 0.5, 0]),
}
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)
REGIMES = {
    "siblings": ("mini_pearl", minipearl.SIBLING_SETTINGS),
    "far": ("mini_pearl_far", minipearl.FAR_SETTINGS),
}


def schedule_recipe(mini: minipearl.MiniPearl, attention_t, mlp_t) -> str:
    """Pearl's recipe for mini-Pearl with its attention and MLP lists of t replaced."""
    layers = mini.settings.shape.num_layers
    config = yaml.safe_load(minipearl.scaled_pearl_recipe(mini.generalist, mini.math, layers))
    config["parameters"]["t"] = [
        {"filter": "self_attn", "value": attention_t},
        {"filter": "mlp", "value": mlp_t},
        {"value": 0.5},
    ]
    return yaml.safe_dump(config, sort_keys=False)


def save_weights(mini: minipearl.MiniPearl, weights: dict, folder: Path) -> Path:
    """Weights computed in memory, saved in float32 so that scoring them changes nothing."""
    model = minipearl.model_from_weights(mini.base, weights)
    tokenizer = minipearl.load_tokenizer(mini.base)
    return minipearl.save_model(model, tokenizer, folder, dtype=torch.float32)


def half_steps(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """The base plus half of each parent's task vector (the half task vector check)."""
    base = minipearl.load_weights(mini.base)
    folders = {}
    for parent in ("generalist", "math"):
        tuned = minipearl.load_weights(getattr(mini, parent))
        halved = minipearl.along_task_vector(base, tuned, 0.5)
        folders[f"half {parent} step"] = save_weights(mini, halved, scratch / f"half-{parent}")
    return folders


def uniform(mini: minipearl.MiniPearl, t: float, scratch: Path) -> Path:
    """SLERP of the two parents with one t for every tensor, through `pearl_edu.merge`."""
    layers = mini.settings.shape.num_layers
    recipe = minipearl.uniform_recipe(mini.generalist, mini.math, layers, t)
    return pearl_edu.merge(recipe, scratch / f"slerp-{t}", progress=False).output_dir


def make_siblings(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    folders = {f"slerp t={t}": uniform(mini, t, scratch) for t in SWEEP}
    generalist = minipearl.load_weights(mini.generalist)
    math = minipearl.load_weights(mini.math)
    linear = minipearl.interpolate_weights(generalist, math, 0.5, "lerp")
    folders["lerp t=0.5"] = save_weights(mini, linear, scratch / "lerp-0.5")
    for label, (attention_t, mlp_t) in SCHEDULES.items():
        out = scratch / ("schedule-" + label.replace(" ", "-").replace("'", ""))
        recipe = schedule_recipe(mini, attention_t, mlp_t)
        folders[label] = pearl_edu.merge(recipe, out, progress=False).output_dir
    folders.update(half_steps(mini, scratch))
    return folders


def make_far(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    return {"slerp t=0.5": uniform(mini, 0.5, scratch), **half_steps(mini, scratch)}


MAKERS = {"siblings": make_siblings, "far": make_far}


def table(record: evaluation.Record, split: str = "test") -> str:
    """Each model's skills on ``split``, one column per seed."""
    lines = [f"{'model':20s}" + "".join(f" {'seed ' + str(s):>13s}" for s in record.seeds)]
    for name in record.names:
        cells = "".join(
            f" {record.get(s, name, split).text:6.1%}/{record.get(s, name, split).addition:6.1%}"
            for s in record.seeds
        )
        lines.append(f"{name:20s}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    args = parser.parse_args()
    for regime in args.regimes:
        name, settings = REGIMES[regime]
        meta = {
            "what": f"chapter 07's models, {regime} regime",
            "pearl_edu": pearl_edu.__version__,
            "torch": torch.__version__,
        }
        record = evaluation.record(
            MAKERS[regime], seeds=tuple(args.seeds), settings=settings, meta=meta
        )
        path = record.save(evaluation.DATA_DIR / f"{name}.json")
        print(f"{regime} (text / addition on test):\n{table(record)}\nwritten to {path}\n")


if __name__ == "__main__":
    main()
