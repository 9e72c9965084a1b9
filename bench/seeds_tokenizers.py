"""Merges with a specialist whose tokenizer differs, for three training seeds: item scores.

    .venv/bin/python bench/seeds_tokenizers.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), the number-token
specialist and its control, the one-token-per-character specialist fine-tuned as long and
as fast (`pearl_edu.teaching.numbertokens`), are trained once and cached. Pearl's SLERP
recipe then merges the generalist with the number specialist for each vocabulary option of
the chapter "When the tokenizers differ" (``tokenizer_source: base`` and ``union``; the
union with every number token's row filled with zeros, or forced to zeros), with the
control specialist, and with mini-Pearl's own specialist. Every merge and every parent is
scored on every validation and test item (the merge with ``tokenizer_source: base`` is
named ``base``, as in the chapter; mini-Pearl's base model, which `evaluation.record`
would score under that name, is not scored here). Writes ``pearl_edu/data/seeds/tokenizers.json``,
which the chapter prints; it runs seed 0 itself. About four minutes per seed the first
time (two fine-tunes), seconds once they are cached.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl, numbertokens

NAME = "tokenizers"
# The merges with the number specialist: label -> the recipe's tokenizer options.
ZERO = {"source": {"kind": "zero"}}
OPTIONS = {
    "base": {"tokenizer_source": "base"},
    "union": {"tokenizer_source": "union"},
    "union, zero fill": {
        "tokenizer": {
            "source": "union",
            "tokens": dict.fromkeys(numbertokens.NUMBER_TOKENS, {**ZERO, "force": False}),
        }
    },
    "union, zero forced": {
        "tokenizer": {
            "source": "union",
            "tokens": dict.fromkeys(numbertokens.NUMBER_TOKENS, {**ZERO, "force": True}),
        }
    },
}
CONTROL = "control merge"
OWN = "mini-Pearl's merge"
# The chapter's comparisons: label -> (first, second).
COMPARISONS = {
    "union - base": ("union", "base"),
    "zero fill - union": ("union, zero fill", "union"),
    "zero forced - union": ("union, zero forced", "union"),
    "union - generalist": ("union", "generalist"),
    "control merge - union": (CONTROL, "union"),
    "mini-Pearl's merge - control merge": (OWN, CONTROL),
}


def recipe(mini: minipearl.MiniPearl, specialist: Path, **tokenizer_options) -> str:
    """Pearl's recipe for ``mini``'s generalist and ``specialist``, with tokenizer options."""
    layers = mini.settings.shape.num_layers
    config = yaml.safe_load(minipearl.scaled_pearl_recipe(mini.generalist, specialist, layers))
    config.update(tokenizer_options)
    return yaml.safe_dump(config, sort_keys=False)


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Train (or read back) the two specialists of ``mini``, merge them in ``scratch``;
    returns the models to score beside mini-Pearl's own: the merges and the specialists."""
    numbers = numbertokens.load_or_build_number_specialist(mini)
    control = numbertokens.load_or_build_long_character_specialist(mini)
    recipes = {label: recipe(mini, numbers, **option) for label, option in OPTIONS.items()}
    recipes[CONTROL] = recipe(mini, control)
    recipes[OWN] = recipe(mini, mini.math)
    folders = {"number specialist": numbers, "control specialist": control}
    for label, text in recipes.items():
        out = scratch / label.replace(" ", "-").replace(",", "").replace("'", "")
        pearl_edu.merge(pearl_edu.load_config(text), out, progress=False)
        folders[label] = out
    return folders


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    return evaluation.record(
        make,
        seeds=seeds,
        meta={
            "options": OPTIONS,
        },
    )


def summary(record: evaluation.Record) -> str:
    """The chapter's comparisons, per seed and over seeds."""
    return "\n".join(
        str(record.compare(first, second, skill))
        for first, second in COMPARISONS.values()
        for skill in evaluation.SKILLS
    )


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    main()
