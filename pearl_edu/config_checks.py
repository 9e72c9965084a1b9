"""The small checks that every part of a config shares: a mapping, known keys, a model.

Each failure is a one-line :class:`~pearl_edu.errors.ConfigError` naming the file
(``where``) and the key, as every message of `pearl_edu.config` does.

Unknown keys follow mergekit 0.1.5, whose config classes are pydantic models with
pydantic's default ``extra="ignore"``: a key it does not know is dropped at every level,
and a misspelling is refused only when it leaves a required key missing (``merge_metod``,
``layer_rnage``, ``valeu``). pearl_edu does the same, but says so: an ignored key is an
:class:`~pearl_edu.errors.UnknownKeyWarning`, one line naming the file and the key, and in
strict mode (``--strict``, ``load_config(..., strict=True)``) a `ConfigError`. A misspelling
that leaves a required key missing is refused under the misspelled name.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from pearl_edu.errors import ConfigError, UnknownKeyWarning
from pearl_edu.yaml_reader import key_text, short

# Whether unknown keys are refused rather than warned about, for the config being read
# (set by `strict_keys` around one `pearl_edu.config.parse_config`).
_STRICT: ContextVar[bool] = ContextVar("pearl_edu_strict_keys", default=False)

MAX_MODEL_REF_LENGTH = 4096  # a model reference: a repo id or a path (PATH_MAX)


def require_mapping(value: Any, where: str, key: str) -> None:
    """Refuse a value that is not a mapping (where the key's entries are expected)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__}")


@contextlib.contextmanager
def strict_keys(strict: bool) -> Iterator[None]:
    """Within the block, unknown keys are refused (``strict``) or warned about."""
    token = _STRICT.set(strict)
    try:
        yield
    finally:
        _STRICT.reset(token)


def reject_unknown_keys(
    entry: Mapping[str, Any],
    known: frozenset[str],
    where: str,
    key: str,
    *,
    required: tuple[frozenset[str], ...] = (),
) -> None:
    """Catch typos such as ``parameter:``, which mergekit silently ignores.

    An unknown key is refused when the config is read strictly, or when one of the
    ``required`` groups (any one of its keys must be there) is missing, so that mergekit
    refuses it too; otherwise it is an `UnknownKeyWarning` and is ignored, as in mergekit.
    """
    unknown = [k for k in entry if k not in known]
    if not unknown:
        return
    prefix = f"{key}." if key else ""
    named = f"{where}: {prefix}{key_text(unknown[0])}: unknown key"
    expected = f"expected one of {', '.join(sorted(known))}"
    missing = [group for group in required if not any(k in entry for k in group)]
    if missing:
        needed = " or ".join(sorted(missing[0]))
        raise ConfigError(f"{named}; {expected} ({needed} is missing)")
    if _STRICT.get():
        raise ConfigError(f"{named}; {expected} (refused by --strict; mergekit ignores it)")
    warnings.warn(
        f"{named}, ignored as mergekit ignores it; {expected} (--strict refuses it)",
        UnknownKeyWarning,
        stacklevel=2,
    )


def model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str:
    """A model reference (HF repo id or local folder, optionally ``+adapter``), a string."""
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
    # mergekit's ModelReference: "model" or "model+adapter" (a LoRA, `pearl_edu.adapters`).
    parts = value.split("+")
    if len(parts) > 2 or not all(part.strip() for part in parts):
        raise ConfigError(
            f"{where}: {key}: expected a model, or a model and a LoRA adapter as "
            f"model+adapter (one '+'), got {short(value)}"
        )
    return value


def optional_model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str | None:
    """Like :func:`model_ref`, but the key may be absent."""
    return None if entry.get(name) is None else model_ref(entry, name, where, key)
