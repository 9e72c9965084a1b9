"""Errors that `pearl_edu` raises for bad input.

Every message is one line that names the file, key or tensor at fault and says what was
expected, so that the CLI can print it as it is, without a traceback.
"""

from __future__ import annotations


class PearlEduError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ConfigError(PearlEduError):
    """A merge config (YAML) is malformed or asks for something impossible."""


class ModelError(PearlEduError):
    """A model folder or weight file is missing, truncated, unsafe or of the wrong shape."""


class OutputError(PearlEduError):
    """The output folder cannot be written as asked (exists, or lies inside an input)."""


class HubError(PearlEduError):
    """A Hugging Face repository could not be reached or resolved."""


class PearlEduWarning(UserWarning):
    """Base class of pearl_edu's warnings: one line each, printed by the CLI without source."""


class UnknownKeyWarning(PearlEduWarning):
    """A config key that mergekit ignores (and so does pearl_edu, unless ``strict``)."""
