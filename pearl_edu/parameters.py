"""Parameters as a config writes them: numbers, gradients and ``{filter, value}`` rules.

``parameters`` (top level, per slice, per source or model) map a name such as ``t`` to a
number, a gradient (a list of numbers spread over the layers of a slice) or an ordered list
of ``{filter, value}`` entries, the first whose filter is a substring of the tensor name
winning, an entry without ``filter`` (or with ``"*"``) matching everything. All three are
read into a :class:`ParamSpec`; `pearl_edu.layer_schedule` says what they are worth at each
layer and tensor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pearl_edu.config_checks import reject_unknown_keys, require_mapping
from pearl_edu.errors import ConfigError
from pearl_edu.methods import METHODS, boolean_parameters
from pearl_edu.yaml_reader import key_text, short

# A filter of "*" matches every tensor in mergekit, like an entry without a filter.
MATCH_ALL = "*"
# Parameters that are fractions of a tensor's entries.
FRACTION_PARAMETERS = frozenset({"density"})
FILTER_KEYS = frozenset({"filter", "value"})

Number = float
Gradient = tuple[float, ...]


@dataclass(frozen=True)
class FilterRule:
    """One ``{filter, value}`` entry: a value (number or gradient) for matching tensors.

    ``filter=None`` matches every tensor (an entry without ``filter``, or ``"*"``).
    """

    filter: str | None
    value: Number | Gradient

    def matches(self, tensor_name: str) -> bool:
        """Whether this rule applies to ``tensor_name`` (case-sensitive substring)."""
        return self.filter is None or (bool(tensor_name) and self.filter in tensor_name)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter as written in the YAML: a number, a gradient, or filter rules.

    All three forms are stored as an ordered tuple of rules: a number or a gradient is a
    single rule that matches every tensor. ``form`` remembers which form was written.
    """

    rules: tuple[FilterRule, ...]
    form: str  # "scalar", "gradient" or "filters"

    def rule_for(self, tensor_name: str) -> FilterRule | None:
        """The first rule whose filter matches ``tensor_name``, or None."""
        return next((rule for rule in self.rules if rule.matches(tensor_name)), None)

    def filters(self) -> list[str | None]:
        """The filters in order (None for a catch-all)."""
        return [rule.filter for rule in self.rules]


def read_parameters(value: Any, where: str, key: str) -> dict[str, ParamSpec]:
    """A ``parameters:`` mapping, each entry parsed into a :class:`ParamSpec`."""
    if value is None:
        return {}
    require_mapping(value, where, key)
    return {
        name: _param_spec(name, spec, where, f"{key}.{key_text(name)}")
        for name, spec in value.items()
    }


def _param_spec(name: str, value: Any, where: str, key: str) -> ParamSpec:
    """One parameter: a number, a gradient list, or a list of ``{filter, value}`` entries."""
    _check_parameter_name(name, where, key)
    if isinstance(value, dict):  # a single {filter, value} entry
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rules = tuple(_filter_rule(name, v, where, f"{key}[{i}]") for i, v in enumerate(value))
        return ParamSpec(rules=rules, form="filters")
    parsed = _value(name, value, where, key)
    form = "gradient" if isinstance(parsed, tuple) else "scalar"
    return ParamSpec(rules=(FilterRule(filter=None, value=parsed),), form=form)


def _check_parameter_name(name: str, where: str, key: str) -> None:
    """Catch a parameter that no merge method takes (a typo such as ``nuslerp_flaten``).

    mergekit ignores it, and merges as if it were not there. A parameter of another method
    (``t`` in a TIES config) is left alone, as mergekit leaves it.
    """
    known = sorted({p for m in METHODS.values() for p in (*m.parameters, *m.input_parameters)})
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {short(close[0])}?" if close else f"known: {', '.join(known)}"
        raise ConfigError(f"{where}: {key}: unknown parameter; {hint}")


def _filter_rule(name: str, entry: dict, where: str, key: str) -> FilterRule:
    """One ``{filter, value}`` entry; no filter (or ``"*"``) matches every tensor."""
    reject_unknown_keys(entry, FILTER_KEYS, where, key, required=(frozenset({"value"}),))
    if "value" not in entry:
        raise ConfigError(f"{where}: {key}: missing 'value' (a number or a list of numbers)")
    flt = entry.get("filter")
    if flt is not None and (not isinstance(flt, str) or not flt):
        raise ConfigError(f"{where}: {key}.filter: expected a non-empty string, got {short(flt)}")
    value = _value(name, entry["value"], where, f"{key}.value")
    return FilterRule(filter=None if flt in (None, MATCH_ALL) else flt, value=value)


def _value(name: str, value: Any, where: str, key: str) -> Number | Gradient:
    """A number, or a gradient (a non-empty list of numbers)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: {key}: expected a number or a non-empty list of numbers")
        return tuple(_number(name, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    return _number(name, value, where, key)


def _number(name: str, value: Any, where: str, key: str) -> float:
    """A finite number; booleans only for the parameters that are flags."""
    if isinstance(value, bool):
        if name in boolean_parameters():
            return float(value)
        raise ConfigError(f"{where}: {key}: expected a number, got {short(value)}")
    number = _finite_number(value, where, key)
    if name in boolean_parameters() and number not in (0.0, 1.0):
        raise ConfigError(f"{where}: {key}: expected true or false, got {short(value)}")
    if name in FRACTION_PARAMETERS and not 0.0 <= number <= 1.0:
        raise ConfigError(
            f"{where}: {key}: expected a fraction of entries to keep, from 0 to 1, got {short(value)}"
        )
    return number


def _finite_number(value: Any, where: str, key: str) -> float:
    """A finite int or float (or a string that reads as one, as YAML gives ``1e-3``)."""
    if isinstance(value, str):  # YAML reads 1e-3 as a string; mergekit accepts it
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}: expected a number, got {short(value)}") from None
    if (
        not isinstance(value, int | float)
        or value != value
        or value in (float("inf"), -float("inf"))
    ):
        raise ConfigError(f"{where}: {key}: expected a finite number, got {short(value)}")
    return float(value)
