"""LoRA adapters on mini-Pearl, for three training seeds: item scores of every model.

    .venv/bin/python bench/seeds_lora.py [--seeds 0 1 2] [--out FILE]

For each seed's mini-Pearl (sibling regime, `evaluation.mini_pearl`), both parents are
fine-tuned a second time as LoRA adapters of the base (`pearl_edu.teaching.lora`, rank 8,
every linear layer; cached). Then:

- each adapter applied to the base (``base+adapter``, a ``passthrough`` recipe);
- the two parents merged with ``task_arithmetic`` (weight 1 each), ``ties`` (density 0.5,
  weight 1 each) and ``linear`` (0.5 each), once from the full fine-tunes and once from the
  applied adapters;
- a LoRA extracted from each full fine-tune (`pearl_edu.extract_lora`, as ``pearl-edu
  extract-lora`` with its defaults: the linear layers decomposed, the embeddings and norms
  saved whole) at ranks 1 to 64, and at rank 64 of the linear layers only (embeddings
  excluded, norms skipped), each applied to the base.

Every model, and the three of mini-Pearl, is scored on every validation and test item.
Writes ``pearl_edu/data/seeds/lora.json``, which the chapter "LoRA adapters are task
vectors" prints; it runs seed 0 itself. About three minutes per seed on one core (the
adapters' training, once).
"""

from __future__ import annotations

from pathlib import Path

import yaml

import pearl_edu
from pearl_edu.extract_lora import ExtractOptions, extract_lora
from pearl_edu.teaching import evaluation, lora, minipearl

NAME = "lora"
PARENTS = minipearl.PARENTS
METHODS = ("task_arithmetic", "ties", "linear")
RANKS = (1, 2, 4, 8, 16, 32, 64)
SETTINGS = lora.LoraSettings()


def merge_recipe(method: str, kind: str) -> str:
    """A recipe merging both parents with ``method``; ``kind`` is ``full`` or ``LoRA``.

    The models are named by words (``base``, ``generalist``, ``math``, and
    ``base+lora-generalist``, ``base+lora-math`` for the applied adapters) that
    `with_adapters` replaces by one seed's folders.
    """
    parents = list(PARENTS) if kind == "full" else [f"base+lora-{p}" for p in PARENTS]
    if method == "linear":
        models = [{"model": p, "parameters": {"weight": 0.5}} for p in parents]
        config = {"models": models, "merge_method": "linear"}
    else:
        own = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
        models = [{"model": p, "parameters": dict(own)} for p in parents]
        config = {"models": models, "merge_method": method, "base_model": "base"}
    config["dtype"] = "bfloat16"
    return yaml.safe_dump(config, sort_keys=False)


def applied_recipe(model: str) -> str:
    """One model reference written out whole (``passthrough``), e.g. ``base+lora-math``."""
    config = {"models": [{"model": model}], "merge_method": "passthrough", "dtype": "bfloat16"}
    return yaml.safe_dump(config, sort_keys=False)


def recipes() -> dict[str, str]:
    """Every merge of the record but the extractions, by name."""
    out = {f"LoRA {p}": applied_recipe(f"base+lora-{p}") for p in PARENTS}
    for method in METHODS:
        for kind in ("full", "LoRA"):
            out[f"{kind} {method}"] = merge_recipe(method, kind)
    return out


def extract_options(rank: int, *, linear_only: bool = False) -> ExtractOptions:
    """``pearl-edu extract-lora --rank R``, with ``linear_only`` also ``-e embed_tokens
    -e lm_head --skip-undecomposable`` (the embeddings and norms stay the base's)."""
    if not linear_only:
        return ExtractOptions(rank=rank)
    return ExtractOptions(
        rank=rank, exclude_regexes=("embed_tokens", "lm_head"), skip_undecomposable=True
    )


def extracted_name(parent: str, rank: int | None) -> str:
    """``extracted math rank 8``; rank ``None`` names the linear-only extraction at rank 64."""
    return f"extracted {parent} rank {rank}" if rank else f"extracted {parent} linear only"


def extractions() -> list[tuple[str, int | None]]:
    """(parent, rank) of every extraction; rank ``None`` is the linear-only one."""
    return [(p, r) for p in PARENTS for r in (*RANKS, None)]


with_adapters = lora.with_adapters


def adapters_of(mini: minipearl.MiniPearl) -> dict[str, Path]:
    """The trained adapters of one seed (trained once, then read from the cache)."""
    return {f"lora-{p}": lora.load_or_train_adapter(mini, p, SETTINGS) for p in PARENTS}


def make(mini: minipearl.MiniPearl, scratch: Path) -> dict[str, Path]:
    """Every model of the record for one seed's mini-Pearl, written into ``scratch``."""
    adapters = adapters_of(mini)
    texts = dict(recipes())
    for parent, rank in extractions():
        key = f"extracted-{parent}-{rank or 'linear'}"
        options = extract_options(rank or RANKS[-1], linear_only=rank is None)
        extract_lora(str(getattr(mini, parent)), str(mini.base), scratch / key, options)
        adapters[key] = scratch / key
        texts[extracted_name(parent, rank)] = applied_recipe(f"base+{key}")
    folders = {}
    for index, (name, text) in enumerate(texts.items()):
        out = scratch / f"model-{index}"
        config = pearl_edu.load_config(with_adapters(text, mini, adapters))
        pearl_edu.merge(config, out, progress=False)
        folders[name] = out
    return folders


def measure(seeds: tuple[int, ...]) -> evaluation.Record:
    return evaluation.record(
        make,
        seeds=seeds,
        meta={
            "lora": repr(SETTINGS),
            "ranks": list(RANKS),
            "recipes": recipes(),
        },
    )


def summary(record: evaluation.Record) -> str:
    """A few of the chapter's comparisons, per seed and over seeds."""
    pairs = [
        ("LoRA math", "math", "addition"),
        ("LoRA generalist", "generalist", "text"),
        ("LoRA task_arithmetic", "full task_arithmetic", "addition"),
        ("LoRA task_arithmetic", "full task_arithmetic", "text"),
    ]
    return "\n".join(str(record.compare(*pair)) for pair in pairs)


def main(argv: list[str] | None = None) -> evaluation.Record:
    return evaluation.seeds_command(__doc__, NAME, measure, summary, argv)


if __name__ == "__main__":
    main()
