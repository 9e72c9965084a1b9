"""The files beside a MoE's weights, and the check of its output folder.

- ``config.json``, made by `pearl_edu.moe.mixtral` or `pearl_edu.moe.qwen`;
- the base's tokenizer files and generation config, copied as they are (mergekit-moe
  saves instead the tokenizer it tokenized the prompts with, re-serialised by
  transformers with the BOS token as its padding token; the weights do not depend on it);
- ``mergekit_moe_config.yml``, the config as given, as mergekit-moe writes it, and a
  ``README.md`` model card (`moe_card`), as pearl_edu writes one for every merge.

`check_moe_output` refuses an output folder as `pearl_edu.output.check_output_dir` does,
and also lets ``--force`` replace a finished MoE folder (which holds
``mergekit_moe_config.yml`` where a merge holds ``mergekit_config.yml``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from pearl_edu._version import __version__
from pearl_edu.card import TOKENIZER_FILES
from pearl_edu.errors import OutputError
from pearl_edu.moe.config import MoEConfig
from pearl_edu.output import MODEL_FOLDER_FILES, MODEL_SHARD, WEIGHT_FILES, check_output_dir

MOE_CONFIG_FILE = "mergekit_moe_config.yml"


def write_moe_files(
    folder: Path,
    config: MoEConfig,
    config_json: str,
    base_dir: Path,
    model_name: str,
    *,
    architecture: str,
    copy_tokenizer: bool,
) -> None:
    """config.json, the base's tokenizer and generation config, the YAML, and README.md."""
    (folder / "config.json").write_text(config_json, encoding="utf-8", newline="\n")
    for name in ("generation_config.json", *TOKENIZER_FILES) if copy_tokenizer else ():
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, folder / name)
    (folder / MOE_CONFIG_FILE).write_text(config.yaml_text(), encoding="utf-8", newline="\n")
    (folder / "README.md").write_text(
        moe_card(config, model_name, architecture), encoding="utf-8", newline="\n"
    )


def moe_card(config: MoEConfig, model_name: str, architecture: str = "Mixtral") -> str:
    """A README.md for the MoE: what it is made of, and the YAML that made it."""
    front_matter = yaml.safe_dump(
        {
            "base_model": config.models(),
            "library_name": "transformers",
            "tags": ["mergekit", "moe", "merge", "pearl-edu"],
        },
        sort_keys=False,
    )
    shared = "".join(
        f"Shared expert, run for every token: {expert.source_model}.\n\n"
        for expert in config.shared_experts or ()
    )
    experts = "\n".join(
        f"{index}. {expert.source_model}" for index, expert in enumerate(config.experts)
    )
    return (
        f"---\n{front_matter}---\n"
        f"# {model_name}\n\n"
        f"This is a {architecture} mixture of experts made with pearl_edu {__version__}, which "
        "reads "
        "mergekit-moe's configuration format with mergekit's meaning.\n\n"
        "## Details\n\n"
        f"Everything but the MLPs comes from {config.base_model}. Each expert below gives "
        f"its MLPs to every layer; {config.experts_per_token} of the "
        f"{len(config.experts)} experts run for each token, chosen by routers made with "
        f"gate mode `{config.gate_mode}`.\n\n"
        f"Experts:\n\n{experts}\n\n{shared}"
        "## Configuration\n\n"
        "The following YAML configuration was used to produce this model:\n\n"
        f"```yaml\n{config.yaml_text().rstrip()}\n```\n"
    )


def finished_moe_folder(folder: Path) -> bool:
    """Whether ``folder`` is a finished MoE folder: a model's files and the MoE's YAML only."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    names = set()
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            return False
        if entry.name not in MODEL_FOLDER_FILES | {MOE_CONFIG_FILE}:
            if not MODEL_SHARD.match(entry.name):
                return False
        names.add(entry.name)
    has_weights = bool(names & set(WEIGHT_FILES)) or any(MODEL_SHARD.match(n) for n in names)
    return {MOE_CONFIG_FILE, "config.json"} <= names and has_weights


def check_moe_output(output_dir: Path, model_dirs: Sequence[Path], *, force: bool) -> None:
    """`check_output_dir`, except that ``force`` may also replace a finished MoE folder."""
    if not (output_dir.is_dir() and finished_moe_folder(output_dir)):
        check_output_dir(output_dir, model_dirs, force=force)
        return
    if not force:
        raise OutputError(
            f"output folder {output_dir} holds a MoE model; pass --force to replace it"
        )
    target = output_dir.resolve()
    for model_dir in model_dirs:
        source = Path(model_dir).resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise OutputError(
                f"output folder {output_dir} overlaps input model folder {source}; choose "
                "another folder"
            )
