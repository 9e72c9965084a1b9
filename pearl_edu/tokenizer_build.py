"""The output vocabulary of a merge, and the tokenizer files written beside the weights.

mergekit 0.1.5 builds an output tokenizer when the config names ``tokenizer_source`` or a
``tokenizer:`` section (whose ``source`` defaults to ``union``):

- ``base``: the base model's tokenizer (``base_model``, else the first model), stripped of
  the tokens whose id is past the model's ``vocab_size`` (a padded embedding matrix);
- a model: that model's tokenizer, as it is;
- ``union``: the base's tokenizer, plus every token of the other models that it lacks, in
  the order the models are listed (regular tokens first, then the added tokens).

The tokens named under ``tokenizer.tokens`` are added when missing. For each model, its
**permutation** says, for every output token id, which row of that model's embeddings
holds it, or -1 when the model lacks the token; `pearl_edu.vocabulary` moves the rows.
Without a tokenizer option the donor's tokenizer files are copied as they are
(`write_tokenizer_files`). The files are written by ``transformers``' ``save_pretrained``,
as mergekit writes them, with the ``chat_template`` the config asks for
(`chat_template_text`).

Where mergekit's choice depends on the order of a Python set (the base when none is given,
the order of the union's models), pearl_edu takes the order of the config.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pearl_edu.config import MergeConfig
from pearl_edu.errors import ConfigError, ModelError, PearlEduWarning

# The files a donor's tokenizer is copied from (mergekit's _copy_tokenizer), when it has a
# tokenizer_config.json and a tokenizer.json or tokenizer.model; otherwise it is loaded
# and saved again.
COPIED_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Any of these says that a folder has a tokenizer at all.
TOKENIZER_MARKERS = (*COPIED_FILES, "vocab.json", "vocab.txt")
# Where pearl_edu's own templates for mergekit's template names live.
TEMPLATE_PACKAGE = "pearl_edu.data.chat_templates"


class TokenizerWarning(PearlEduWarning):
    """A tokenizer could not be read or written as asked; the weights are merged all the same."""


@dataclass
class OutputVocabulary:
    """The output tokenizer and, per model, where its rows go.

    ``permutations[model][i]`` is the row of ``model``'s embeddings for output token ``i``
    (-1: the model lacks it); ``original_vocabs[model]`` is the model's own vocabulary
    (token -> id); ``rows`` is the output's vocabulary size, padded to
    ``pad_to_multiple_of``.
    """

    tokenizer: Any  # a transformers tokenizer
    vocab: dict[str, int]
    permutations: dict[str, list[int]]
    original_vocabs: dict[str, dict[str, int]]
    rows: int


def tokenizer_source(config: MergeConfig) -> str | None:
    """``union``, ``base``, a model, or None when the config builds no tokenizer."""
    if config.tokenizer is not None:
        return config.tokenizer.source
    return config.tokenizer_source


def donor_model(config: MergeConfig) -> str:
    """The model whose tokenizer and config.json the output starts from (mergekit's donor)."""
    return config.base_model or config.slice_base(0) or config.models()[0]


def load_tokenizer(folder: Path, model: str) -> Any:
    """A model folder's (fast) tokenizer; `ModelError` naming the model when it has none."""
    transformers = needs_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as err:  # transformers raises many kinds for a folder it cannot read
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{model}: cannot load its tokenizer from {folder} ({reason})") from None


def needs_transformers() -> Any:
    """The ``transformers`` module, or a one-line `ConfigError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "tokenizer_source, tokenizer and chat_template need the transformers package: "
            "pip install 'pearl-edu[tokenizer]'"
        ) from None
    return transformers


def declared_vocab_size(header: Any) -> int | None:
    """``vocab_size`` from a model's config.json (or its ``text_config``), if it says."""
    config = getattr(header, "config", {}) or {}
    for source in (config, config.get("text_config") or {}):
        value = source.get("vocab_size") if isinstance(source, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def build_vocabulary(
    config: MergeConfig, headers: Mapping[str, Any], model_dirs: Mapping[str, Path]
) -> OutputVocabulary:
    """The output tokenizer and the permutations, as mergekit 0.1.5's build_tokenizer."""
    from pearl_edu.hub import resolve_model

    source = tokenizer_source(config)
    models = config.models()
    base = config.base_model or models[0]
    tokenizers = {base: stripped_tokenizer(load_tokenizer(model_dirs[base], base), headers[base])}
    for model in models:
        if model == base:
            continue
        try:
            tokenizers[model] = load_tokenizer(model_dirs[model], model)
        except ModelError as err:  # mergekit: assumed the same as the base's
            warnings.warn(f"{err}; taking it to be the base's", TokenizerWarning, 2)
    if source == "base":
        out = tokenizers[base]
    elif source == "union":
        out = union_tokenizer(base, tokenizers, headers)
    else:
        folder = model_dirs[source] if source in model_dirs else resolve_model(source)
        out = load_tokenizer(folder, source)
    tokens = config.tokenizer.tokens if config.tokenizer is not None else {}
    present = set(out.get_vocab())
    for token in tokens:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    vocab = out.get_vocab()
    original_vocabs = {model: tok.get_vocab() for model, tok in tokenizers.items()}
    permutations = {
        model: permutation(
            vocab,
            original_vocabs.get(model, original_vocabs[base]),
            declared_vocab_size(headers[model]),
        )
        for model in models
    }
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer is not None else None
    rows = len(vocab)
    if pad and rows % pad:
        rows += pad - rows % pad
    check_token_sources(config, original_vocabs)
    return OutputVocabulary(out, vocab, permutations, original_vocabs, rows)


def permutation(vocab: Mapping[str, int], own: Mapping[str, int], size: int | None) -> list[int]:
    """For each output id, the model's row of that token: -1 when it lacks it.

    A token whose id is past the model's ``vocab_size`` is a padding row: lacking too.
    """
    limit = size if size is not None else len(own)
    rows = [-1] * len(vocab)
    for token, new_id in vocab.items():
        old_id = own.get(token, -1)
        if new_id >= len(rows):
            raise ModelError(
                f"output tokenizer: token {token!r} has id {new_id}, past its "
                f"{len(rows)} tokens; its ids must be 0 to {len(rows) - 1}"
            )
        rows[new_id] = old_id if 0 <= old_id < limit else -1
    return rows


def stripped_tokenizer(tokenizer: Any, header: Any) -> Any:
    """The base's tokenizer without the tokens past its ``vocab_size`` (BPE only, as mergekit)."""
    size = declared_vocab_size(header) or len(tokenizer.get_vocab())
    unused = {token for token, index in tokenizer.get_vocab().items() if index >= size}
    if not unused:
        return tokenizer
    import tokenizers

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = data["model"]["type"]
    if kind != "BPE":
        raise ModelError(
            f"{header.path}: the tokenizer has {len(unused)} tokens past vocab_size={size}, "
            f"and only a BPE tokenizer can be cut to it (this one is {kind})"
        )
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}

    def keeps(merge: Any) -> bool:  # mergekit's rule, and not one that makes a cut token
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(token in unused for token in [*pair, "".join(pair)])

    data["model"]["merges"] = [merge for merge in data["model"]["merges"] if keeps(merge)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def union_tokenizer(base: str, tokenizers: Mapping[str, Any], headers: Mapping[str, Any]) -> Any:
    """The base's tokenizer, plus the tokens the other models have and it lacks.

    Regular tokens are added in the order of the models (base first), each model's by id;
    then every model's added tokens (special or not), the first settings seen of each. A
    token past a model's ``vocab_size`` is not taken from it. (mergekit takes each model's
    tokens in the order of its ``get_vocab()``, a hash map's, which changes from run to run;
    the order by id is one of those it may take.)
    """
    transformers = needs_transformers()
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tokenizer in tokenizers.items():
        limit = declared_vocab_size(headers[model]) or tokenizer.vocab_size
        for token, index in by_id(tokenizer.get_vocab()):
            if index < limit:
                regular.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < limit:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base's is left as it is
        tokenizers[base].save_pretrained(folder)
        out = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)
    base_vocab = tokenizers[base].get_vocab()
    for token in regular:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def by_id(vocab: Mapping[str, int]) -> list[tuple[str, int]]:
    """A vocabulary's ``(token, id)`` pairs in the order of their ids."""
    return sorted(vocab.items(), key=lambda item: item[1])


def check_token_sources(config: MergeConfig, original_vocabs: Mapping[str, Mapping]) -> None:
    """Refuse a ``tokens`` entry whose source is not a model of the merge, or lacks the token."""
    if config.tokenizer is None:
        return
    models = config.models()
    for token, entry in config.tokenizer.tokens.items():
        source = entry.source
        if source is None or source.kind == "zero":
            continue
        key = f"tokenizer.tokens.{token}.source"
        if source.model not in models:
            raise ConfigError(
                f"{config.source}: {key}: {source.model} is not a model of this merge "
                f"(expected one of {', '.join(models)})"
            )
        vocab = original_vocabs.get(source.model, {})
        if source.kind == "model_token" and source.token is not None and source.token not in vocab:
            raise ConfigError(
                f"{config.source}: {key}.token: {source.token!r} is not in the tokenizer of "
                f"{source.model}"
            )


# --------------------------------------------------------------------------------------
# The files written beside the weights
# --------------------------------------------------------------------------------------


def chat_template_text(config: MergeConfig, model_dirs: Mapping[str, Path]) -> str | None:
    """The Jinja text of ``chat_template``: a shipped name's, ``auto``'s choice, or as given.

    ``auto`` takes the template most of the models have (the first listed on a tie), as
    mergekit does, or None when none has one (the tokenizer's own is then kept).
    """
    value = config.chat_template
    if not value:
        return None
    if value == "auto":
        found = []
        for model in config.models():
            try:
                template = load_tokenizer(model_dirs[model], model).chat_template
            except ModelError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        shipped = resources.files(TEMPLATE_PACKAGE).joinpath(f"{value}.jinja")
        if shipped.is_file():
            return shipped.read_text(encoding="utf-8")
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"{config.source}: chat_template: {value!r} is not a known template")
    return value


def write_tokenizer_files(
    folder: Path,
    config: MergeConfig,
    model_dirs: Mapping[str, Path],
    vocabulary: OutputVocabulary | None,
    copy_tokenizer: bool,
) -> None:
    """Write the output's tokenizer, as mergekit 0.1.5's run_merge does.

    A built tokenizer (``tokenizer_source`` or ``tokenizer:``) is always written. Otherwise,
    with ``copy_tokenizer``, the donor's: its files copied as they are, or, when a chat
    template is asked for (or the donor has no tokenizer.json nor tokenizer.model), loaded
    and saved again with that template. A donor without any tokenizer file gives none.
    """
    template = None
    if vocabulary is not None:
        template = chat_template_text(config, model_dirs)
        save_tokenizer(vocabulary.tokenizer, template, folder)
        return
    if not copy_tokenizer:
        if config.chat_template:
            warnings.warn(
                "chat_template: not written, as no tokenizer is (--no-copy-tokenizer)",
                TokenizerWarning,
                2,
            )
        return
    donor = donor_model(config)
    donor_dir = model_dirs[donor]
    if not any((donor_dir / name).is_file() for name in TOKENIZER_MARKERS):
        return
    whole = (donor_dir / "tokenizer.json").is_file() or (donor_dir / "tokenizer.model").is_file()
    if not config.chat_template and whole and (donor_dir / "tokenizer_config.json").is_file():
        for name in COPIED_FILES:
            if (donor_dir / name).is_file():
                shutil.copyfile(donor_dir / name, folder / name)
        return
    try:
        tokenizer = load_tokenizer(donor_dir, donor)
    except ModelError as err:
        warnings.warn(f"{err}; the output has no tokenizer", TokenizerWarning, 2)
        return
    save_tokenizer(tokenizer, chat_template_text(config, model_dirs), folder)


def save_tokenizer(tokenizer: Any, template: str | None, folder: Path) -> None:
    """``save_pretrained`` into ``folder``, with ``template`` as its chat template if given."""
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
