"""Mixtures of experts from mini-Pearl's two fine-tunes, for three training seeds: item scores.

    .venv/bin/python bench/seeds_moe.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), build a Mixtral with
`pearl_edu.moe.build_moe` from a mergekit-moe config: the generalist as the base model
(attention, embeddings, norms), the generalist's and the specialist's MLPs as the two
experts, one expert per token, the routers from positive prompts of each skill (the first
training sentences; the first training additions, answers included), once per gate mode
(``hidden``, ``cheap_embed``, ``random``). Beside them the SLERP merge of the same parents
with Pearl's schedule. Every model and the three models of mini-Pearl are scored on every
validation and test item. Writes ``pearl_edu/data/seeds/moe.json``, which the chapter
"Mixtures of experts from fine-tunes" prints; it runs seed 0 itself. Seconds per seed
once the seeds' mini-Pearls are cached.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import pearl_edu
from pearl_edu.moe import build_moe
from pearl_edu.teaching import evaluation, minipearl

NAME = "moe"
GATE_MODES = ("hidden", "cheap_embed", "random")
PROMPTS = 8  # positive prompts per expert
SLERP = "SLERP, Pearl's schedule"


def moe_name(mode: str) -> str:
    """The name of one mixture in the record, e.g. ``MoE hidden``."""
    return f"MoE {mode}"


def prompts(corpus: minipearl.Corpus, count: int = PROMPTS) -> dict[str, list[str]]:
    """Positive prompts for each expert: training sentences, and training additions written
    out in full (``07+35=042``). Both come from the training split, never the held-out ones."""
    additions = [
        minipearl.addition_prompt(a, b) + minipearl.addition_answer(a, b)
        for a, b in corpus.train_problems[:count]
    ]
    return {"generalist": list(corpus.train_sentences[:count]), "math": additions}


def moe_config(mode: str, corpus: minipearl.Corpus, experts_per_token: int = 1) -> dict:
    """A mergekit-moe config for the two parents, the models named by the words
    base, generalist and math (`with_folders` puts a seed's folders in their place)."""
    by_expert = prompts(corpus)
    return {
        "base_model": "generalist",
        "gate_mode": mode,
        "dtype": "bfloat16",
        "experts_per_token": experts_per_token,
        "experts": [
            {"source_model": parent, "positive_prompts": by_expert[parent]}
            for parent in ("generalist", "math")
        ],
    }


def with_folders(config: dict, mini: minipearl.MiniPearl) -> str:
    """The config's YAML with the words base, generalist and math replaced by mini's folders."""
    folders = {"base": mini.base, "generalist": mini.generalist, "math": mini.math}
    filled = dict(config)
    filled["base_model"] = str(folders[config["base_model"]])
    filled["experts"] = [
        {**expert, "source_model": str(folders[expert["source_model"]])}
        for expert in config["experts"]
    ]
    return yaml.safe_dump(filled, sort_keys=False)


def slerp_recipe(mini: minipearl.MiniPearl) -> str:
    """Pearl's SLERP recipe for the same two parents (chapter 07's merge)."""
    layers = mini.settings.shape.num_layers
    return minipearl.scaled_pearl_recipe(mini.generalist, mini.math, layers)


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Build the three mixtures and the SLERP merge of one seed's mini-Pearl in ``scratch``."""
    corpus = mini.settings.corpus()
    folders = {}
    for mode in GATE_MODES:
        out = scratch / f"moe-{mode}"
        build_moe(with_folders(moe_config(mode, corpus), mini), out, progress=False)
        folders[moe_name(mode)] = out
    out = scratch / "slerp"
    pearl_edu.merge(pearl_edu.load_config(slerp_recipe(mini)), out, progress=False)
    folders[SLERP] = out
    return folders


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    return evaluation.record(
        make,
        seeds=seeds,
        meta={
            "configs": {moe_name(m): moe_config(m, minipearl.make_corpus()) for m in GATE_MODES},
        },
    )


def summary(record: evaluation.Record) -> str:
    """The chapter's comparisons, per seed and over seeds."""
    lines = []
    for mode in GATE_MODES:
        for skill in evaluation.SKILLS:
            lines.append(str(record.compare(moe_name(mode), SLERP, skill)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    main()
