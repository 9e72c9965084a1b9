"""The capstone over training seeds: the baseline, the worked solution and its neighbours, scored.

    .venv/bin/python bench/seeds_capstone.py [--seeds 0 1 2] [--out FILE]

For each seed's sibling mini-Pearl (`evaluation.mini_pearl`, trained once and cached),
merges what the capstone's teacher's notebook merges for seed 0 and records each model's
result on every held-out item of both splits (`evaluation.record`), into
``pearl_edu/data/seeds/capstone.json``:

- ``baseline``: SLERP of the two parents at a uniform ``t = 0.5`` (`capstone.baseline_recipe`);
- ``slerp t``: SLERP at the other uniform ``t`` of `SLERP_TS`;
- ``linear lambda``: the linear merge of the generalist and the specialist with weight
  ``lambda`` each and the base with ``1 - 2 lambda`` (`linear_recipe`), for `LAMBDAS`; the
  worked solution, `capstone.WORKED_SOLUTION`, is one of them (``lambda = 0.7``), and is
  recorded under ``worked solution`` too.

Under a minute per seed on one core once the models are cached.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pearl_edu
from pearl_edu.teaching import capstone, evaluation, minipearl

DATA_FILE = evaluation.DATA_DIR / "capstone.json"
SLERP_TS = (0.3, 0.4, 0.6, 0.7)
LAMBDAS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0)


def linear_recipe(weight: float) -> str:
    """Both parents with ``weight``, the base with ``1 - 2 weight``: the parents' weights
    need not add up to one."""
    return f"""\
models:
  - model: generalist
    parameters: {{weight: {weight:g}}}
  - model: math
    parameters: {{weight: {weight:g}}}
  - model: base
    parameters: {{weight: {1 - 2 * weight:.10g}}}
merge_method: linear
dtype: bfloat16
"""


def recipes(mini: minipearl.MiniPearl) -> dict[str, str]:
    """Every recipe recorded, by name, for one seed's models."""
    layers = capstone.num_layers(mini)
    found = {"baseline": capstone.baseline_recipe(mini)}
    for t in SLERP_TS:
        found[f"slerp {t:g}"] = minipearl.uniform_recipe("generalist", "math", layers, t)
    for weight in LAMBDAS:
        found[f"linear {weight:g}"] = linear_recipe(weight)
    found["worked solution"] = capstone.WORKED_SOLUTION
    return found


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    folders = {}
    for name, recipe in recipes(mini).items():
        out = scratch / name.replace(" ", "-")
        pearl_edu.merge(pearl_edu.load_config(capstone.resolve(recipe, mini)), out, progress=False)
        folders[name] = out
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    meta = {
        "script": "bench/seeds_capstone.py",
        "worked_solution": capstone.WORKED_SOLUTION,
        "slerp_ts": list(SLERP_TS),
        "lambdas": list(LAMBDAS),
    }
    record = evaluation.record(make, seeds=args.seeds, meta=meta)
    record.save(args.out)
    print(
        f"{args.out}: seeds {record.seeds}, {len(record.names)} models each, "
        f"in {time.perf_counter() - started:.0f} s"
    )
    for seed in record.seeds:
        for skill in evaluation.SKILLS:
            print(
                f"seed {seed}: worked solution - baseline, test, "
                f"{evaluation.paired(record.get(seed, 'worked solution'), record.get(seed, 'baseline'), skill)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
