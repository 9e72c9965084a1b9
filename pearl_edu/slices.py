"""Which layers of which models a config merges: the ``slices:``, ``models:`` and ``modules:`` forms.

``slices:`` lists output slices; each has ``sources`` (``model`` + half-open
``layer_range: [a, b]``) and optionally its own ``base_model`` and ``parameters``.
``models:`` (instead of ``slices:``) means one slice over all layers of every model: a
single slice whose sources have ``layer_range=None``; a ``base_model`` that it does not list
is added as its last model.

``modules:`` is the form mergekit 0.1.5 normalises the other two into (its
``MergePlanner.normalize_config``): ``modules: {NAME: {slices | models, parameters}}``, one
entry per module of the architecture. A decoder-only model has one module, which mergekit
names ``default``; its ``slices`` or ``models`` are the config's, and its ``parameters`` come
between a slice's and the top-level ones in precedence (mergekit's
``ConfigReader.parameter_sources``). pearl_edu merges single-module models, so it refuses
several modules, or a module of another name, in one line naming the key.

A model reference may carry a LoRA adapter, ``model+adapter`` (mergekit's
``ModelReference``); it is kept as written here and split by `pearl_edu.adapters`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pearl_edu.config_checks import (
    model_ref,
    optional_model_ref,
    reject_unknown_keys,
    require_mapping,
)
from pearl_edu.errors import ConfigError
from pearl_edu.parameters import ParamSpec, read_parameters
from pearl_edu.yaml_reader import key_text, short

SLICE_KEYS = frozenset({"sources", "base_model", "parameters"})
MODULE_KEYS = frozenset({"slices", "models", "parameters"})
# The name mergekit gives the one module of a single-module architecture.
DEFAULT_MODULE = "default"
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})
MODEL_KEYS = frozenset({"model", "parameters"})
MAX_LAYERS = 10_000  # layer indices, and output layers in all (the largest models have ~100)


@dataclass(frozen=True)
class SourceConfig:
    """One input of a slice: a model and the half-open range of its layers to use.

    ``layer_range=None`` means all layers of the model (the ``models:`` form).
    """

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, ParamSpec] = field(default_factory=dict)

    @property
    def num_layers(self) -> int | None:
        """How many layers this source contributes, when the YAML says so."""
        return None if self.layer_range is None else self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class SliceConfig:
    """One output slice: its sources and the base model and parameters it overrides."""

    sources: tuple[SourceConfig, ...]
    base_model: str | None = None
    parameters: dict[str, ParamSpec] = field(default_factory=dict)

    def models(self) -> list[str]:
        """The models of this slice, in order."""
        return [source.model for source in self.sources]


@dataclass(frozen=True)
class MergeInputs:
    """What a config merges, whichever form it is written in.

    ``slices`` are the output slices (the ``models:`` form's one slice with the base model
    added when it is not listed); ``module_parameters`` are the ``parameters`` of the one
    module in the ``modules:`` form (empty otherwise).
    """

    slices: tuple[SliceConfig, ...]
    module_parameters: dict[str, ParamSpec] = field(default_factory=dict)


def read_inputs(raw: Mapping[str, Any], where: str, base_model: str | None) -> MergeInputs:
    """The slices of a config in the ``slices:``, ``models:`` or ``modules:`` form."""
    given = [form for form in ("slices", "models", "modules") if raw.get(form) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"{where}: expected exactly one of 'slices' or 'models' (or 'modules'), "
            f"got {', '.join(given) if given else 'none'}"
        )
    if given == ["modules"]:
        return _modules_form(raw["modules"], where, base_model)
    return MergeInputs(_slices_or_models(raw, where, "", base_model))


def _modules_form(modules: Any, where: str, base_model: str | None) -> MergeInputs:
    """``modules: {default: {slices | models, parameters}}``: a single-module model's inputs."""
    require_mapping(modules, where, "modules")
    names = list(modules)
    if len(names) != 1:
        shown = ", ".join(map(key_text, names)) if names else "none"
        raise ConfigError(
            f"{where}: modules: pearl_edu merges single-module models; expected one module "
            f"({DEFAULT_MODULE}), got {len(names)} ({shown})"
        )
    name = names[0]
    key = f"modules.{key_text(name)}"
    if name != DEFAULT_MODULE:
        raise ConfigError(
            f"{where}: {key}: unknown module; the one module of a single-module model is "
            f"named {DEFAULT_MODULE!r} (as mergekit names it)"
        )
    module = modules[name]
    require_mapping(module, where, key)
    reject_unknown_keys(
        module, MODULE_KEYS, where, key, required=(frozenset({"slices", "models"}),)
    )
    given = [form for form in ("slices", "models") if module.get(form)]
    if len(given) != 1:
        raise ConfigError(
            f"{where}: {key}: expected exactly one of 'slices' or 'models' (as mergekit), "
            f"got {', '.join(given) if given else 'none'}"
        )
    return MergeInputs(
        slices=_slices_or_models(module, where, f"{key}.", base_model),
        module_parameters=read_parameters(module.get("parameters"), where, f"{key}.parameters"),
    )


def _slices_or_models(
    raw: Mapping[str, Any], where: str, prefix: str, base_model: str | None
) -> tuple[SliceConfig, ...]:
    """The slices of the ``slices:`` or ``models:`` key of ``raw`` (one of them is there)."""
    if raw.get("models") is not None:
        return (with_base_model(_models_form(raw["models"], where, prefix), base_model),)
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}: {prefix}slices: expected a non-empty list of slices")
    parsed = tuple(_slice(entry, where, f"{prefix}slices[{i}]") for i, entry in enumerate(slices))
    total = sum(sl.sources[0].num_layers or 0 for sl in parsed)
    if total > MAX_LAYERS:
        raise ConfigError(
            f"{where}: {prefix}slices: {total} output layers in all, more than {MAX_LAYERS}; no model "
            "has so many"
        )
    return parsed


def _models_form(models: Any, where: str, prefix: str = "") -> SliceConfig:
    """``models: [{model, parameters}, ...]``: one slice over all layers of each model."""
    if not isinstance(models, list) or not models:
        raise ConfigError(
            f"{where}: {prefix}models: expected a non-empty list of {{model: ...}} entries"
        )
    sources = []
    for i, entry in enumerate(models):
        key = f"{prefix}models[{i}]"
        if isinstance(entry, str):  # mergekit also accepts a bare model reference
            entry = {"model": entry}
        require_mapping(entry, where, key)
        reject_unknown_keys(entry, MODEL_KEYS, where, key, required=(frozenset({"model"}),))
        sources.append(
            SourceConfig(
                model=model_ref(entry, "model", where, f"{key}.model"),
                layer_range=None,
                parameters=read_parameters(entry.get("parameters"), where, f"{key}.parameters"),
            )
        )
    return SliceConfig(sources=tuple(sources))


def with_base_model(models_slice: SliceConfig, base_model: str | None) -> SliceConfig:
    """The ``models:`` slice with the base model added last when it is not listed (mergekit)."""
    if base_model is None or base_model in models_slice.models():
        return models_slice
    base = SourceConfig(model=base_model, layer_range=None)
    return dataclasses.replace(models_slice, sources=(*models_slice.sources, base))


def _slice(entry: Any, where: str, key: str) -> SliceConfig:
    """One entry of ``slices:``, with its layer ranges checked."""
    require_mapping(entry, where, key)
    reject_unknown_keys(entry, SLICE_KEYS, where, key, required=(frozenset({"sources"}),))
    sources_raw = entry.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise ConfigError(f"{where}: {key}.sources: expected a non-empty list of sources")
    sources = tuple(_source(src, where, f"{key}.sources[{j}]") for j, src in enumerate(sources_raw))
    lengths = [source.num_layers for source in sources]
    if len(set(lengths)) > 1:
        ranges = ", ".join(f"{s.model} {list(s.layer_range or ())}" for s in sources)
        raise ConfigError(
            f"{where}: {key}.sources: every source of a slice must span the same number "
            f"of layers; got {lengths} ({ranges})"
        )
    return SliceConfig(
        sources=sources,
        base_model=optional_model_ref(entry, "base_model", where, f"{key}.base_model"),
        parameters=read_parameters(entry.get("parameters"), where, f"{key}.parameters"),
    )


def _source(entry: Any, where: str, key: str) -> SourceConfig:
    """One source of a slice: ``{model, layer_range: [a, b], parameters}``."""
    require_mapping(entry, where, key)
    reject_unknown_keys(
        entry, SOURCE_KEYS, where, key, required=(frozenset({"model"}), frozenset({"layer_range"}))
    )
    return SourceConfig(
        model=model_ref(entry, "model", where, f"{key}.model"),
        layer_range=_layer_range(entry.get("layer_range"), where, f"{key}.layer_range"),
        parameters=read_parameters(entry.get("parameters"), where, f"{key}.parameters"),
    )


def _layer_range(value: Any, where: str, key: str) -> tuple[int, int]:
    """A half-open ``[start, end]`` with ``0 <= start < end``."""
    if value is None:
        raise ConfigError(f"{where}: {key}: missing; expected [start, end] (half-open)")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{where}: {key}: expected two integers [start, end], got {short(value)}")
    start, end = value
    if start < 0 or end < 0:
        raise ConfigError(f"{where}: {key}: layer indices must not be negative, got {value}")
    if start >= end:
        raise ConfigError(
            f"{where}: {key}: expected start < end (half-open range), got {value}; "
            "did you reverse it?"
        )
    if end > MAX_LAYERS:
        raise ConfigError(
            f"{where}: {key}: layer {end} is beyond {MAX_LAYERS}; no model has so many layers"
        )
    return (start, end)
