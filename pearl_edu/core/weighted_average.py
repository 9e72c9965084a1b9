r"""A weighted average of whole models, in plain torch: the reference core of ``linear``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pearl_edu.core.interpolation import work_dtype


def common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the inputs meet in, as mergekit promotes them (bfloat16 + float16: float32)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    r"""Weighted sum of tensors, divided by the sum of the weights when ``normalize``.

    $$ \operatorname{linear}(x_1, \dots, x_n) = \frac{\sum_i w_i\, x_i}{\sum_i w_i} $$

    The sum is taken in float32 (float64 for float64 inputs), in the order given (mergekit
    puts the base model first), one ``addcmul_`` per input as mergekit does, so that the
    roundings are mergekit's. The result has the inputs' common dtype.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    common = common_dtype(tensors)
    work = work_dtype(tensors[0].to(common))
    # The weights are rounded to the work dtype before anything is multiplied, as mergekit's.
    w = torch.tensor(list(weights), dtype=work, device=tensors[0].device)
    result = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    for tensor, weight in zip(tensors, w.unbind(0), strict=True):
        result.addcmul_(tensor.to(common), weight)
    if normalize:
        result.div_(w.sum())
    return result.to(common)
