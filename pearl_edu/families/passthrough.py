"""passthrough: each output tensor is one model's tensor, copied or times ``scale``.

mergekit 0.1.5's ``passthrough`` takes exactly one model per slice. With slices that take
different layer ranges of one or several models it stacks layers: the output has as many
layers as the slices together, numbered consecutively (``pearl_edu.plan``), and its
``config.json`` says so (``num_hidden_layers``). This is how frankenmerges and depth
up-scaling are made. ``scale`` is a per-model parameter (a number, a gradient over the
slice's layers, or ``{filter, value}`` entries); where none is given the tensor is copied
as it is, and where one is given it is multiplied by it in the tensor's own dtype, as
``tensor * scale`` in torch (mergekit's arithmetic, so the bits are the same).

The embeddings come from the first slice's model and the final norm and ``lm_head`` from
the last slice's, as in mergekit. ``config.json`` (and the tokenizer) come from
``base_model`` when the recipe names one, else from the first slice's model; mergekit then
takes one of the models in the order of a Python set, which can change from one run to the
next, so a recipe that names ``base_model`` gets the same files from both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pearl_edu.methods import MergeMethod, register


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The tensor itself when ``scale`` is None, else ``tensor * scale`` in its dtype."""
    return tensor if scale is None else tensor * scale


def _passthrough_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The engine's entry: one input, written into ``out`` when the engine gives one."""
    (tensor,) = tensors
    scale = input_params[0].get("scale") if input_params else None
    if out is None:
        return passthrough(tensor, scale)
    if scale is None:
        return out.copy_(tensor)
    return torch.mul(tensor, scale, out=out)


register(
    MergeMethod(
        name="passthrough",
        merge=_passthrough_method,
        parameters={},
        min_models=1,
        max_models=1,
        input_parameters={"scale": None},
        base_has_input_parameters=True,
        writes_into_out=True,
        optional_inputs=frozenset({"scale"}),
    )
)
