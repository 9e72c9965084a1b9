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

import torch

from pearl_edu.method_parameters import PerInput
from pearl_edu.methods import MergeContext, MergeInputs, merge_method


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The tensor itself when ``scale`` is None, else ``tensor * scale`` in its dtype."""
    return tensor if scale is None else tensor * scale


@merge_method("passthrough", models=(1, 1))
def _passthrough(
    inputs: MergeInputs, run: MergeContext, *, scale: PerInput[float | None] = None
) -> torch.Tensor:
    """The engine's entry: one input, written into the output buffer when there is one."""
    ((tensor,), (factor,)) = inputs.tensors, scale
    if run.out is None:
        return passthrough(tensor, factor)
    if factor is None:
        return run.out.copy_(tensor)
    return torch.mul(tensor, factor, out=run.out)
