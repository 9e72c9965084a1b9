"""Plan a merge: which output tensor comes from which inputs, with which parameters.

The second step of a merge (config -> plan -> read -> math -> write). It needs the config
and the models' headers (tensor names, shapes, dtypes) but not a single weight, so a plan
can be printed and plotted before anything heavy happens. With `pearl_edu.layer_schedule`,
which says what each parameter is worth at a layer and a tensor (mergekit's meaning of
gradients and filters), it is the only place that knows about filters, gradients and layer
ranges. `pearl_edu.layout` sorts each model's tensors into layers by their names, and
`pearl_edu.tensor_checks` checks each tensor's inputs and gives its dtypes.

Tensors outside the layers are read at $x = 0$: the embeddings with the first slice's models
and parameters, the final norm and ``lm_head`` with the last slice's. Random methods (DARE)
get a seed per tensor, from the config's ``random_seed`` and the tensor's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pearl_edu.config import MergeConfig
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.layer_schedule import (
    input_scopes,
    layer_position,
    parameter_value,
    slice_scopes,
    takes_input_parameters,
)
from pearl_edu.layout import (
    LM_HEAD,
    TIED_TO,
    Header,
    ModelLayout,
    TensorInfo,
    TensorInput,
    model_layout,
    natural_key,
)
from pearl_edu.methods import METHODS, check_parameters, tensor_seed
from pearl_edu.tensor_checks import (
    check_float8,
    check_shapes,
    check_weights,
    output_dtype,
    result_dtype,
)


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
        """The plan as plain data for JSON (dtypes by name, e.g. ``"bfloat16"``)."""
        return {
            "num_layers": self.num_layers,
            "base_model": self.base_model,
            "total_bytes": self.total_bytes,
            "tensors": [
                {
                    "name": t.name,
                    "layer": t.layer,
                    "x": t.x,
                    "inputs": [{"model": i.model, "tensor": i.tensor} for i in t.inputs],
                    "base_index": t.base_index,
                    "method": t.method,
                    "params": t.params,
                    "matched_filter": t.matched_filter,
                    "input_params": list(t.input_params),
                    "input_filters": list(t.input_filters),
                    "seed": t.seed,
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                }
                for t in self.tensors
            ],
        }


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
    check_shapes(name, inputs, metas)
    params, filters = _resolve_params(config, index, name, x)
    # Per-model parameters are matched against each input's own tensor name (mergekit).
    lookup_names = [name if layer is None else i.tensor for i in inputs]
    per_input = [
        _resolve_input_params(config, index, i.model, lookup, x)
        for i, lookup in zip(inputs, lookup_names, strict=True)
    ]
    check_weights(config, name, params, [values for values, _ in per_input])
    check_float8(config, inputs, metas, [values for values, _ in per_input])
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
        dtype=output_dtype(config, result_dtype(config, metas, base)),
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
