"""A merge method's parameters, read off its function's signature (`pearl_edu.methods`).

Keyword-only arguments are parameters: a plain ``float``, ``int`` or ``bool`` is one value
per output tensor; ``PerNonBase[float]`` one value per model but the base; ``PerInput[float]``
one per input, the base too. A default makes a parameter optional (``None``: "not given",
for a per-input one), and ``lambda_`` is the config's ``lambda``, a Python keyword.
"""

from __future__ import annotations

import inspect
import keyword
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

import torch

T = TypeVar("T")
# Markers of per-input parameters, in a parameter's annotation (see the module's docstring).
PER_INPUT, PER_NON_BASE = "per input", "per model but the base"
PerInput = Annotated[Sequence[T], PER_INPUT]
PerNonBase = Annotated[Sequence[T], PER_NON_BASE]


def read_parameters(
    function: Callable[..., torch.Tensor],
) -> tuple[dict, dict, dict, frozenset, dict]:
    """A method function's parameters: shared and per-input defaults, types, scopes."""
    hints = typing.get_type_hints(function, include_extras=True)
    shared: dict[str, float | None] = {}
    per_input: dict[str, float | None] = {}
    types: dict[str, type] = {}
    optional: set[str] = set()
    scopes: dict[str, str] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints[parameter.name]
        name = config_name(parameter.name)
        given = parameter.default is not inspect.Parameter.empty
        default = None if not given or parameter.default is None else float(parameter.default)
        if typing.get_origin(hint) is Annotated:
            sequence, scope = typing.get_args(hint)[:2]
            hint = typing.get_args(sequence)[0]
            scopes[name] = scope
            per_input[name] = default
            if given and parameter.default is None:
                optional.add(name)
        else:
            shared[name] = default
        kinds = [k for k in (bool, int, float) if k is hint or k in typing.get_args(hint)]
        if not kinds:
            raise TypeError(f"{function.__name__}: {parameter.name}: expected bool, int or float")
        types[name] = kinds[0]
    return shared, per_input, types, frozenset(optional), scopes


def config_name(argument: str) -> str:
    """A parameter's name in configs: ``lambda_`` is ``lambda`` (a Python keyword)."""
    return argument[:-1] if keyword.iskeyword(argument[:-1]) else argument


def argument_name(name: str) -> str:
    """A config parameter's name as a function's argument: ``lambda`` is ``lambda_``."""
    return f"{name}_" if keyword.iskeyword(name) else name
