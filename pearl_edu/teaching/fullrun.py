"""The full Pearl-7B-slerp run, step by step: fetch, merge, verify, use, share.

Each step is one function that the chapter "Run the full Pearl-7B merge" calls:

1. `fetch` turns a model reference into a folder, downloading it through `pearl_edu.hub`
   (weights, config and tokenizer only; WizardMath's pickle ``.bin`` shards are read later
   with ``weights_only=True``, so no code inside them runs);
2. `pearl_config` builds the merge config from the shipped recipe's text, with the model
   references replaced by the fetched folders, and `merge_pearl` runs it with
   `pearl_edu.merge` (resuming an interrupted run); `name_models_in_card` puts the repo
   ids back into the model card;
3. `compare` runs `pearl_edu.verify` against the published model with a progress bar, and
   `explain` says in words what the comparison means;
4. `generate` uses the merged model as its model card shows; `push_to_hub` shares it.

Without a network, `make_stand_ins` writes small models with the real parents' layout
(Mistral, 32 layers; one parent float16 safetensors, the other bfloat16 pickle shards) and
`mergekit_merge` makes the stand-in "published" model with mergekit itself, so the same
steps run end to end offline and the verify step compares two independent implementations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pearl_edu.config import MergeConfig, load_config
from pearl_edu.engine import MergeResult, merge
from pearl_edu.errors import HubError, ModelError
from pearl_edu.hub import hub_reachable, resolve_model
from pearl_edu.recipes import pearl_recipe
from pearl_edu.verification import VerifyReport, verify

OMNIBEAGLE = "mlabonne/OmniBeagle-7B"
WIZARDMATH = "WizardLM/WizardMath-7B-V1.1"
PUBLISHED = "louisbrulenaudet/Pearl-7B-slerp"

# The sampling settings of Pearl-7B-slerp's model card.
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.95}

# Mistral-Instruct's prompt format, for the stand-ins' tokenizers. The real run uses the
# chat template that the merge copies from OmniBeagle's tokenizer.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


# --------------------------------------------------------------------------------------
# 1. Fetch
# --------------------------------------------------------------------------------------


def fetch(ref: str | Path, revision: str | None = None) -> Path:
    """The local folder of ``ref``: itself if it is a folder, else a download from the Hub.

    Only what a merge needs is downloaded (weights in one format, config, tokenizer), with
    the Hugging Face client's progress bars, into its cache (``HF_HOME``); a second call
    finds the files there. ``revision`` (a commit hash, branch or tag) pins the repository's
    version; ``None`` takes its latest commit. Raises `HubError` with what to do when the
    Hub cannot be reached or has no such revision.
    """
    return resolve_model(ref, revision=revision)


# --------------------------------------------------------------------------------------
# 2. Merge
# --------------------------------------------------------------------------------------


def pearl_recipe_yaml(omnibeagle: str | Path, wizardmath: str | Path) -> str:
    """The shipped Pearl-7B-slerp recipe, with its two model references replaced."""
    return pearl_recipe(omnibeagle, wizardmath)


def pearl_config(omnibeagle: str | Path, wizardmath: str | Path) -> MergeConfig:
    """The Pearl-7B-slerp merge config over the given parents (folders or repo ids)."""
    return load_config(pearl_recipe_yaml(omnibeagle, wizardmath))


def merge_pearl(
    omnibeagle_dir: str | Path,
    wizardmath_dir: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    progress: bool = True,
) -> MergeResult | None:
    """Merge the two fetched parents with Pearl's recipe; None if ``output_dir`` is done.

    `pearl_edu.merge` renames its hidden partial folder to ``output_dir`` only at the very
    end, so an existing ``output_dir`` is a finished merge. A run interrupted before (a
    dead kernel) left the partial folder, and calling this again resumes it.
    """
    if Path(output_dir).is_dir():
        return None
    config = pearl_config(omnibeagle_dir, wizardmath_dir)
    return merge(config, output_dir, device=device, progress=progress)


def name_models_in_card(output_dir: str | Path, names: dict[str, str]) -> None:
    """Replace the parents' folder paths by their names (repo ids) in the model card.

    The merge records the references it was given, which after `fetch` are folders of
    the local cache; a card to share should name the models on the Hub instead.
    """
    for file_name in ("README.md", "mergekit_config.yml"):
        path = Path(output_dir) / file_name
        text = path.read_text(encoding="utf-8")
        for folder, name in names.items():
            text = text.replace(str(folder), name)
        path.write_text(text, encoding="utf-8", newline="\n")


# --------------------------------------------------------------------------------------
# 3. Verify
# --------------------------------------------------------------------------------------


def compare(
    merged_dir: str | Path,
    reference_dir: str | Path,
    *,
    progress: bool = True,
    scale_ulp: float | None = None,
    max_fraction: float | None = None,
) -> VerifyReport:
    """`pearl_edu.verify` of the merge against the reference, with a progress bar.

    ``scale_ulp`` and ``max_fraction`` are `verify`'s tolerance; to compare with the published
    Pearl-7B-slerp, pass ``**pearl_edu.verification.NUMPY_ERA_TOLERANCE``.
    """
    from tqdm import tqdm

    with tqdm(desc="verifying", unit="tensor", disable=not progress) as bar:

        def advance(done: int, total: int, name: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return verify(
            merged_dir,
            reference_dir,
            progress=advance,
            scale_ulp=scale_ulp,
            max_fraction=max_fraction,
        )


def explain(report: VerifyReport) -> str:
    """Say in words what a `VerifyReport` means for "is this the published model?"."""
    if report.only_in_a or report.only_in_b:
        return (
            f"Not the same model: {len(report.only_in_a)} tensors only in the merge and "
            f"{len(report.only_in_b)} only in the reference. The recipe or the parents differ."
        )
    if any(not t.same_layout for t in report.tensors):
        return (
            "Not the same model: some tensors differ in shape or dtype "
            "(see the table). Check the recipe's dtype and the parents' revisions."
        )
    if report.identical:
        return (
            f"Identical: all {len(report.tensors)} tensors, {report.num_elements:,} numbers, "
            "are bit for bit the same."
        )
    fraction = report.num_differing / report.num_elements
    differing = f"{report.num_differing:,} of {report.num_elements:,} numbers ({fraction:.3%})"
    if report.scale_ulp is not None and report.ok:
        return (
            f"The same math, rounded differently: {differing} differ, each by at most "
            f"{report.max_scale_ulp_diff:.2g} step of the number format at its tensor's "
            f"scale, and no tensor has more than {report.max_fraction_differing:.1%} of its "
            "numbers changed. Two implementations that take the same sums in another order "
            "(another mergekit, another CPU) round that many results the other way."
        )
    if report.scale_ulp is None and report.max_ulp_diff == 1:
        return (
            f"The same math, rounded differently: {differing} differ, each by one step of "
            "the number format (1 ULP). Two implementations that add the same float32 "
            "numbers in a different order round a few results the other way."
        )
    return (
        f"Different: {report.num_differing:,} numbers ({fraction:.3%}) differ, by up to "
        f"{report.max_abs_diff:.3g}. That is more than rounding: look for another revision "
        "of a parent, another t, or another dtype."
    )


# --------------------------------------------------------------------------------------
# 4. Use and share
# --------------------------------------------------------------------------------------


def generate(
    model_dir: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    device: str = "auto",
    seed: int = 0,
) -> list[str]:
    """Answer each prompt with the model, as Pearl-7B-slerp's model card does.

    The prompt goes through the tokenizer's chat template; sampling uses the card's
    settings (`SAMPLING`). Returns the new text only, one answer per prompt.
    """
    import torch
    import transformers

    from pearl_edu.devices import resolve_device

    model_dir = Path(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ModelError(f"{model_dir}: the tokenizer has no chat_template to format prompts")
    pipeline = transformers.pipeline(
        "text-generation",
        model=str(model_dir),
        tokenizer=tokenizer,
        dtype=torch.bfloat16,
        device=resolve_device(device),
    )
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        torch.manual_seed(seed)  # the same answer on a rerun
        outputs = pipeline(text, max_new_tokens=max_new_tokens, return_full_text=False, **SAMPLING)
        answers.append(outputs[0]["generated_text"])
    return answers


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the merged folder, model card included, to ``repo_id``; return its URL.

    Needs a network and a login (`hf auth login`); raises `HubError` saying so otherwise.
    """
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    if not (model_dir / "README.md").is_file():
        raise ModelError(f"{model_dir}: no README.md model card; push a folder made by merge")
    if not hub_reachable():
        raise HubError(f"{repo_id}: the Hugging Face Hub cannot be reached; push when online")
    api = HfApi()
    try:
        api.whoami()
    except Exception:  # no token, or a token the Hub refuses
        raise HubError(f"{repo_id}: not logged in to the Hub; run `hf auth login` first") from None
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(model_dir), repo_id=repo_id, commit_message="Upload Pearl-7B-slerp merge"
    )
    return f"https://huggingface.co/{repo_id}"


# --------------------------------------------------------------------------------------
# Offline stand-ins for the real models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandIns:
    """Folders of the two stand-in parents."""

    omnibeagle: Path
    wizardmath: Path


def make_stand_ins(root: str | Path, *, num_layers: int = 32, hidden_size: int = 64) -> StandIns:
    """Write small stand-ins of Pearl's parents under ``root``, with the real ones' layout.

    Both are fine-tuned siblings of one common parent (as the real ones both descend from
    Mistral-7B). The OmniBeagle stand-in is float16 safetensors in 2 shards; the WizardMath
    stand-in bfloat16 pickle ``.bin`` in 2 shards. Both have a tokenizer with a chat template.
    """
    import torch

    from pearl_edu.teaching.toy import make_tiny_model

    root = Path(root)
    common = make_tiny_model(
        root / "common-parent",
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        dtype=torch.float32,
    )
    siblings = {}
    for name, seed, dtype, fmt in (
        ("OmniBeagle-7B-stand-in", 1, torch.float16, "safetensors"),
        ("WizardMath-7B-V1.1-stand-in", 2, torch.bfloat16, "bin"),
    ):
        folder = make_tiny_model(
            root / name,
            base=common,
            noise=0.5,
            seed=seed,
            dtype=dtype,
            fmt=fmt,
            shard_count=2,
            with_tokenizer=True,
        )
        add_chat_template(folder)
        siblings[name] = folder
    return StandIns(*siblings.values())


def add_chat_template(model_dir: str | Path, template: str = MISTRAL_CHAT_TEMPLATE) -> None:
    """Record a chat template in ``tokenizer_config.json``, where transformers reads it."""
    path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8", newline="\n")


def mergekit_merge(config_yaml: str, output_dir: str | Path) -> Path:
    """Merge with mergekit's own Python API, offline, on the CPU (needs mergekit installed).

    mergekit is quiet: no progress bars, and no transformers warnings. ``lazy_unpickle=False`` makes mergekit read ``.bin`` shards with
    ``torch.load(..., weights_only=True)``, which runs no code from the pickle.
    """
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        raise ModelError("mergekit is not installed: pip install mergekit") from None

    from transformers.utils import logging as transformers_logging

    config = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False)
    # mergekit reads the parents' configs through transformers, which warns that the
    # `torch_dtype` key they carry (for older loaders) is deprecated: noise for a reader.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        run_merge(config, str(output_dir), options=options)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return Path(output_dir)
