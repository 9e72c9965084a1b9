"""The files beside the weights: config.json, tokenizer, generation config, model card.

Written last, into the partial folder, so that a merged folder is usable as is by
transformers and describes itself as mergekit's do. The tokenizer is the one mergekit
0.1.5 writes (`pearl_edu.tokenizer_build.write_tokenizer_files`): the output vocabulary
built from ``tokenizer_source`` or ``tokenizer:``, else the donor's tokenizer (the base
model, else the first model), with the ``chat_template`` asked for.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import yaml

from pearl_edu._version import __version__
from pearl_edu.config import DTYPE_NAMES, MergeConfig
from pearl_edu.methods import METHODS
from pearl_edu.tensor_plan import MergePlan
from pearl_edu.tokenizer_build import OutputVocabulary, donor_model, write_tokenizer_files

# The tokenizer files a model folder may hold (copied from the donor, or written).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def write_model_files(
    folder: Path,
    config: MergeConfig,
    merge_plan: MergePlan,
    base_dir: Path,
    model_name: str,
    copy_tokenizer: bool = True,
    *,
    model_dirs: Mapping[str, Path] | None = None,
    vocabulary: OutputVocabulary | None = None,
) -> None:
    """Write config.json, generation config, tokenizer, README.md and mergekit_config.yml.

    ``vocabulary`` is the output vocabulary when the config builds one
    (`pearl_edu.vocabulary.VocabularyAlignment`); config.json then gets its
    ``vocab_size``. ``model_dirs`` are the models' folders (by default the base's only).
    Text files get ``\n`` line endings on every system, so a merge's bytes do not depend on it.
    """
    rows = vocabulary.rows if vocabulary is not None else None
    write_hf_config(folder, base_dir, merge_plan, vocab_size=rows)
    if copy_tokenizer and (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", folder / "generation_config.json")
    dirs = dict(model_dirs) if model_dirs is not None else {donor_model(config): base_dir}
    write_tokenizer_files(folder, config, dirs, vocabulary, copy_tokenizer)
    config_yaml = yaml.safe_dump(config.raw, sort_keys=False, default_flow_style=None)
    (folder / "mergekit_config.yml").write_text(config_yaml, encoding="utf-8", newline="\n")
    card = model_card(config, config_yaml, model_name)
    (folder / "README.md").write_text(card, encoding="utf-8", newline="\n")


def write_hf_config(
    folder: Path, base_dir: Path, merge_plan: MergePlan, vocab_size: int | None = None
) -> None:
    """The base model's ``config.json`` with the output dtype and layer count updated.

    ``vocab_size``, when given, is the output vocabulary's (padded) size, as mergekit sets it.
    """
    source = base_dir / "config.json"
    hf_config = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    dtype_counts = Counter(job.dtype for job in merge_plan.tensors)
    dtype = dtype_counts.most_common(1)[0][0]
    for key in ("torch_dtype", "dtype"):
        hf_config[key] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    hf_config["num_hidden_layers"] = merge_plan.num_layers
    if vocab_size is not None:
        hf_config["vocab_size"] = vocab_size
    text = json.dumps(hf_config, indent=2) + "\n"
    (folder / "config.json").write_text(text, encoding="utf-8", newline="\n")


def model_card(config: MergeConfig, config_yaml: str, model_name: str) -> str:
    """A README.md in the shape of mergekit's model cards: method, inputs, the YAML."""
    models = config.models()
    # The Hub's base_model metadata names models; a `base+adapter` reference names both
    # (as mergekit's card does), while the list below keeps the reference as written.
    named = list(dict.fromkeys(part for model in models for part in model.split("+")))
    front_matter = yaml.safe_dump(
        {
            "base_model": named,
            "library_name": "transformers",
            "tags": ["mergekit", "merge", "pearl-edu"],
        },
        sort_keys=False,
    )
    listed = "\n".join(f"* {model}" for model in models)
    t_note = " (t = 0)" if config.merge_method == "slerp" else ""
    base = f" with {config.base_model} as the base{t_note}" if config.base_model else ""
    seed = (
        f"Random seed: `{config.random_seed}` (each tensor draws from a seed made of this "
        "one and the tensor's name, so the merge is reproducible).\n\n"
        if METHODS[config.merge_method].random
        else ""
    )
    return (
        f"---\n{front_matter}---\n"
        f"# {model_name}\n\n"
        f"This is a merge of pre-trained language models made with pearl_edu {__version__}, "
        "which reads mergekit's configuration format with mergekit's meaning.\n\n"
        "## Merge details\n\n"
        f"Merge method: {method_words(config.merge_method)}{base}.\n\n"
        f"{seed}"
        f"Models merged:\n\n{listed}\n\n"
        "## Configuration\n\n"
        "The following YAML configuration was used to produce this model:\n\n"
        f"```yaml\n{config_yaml}```\n"
    )


def method_words(name: str) -> str:
    """The method as the card names it: ``[Model Stock](paper) (`model_stock`)``, or ``name``."""
    method = METHODS[name]
    if not method.title:
        return f"`{name}`"
    title = f"[{method.title}]({method.reference})" if method.reference else method.title
    return f"{title} (`{name}`)"
