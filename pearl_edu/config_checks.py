"""The small checks that every part of a config shares: a mapping, known keys, a model.

Each failure is a one-line :class:`~pearl_edu.errors.ConfigError` naming the file
(``where``) and the key, as every message of `pearl_edu.config` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pearl_edu.errors import ConfigError
from pearl_edu.yaml_reader import key_text, short

MAX_MODEL_REF_LENGTH = 4096  # a model reference: a repo id or a path (PATH_MAX)


def require_mapping(value: Any, where: str, key: str) -> None:
    """Refuse a value that is not a mapping (where the key's entries are expected)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__}")


def reject_unknown_keys(
    entry: Mapping[str, Any], known: frozenset[str], where: str, key: str
) -> None:
    """Catch typos such as ``parameter:`` that mergekit would silently ignore."""
    unknown = [k for k in entry if k not in known]
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(
            f"{where}: {prefix}{key_text(unknown[0])}: unknown key; expected one of "
            f"{', '.join(sorted(known))}"
        )


def model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str:
    """A model reference (HF repo id or local folder), which must be a non-empty string."""
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}: {key}: expected a model (repo id or folder), got {short(value)}"
        )
    if not value.isprintable() or len(value) > MAX_MODEL_REF_LENGTH:
        raise ConfigError(
            f"{where}: {key}: expected a model (repo id or folder) on one line, of at most "
            f"{MAX_MODEL_REF_LENGTH} characters, got {short(value)}"
        )
    return value


def optional_model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str | None:
    """Like :func:`model_ref`, but the key may be absent."""
    return None if entry.get(name) is None else model_ref(entry, name, where, key)
