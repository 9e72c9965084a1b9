"""Does mini-Pearl's regime hold across seeds? Build it for several seeds and measure the merge.

    .venv/bin/python bench/mini_pearl_seeds.py [--seeds 0 1 2] [--jobs 2] [--out FILE]

For each regime (the default sibling regime and `FAR_SETTINGS`) and each seed: train the
base and both parents, merge the parents with `pearl_edu.merge`, with one t = 0.5 and with
Pearl's own schedule (SLERP, the recipes of chapter 07), and measure both skills of all
five models on held-out data. Also
the "half task vector" check of chapter 07: each skill of the base plus half of its own
parent's change. Writes the rows to ``pearl_edu/data/mini_pearl_seeds.json`` (chapter 07 shows them)
and prints them as a table. About a minute per build and seed on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import pearl_edu
from pearl_edu.teaching import minipearl

DATA_FILE = Path(__file__).resolve().parents[1] / "pearl_edu" / "data" / "mini_pearl_seeds.json"
REGIMES = {"siblings": minipearl.SIBLING_SETTINGS, "far": minipearl.FAR_SETTINGS}


def measure(regime: str, seed: int) -> dict:
    """Build one regime with one seed and measure what its merge keeps."""
    torch.set_num_threads(1)
    settings = dataclasses.replace(REGIMES[regime], seed=seed)
    with tempfile.TemporaryDirectory(prefix="mini-pearl-seeds-") as scratch:
        started = time.perf_counter()
        mini = minipearl.build_mini_pearl(Path(scratch) / "models", settings)
        build_seconds = time.perf_counter() - started
        tokenizer = minipearl.load_tokenizer(mini.base)
        corpus = settings.corpus()
        layers = settings.shape.num_layers
        uniform = minipearl.uniform_recipe(mini.generalist, mini.math, layers, 0.5)
        merged = pearl_edu.merge(uniform, Path(scratch) / "merged", progress=False).output_dir
        pearls = minipearl.scaled_pearl_recipe(mini.generalist, mini.math, layers)
        scheduled = pearl_edu.merge(pearls, Path(scratch) / "pearl", progress=False).output_dir

        def skills(folder: Path) -> minipearl.Skills:
            return minipearl.measure_skills(minipearl.load_model(folder), tokenizer, corpus)

        base, generalist, specialist, merge, pearl = map(
            skills, (mini.base, mini.generalist, mini.math, merged, scheduled)
        )
        weights = {
            name: minipearl.load_weights(getattr(mini, name))
            for name in ("base", "generalist", "math")
        }

        def half_way(parent: str) -> minipearl.Skills:
            halved = minipearl.along_task_vector(weights["base"], weights[parent], 0.5)
            model = minipearl.model_from_weights(mini.base, halved)
            return minipearl.measure_skills(model, tokenizer, corpus)

        half_generalist, half_specialist = half_way("generalist"), half_way("math")
    return {
        "regime": regime,
        "seed": seed,
        "build_seconds": round(build_seconds, 1),
        "skills": {
            name: dataclasses.asdict(value)
            for name, value in (
                ("base", base),
                ("generalist", generalist),
                ("specialist", specialist),
                ("slerp_t_0.5", merge),
                ("pearl_schedule", pearl),
            )
        },
        "text_gain": generalist.text - base.text,
        "addition_gain": specialist.addition - base.addition,
        "text_kept": minipearl.share_of_gain(merge, base, generalist, "text"),
        "addition_kept": minipearl.share_of_gain(merge, base, specialist, "addition"),
        "pearl_schedule_text_kept": minipearl.share_of_gain(pearl, base, generalist, "text"),
        "pearl_schedule_addition_kept": minipearl.share_of_gain(
            pearl, base, specialist, "addition"
        ),
        "half_task_vector_text": minipearl.share_of_gain(half_generalist, base, generalist, "text"),
        "half_task_vector_addition": minipearl.share_of_gain(
            half_specialist, base, specialist, "addition"
        ),
        "moved": {
            "generalist": minipearl.relative_move(weights["base"], weights["generalist"]),
            "specialist": minipearl.relative_move(weights["base"], weights["math"]),
        },
    }


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| regime | seed | base text / add. | generalist text | specialist add. "
        "| merge text / add. | text gain kept | addition gain kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s = row["skills"]
        lines.append(
            f"| {row['regime']} | {row['seed']} "
            f"| {s['base']['text']:.1%} / {s['base']['addition']:.1%} "
            f"| {s['generalist']['text']:.1%} | {s['specialist']['addition']:.1%} "
            f"| {s['slerp_t_0.5']['text']:.1%} / {s['slerp_t_0.5']['addition']:.1%} "
            f"| {row['text_kept']:.0%} | {row['addition_kept']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--jobs", type=int, default=2, help="builds run side by side")
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args()
    jobs = [(regime, seed) for regime in args.regimes for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(measure, *zip(*jobs, strict=True)))
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "pearl_edu": pearl_edu.__version__,
        "torch": torch.__version__,
        "settings": {name: repr(settings) for name, settings in REGIMES.items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(rows))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
