r"""The layer schedule: what each parameter is worth at each layer and tensor, from a config.

A config gives a parameter as a number, a gradient or ``{filter, value}`` rules
(`pearl_edu.parameters`); this module reads them at a layer's position and a tensor's name.
It needs the config alone (and, for a ``models:`` config, the number of layers), so the
schedule can be printed and plotted before any model is read; `pearl_edu.plan` uses the same
functions for every tensor of the merge.

Where ``t`` comes from (mergekit's meaning):

- A layer at offset $i$ inside a slice of $n$ layers sits at $x = i / (n - 1)$ ($x = 1$
  when $n = 1$). A gradient $L$ is the piecewise-linear curve through $L$ placed at evenly
  spaced points of $[0, 1]$, read at $x$: ``numpy.interp(x, linspace(0, 1, len(L)), L)``.
- The first ``{filter, value}`` entry whose filter is a substring of the tensor name wins.
  A slice's own ``parameters`` come first; when none of its entries matches (or it has no
  such parameter), the top-level ``parameters`` are asked.
- Tensors outside the layers are read at $x = 0$: the embeddings with the first slice's
  models and parameters, the final norm and ``lm_head`` with the last slice's.
- Per-model parameters (``weight``, ``density``) are resolved for each input in the same
  way, with one more scope first: the model's own entry in the slice's sources (or in
  ``models:``). They are matched against the input's tensor name, as mergekit does (which
  differs from the output name when a slice takes layers from elsewhere in a model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pearl_edu.config import MergeConfig
from pearl_edu.errors import ConfigError
from pearl_edu.layout import LM_HEAD
from pearl_edu.methods import METHODS, boolean_parameters
from pearl_edu.parameters import FilterRule, ParamSpec

# Column label of the catch-all entry (a filter rule without `filter`).
OTHER = "other"


# ---------------------------------------------------------------------------------------
# Where t comes from


def layer_position(offset: int, slice_layers: int) -> float:
    r"""Position of a layer inside its slice, $x = i / (n - 1)$, with $x = 1$ when $n = 1$."""
    return offset / (slice_layers - 1) if slice_layers > 1 else 1.0


def gradient_value(values: Sequence[float], x: float) -> float:
    r"""A gradient read at $x$: piecewise-linear through ``values`` spread over $[0, 1]$.

    $$ g(x) = \operatorname{interp}\bigl(x;\ (\tfrac{k}{m - 1}, L_k)_{k=0}^{m-1}\bigr) $$
    """
    return float(np.interp(x, np.linspace(0.0, 1.0, len(values)), values))


def rule_value(rule: FilterRule, x: float, *, discrete: bool = False) -> float:
    """The value of one filter rule at layer position ``x`` (a number, or a gradient).

    A ``discrete`` gradient (of a flag such as ``normalize``) is not interpolated: it steps,
    taking entry ``int(x * (len - 1))``, as mergekit does for booleans.
    """
    if isinstance(rule.value, tuple):
        if discrete:
            return rule.value[int(x * (len(rule.value) - 1))]
        return gradient_value(rule.value, x)
    return rule.value


def parameter_value(
    parameter: str, tensor_name: str, x: float, scopes: Sequence[Mapping[str, ParamSpec]]
) -> tuple[float, str | None] | None:
    """The value of ``parameter`` for a tensor, and the filter that gave it.

    ``scopes`` are the ``parameters`` mappings from highest precedence to lowest (a slice's,
    then the top level). Returns None when no scope has an entry matching the tensor.
    """
    for scope in scopes:
        spec = scope.get(parameter)
        rule = spec.rule_for(tensor_name) if spec is not None else None
        if rule is not None:
            return rule_value(rule, x, discrete=parameter in boolean_parameters()), rule.filter
    return None


def interpolation_t(
    tensor_name: str, x: float, scopes: Sequence[Mapping[str, ParamSpec]]
) -> tuple[float, str | None] | None:
    """SLERP's ``t`` for a tensor at layer position ``x`` (see :func:`parameter_value`)."""
    return parameter_value("t", tensor_name, x, scopes)


def slice_scopes(config: MergeConfig, slice_index: int) -> list[Mapping[str, ParamSpec]]:
    """A slice's parameter scopes, highest precedence first: the slice's, then top-level.

    Parameters under a model entry are per-model parameters (``weight``, ``density``) of
    later methods; mergekit ignores them for shared parameters such as ``t``.
    """
    return [config.slices[slice_index].parameters, config.parameters]


def input_scopes(
    config: MergeConfig, slice_index: int, model: str
) -> list[Mapping[str, ParamSpec]]:
    """A model's per-model parameter scopes in a slice, highest precedence first.

    The model's own entries among the slice's sources, then the slice's parameters, then
    the top-level ones (mergekit's order).
    """
    sl = config.slices[slice_index]
    own = [source.parameters for source in sl.sources if source.model == model]
    return [*own, sl.parameters, config.parameters]


def takes_input_parameters(config: MergeConfig, slice_index: int, model: str) -> bool:
    """Whether a model of a slice gets per-model parameters (the base may not)."""
    method = METHODS[config.merge_method]
    if not method.input_parameters:
        return False
    return method.base_has_input_parameters or model != config.slice_base(slice_index)


# ---------------------------------------------------------------------------------------
# The schedule: t per layer and filter, from the YAML alone


@dataclass(frozen=True)
class ScheduleRow:
    """The parameter values of one output layer, per parameter and filter label.

    ``sources`` says where the layer comes from: ``(model, layer)`` for each source of its
    slice (the layer's index in that model).
    """

    layer: int
    slice_index: int
    x: float
    values: dict[str, dict[str, float | None]]
    sources: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Schedule:
    """Per-layer values of every parameter for every filter of a config.

    ``columns[parameter]`` lists the filter labels in the order the config names them,
    with ``"other"`` for the catch-all. ``outside_layers`` gives the values of the usual
    tensors outside the layers (Llama-style names), read at ``x = 0``, and
    ``outside_sources`` the models they come from. ``model_labels`` are the models' short
    names, for tables.
    """

    columns: dict[str, tuple[str, ...]]
    rows: tuple[ScheduleRow, ...]
    outside_layers: dict[str, dict[str, float | None]]
    outside_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    model_labels: dict[str, str] = field(default_factory=dict)

    @property
    def moves_layers(self) -> bool:
        """Whether some output layer comes from a layer of another index (stacking)."""
        return any(layer != row.layer for row in self.rows for _, layer in row.sources)

    def column(self, parameter: str, label: str) -> list[float | None]:
        """The values of one parameter for one filter label, layer by layer."""
        return [row.values[parameter][label] for row in self.rows]

    def table(self) -> str:
        """A readable table: one row per layer, one column per parameter and filter.

        When layers are stacked (some output layer comes from a layer of another index), a
        ``from`` column says which layer of which model each output layer copies or merges.
        """
        moved = self.moves_layers
        headers = ["layer", "slice", "x"] + (["from"] if moved else [])
        headers += [
            f"{parameter}[{label}]"
            for parameter, labels in self.columns.items()
            for label in labels
        ]
        lines = [headers]
        for row in self.rows:
            cells = [str(row.layer), str(row.slice_index), f"{row.x:.3f}"]
            if moved:
                cells.append(",".join(f"{self.model_labels[m]}:{i}" for m, i in row.sources))
            cells += [
                cell(row.values[p][label]) for p, labels in self.columns.items() for label in labels
            ]
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
        return "\n".join(
            "  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True))
            for line in lines
        )

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data for JSON."""
        return {
            "columns": {parameter: list(labels) for parameter, labels in self.columns.items()},
            "layers": [
                {
                    "layer": r.layer,
                    "slice": r.slice_index,
                    "x": r.x,
                    "sources": [{"model": model, "layer": layer} for model, layer in r.sources],
                    **r.values,
                }
                for r in self.rows
            ],
            "outside_layers": self.outside_layers,
            "outside_sources": {
                name: list(models) for name, models in self.outside_sources.items()
            },
        }


def schedule(config: MergeConfig, num_layers: int | None = None) -> Schedule:
    """The per-layer value of every parameter for every filter, from the config alone.

    Slices give their lengths through ``layer_range``; a ``models:`` config does not, so
    its number of layers must be passed as ``num_layers`` (from the models' headers).
    A tensor "matching filter F" is represented by a tensor named F; "other" by a name
    that matches no filter.
    """
    columns = _filter_columns(config)
    per_model = _input_columns(config)
    rows = []
    layer = 0
    for index, sl in enumerate(config.slices):
        count = sl.sources[0].num_layers or num_layers
        if count is None:
            raise ConfigError(
                f"{config.source}: models: no layer_range to count layers from; the schedule "
                "needs the models' headers: make the models available as local folders (or pass "
                "num_layers)"
            )
        scopes = slice_scopes(config, index)
        for offset in range(count):
            x = layer_position(offset, count)
            values = {p: _values_by_label(p, labels, x, scopes) for p, labels in columns.items()}
            values |= _input_values_by_label(config, index, per_model, x)
            sources = tuple(
                (source.model, (source.layer_range or (0, 0))[0] + offset) for source in sl.sources
            )
            rows.append(ScheduleRow(layer, index, x, values, sources))
            layer += 1
    outside = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight", LM_HEAD):
        scopes = slice_scopes(config, 0 if "embed" in name else len(config.slices) - 1)
        outside[name] = {p: _value_or_none(p, name, 0.0, scopes) for p in columns}
        index = 0 if "embed" in name else len(config.slices) - 1
        outside[name] |= {
            key: column.value(config, index, name, 0.0) for key, column in per_model.items()
        }
    columns |= {key: column.labels for key, column in per_model.items()}
    first, last = config.slices[0].models(), config.slices[-1].models()
    return Schedule(
        columns=columns,
        rows=tuple(rows),
        outside_layers=outside,
        outside_sources={name: tuple(first if "embed" in name else last) for name in outside},
        model_labels=_model_labels(config),
    )


def _filter_columns(config: MergeConfig) -> dict[str, tuple[str, ...]]:
    """Per shared parameter, the filter labels the config uses, in order ("other" last).

    The method's per-model parameters get columns of their own (see `_input_columns`).
    """
    per_model = METHODS[config.merge_method].input_parameters
    scopes = [sl.parameters for sl in config.slices] + [config.parameters]
    shared = [{p: spec for p, spec in scope.items() if p not in per_model} for scope in scopes]
    return _labels_by_parameter(shared)


def _labels_by_parameter(scopes: Sequence[Mapping[str, ParamSpec]]) -> dict[str, tuple[str, ...]]:
    """Per parameter named in ``scopes``, its filter labels in order ("other" last)."""
    columns: dict[str, list[str]] = {}
    for scope in scopes:
        for parameter, spec in scope.items():
            labels = columns.setdefault(parameter, [])
            for flt in spec.filters():
                if (flt or OTHER) not in labels:
                    labels.append(flt or OTHER)
    return {
        p: tuple(sorted(labels, key=lambda label: label == OTHER)) for p, labels in columns.items()
    }


@dataclass(frozen=True)
class InputColumn:
    """The schedule's columns for one per-model parameter of one model (``weight@b``)."""

    parameter: str
    model: str
    labels: tuple[str, ...]

    def value(
        self, config: MergeConfig, slice_index: int, tensor_name: str, x: float
    ) -> float | None:
        """The value for a tensor of a slice; None where the model takes no such value."""
        if self.model not in config.slices[slice_index].models():
            return None
        if not takes_input_parameters(config, slice_index, self.model):
            return None
        scopes = input_scopes(config, slice_index, self.model)
        return _value_or_none(self.parameter, tensor_name, x, scopes)


def _input_columns(config: MergeConfig) -> dict[str, InputColumn]:
    """Columns for the method's per-model parameters that the config names, per model.

    Keyed ``parameter@model`` (the model's folder or repository name), for every model that
    takes per-model parameters in some slice.
    """
    per_model = METHODS[config.merge_method].input_parameters
    labels = _model_labels(config)
    columns = {}
    for parameter in per_model:
        for model in config.models():
            slices = [
                i
                for i, sl in enumerate(config.slices)
                if model in sl.models() and takes_input_parameters(config, i, model)
            ]
            scopes = [
                {parameter: scope[parameter]}
                for i in slices
                for scope in input_scopes(config, i, model)
                if parameter in scope
            ]
            if scopes:
                found = _labels_by_parameter(scopes)[parameter]
                columns[f"{parameter}@{labels[model]}"] = InputColumn(parameter, model, found)
    return columns


def _model_labels(config: MergeConfig) -> dict[str, str]:
    """Short names of the models (their last path part), or the full ones if those clash."""
    short = {model: model.rstrip("/").rsplit("/", 1)[-1] for model in config.models()}
    if len(set(short.values())) < len(short):
        return {model: model for model in short}
    return short


def _input_values_by_label(
    config: MergeConfig, slice_index: int, columns: Mapping[str, InputColumn], x: float
) -> dict[str, dict[str, float | None]]:
    """Per-model parameter values of one layer, for a representative tensor of each label."""
    return {
        key: {
            label: column.value(config, slice_index, "" if label == OTHER else label, x)
            for label in column.labels
        }
        for key, column in columns.items()
    }


def _values_by_label(
    parameter: str, labels: Sequence[str], x: float, scopes: Sequence[Mapping[str, ParamSpec]]
) -> dict[str, float | None]:
    """One parameter's value for a representative tensor of each filter label."""
    # The empty name contains no filter, so only catch-all entries match it.
    return {
        label: _value_or_none(parameter, "" if label == OTHER else label, x, scopes)
        for label in labels
    }


def _value_or_none(
    parameter: str, tensor_name: str, x: float, scopes: Sequence[Mapping[str, ParamSpec]]
) -> float | None:
    found = parameter_value(parameter, tensor_name, x, scopes)
    return None if found is None else found[0]


def cell(value: float | None) -> str:
    """A table cell: four decimals (small values such as eps in four digits), '-' for none."""
    if value is None:
        return "-"
    return f"{value:.4g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
