"""What the merge method asks of a config: model counts, a base model, parameters.

Checked slice by slice once the config is read (`pearl_edu.config.parse_config`), from what
`pearl_edu.methods.METHODS` says of the method, so that a config that cannot be merged is
refused, in one line naming the key, before any model is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pearl_edu.errors import ConfigError
from pearl_edu.methods import METHODS
from pearl_edu.yaml_reader import short

if TYPE_CHECKING:
    from pearl_edu.config import MergeConfig


def check_method_requirements(config: MergeConfig) -> None:
    """Check model counts, the base model and the required parameters, slice by slice."""
    method = METHODS[config.merge_method]
    where, name = config.source, config.merge_method
    for i, sl in enumerate(config.slices):
        key = f"slices[{i}]" if "slices" in config.raw else "models"
        count = len(sl.sources)
        if count < method.min_models or (method.max_models and count > method.max_models):
            expected = _count_words(method.min_models, method.max_models)
            added = (
                f", counting base_model {config.base_model}, which is added because it is "
                "not listed"
                if key == "models" and _base_was_added(config)
                else ""
            )
            raise ConfigError(f"{where}: {key}: {name} needs {expected}; got {count}{added}")
        if method.needs_base or (method.optional_base and config.slice_base(i) is not None):
            _check_base(config, i, key)
        _check_non_base_count(config, i, key)
        for param in method.required_parameters():
            if param not in sl.parameters and param not in config.parameters:
                raise ConfigError(
                    f"{where}: parameters.{param}: missing; {name} needs it "
                    f"(for example 'parameters: {{{param}: 0.5}}')"
                )
        _check_input_parameters(config, i, key)


def _check_non_base_count(config: MergeConfig, slice_index: int, key: str) -> None:
    """How many models besides the base, for methods that count them (nuslerp: exactly 2)."""
    method = METHODS[config.merge_method]
    low, high = method.min_non_base, method.max_non_base
    models = config.slices[slice_index].models()
    count = len(models) - (config.slice_base(slice_index) in models)
    if count < low or (high is not None and count > high):
        raise ConfigError(
            f"{config.source}: {key}: {config.merge_method} needs {_count_words(low, high)} "
            f"besides the base model; got {count}"
        )


def _base_was_added(config: MergeConfig) -> bool:
    """Whether the ``models:`` list leaves out ``base_model`` (so the base was added)."""
    listed = [e if isinstance(e, str) else e.get("model") for e in config.raw.get("models", [])]
    return config.base_model is not None and config.base_model not in listed


def _check_input_parameters(config: MergeConfig, slice_index: int, key: str) -> None:
    """Every input that takes per-model parameters must be given the required ones."""
    method = METHODS[config.merge_method]
    sl = config.slices[slice_index]
    base = config.slice_base(slice_index)
    for j, source in enumerate(sl.sources):
        if source.model == base and not method.base_has_input_parameters:
            continue
        for param in method.required_input_parameters():
            scopes = (source.parameters, sl.parameters, config.parameters)
            if not any(param in scope for scope in scopes):
                where_key = f"{key}[{j}]" if key == "models" else f"{key}.sources[{j}]"
                raise ConfigError(
                    f"{config.source}: {where_key}.parameters.{param}: missing for "
                    f"{source.model}; {config.merge_method} needs a {param} for each model "
                    f"(for example 'parameters: {{{param}: 0.5}}')"
                )


def _check_base(config: MergeConfig, slice_index: int, key: str) -> None:
    """The slice's base model must exist and be one of its sources."""
    where, name = config.source, config.merge_method
    base = config.slice_base(slice_index)
    models = config.slices[slice_index].models()
    if base is None:
        raise ConfigError(
            f"{where}: base_model: missing; {name} needs one of {models} as base_model"
            + (" (t = 0)" if name == "slerp" else "")
        )
    if base not in models:
        raise ConfigError(
            f"{where}: base_model: {short(base)} is not among the models of {key} ({', '.join(models)})"
        )


def _count_words(low: int, high: int | None) -> str:
    """'exactly 2 models', 'at least 2 models' or '2 to 4 models'."""
    if high == low:
        return f"exactly {low} model{'s' if low != 1 else ''}"
    if high is None:
        return f"at least {low} model{'s' if low != 1 else ''}"
    return f"{low} to {high} models"
