"""Merging with data on mini-Pearl, for three training seeds: item scores of every merge.

    .venv/bin/python bench/seeds_data_merging.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), merge the two parents
with the data-free methods the chapter compares against (the plain average, task
arithmetic adding both task vectors, SLERP at t = 0.5), all through `pearl_edu.merge` from
YAML recipes, and with the two data-aware methods of `pearl_edu.teaching.datamerge`:
Fisher merging and RegMean (off-diagonal scale ``alpha`` 0, 0.5, 0.9 and 1), each from the
first N validation items of each parent's own skill, N in `SIZES`. Every merge and the three
models of mini-Pearl are scored on every validation and test item. The seconds spent on the
statistics and on the merge itself, and the bytes the statistics hold, are kept in the
record's meta. Writes ``pearl_edu/data/seeds/data_merging.json``, which the chapter "Merging
with data" reads; it runs seed 0 itself. About a minute per seed on one core.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

import pearl_edu
from pearl_edu.teaching import datamerge, evaluation, minipearl

NAME = "data_merging"
SIZES = (2, 8, 32, 128, 300)
ALPHAS = (0.0, 0.5, 0.9, 1.0)
TIMINGS: dict[str, dict] = {}


def recipes(num_layers: int = minipearl.ModelShape().num_layers) -> dict[str, str]:
    """The data-free merges, by the name the record keeps; the models are named by the words
    base, generalist and math (`evaluation.with_folders` puts a seed's folders in place)."""
    parents = [{"model": parent, "parameters": {"weight": 1.0}} for parent in minipearl.PARENTS]
    average = {
        "merge_method": "linear",
        "models": [{"model": p, "parameters": {"weight": 0.5}} for p in minipearl.PARENTS],
        "dtype": "bfloat16",
    }
    arithmetic = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": parents,
        "dtype": "bfloat16",
    }
    slerp = minipearl.uniform_recipe("generalist", "math", num_layers, 0.5)
    dump = {"sort_keys": False}
    return {
        "average": yaml.safe_dump(average, **dump),
        "task arithmetic": yaml.safe_dump(arithmetic, **dump),
        "SLERP t=0.5": slerp,
    }


def fisher_name(size: int) -> str:
    return f"Fisher n={size}"


def regmean_name(size: int, alpha: float) -> str:
    return f"RegMean a={alpha} n={size}"


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Every merge of the record for one seed's mini-Pearl, written under ``scratch``."""
    folders = {}
    timings = TIMINGS.setdefault(str(mini.settings.seed), {})
    for index, (name, text) in enumerate(recipes(mini.settings.shape.num_layers).items()):
        out = scratch / f"free-{index}"
        started = time.perf_counter()
        pearl_edu.merge(
            pearl_edu.load_config(evaluation.with_folders(text, mini)), out, progress=False
        )
        timings[f"merge {name}"] = time.perf_counter() - started
        folders[name] = out
    for size in SIZES:
        for kind in ("fisher", "gram"):
            started = time.perf_counter()
            stats = datamerge.parent_statistics(mini, kind, size)
            timings[f"{kind} n={size}"] = time.perf_counter() - started
            timings[f"{kind} bytes"] = sum(
                t.numel() * t.element_size() for t in stats["generalist"].values()
            )
            if kind == "fisher":
                started = time.perf_counter()
                folders[fisher_name(size)] = datamerge.merge_folders(
                    mini, "fisher", stats, scratch / f"fisher-{size}"
                )
                timings[f"merge fisher n={size}"] = time.perf_counter() - started
                continue
            for alpha in ALPHAS:
                started = time.perf_counter()
                name = regmean_name(size, alpha)
                folders[name] = datamerge.merge_folders(
                    mini, "regmean", stats, scratch / f"regmean-{size}-{alpha}", alpha=alpha
                )
                timings[f"merge regmean a={alpha} n={size}"] = time.perf_counter() - started
    return folders


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    TIMINGS.clear()
    record = evaluation.record(
        make,
        seeds=seeds,
        meta={
            "recipes": recipes(),
            "sizes": list(SIZES),
            "alphas": list(ALPHAS),
        },
    )
    record.meta["seconds"] = {seed: dict(t) for seed, t in TIMINGS.items()}
    return record


def summary(record: evaluation.Record) -> str:
    """A few of the chapter's comparisons, per seed and over seeds."""
    pairs = [
        (regmean_name(300, 0.9), "average", "addition"),
        (regmean_name(300, 0.9), "average", "text"),
        (fisher_name(300), "average", "addition"),
        (fisher_name(300), "average", "text"),
    ]
    return "\n".join(str(record.compare(*pair)) for pair in pairs)


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    main()
