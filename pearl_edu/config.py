"""Read a mergekit YAML config into a validated, typed description of the merge.

This is the first step of a merge (config -> plan -> read -> math -> write). Every mistake
in the YAML is reported here, as a one-line :class:`~pearl_edu.errors.ConfigError` naming
the file and the key, before a single weight is read.

The meaning is mergekit's:

- ``slices:`` lists output slices; each has ``sources`` (``model`` + half-open
  ``layer_range: [a, b]``) and optionally its own ``base_model`` and ``parameters``.
- ``models:`` (instead of ``slices:``) means one slice over all layers of every model; it
  becomes a single slice whose sources have ``layer_range=None``.
- ``parameters`` (top level, per slice, per source/model) map a name such as ``t`` to a
  number, a gradient (a list of numbers spread over the layers of a slice) or an ordered
  list of ``{filter, value}`` entries, the first whose filter is a substring of the tensor
  name winning, an entry without ``filter`` matching everything.
- Per-model parameters (``weight``, ``density``) are looked up for each input: first under
  its own entry in ``sources``/``models``, then the slice's ``parameters``, then the
  top-level ones. Shared parameters (``t``, ``normalize``, ``lambda``) ignore model entries.
- In the ``models:`` form, a ``base_model`` that is not listed is added as the last model.
- ``random_seed`` (or ``seed``), default 0, seeds the random methods (DARE).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pearl_edu.errors import ConfigError
from pearl_edu.methods import METHODS, known_methods
from pearl_edu.recipes import recipe_path

# The one table of dtype names in configs and config.json: mergekit's floating names
# (mergekit 0.1.5's `dtype_from_name`; `torch.` prefixed forms are accepted too) and the
# torch dtypes they mean. (mergekit also reads int64, which no merge can compute in.)
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# A filter of "*" matches every tensor in mergekit, like an entry without a filter.
MATCH_ALL = "*"
# Parameters that later methods take as booleans (stored as 1.0 / 0.0).
BOOLEAN_PARAMETERS = frozenset(
    {
        "normalize",
        "int8_mask",
        "rescale",
        "lambda_normalize",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "normalize_weights",
        "filter_wise",
    }
)

TOP_LEVEL_KEYS = frozenset(
    {
        "slices",
        "models",
        "merge_method",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        # Tokenizer and template options are accepted and left to the writer.
        "tokenizer_source",
        "tokenizer",
        "chat_template",
        "name",
        # The seed of random methods (DARE); mergekit takes it on the command line instead.
        "random_seed",
        "seed",
    }
)
SEED_KEYS = ("random_seed", "seed")
# Parameters that are fractions of a tensor's entries.
FRACTION_PARAMETERS = frozenset({"density"})
SLICE_KEYS = frozenset({"sources", "base_model", "parameters"})
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})
MODEL_KEYS = frozenset({"model", "parameters"})
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
class MergeConfig:
    """A validated merge config (see the module docstring for its meaning).

    ``source`` is where it came from (a file path, a recipe, or ``"<string>"``), used in
    error messages; ``raw`` is the YAML as parsed, kept for the model card.
    """

    merge_method: str
    slices: tuple[SliceConfig, ...]
    base_model: str | None
    parameters: dict[str, ParamSpec]
    dtype: str | None
    out_dtype: str | None
    source: str
    raw: dict
    random_seed: int = 0

    def models(self) -> list[str]:
        """Distinct model references, in order of first appearance."""
        refs = [source.model for sl in self.slices for source in sl.sources]
        refs += [sl.base_model for sl in self.slices if sl.base_model]
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))

    def slice_base(self, slice_index: int) -> str | None:
        """The base model of a slice: its own ``base_model``, else the top-level one."""
        return self.slices[slice_index].base_model or self.base_model

    def config_hash(self) -> str:
        """A stable hex digest of what the merge computes (not of comments or key order).

        Two configs with the same hash produce the same model from the same inputs, so a
        resumed merge can check it is continuing the same work.
        """
        canonical = json.dumps(
            {key: self.raw.get(key) for key in sorted(self.raw) if key != "name"},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_config(source: str | Path) -> MergeConfig:
    """Read and validate a merge config from a YAML file, a YAML string or a recipe name.

    ``source`` is a path to a YAML file, YAML text (any string containing a newline), or
    the name of a recipe shipped with the package, such as ``"pearl-7b-slerp"``.
    """
    text, where = _read_source(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: malformed YAML{_yaml_location(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (merge_method, slices, ...)")
    return parse_config(raw, where)


def parse_config(raw: Mapping[str, Any], where: str = "<config>") -> MergeConfig:
    """Validate an already-parsed YAML mapping (see :func:`load_config`)."""
    _reject_unknown_keys(raw, TOP_LEVEL_KEYS, where, "")
    method = _merge_method(raw, where)
    base_model = _optional_model_ref(raw, "base_model", where, "base_model")
    slices = _slices(raw, where)
    if "models" in raw:
        slices = (_with_base_model(slices[0], base_model),)
    config = MergeConfig(
        merge_method=method,
        slices=slices,
        base_model=base_model,
        parameters=_parameters(raw.get("parameters"), where, "parameters"),
        dtype=_dtype(raw, "dtype", where),
        out_dtype=_dtype(raw, "out_dtype", where),
        source=where,
        raw=dict(raw),
        random_seed=_random_seed(raw, where),
    )
    _check_method_requirements(config)
    return config


# ---------------------------------------------------------------------------------------
# Where the YAML comes from


def _read_source(source: str | Path) -> tuple[str, str]:
    """The YAML text of ``source`` and the name to use for it in error messages."""
    if isinstance(source, str) and "\n" in source:
        return source, "<string>"
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    if isinstance(source, str) and not source.endswith((".yml", ".yaml")) and "/" not in source:
        try:
            recipe = recipe_path(source)
        except FileNotFoundError as err:
            raise ConfigError(f"{source}: not a file, and {err}") from None
        return recipe.read_text(encoding="utf-8"), str(recipe)
    raise ConfigError(f"{source}: no such file (expected a mergekit YAML config)")


def _yaml_location(err: yaml.YAMLError) -> str:
    """' at line L, column C: problem' for a YAML parse error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {' '.join(str(problem).split())}"


# ---------------------------------------------------------------------------------------
# Keys


def _merge_method(raw: Mapping[str, Any], where: str) -> str:
    """The ``merge_method``, which must be one that :mod:`pearl_edu.methods` implements."""
    method = raw.get("merge_method")
    if method is None:
        raise ConfigError(f"{where}: merge_method: missing; known: {', '.join(known_methods())}")
    if method not in METHODS:
        raise ConfigError(
            f"{where}: merge_method: unknown method {method!r}; known: {', '.join(known_methods())}"
        )
    return method


def _slices(raw: Mapping[str, Any], where: str) -> tuple[SliceConfig, ...]:
    """The output slices, from either the ``slices:`` or the ``models:`` form."""
    has_slices, has_models = "slices" in raw, "models" in raw
    if has_slices == has_models:
        raise ConfigError(f"{where}: expected exactly one of 'slices' or 'models'")
    if has_models:
        return (_models_form(raw["models"], where),)
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}: slices: expected a non-empty list of slices")
    return tuple(_slice(entry, where, f"slices[{i}]") for i, entry in enumerate(slices))


def _models_form(models: Any, where: str) -> SliceConfig:
    """``models: [{model, parameters}, ...]``: one slice over all layers of each model."""
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: models: expected a non-empty list of {{model: ...}} entries")
    sources = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):  # mergekit also accepts a bare model reference
            entry = {"model": entry}
        _require_mapping(entry, where, key)
        _reject_unknown_keys(entry, MODEL_KEYS, where, key)
        sources.append(
            SourceConfig(
                model=_model_ref(entry, "model", where, f"{key}.model"),
                layer_range=None,
                parameters=_parameters(entry.get("parameters"), where, f"{key}.parameters"),
            )
        )
    return SliceConfig(sources=tuple(sources))


def _with_base_model(models_slice: SliceConfig, base_model: str | None) -> SliceConfig:
    """The ``models:`` slice with the base model added last when it is not listed (mergekit)."""
    if base_model is None or base_model in models_slice.models():
        return models_slice
    base = SourceConfig(model=base_model, layer_range=None)
    return dataclasses.replace(models_slice, sources=(*models_slice.sources, base))


def _slice(entry: Any, where: str, key: str) -> SliceConfig:
    """One entry of ``slices:``, with its layer ranges checked."""
    _require_mapping(entry, where, key)
    _reject_unknown_keys(entry, SLICE_KEYS, where, key)
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
        base_model=_optional_model_ref(entry, "base_model", where, f"{key}.base_model"),
        parameters=_parameters(entry.get("parameters"), where, f"{key}.parameters"),
    )


def _source(entry: Any, where: str, key: str) -> SourceConfig:
    """One source of a slice: ``{model, layer_range: [a, b], parameters}``."""
    _require_mapping(entry, where, key)
    _reject_unknown_keys(entry, SOURCE_KEYS, where, key)
    return SourceConfig(
        model=_model_ref(entry, "model", where, f"{key}.model"),
        layer_range=_layer_range(entry.get("layer_range"), where, f"{key}.layer_range"),
        parameters=_parameters(entry.get("parameters"), where, f"{key}.parameters"),
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
        raise ConfigError(f"{where}: {key}: expected two integers [start, end], got {value!r}")
    start, end = value
    if start < 0 or end < 0:
        raise ConfigError(f"{where}: {key}: layer indices must not be negative, got {value}")
    if start >= end:
        raise ConfigError(
            f"{where}: {key}: expected start < end (half-open range), got {value}; "
            "did you reverse it?"
        )
    return (start, end)


def _model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str:
    """A model reference (HF repo id or local folder), which must be a non-empty string."""
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key}: expected a model (repo id or folder), got {value!r}")
    return value


def _optional_model_ref(entry: Mapping[str, Any], name: str, where: str, key: str) -> str | None:
    """Like :func:`_model_ref`, but the key may be absent."""
    return None if entry.get(name) is None else _model_ref(entry, name, where, key)


def torch_dtype(value: Any, *, where: str, key: str) -> torch.dtype:
    """The torch dtype of a dtype name as mergekit spells it (``bfloat16``, ``torch.float16``).

    Anything else is a `ConfigError` naming ``where`` (the config file) and ``key``.
    """
    plain = value.removeprefix("torch.") if isinstance(value, str) else value
    dtype = DTYPES.get(plain) if isinstance(plain, str) else None
    if dtype is None:
        raise ConfigError(f"{where}: {key}: unknown dtype {value!r}; known: {', '.join(DTYPES)}")
    return dtype


def _dtype(raw: Mapping[str, Any], name: str, where: str) -> str | None:
    """A dtype name as mergekit spells it (``bfloat16``, ``torch.float16`` ...), or None."""
    value = raw.get(name)
    if value is None:
        return None
    return DTYPE_NAMES[torch_dtype(value, where=where, key=name)]


def _random_seed(raw: Mapping[str, Any], where: str) -> int:
    """The seed of random methods: ``random_seed`` or ``seed`` (an integer), default 0."""
    given = [key for key in SEED_KEYS if raw.get(key) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: seed: give either random_seed or seed, not both")
    if not given:
        return 0
    value = raw[given[0]]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {given[0]}: expected an integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# Parameters


def _parameters(value: Any, where: str, key: str) -> dict[str, ParamSpec]:
    """A ``parameters:`` mapping, each entry parsed into a :class:`ParamSpec`."""
    if value is None:
        return {}
    _require_mapping(value, where, key)
    return {name: _param_spec(name, spec, where, f"{key}.{name}") for name, spec in value.items()}


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
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
        raise ConfigError(f"{where}: {key}: unknown parameter; {hint}")


def _filter_rule(name: str, entry: dict, where: str, key: str) -> FilterRule:
    """One ``{filter, value}`` entry; no filter (or ``"*"``) matches every tensor."""
    _reject_unknown_keys(entry, FILTER_KEYS, where, key)
    if "value" not in entry:
        raise ConfigError(f"{where}: {key}: missing 'value' (a number or a list of numbers)")
    flt = entry.get("filter")
    if flt is not None and (not isinstance(flt, str) or not flt):
        raise ConfigError(f"{where}: {key}.filter: expected a non-empty string, got {flt!r}")
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
        if name in BOOLEAN_PARAMETERS:
            return float(value)
        raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
    number = _finite_number(value, where, key)
    if name in BOOLEAN_PARAMETERS and number not in (0.0, 1.0):
        raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
    if name in FRACTION_PARAMETERS and not 0.0 <= number <= 1.0:
        raise ConfigError(
            f"{where}: {key}: expected a fraction of entries to keep, from 0 to 1, got {value!r}"
        )
    return number


def _finite_number(value: Any, where: str, key: str) -> float:
    """A finite int or float (or a string that reads as one, as YAML gives ``1e-3``)."""
    if isinstance(value, str):  # YAML reads 1e-3 as a string; mergekit accepts it
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}") from None
    if (
        not isinstance(value, int | float)
        or value != value
        or value in (float("inf"), -float("inf"))
    ):
        raise ConfigError(f"{where}: {key}: expected a finite number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------
# What the merge method asks of the config


def _check_method_requirements(config: MergeConfig) -> None:
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
            f"{where}: base_model: {base!r} is not among the models of {key} ({', '.join(models)})"
        )


def _count_words(low: int, high: int | None) -> str:
    """'exactly 2 models', 'at least 2 models' or '2 to 4 models'."""
    if high == low:
        return f"exactly {low} model{'s' if low != 1 else ''}"
    if high is None:
        return f"at least {low} model{'s' if low != 1 else ''}"
    return f"{low} to {high} models"


# ---------------------------------------------------------------------------------------
# Small checks


def _require_mapping(value: Any, where: str, key: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__}")


def _reject_unknown_keys(
    entry: Mapping[str, Any], known: frozenset[str], where: str, key: str
) -> None:
    """Catch typos such as ``parameter:`` that mergekit would silently ignore."""
    unknown = [k for k in entry if k not in known]
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(
            f"{where}: {prefix}{unknown[0]}: unknown key; expected one of {', '.join(sorted(known))}"
        )
