r"""Plan a merge: which output tensor comes from which inputs, with which parameters.

The second step of a merge (config -> plan -> read -> math -> write). It needs the config
and the models' headers (tensor names, shapes, dtypes) but not a single weight, so a plan
can be printed and plotted before anything heavy happens. This is the only module that
knows about filters, gradients and layer ranges.

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
- Random methods (DARE) get a seed per tensor, from the config's ``random_seed`` and the
  tensor's name.

Architectures are recognised by tensor names, not by a list of model types: anything named
``<prefix>.layers.<i>.<rest>`` is a layer tensor (Llama, Mistral, Qwen2 and their kin); the
other tensors are embeddings (names containing ``embed``) or come after the layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pearl_edu.config import MergeConfig, torch_dtype
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.methods import METHODS, check_parameters, tensor_seed
from pearl_edu.parameters import BOOLEAN_PARAMETERS, FilterRule, ParamSpec

# Column label of the catch-all entry (a filter rule without `filter`).
OTHER = "other"
LM_HEAD = "lm_head.weight"
# A model with tied embeddings has no lm_head; its input embeddings play that role.
TIED_TO = "model.embed_tokens.weight"
LAYER_TENSOR = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Buffers that some checkpoints store but that are not weights; mergekit skips them too.
NOT_WEIGHTS = ("rotary_emb.inv_freq",)


class TensorInfo(Protocol):
    """What the plan needs of one tensor in a header: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Header(Protocol):
    """What the plan needs of a model header (see :func:`pearl_edu.reading.read_header`)."""

    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, Any]


@dataclass(frozen=True)
class TensorInput:
    """One input of an output tensor: which tensor of which model."""

    model: str
    tensor: str


@dataclass(frozen=True)
class TensorPlan:
    """Everything needed to produce one output tensor, decided before reading weights.

    ``inputs[base_index]`` is the base model's tensor (``t = 0`` for SLERP); ``params`` are
    the method's shared parameters for this tensor and ``matched_filter`` says, per
    parameter, which filter gave the value (None for a catch-all, a plain number or a
    default). ``input_params[i]`` and ``input_filters[i]`` are the same for the per-model
    parameters of ``inputs[i]`` (empty for the base when the method gives it none, and for
    methods without per-model parameters). ``seed`` is the tensor's seed for random
    methods (None otherwise). ``layer`` is the output layer (None outside the layers) and
    ``x`` its position in its slice. ``dtype`` is the dtype the tensor is written in.
    """

    name: str
    inputs: tuple[TensorInput, ...]
    base_index: int
    method: str
    params: dict[str, float]
    layer: int | None
    matched_filter: dict[str, str | None]
    shape: tuple[int, ...]
    dtype: torch.dtype
    x: float = 0.0
    input_params: tuple[dict[str, float], ...] = ()
    input_filters: tuple[dict[str, str | None], ...] = ()
    seed: int | None = None

    @property
    def nbytes(self) -> int:
        """Size of the output tensor in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class MergePlan:
    """The whole merge, tensor by tensor, in the order the output is written.

    ``base_model`` is the model whose ``config.json``, tokenizer and generation config the
    output copies (with ``num_hidden_layers`` set to ``num_layers``).
    """

    config: MergeConfig
    tensors: list[TensorPlan]
    num_layers: int
    base_model: str

    @property
    def total_bytes(self) -> int:
        """Size of all output tensors in bytes."""
        return sum(tensor.nbytes for tensor in self.tensors)

    def outside_layers(self) -> list[TensorPlan]:
        """The tensors that belong to no layer (embeddings, final norm, lm_head)."""
        return [tensor for tensor in self.tensors if tensor.layer is None]

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data for JSON (see `pearl_edu.plan_table.plan_dict`)."""
        from pearl_edu.plan_table import plan_dict

        return plan_dict(self)


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
            return rule_value(rule, x, discrete=parameter in BOOLEAN_PARAMETERS), rule.filter
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
        """A readable table, one row per layer (see `pearl_edu.plan_table.schedule_table`)."""
        from pearl_edu.plan_table import schedule_table

        return schedule_table(self)

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data for JSON (see `pearl_edu.plan_table.schedule_dict`)."""
        from pearl_edu.plan_table import schedule_dict

        return schedule_dict(self)


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


# ---------------------------------------------------------------------------------------
# Model layouts, read from tensor names


@dataclass(frozen=True)
class ModelLayout:
    """A model's tensors sorted into layers and the rest, recognised by their names."""

    model: str
    tensors: Mapping[str, TensorInfo]
    layer_prefix: str
    layers: tuple[tuple[str, ...], ...]  # per layer index, the names after the index
    outside: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        """How many layers the model has (counted from its tensor names)."""
        return len(self.layers)

    def layer_tensor(self, index: int, rest: str) -> str:
        """Full name of a tensor of layer ``index``, e.g. ``model.layers.3.mlp.up_proj.weight``."""
        return f"{self.layer_prefix}.{index}.{rest}"


def model_layout(model: str, header: Header) -> ModelLayout:
    """Sort a model's tensor names into layers and the tensors outside them."""
    by_layer: dict[int, list[str]] = {}
    prefixes = set()
    outside = []
    for name in header.tensors:
        if name.endswith(NOT_WEIGHTS):
            continue
        match = LAYER_TENSOR.match(name)
        if match is None:
            outside.append(name)
            continue
        prefixes.add(match["prefix"])
        by_layer.setdefault(int(match["index"]), []).append(match["rest"])
    if len(prefixes) > 1:
        raise ModelError(f"{model}: layers under several prefixes ({', '.join(sorted(prefixes))})")
    count = max(by_layer, default=-1) + 1
    missing = [i for i in range(count) if i not in by_layer]
    if missing:
        raise ModelError(f"{model}: no tensors for layer {missing[0]} of {count}")
    declared = header.config.get("num_hidden_layers")
    if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool)):
        kinds = {str: "a string", float: "a number", bool: "a boolean", list: "a list"}
        kind = kinds.get(type(declared), "an object")
        raise ModelError(
            f"{model}: config.json: num_hidden_layers is {repr(declared)[:60]} ({kind}); "
            "expected an integer"
        )
    if declared is not None and declared != count:
        raise ModelError(
            f"{model}: config.json says num_hidden_layers={declared!r} but the weights have "
            f"{count} layers"
        )
    return ModelLayout(
        model=model,
        tensors=header.tensors,
        layer_prefix=prefixes.pop() if prefixes else "model.layers",
        layers=tuple(tuple(sorted(by_layer[i], key=natural_key)) for i in range(count)),
        outside=tuple(outside),
    )


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``experts.2`` before ``experts.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------
# The plan


def plan(config: MergeConfig, headers: Mapping[str, Header]) -> MergePlan:
    """Plan every output tensor of a merge from the config and the models' headers.

    ``headers[model]`` is the header of each model of ``config.models()``. Output order:
    embeddings, then the layers in order (tensor names sorted naturally within a layer),
    then the final norm and ``lm_head``.
    """
    layouts = {model: _layout(config, model, headers) for model in config.models()}
    slice_lengths = [_slice_length(config, i, layouts) for i in range(len(config.slices))]
    first, last = 0, len(config.slices) - 1

    planned = [
        _plan_outside_tensor(config, first, name, layouts)
        for name in _outside_names(config, first, layouts, before_layers=True)
    ]
    out_layer = 0
    for index, count in enumerate(slice_lengths):
        for offset in range(count):
            planned += _plan_layer(config, index, offset, count, out_layer, layouts)
            out_layer += 1
    planned += [
        _plan_outside_tensor(config, last, name, layouts)
        for name in _outside_names(config, last, layouts, before_layers=False)
    ]
    return MergePlan(
        config=config,
        tensors=planned,
        num_layers=out_layer,
        base_model=config.slice_base(first) or config.slices[first].sources[0].model,
    )


def _layout(config: MergeConfig, model: str, headers: Mapping[str, Header]) -> ModelLayout:
    if model not in headers:
        raise ModelError(f"{config.source}: no header for model {model!r}")
    return model_layout(model, headers[model])


def _slice_length(config: MergeConfig, index: int, layouts: Mapping[str, ModelLayout]) -> int:
    """Number of layers of a slice, checking every range against the model's layers."""
    lengths = {}
    for j, source in enumerate(config.slices[index].sources):
        available = layouts[source.model].num_layers
        start, end = source.layer_range or (0, available)
        if end > available:
            raise ModelError(
                f"{config.source}: slices[{index}].sources[{j}].layer_range: [{start}, {end}] "
                f"goes beyond {source.model}, which has {available} layers"
            )
        lengths[source.model] = end - start
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{model} has {n}" for model, n in lengths.items())
        raise ModelError(f"{config.source}: models: every model must have as many layers; {counts}")
    return next(iter(lengths.values()))


def _plan_layer(
    config: MergeConfig,
    index: int,
    offset: int,
    count: int,
    out_layer: int,
    layouts: Mapping[str, ModelLayout],
) -> list[TensorPlan]:
    """The tensors of one output layer, from layer ``start + offset`` of each source."""
    sources = config.slices[index].sources
    base = _base_index(config, index)
    reference = layouts[sources[base].model]
    in_layers = [(source.layer_range or (0, 0))[0] + offset for source in sources]
    names = reference.layers[in_layers[base]]
    x = layer_position(offset, count)
    planned = []
    for rest in names:
        inputs = tuple(
            TensorInput(source.model, layouts[source.model].layer_tensor(layer, rest))
            for source, layer in zip(sources, in_layers, strict=True)
        )
        output_name = reference.layer_tensor(out_layer, rest)
        planned.append(_tensor_plan(config, index, output_name, inputs, out_layer, x, layouts))
    return planned


def _outside_names(
    config: MergeConfig, index: int, layouts: Mapping[str, ModelLayout], *, before_layers: bool
) -> list[str]:
    """Names outside the layers for one end of the model, in writing order.

    Embeddings go before the layers; the rest after, ``lm_head`` last. A name is planned
    when any model of the slice has it (``lm_head`` of a tied model comes from its
    embeddings, as in mergekit).
    """
    names = dict.fromkeys(
        name for model in config.slices[index].models() for name in layouts[model].outside
    )
    chosen = [name for name in names if ("embed" in name) == before_layers]
    return sorted(chosen, key=lambda name: (name.startswith("lm_head"), natural_key(name)))


def _plan_outside_tensor(
    config: MergeConfig, index: int, name: str, layouts: Mapping[str, ModelLayout]
) -> TensorPlan:
    """Plan a tensor outside the layers (named the same in every model), read at x = 0."""
    inputs = tuple(
        TensorInput(model, _name_in_model(layouts[model], name))
        for model in config.slices[index].models()
    )
    return _tensor_plan(config, index, name, inputs, None, 0.0, layouts)


def _name_in_model(layout: ModelLayout, wanted: str) -> str:
    """The tensor to read for ``wanted``: itself, or the embeddings for a tied lm_head."""
    if wanted in layout.tensors:
        return wanted
    if wanted == LM_HEAD and TIED_TO in layout.tensors:
        return TIED_TO
    raise ModelError(f"{layout.model}: has no tensor {wanted!r}, which another model has")


def _tensor_plan(
    config: MergeConfig,
    index: int,
    name: str,
    inputs: tuple[TensorInput, ...],
    layer: int | None,
    x: float,
    layouts: Mapping[str, ModelLayout],
) -> TensorPlan:
    """Resolve the method's parameters for one tensor and check its input shapes."""
    metas = [_tensor_info(layouts[i.model], i.tensor) for i in inputs]
    base = _base_index(config, index)
    _check_shapes(name, inputs, metas)
    params, filters = _resolve_params(config, index, name, x)
    # Per-model parameters are matched against each input's own tensor name (mergekit).
    lookup_names = [name if layer is None else i.tensor for i in inputs]
    per_input = [
        _resolve_input_params(config, index, i.model, lookup, x)
        for i, lookup in zip(inputs, lookup_names, strict=True)
    ]
    _check_weights(config, name, params, [values for values, _ in per_input])
    _check_float8(config, inputs, metas, [values for values, _ in per_input])
    problem = check_parameters(
        config.merge_method,
        tuple(metas[base].shape),
        params,
        [values for values, _ in per_input],
        [i.model for i in inputs],
    )
    if problem:
        raise ConfigError(f"{config.source}: {problem} (tensor {name})")
    return TensorPlan(
        name=name,
        inputs=inputs,
        base_index=base,
        method=config.merge_method,
        params=params,
        layer=layer,
        matched_filter=filters,
        shape=tuple(metas[base].shape),
        dtype=_output_dtype(config, _result_dtype(config, metas, base)),
        x=x,
        input_params=tuple(values for values, _ in per_input),
        input_filters=tuple(found for _, found in per_input),
        seed=tensor_seed(config.random_seed, name) if METHODS[config.merge_method].random else None,
    )


def _tensor_info(layout: ModelLayout, name: str) -> TensorInfo:
    if name not in layout.tensors:
        raise ModelError(f"{layout.model}: has no tensor {name!r}, which the merge needs")
    return layout.tensors[name]


def _base_index(config: MergeConfig, index: int) -> int:
    """Position of the slice's base model among its sources (0 when there is no base)."""
    base = config.slice_base(index)
    models = config.slices[index].models()
    return models.index(base) if base in models else 0


def _check_shapes(name: str, inputs: Sequence[TensorInput], metas: Sequence[TensorInfo]) -> None:
    """Refuse inputs of different shapes, before any weight is read."""
    first = tuple(metas[0].shape)
    for tensor_input, meta in zip(inputs[1:], metas[1:], strict=True):
        if tuple(meta.shape) != first:
            shape = tuple(meta.shape)
            # Embeddings and lm_head have one row per token: only the rows differing means
            # the vocabularies differ (mergekit 0.1.5 refuses too; older versions cropped).
            vocabulary_only = len(shape) == len(first) and shape[1:] == first[1:]
            hint = (
                "the vocabularies differ; align the tokenizers and resize the embeddings first"
                if vocabulary_only and ("embed" in name or "lm_head" in name)
                else "merge only models of the same architecture and size"
            )
            raise ModelError(
                f"{name}: shapes differ: {inputs[0].model} {first} vs "
                f"{tensor_input.model} {shape}; {hint}"
            )


def _resolve_params(
    config: MergeConfig, index: int, name: str, x: float
) -> tuple[dict[str, float], dict[str, str | None]]:
    """The method's parameters for one tensor, and which filter gave each."""
    method = METHODS[config.merge_method]
    scopes = slice_scopes(config, index)
    params: dict[str, float] = {}
    filters: dict[str, str | None] = {}
    for parameter, default in method.parameters.items():
        found = parameter_value(parameter, name, x, scopes)
        if found is None and default is None:
            raise ConfigError(
                f"{config.source}: parameters.{parameter}: no entry matches tensor {name}; "
                "add a catch-all entry such as '- value: 0.5'"
            )
        params[parameter], filters[parameter] = found if found else (default, None)
    return params, filters


def _resolve_input_params(
    config: MergeConfig, index: int, model: str, tensor_name: str, x: float
) -> tuple[dict[str, float], dict[str, str | None]]:
    """One input's per-model parameters for one tensor, and which filter gave each."""
    if not takes_input_parameters(config, index, model):
        return {}, {}
    method = METHODS[config.merge_method]
    scopes = input_scopes(config, index, model)
    params: dict[str, float] = {}
    filters: dict[str, str | None] = {}
    for parameter, default in method.input_parameters.items():
        found = parameter_value(parameter, tensor_name, x, scopes)
        if found is None and parameter in method.optional_inputs:
            continue  # not given: the method does without it (passthrough's scale)
        if found is None and default is None:
            raise ConfigError(
                f"{config.source}: parameters.{parameter}: no entry for {model} matches tensor "
                f"{tensor_name}; add a catch-all entry such as '- value: 0.5'"
            )
        params[parameter], filters[parameter] = found if found else (default, None)
    return params, filters


def _check_weights(
    config: MergeConfig, name: str, params: Mapping[str, float], inputs: Sequence[Mapping]
) -> None:
    """Refuse a normalized linear merge whose weights sum to 0 (it would divide by 0)."""
    if config.merge_method != "linear" or not params.get("normalize"):
        return
    if sum(values["weight"] for values in inputs) == 0:
        raise ConfigError(
            f"{config.source}: parameters.weight: the weights for tensor {name} sum to 0, and "
            "linear with normalize: true divides by their sum; change a weight or set "
            "normalize: false"
        )


def _check_float8(
    config: MergeConfig,
    inputs: Sequence[TensorInput],
    metas: Sequence[TensorInfo],
    input_params: Sequence[Mapping],
) -> None:
    """Refuse float8 inputs to the math when the config gives no ``dtype`` to compute in.

    torch has no arithmetic in float8, and mergekit 0.1.5 computes in the stored dtype when
    ``dtype`` is not set: its linear and TIES then fail inside torch. Here they, and every
    other method, refuse before anything is written, except two that work as in mergekit:
    SLERP (which computes in float32 and gives mergekit's bits on float8 inputs) and a
    passthrough without ``scale``, a copy.
    """
    if config.dtype or config.merge_method == "slerp":
        return
    for tensor_input, meta, values in zip(inputs, metas, input_params, strict=True):
        dtype = meta.dtype
        copy = config.merge_method == "passthrough" and "scale" not in values
        if dtype.is_floating_point and dtype.itemsize == 1 and not copy:
            raise ConfigError(
                f"{config.source}: {tensor_input.model}: tensor {tensor_input.tensor} is "
                f"{str(dtype).removeprefix('torch.')}, and torch cannot compute in float8; set "
                f"'dtype: bfloat16' (or float16, float32) in the config so that "
                f"{config.merge_method} computes in that type"
            )


def _result_dtype(config: MergeConfig, metas: Sequence[TensorInfo], base: int) -> torch.dtype:
    """The dtype a method returns: the base's for SLERP, else all inputs' common dtype.

    Linear, task arithmetic, TIES and DARE promote their inputs to a common dtype before
    the math (bfloat16 and float16 give float32), and return that dtype, as in mergekit.
    With ``dtype`` the inputs are cast to it first (float8 ones too, which torch cannot
    promote).
    """
    if config.dtype:
        return torch_dtype(config.dtype, where=config.source, key="dtype")
    if config.merge_method == "slerp":
        return metas[base].dtype
    dtype = metas[0].dtype
    for meta in metas[1:]:
        dtype = torch.promote_types(dtype, meta.dtype)
    return dtype


def _output_dtype(config: MergeConfig, base_dtype: torch.dtype) -> torch.dtype:
    """``out_dtype``, else the config's ``dtype``, else the base tensor's dtype."""
    name = config.out_dtype or config.dtype
    return (
        torch_dtype(name, where=config.source, key="out_dtype" if config.out_dtype else "dtype")
        if name
        else base_dtype
    )


# ---------------------------------------------------------------------------------------
# Showing a plan (what `pearl-edu plan` prints)


def show_plan(
    config: MergeConfig,
    merge_plan: MergePlan | None = None,
    *,
    unread: Sequence[str] = (),
    as_json: bool = False,
) -> str:
    """The text (or JSON) that ``pearl-edu plan`` prints (see `pearl_edu.plan_table`)."""
    from pearl_edu.plan_table import show_plan as show

    return show(config, merge_plan, unread=unread, as_json=as_json)
