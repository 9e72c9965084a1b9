"""The tokenizer options of a config, validated as mergekit 0.1.5 reads them.

``tokenizer_source`` (``union``, ``base`` or a model), or the ``tokenizer:`` mapping
(``source``, ``tokens``, ``pad_to_multiple_of``), and ``chat_template`` (``auto``, a
template mergekit ships, or Jinja text), checked here key by key so that a config means
what it means in mergekit. They are applied as mergekit applies them: the output
vocabulary and tokenizer files by `pearl_edu.tokenizer_build`, the embeddings and
``lm_head`` moved into that vocabulary (the rows a model lacks filled) by
`pearl_edu.vocabulary`, and the chat template written with the tokenizer. The templates
named here ship with pearl_edu (``pearl_edu/data/chat_templates``), written to render as
mergekit's do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pearl_edu.config_checks import model_ref, reject_unknown_keys, require_mapping
from pearl_edu.errors import ConfigError
from pearl_edu.yaml_reader import key_text, short

# mergekit 0.1.5's TokenizerConfig and TokenEmbeddingConfig (mergekit/tokenizer/config.py).
TOKENIZER_KEYS = frozenset({"source", "tokens", "pad_to_multiple_of"})
TOKEN_KEYS = frozenset({"source", "force"})
TOKEN_SOURCE_KEYS = {  # by kind: ModelTokenEmbedding and ZeroEmbedding
    "model_token": frozenset({"kind", "model", "token_id", "token"}),
    "zero": frozenset({"kind"}),
}
# The tokenizer sources that are not a model: mergekit's Literal["union"] and ["base"].
TOKENIZER_SOURCES = ("union", "base")
# The chat templates shipped with mergekit 0.1.5 (mergekit/_data/chat_templates/*.jinja);
# "auto" takes the most common template of the input models.
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
# mergekit's _set_chat_template takes any other text for Jinja when it is at least this
# long and has a "{"; shorter text, or text without "{", is refused.
MIN_JINJA_LENGTH = 20


@dataclass(frozen=True)
class TokenSource:
    """Where the embedding of an added token comes from (mergekit's ``tokens.X.source``).

    ``kind`` is ``"model"`` (the same token in ``model``), ``"model_token"`` (token
    ``token_id`` or text ``token`` of ``model``) or ``"zero"`` (a zero vector).
    """

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenEmbedding:
    """One entry of ``tokenizer.tokens``: its source and whether to ``force`` it."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """The ``tokenizer:`` mapping (mergekit 0.1.5's TokenizerConfig).

    ``source`` is ``"union"`` (the default), ``"base"`` or a model reference.
    """

    source: str = "union"
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def read_tokenizer_options(
    raw: Mapping[str, Any], where: str
) -> tuple[str | None, TokenizerConfig | None]:
    """``tokenizer_source`` and ``tokenizer``, at most one of them (as in mergekit)."""
    source = raw.get("tokenizer_source")
    tokenizer = raw.get("tokenizer")
    if source is not None and tokenizer is not None:
        raise ConfigError(
            f"{where}: tokenizer_source: give either tokenizer_source or tokenizer, not both "
            "(mergekit refuses both; put the source in tokenizer.source)"
        )
    if source is not None:
        source = _tokenizer_source(source, where, "tokenizer_source")
    if tokenizer is not None:
        tokenizer = _tokenizer(tokenizer, where)
    return source, tokenizer


def _tokenizer_source(value: Any, where: str, key: str) -> str:
    """``union``, ``base`` or a model reference (mergekit's Literal or ModelReference)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}: {key}: expected {' or '.join(TOKENIZER_SOURCES)} or a model (repo id or "
            f"folder), got {short(value)}"
        )
    return model_ref({key: value}, key, where, key)


def _tokenizer(value: Any, where: str) -> TokenizerConfig:
    """The ``tokenizer:`` mapping: ``source``, ``tokens`` and ``pad_to_multiple_of``."""
    require_mapping(value, where, "tokenizer")
    reject_unknown_keys(value, TOKENIZER_KEYS, where, "tokenizer")
    source = value.get("source")
    source = "union" if source is None else _tokenizer_source(source, where, "tokenizer.source")
    tokens_raw = value.get("tokens")
    if tokens_raw is not None:
        require_mapping(tokens_raw, where, "tokenizer.tokens")
    tokens = {
        token: _token_embedding(token, entry, where, f"tokenizer.tokens.{key_text(token)}")
        for token, entry in (tokens_raw or {}).items()
    }
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(
            f"{where}: tokenizer.pad_to_multiple_of: expected a positive integer (such as "
            f"64), got {short(pad)}"
        )
    return TokenizerConfig(source=source, tokens=tokens, pad_to_multiple_of=pad)


def _token_embedding(token: str, entry: Any, where: str, key: str) -> TokenEmbedding:
    """One ``tokens`` entry: ``{source, force}`` (mergekit's TokenEmbeddingConfig)."""
    if not token:
        raise ConfigError(f"{where}: {key}: expected a non-empty token")
    require_mapping(entry, where, key)
    reject_unknown_keys(entry, TOKEN_KEYS, where, key)
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}: {key}.force: expected true or false, got {short(force)}")
    source = entry.get("source")
    if source is not None:
        source = _token_source(source, where, f"{key}.source")
    return TokenEmbedding(source=source, force=force)


def _token_source(value: Any, where: str, key: str) -> TokenSource:
    """A model (the same token there), ``{kind: model_token, ...}`` or ``{kind: zero}``."""
    if isinstance(value, str):
        return TokenSource(kind="model", model=model_ref({key: value}, key, where, key))
    kinds = " or ".join(TOKEN_SOURCE_KEYS)
    if not isinstance(value, dict) or value.get("kind") not in TOKEN_SOURCE_KEYS:
        got = value.get("kind") if isinstance(value, dict) else value
        raise ConfigError(
            f"{where}: {key}: expected a model, or a mapping with kind {kinds}, got {short(got)}"
        )
    kind = value["kind"]
    reject_unknown_keys(value, TOKEN_SOURCE_KEYS[kind], where, key)
    if kind == "zero":
        return TokenSource(kind="zero")
    model = model_ref(value, "model", where, f"{key}.model")
    token_id, token = value.get("token_id"), value.get("token")
    if (token_id is None) == (token is None):
        raise ConfigError(f"{where}: {key}: give either token_id or token (one of them)")
    if token_id is not None and (
        not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0
    ):
        raise ConfigError(
            f"{where}: {key}.token_id: expected a token number (0 or more), got {short(token_id)}"
        )
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigError(f"{where}: {key}.token: expected a non-empty string, got {short(token)}")
    return TokenSource(kind="model_token", model=model, token_id=token_id, token=token)


def read_chat_template(raw: Mapping[str, Any], where: str) -> str | None:
    """``chat_template``: ``auto``, a template mergekit ships, or Jinja text.

    mergekit 0.1.5 checks it when it writes the tokenizer, at the end of a merge; an empty
    one means none.
    """
    value = raw.get("chat_template")
    if value is None or value == "":
        return None
    names = ", ".join(CHAT_TEMPLATE_NAMES)
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: chat_template: expected auto, a template name ({names}) or Jinja "
            f"text, got {short(value)}"
        )
    if (
        value != "auto"
        and value not in CHAT_TEMPLATE_NAMES
        and (len(value) < MIN_JINJA_LENGTH or "{" not in value)
    ):
        raise ConfigError(
            f"{where}: chat_template: {short(value)} is neither auto, a template name "
            f"({names}) nor Jinja text (at least {MIN_JINJA_LENGTH} characters, with "
            "{{ ... }} or {% ... %})"
        )
    return value
