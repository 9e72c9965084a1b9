"""Refusing a merged tensor with infinite or NaN values, before it is written.

mergekit publishes such a model silently; pearl_edu names the tensor and the likely cause
(its inputs, or the method's parameters) in one line, or, when the merge allows it
(``--allow-nonfinite``), warns in one line and writes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from pearl_edu.errors import ConfigError, PearlEduWarning
from pearl_edu.tensor_plan import TensorPlan


class NonFiniteWarning(PearlEduWarning):
    """A merged tensor holds infinite or NaN values, published because it was allowed."""


def check_finite(
    merged: torch.Tensor, job: TensorPlan, inputs: Sequence[torch.Tensor], *, allow: bool
) -> None:
    """Refuse a merged tensor with an infinite or NaN value, naming it and the likely cause.

    One pass of ``aminmax`` (NaN and infinities reach its minimum or maximum), about 5 ms
    for a 58.7M-element bfloat16 tensor on the benchmark machine. With ``allow``, a
    one-line `NonFiniteWarning` instead. mergekit publishes such a model silently.
    """
    if not merged.is_floating_point() or merged.numel() == 0 or is_finite(merged):
        return
    count = nonfinite_count(merged)
    from_inputs = not all(is_finite(x) for x in inputs if x.is_floating_point())
    cause = (
        "its inputs hold infinite or NaN values already"
        if from_inputs
        else f"from finite inputs: check the {job.method} parameters "
        f"({', '.join(f'{k}={v:g}' for k, v in sorted(job.params.items())) or 'none'})"
    )
    message = f"{job.name}: the merge gives {count} infinite or NaN values, {cause}"
    if allow:
        warnings.warn(f"{message}; written anyway (--allow-nonfinite)", NonFiniteWarning, 2)
        return
    raise ConfigError(
        f"{message}; nothing was published (pass --allow-nonfinite to write such a model)"
    )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (one ``aminmax`` pass)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # float8: no aminmax; rare, so counted plainly
        return nonfinite_count(tensor) == 0
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are infinite or NaN (counted in slices of 2**20)."""
    flat = tensor.reshape(-1)
    step = 2**20
    return sum(
        int((~torch.isfinite(flat[i : i + step].float())).sum())
        for i in range(0, flat.numel(), step)
    )
