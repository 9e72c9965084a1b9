"""How two tensors differ: the measures `pearl_edu.verify` reports for each tensor.

`compare_tensors` compares the values in float64, in chunks, so memory stays a few
tensors. It records the largest absolute difference,

$$ \\max_i |a_i - b_i|, $$

how many elements differ at all, and how far apart the two values are in units in the
last place (ULP, `pearl_edu.ulp`) of the tensor's dtype: two bfloat16 numbers that are
neighbours on the bfloat16 number line are 1 ULP apart. "One ULP on a few elements" is what
two correct implementations of the same float32 math produce when they round a sum in a
different order; anything larger points at a real difference.

It also measures the largest difference in steps of the dtype at the tensor's scale, one
step at its largest finite value, and, given the elements' input scale
(`pearl_edu.contract`), at each element's own. `TensorComparison.within` judges a tensor
by a tolerance in any of these measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from pearl_edu.contract import InputScale
from pearl_edu.ulp import SAME_WIDTH_INT, ulp_at, ulp_at_each, ulp_distance

# Elements compared per step: 4M float64 values are 32 MB, small next to a 7B tensor.
CHUNK_ELEMENTS = 4 * 1024 * 1024


class _HasShape(Protocol):
    """A tensor, or a header's description of one."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TensorComparison:
    """How one tensor present in both models compares."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: torch.dtype
    dtype_b: torch.dtype
    num_elements: int
    num_differing: int = 0
    max_abs_diff: float = 0.0
    max_ulp_diff: int | None = 0
    """ULP distance in the common dtype; None when shapes or dtypes differ, or for integers."""
    max_scale_ulp_diff: float | None = 0.0
    """The largest difference in steps of the dtype at the tensor's scale: ``max |a - b|``
    over one ULP of the largest finite ``|value|`` of either tensor. None when shapes or
    dtypes differ, or for integers."""
    max_input_scale_ulp_diff: float | None = None
    """The largest difference in steps of the dtype at each element's input scale
    (`input_scale`); None when not measured (no config given), or not measurable."""

    @property
    def same_layout(self) -> bool:
        """Same shape and same dtype, the precondition for the models to be the same."""
        return self.shape_a == self.shape_b and self.dtype_a == self.dtype_b

    @property
    def identical(self) -> bool:
        """Same shape, same dtype, same value in every element."""
        return self.same_layout and self.num_differing == 0

    @property
    def fraction_differing(self) -> float:
        """The share of the tensor's elements that differ (0 for an empty tensor)."""
        return self.num_differing / self.num_elements if self.num_elements else 0.0

    def within(
        self,
        atol: float,
        max_ulp: int | None = None,
        *,
        scale_ulp: float | None = None,
        max_fraction: float | None = None,
        input_scale_ulp: float | None = None,
    ) -> bool:
        """Same shape and dtype, and no element further apart than ``atol``, or else (when
        ``max_ulp`` is given) no element more than ``max_ulp`` units in the last place apart,
        or else (when ``scale_ulp`` is given) no element more than ``scale_ulp`` steps of the
        dtype at the tensor's scale apart, or else (when ``input_scale_ulp`` is given) no
        element more than that many steps at its input scale apart; and, when
        ``max_fraction`` is given, at most that share of the elements differing at all."""
        if not self.same_layout:
            return False
        if max_fraction is not None and self.fraction_differing > max_fraction:
            return False
        if self.max_abs_diff <= atol:
            return True
        if max_ulp is not None and self.max_ulp_diff is not None and self.max_ulp_diff <= max_ulp:
            return True
        if (
            scale_ulp is not None
            and self.max_scale_ulp_diff is not None
            and self.max_scale_ulp_diff <= scale_ulp
        ):
            return True
        return (
            input_scale_ulp is not None
            and self.max_input_scale_ulp_diff is not None
            and self.max_input_scale_ulp_diff <= input_scale_ulp
        )


def compare_tensors(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: InputScale | Callable[[], InputScale] | None = None,
) -> TensorComparison:
    """Compare two tensors: largest absolute difference, differing elements, ULP distance.

    Shapes must match for values to be compared; a shape mismatch is recorded, not raised.
    NaNs in the same places count as equal; a NaN facing a number counts as an infinite
    difference. ``scale``, the elements' input scale (`input_scale`), or a function that
    makes it (called only when the tensors differ), gives ``max_input_scale_ulp_diff``.
    """
    if a.shape != b.shape:
        return shape_mismatch(name, a, b)
    comparison = TensorComparison(
        name=name,
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=a.dtype,
        dtype_b=b.dtype,
        num_elements=a.numel(),
    )
    measure_ulps = a.dtype == b.dtype and a.dtype in SAME_WIDTH_INT
    measure_input_scale = scale is not None and measure_ulps
    if measure_input_scale:
        comparison = replace(comparison, max_input_scale_ulp_diff=0.0)
    if a.dtype == b.dtype and torch.equal(a, b):
        return comparison  # the common case, in one cheap pass: nothing to measure

    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    if measure_input_scale and not isinstance(scale, InputScale):
        scale = scale()  # type: ignore[misc]  # read the inputs: the tensors differ
    num_differing, max_abs, max_ulp, largest, max_input = 0, 0.0, 0, 0.0, 0.0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        chunk_a = flat_a[start : start + CHUNK_ELEMENTS]
        chunk_b = flat_b[start : start + CHUNK_ELEMENTS]
        # Usually few elements differ: they are found in the tensors' own dtype, and only
        # they are measured in float64 (across dtypes, every element is).
        if a.dtype == b.dtype:
            where = chunk_a != chunk_b
        else:
            where = torch.ones(chunk_a.shape, dtype=torch.bool)
        where = where.nonzero().squeeze(1)
        some_a, some_b = chunk_a[where], chunk_b[where]
        differs, abs_diff = _elementwise_difference(some_a, some_b)
        where, some_a, some_b, abs_diff = (x[differs] for x in (where, some_a, some_b, abs_diff))
        num_differing += where.numel()
        if where.numel():
            max_abs = max(max_abs, float(abs_diff.max()))
        if measure_ulps:
            if where.numel():
                max_ulp = max(max_ulp, int(ulp_distance(some_a, some_b).max()))
            largest = max(largest, _largest_finite_magnitude(chunk_a, chunk_b))
        if measure_input_scale and where.numel():
            part = slice(start, start + chunk_a.numel())
            at_scale = ulp_at_each(scale.at(part, where), a.dtype)  # type: ignore[union-attr]
            max_input = max(max_input, float((abs_diff / at_scale).max()))
    return replace(
        comparison,
        num_differing=num_differing,
        max_abs_diff=max_abs,
        max_ulp_diff=max_ulp if measure_ulps else None,
        max_scale_ulp_diff=max_abs / ulp_at(largest, a.dtype) if measure_ulps else None,
        max_input_scale_ulp_diff=max_input if measure_input_scale else None,
    )


def _largest_finite_magnitude(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest finite ``|value|`` in ``a`` and ``b`` (0 when there is none)."""
    largest = 0.0
    for x in (a, b):
        if x.numel() == 0:
            continue
        low, high = (float(v) for v in torch.aminmax(x))
        if math.isfinite(low) and math.isfinite(high):  # one pass, in x's own dtype
            largest = max(largest, -low, high)
            continue
        magnitude = x.abs()
        finite = magnitude[magnitude.isfinite()]
        if finite.numel():
            largest = max(largest, float(finite.max()))
    return largest


def shape_mismatch(name: str, a: _HasShape, b: _HasShape) -> TensorComparison:
    """The record of two tensors that cannot be compared value by value."""
    return TensorComparison(
        name=name,
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=a.dtype,
        dtype_b=b.dtype,
        num_elements=math.prod(a.shape),
        num_differing=math.prod(a.shape),
        max_abs_diff=math.inf,
        max_ulp_diff=None,
        max_scale_ulp_diff=None,
    )


def _elementwise_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which elements differ, and |a - b| in float64 (exact for every float dtype here)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    both_nan = a64.isnan() & b64.isnan()
    differs = (a64 != b64) & ~both_nan
    # A NaN against a number is a difference without a size: call it infinite. Equal
    # elements (infinities included, whose difference would be NaN) count as zero.
    abs_diff = torch.nan_to_num((a64 - b64).abs(), nan=math.inf, posinf=math.inf)
    abs_diff = torch.where(differs, abs_diff, 0.0)
    return differs, abs_diff
