"""The pruning family on mini-Pearl, for three training seeds: item scores of every merge.

    .venv/bin/python bench/seeds_pruning.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), merge the two
parents' task vectors (weight 1 each) with TIES, DARE, Model Breadcrumbs and DELLA
(mergekit's ``ties``, ``dare_ties``, ``breadcrumbs_ties`` and ``della``), signs elected and
agreeing entries averaged, at densities 0.8 to 0.2, with and without the rescale; DARE
and DELLA with two draws (``random_seed`` 0 and 1). Then Breadcrumbs at density 0.3 with
other ``gamma``s, and ``dare_ties`` at density 0.5 summed (``normalize: false``). Every
merge and the three models of mini-Pearl are scored on every validation and test item.
Writes ``pearl_edu/data/seeds/pruning.json``, which the chapter "The pruning family side by
side" prints; it runs seed 0 itself. A few minutes per seed on one core.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

NAME = "pruning"
PRUNINGS = {
    "TIES": "ties",
    "DARE": "dare_ties",
    "Breadcrumbs": "breadcrumbs_ties",
    "DELLA": "della",
}
RANDOMISED = ("DARE", "DELLA")
DRAWS = (0, 1)
DENSITIES = (0.8, 0.7, 0.5, 0.3, 0.2)
GAMMAS = (0.0, 0.01, 0.05, 0.1, 0.2)


def recipe(method: str, density: float, **options) -> str:
    """A mergekit recipe adding both mini-Pearl parents' task vectors (weight 1) to the base.

    The models are named by the words base, generalist and math (`with_folders` puts a seed's
    folders in their place). ``options`` are the method's own per-model parameters
    (``gamma``, ``epsilon``) and shared ones (``normalize``, ``rescale``, ``random_seed``).
    """
    own = {k: options.pop(k) for k in ("gamma", "epsilon") if k in options}
    seed = options.pop("random_seed", 0)
    models = [
        {"model": parent, "parameters": {"weight": 1.0, "density": density, **own}}
        for parent in ("generalist", "math")
    ]
    config = {
        "models": models,
        "merge_method": method,
        "base_model": "base",
        "dtype": "bfloat16",
        "random_seed": seed,
    }
    if options:
        config["parameters"] = options
    return yaml.safe_dump(config, sort_keys=False)


def model_name(label: str, rescale: bool, density: float, draw: int | None = None) -> str:
    """The name of one merge of the grid in the record, e.g. ``DARE rescaled 0.5 draw 1``."""
    name = f"{label} {'rescaled' if rescale else 'as kept'} {density}"
    return name if draw is None else f"{name} draw {draw}"


def recipes() -> dict[str, str]:
    """Every merge of the record, by name."""
    out = {}
    for label, method in PRUNINGS.items():
        for rescale in (False, True):
            for density in DENSITIES:
                for draw in DRAWS if label in RANDOMISED else (None,):
                    out[model_name(label, rescale, density, draw)] = recipe(
                        method,
                        density,
                        normalize=True,
                        rescale=rescale,
                        **({} if draw is None else {"random_seed": draw}),
                    )
    for gamma in GAMMAS:
        if gamma != 0.01:  # the default, merged in the grid above
            out[f"Breadcrumbs gamma {gamma}"] = recipe(
                "breadcrumbs_ties", 0.3, gamma=gamma, normalize=True
            )
    for draw in DRAWS:
        out[f"DARE summed 0.5 draw {draw}"] = recipe(
            "dare_ties", 0.5, normalize=False, rescale=True, random_seed=draw
        )
    return out


with_folders = evaluation.with_folders


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Merge every recipe for one seed's mini-Pearl into ``scratch``."""
    folders = {}
    for index, (name, text) in enumerate(recipes().items()):
        out = scratch / f"merge-{index}"
        pearl_edu.merge(pearl_edu.load_config(with_folders(text, mini)), out, progress=False)
        folders[name] = out
    return folders


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    return evaluation.record(
        make,
        seeds=seeds,
        meta={
            "recipes": recipes(),
        },
    )


def summary(record: evaluation.Record) -> str:
    """A few of the chapter's comparisons, per seed and over seeds."""
    pairs = [
        ("TIES as kept 0.3", "TIES rescaled 0.3", "addition"),
        ("DELLA as kept 0.5 draw 0", "DARE as kept 0.5 draw 0", "text"),
        ("TIES as kept 0.5", "Breadcrumbs as kept 0.5", "addition"),
    ]
    return "\n".join(str(record.compare(*pair)) for pair in pairs)


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    main()
