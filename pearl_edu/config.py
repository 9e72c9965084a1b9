"""Read a mergekit YAML config into a validated, typed description of the merge.

This is the first step of a merge (config -> plan -> read -> math -> write). Every mistake
in the YAML is reported here, as a one-line :class:`~pearl_edu.errors.ConfigError` naming
the file and the key, before a single weight is read.

The meaning is mergekit's:

- ``slices:`` lists output slices; each has ``sources`` (``model`` + half-open
  ``layer_range: [a, b]``) and optionally its own ``base_model`` and ``parameters``.
- ``models:`` (instead of ``slices:``) means one slice over all layers of every model; it
  becomes a single slice whose sources have ``layer_range=None``.
- ``modules: {default: {slices | models, parameters}}`` is the form mergekit normalises
  those two into and writes into the model cards it publishes; for a single-module model
  the module's slices are the config's, and its parameters rank between a slice's and the
  top-level ones (`pearl_edu.slices`).
- A key mergekit ignores (its schema drops unknown keys) is an ``UnknownKeyWarning``, or
  a `ConfigError` with ``strict=True`` (`pearl_edu.config_checks`).
- ``parameters`` (top level, per slice, per source/model) map a name such as ``t`` to a
  number, a gradient (a list of numbers spread over the layers of a slice) or an ordered
  list of ``{filter, value}`` entries, the first whose filter is a substring of the tensor
  name winning, an entry without ``filter`` matching everything.
- Per-model parameters (``weight``, ``density``) are looked up for each input: first under
  its own entry in ``sources``/``models``, then the slice's ``parameters``, then the
  top-level ones. Shared parameters (``t``, ``normalize``, ``lambda``) ignore model entries.
- In the ``models:`` form, a ``base_model`` that is not listed is added as the last model.
- ``random_seed`` (or ``seed``), default 0, seeds the random methods (DARE).

This module puts a :class:`MergeConfig` together from parts that have modules of their
own: `pearl_edu.yaml_reader` reads the YAML text within bounds, `pearl_edu.slices` the
slices and models, `pearl_edu.parameters` the parameters, `pearl_edu.tokenizer_config` the
tokenizer options, and `pearl_edu.method_requirements` checks what the method asks of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pearl_edu.config_checks import optional_model_ref, reject_unknown_keys, strict_keys
from pearl_edu.errors import ConfigError
from pearl_edu.method_requirements import check_method_requirements
from pearl_edu.methods import METHODS, known_methods
from pearl_edu.parameters import ParamSpec, read_parameters
from pearl_edu.recipes import recipe_path
from pearl_edu.slices import SliceConfig, read_inputs
from pearl_edu.tokenizer_config import TokenizerConfig, read_chat_template, read_tokenizer_options
from pearl_edu.yaml_reader import (
    check_size,
    check_tree,
    load_yaml,
    os_reason,
    read_text,
    short,
    shown_path,
)

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

TOP_LEVEL_KEYS = frozenset(
    {
        "slices",
        "models",
        "modules",
        "merge_method",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        # Tokenizer and template options: validated as mergekit 0.1.5 does, then left to
        # the writer.
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


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config (see the module docstring for its meaning).

    ``source`` is where it came from (a file path, a recipe, or ``"<string>"``), used in
    error messages; ``raw`` is the YAML as parsed, kept for the model card (bounded by the
    reader's limits: `pearl_edu.yaml_reader.MAX_CONFIG_BYTES`, ``MAX_DEPTH``,
    ``MAX_EXPANDED_NODES``).
    The tokenizer options (``tokenizer_source``, ``tokenizer``, ``chat_template``) and
    ``name`` are validated as mergekit does; `pearl_edu.tokenizer_build` and
    `pearl_edu.vocabulary` apply them as mergekit does.
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
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None

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

    def canonical(self) -> str:
        """The validated merge as compact JSON with sorted keys: what determines the bits.

        The method, the slices (sources, layer ranges, parameters), the base model, the
        parameters, dtype, out_dtype, the random seed and the tokenizer options, as
        validated; not ``name``, comments, key order or how a value was spelled
        (``0.5`` or ``5e-1``). Built from the validated fields, never from ``raw``, so it
        is as bounded as the reader's limits make them.
        """
        data = {
            "merge_method": self.merge_method,
            "slices": [
                {
                    "sources": [
                        {
                            "model": source.model,
                            "layer_range": source.layer_range,
                            "parameters": _params_data(source.parameters),
                        }
                        for source in sl.sources
                    ],
                    "base_model": sl.base_model,
                    "parameters": _params_data(sl.parameters),
                }
                for sl in self.slices
            ],
            "base_model": self.base_model,
            "parameters": _params_data(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "random_seed": self.random_seed,
            "tokenizer_source": self.tokenizer_source,
            "tokenizer": None if self.tokenizer is None else dataclasses.asdict(self.tokenizer),
            "chat_template": self.chat_template,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def config_hash(self) -> str:
        """A stable hex digest of what the merge computes: the SHA-256 of :meth:`canonical`.

        Two configs with the same hash produce the same model from the same inputs, so a
        resumed merge can check it is continuing the same work.
        """
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()


def _params_data(parameters: Mapping[str, ParamSpec]) -> dict[str, list[list[Any]]]:
    """Parameters as JSON-ready data: each name's ordered [filter, value] rules."""
    return {
        name: [[rule.filter, rule.value] for rule in spec.rules]
        for name, spec in parameters.items()
    }


def load_config(source: str | Path, *, strict: bool = False) -> MergeConfig:
    """Read and validate a merge config from a YAML file, a YAML string or a recipe name.

    ``source`` is a path to a YAML file, YAML text (any string containing a newline), or
    the name of a recipe shipped with the package, such as ``"pearl-7b-slerp"``.

    The reader (`pearl_edu.yaml_reader`) is bounded: at most ``MAX_CONFIG_BYTES`` of UTF-8
    text, nested at most ``MAX_DEPTH`` levels, and at most ``MAX_EXPANDED_NODES`` values once
    every alias is expanded (counted on the YAML's node graph before any Python object is
    built), so that hostile input is a one-line `ConfigError`, never a hang.

    Keys that mergekit ignores are warned about (`UnknownKeyWarning`) and ignored, or
    refused when ``strict`` is true.
    """
    text, where = _read_source(source)
    raw = load_yaml(text, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (merge_method, slices, ...)")
    return parse_config(raw, where, strict=strict)


def parse_config(
    raw: Mapping[str, Any], where: str = "<config>", *, strict: bool = False
) -> MergeConfig:
    """Validate an already-parsed YAML mapping (see :func:`load_config`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys (merge_method, slices, ...)")
    with strict_keys(strict):
        return _parse_config(raw, where)


def _parse_config(raw: Mapping[str, Any], where: str) -> MergeConfig:
    check_tree(raw, where)
    reject_unknown_keys(
        raw,
        TOP_LEVEL_KEYS,
        where,
        "",
        required=(frozenset({"merge_method"}), frozenset({"slices", "models", "modules"})),
    )
    method = _merge_method(raw, where)
    base_model = optional_model_ref(raw, "base_model", where, "base_model")
    inputs = read_inputs(raw, where, base_model)
    tokenizer_source, tokenizer = read_tokenizer_options(raw, where)
    parameters = read_parameters(raw.get("parameters"), where, "parameters")
    config = MergeConfig(
        merge_method=method,
        slices=inputs.slices,
        base_model=base_model,
        parameters=_with_module_parameters(inputs.module_parameters, parameters),
        dtype=_dtype(raw, "dtype", where),
        out_dtype=_dtype(raw, "out_dtype", where),
        source=where,
        raw=dict(raw),
        random_seed=_random_seed(raw, where),
        tokenizer_source=tokenizer_source,
        tokenizer=tokenizer,
        chat_template=read_chat_template(raw, where),
        name=_name(raw, where),
    )
    check_method_requirements(config)
    return config


def _with_module_parameters(
    module: Mapping[str, ParamSpec], top: Mapping[str, ParamSpec]
) -> dict[str, ParamSpec]:
    """The top-level parameters with a module's ahead of them, rule by rule.

    mergekit looks a parameter up in the module's ``parameters`` before the top-level
    ones, taking the first rule whose filter matches the tensor; the module's rules placed
    before the top-level rules of the same name are looked up in that same order.
    """
    merged = dict(top)
    for name, spec in module.items():
        below = top.get(name)
        merged[name] = (
            spec if below is None else ParamSpec(rules=(*spec.rules, *below.rules), form="filters")
        )
    return merged


# ---------------------------------------------------------------------------------------
# Where the YAML comes from


def _read_source(source: str | Path) -> tuple[str, str]:
    """The YAML text of ``source`` and the name to use for it in error messages."""
    if isinstance(source, str) and "\n" in source:
        where = "<string>"
        check_size(source, where)
        return source, where
    path = Path(source)
    where = shown_path(source)
    try:
        is_file = path.is_file()
        is_dir = not is_file and path.is_dir()
    except OSError as err:  # a name too long, a loop of links, ...
        raise ConfigError(f"{where}: cannot read the config: {os_reason(err)}") from None
    if is_file:
        return read_text(path, where), where
    if isinstance(source, str) and not source.endswith((".yml", ".yaml")) and "/" not in source:
        try:
            recipe = recipe_path(source)
        except FileNotFoundError as err:
            if is_dir:
                raise ConfigError(f"{where}: a folder, not a YAML config file") from None
            raise ConfigError(f"{where}: not a file, and {err}") from None
        except (OSError, ValueError) as err:  # a name no file system takes
            raise ConfigError(f"{where}: not a file, and not a shipped recipe ({err})") from None
        return read_text(recipe, str(recipe)), str(recipe)
    if is_dir:
        raise ConfigError(f"{where}: a folder, not a YAML config file")
    raise ConfigError(f"{where}: no such file (expected a mergekit YAML config)")


# ---------------------------------------------------------------------------------------
# Keys


def _merge_method(raw: Mapping[str, Any], where: str) -> str:
    """The ``merge_method``, which must be one that :mod:`pearl_edu.methods` implements."""
    method = raw.get("merge_method")
    if method is None:
        raise ConfigError(f"{where}: merge_method: missing; known: {', '.join(known_methods())}")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(
            f"{where}: merge_method: unknown method {short(method)}; "
            f"known: {', '.join(known_methods())}"
        )
    return method


def torch_dtype(value: Any, *, where: str, key: str) -> torch.dtype:
    """The torch dtype of a dtype name as mergekit spells it (``bfloat16``, ``torch.float16``).

    Anything else is a `ConfigError` naming ``where`` (the config file) and ``key``.
    """
    plain = value.removeprefix("torch.") if isinstance(value, str) else value
    dtype = DTYPES.get(plain) if isinstance(plain, str) else None
    if dtype is None:
        raise ConfigError(
            f"{where}: {key}: unknown dtype {short(value)}; known: {', '.join(DTYPES)}"
        )
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
        raise ConfigError(f"{where}: {given[0]}: expected an integer, got {short(value)}")
    return value


def _name(raw: Mapping[str, Any], where: str) -> str | None:
    """``name``: a label for the merged model, a string (it does not change the weights)."""
    value = raw.get("name")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: name: expected a string, got {short(value)}; put it in quotes")
    return value
