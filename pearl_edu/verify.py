"""Compare two model folders tensor by tensor, without loading either model whole.

`verify` answers the question a reader asks after re-running a merge: "is my model the
same as the published one?". It streams both folders through `pearl_edu.io`, one tensor
at a time, and compares the values in float64 in chunks, so memory stays a few tensors.

For every tensor present in both models it records the largest absolute difference,

$$ \\max_i |a_i - b_i|, $$

how many elements differ at all, and how far apart the two values are in units in the
last place (ULP) of the tensor's dtype: two bfloat16 numbers that are neighbours on the
bfloat16 number line are 1 ULP apart. "One ULP on a few elements" is what two correct
implementations of the same float32 math produce when they round a sum in a different
order; anything larger points at a real difference.

A model merged by another version of the tool can differ by more ULPs on a few elements:
where the two weighted inputs nearly cancel, the output is small and its ULP is tiny, so
weights that differ in their last bits move it by several of its own ULPs. Measured at the
tensor's scale, one step of the dtype at the tensor's largest value, the same difference is
at most one step. ``scale_ulp`` accepts such differences and ``max_fraction`` bounds how many
elements of each tensor may differ at all: rounding moved up to 13% of a 131-million-element
tensor on Mistral-7B-shaped stand-ins, while another ``t`` of nearly identical parents,
which also stays within one step, moved 45% of it, and of distant ones 97%.
`NUMPY_ERA_TOLERANCE` is the tolerance to verify a fresh merge against the published
Pearl-7B-slerp, which a mergekit of early 2024 computed with NumPy (measured by
``bench/numpy_era_drift.py``, recorded in ``pearl_edu/data/numpy_era_drift.json``).

Given the merge's config, `verify` measures each element's difference at the scale of
the inputs that made it (``input_scale_ulp``): in steps of the dtype at, for SLERP,
$|w_0 x_i| + |w_1 y_i|$, the reference's weights applied to the element's inputs
(`input_scale`). A correct element where the two weighted inputs nearly cancel is then
small next to its scale, whatever its own ULP; this is the measure in which a GPU merge's
contract with the reference is stated (`pearl_edu.backends.cuda`, the book's appendix
"The GPU contract").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from pearl_edu.errors import ModelError

if TYPE_CHECKING:
    from pearl_edu.config import MergeConfig

# Elements compared per step: 4M float64 values are 32 MB, small next to a 7B tensor.
CHUNK_ELEMENTS = 4 * 1024 * 1024

# The tolerance for a fresh merge against the published Pearl-7B-slerp, made by a NumPy-era
# mergekit: every element within one step of bfloat16 at its tensor's largest value, and at
# most a quarter of each tensor's elements differing at all (about twice the 13% measured).
# See the module's docstring.
NUMPY_ERA_TOLERANCE = {"scale_ulp": 1.0, "max_fraction": 0.25}

# Integer types with the same width as each float type, to read a float's bit pattern.
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


class _HasShape(Protocol):
    """A tensor, or a header's description of one."""

    shape: tuple[int, ...]
    dtype: torch.dtype


Progress = Callable[[int, int, str], None]
"""Called as ``progress(done, total, tensor_name)`` after each tensor is compared."""


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


@dataclass(frozen=True)
class VerifyReport:
    """The result of comparing two model folders; ``ok`` says whether they agree."""

    dir_a: Path
    dir_b: Path
    atol: float
    tensors: tuple[TensorComparison, ...]
    max_ulp: int | None = None
    only_in_a: tuple[str, ...] = field(default=())
    only_in_b: tuple[str, ...] = field(default=())
    scale_ulp: float | None = None
    max_fraction: float | None = None
    input_scale_ulp: float | None = None

    @property
    def identical(self) -> bool:
        """The same tensor names, shapes, dtypes, and the same value in every element."""
        return self._same_names and all(t.identical for t in self.tensors)

    @property
    def ok(self) -> bool:
        """The same tensor names, shapes and dtypes, and each tensor's values within ``atol``
        or, when ``max_ulp`` is set, within ``max_ulp`` units in the last place, or, when
        ``scale_ulp`` is set, within ``scale_ulp`` steps at the tensor's scale, or, when
        ``input_scale_ulp`` is set, within that many steps at each element's input scale;
        and, when ``max_fraction`` is set, at most that share of each tensor's elements
        differing."""
        return self._same_names and all(
            t.within(
                self.atol,
                self.max_ulp,
                scale_ulp=self.scale_ulp,
                max_fraction=self.max_fraction,
                input_scale_ulp=self.input_scale_ulp,
            )
            for t in self.tensors
        )

    @property
    def _same_names(self) -> bool:
        return not self.only_in_a and not self.only_in_b

    @property
    def differing(self) -> list[TensorComparison]:
        """Tensors that are not identical, the largest difference first."""
        found = [t for t in self.tensors if not t.identical]
        return sorted(found, key=_badness, reverse=True)

    @property
    def num_elements(self) -> int:
        """Elements compared, over all tensors present in both models."""
        return sum(t.num_elements for t in self.tensors)

    @property
    def num_differing(self) -> int:
        """Elements whose values differ (all elements of a tensor whose shapes differ)."""
        return sum(t.num_differing for t in self.tensors)

    @property
    def max_abs_diff(self) -> float:
        """The largest absolute difference; infinite when some tensor's shapes differ."""
        return max((t.max_abs_diff for t in self.tensors), default=0.0)

    @property
    def max_ulp_diff(self) -> int | None:
        """The largest ULP distance; None when some tensor could not be measured in ULPs."""
        ulps = [t.max_ulp_diff for t in self.tensors]
        if any(u is None for u in ulps):
            return None
        return max(ulps, default=0)  # type: ignore[type-var]

    @property
    def max_scale_ulp_diff(self) -> float | None:
        """The largest difference in steps at its tensor's scale; None when some tensor
        could not be measured so."""
        steps = [t.max_scale_ulp_diff for t in self.tensors]
        if any(s is None for s in steps):
            return None
        return max(steps, default=0.0)  # type: ignore[type-var]

    @property
    def max_input_scale_ulp_diff(self) -> float | None:
        """The largest difference in steps at its element's input scale; None when some
        tensor was not measured so."""
        steps = [t.max_input_scale_ulp_diff for t in self.tensors]
        if any(s is None for s in steps):
            return None
        return max(steps, default=0.0)  # type: ignore[type-var]

    @property
    def max_fraction_differing(self) -> float:
        """The largest share of differing elements in one tensor."""
        return max((t.fraction_differing for t in self.tensors), default=0.0)

    def summary(self, max_rows: int = 20) -> str:
        """A readable text report: the differing tensors as a table, then the totals."""
        lines = [f"A: {self.dir_a}", f"B: {self.dir_b}"]
        lines += _missing_lines("only in A", self.only_in_a, max_rows)
        lines += _missing_lines("only in B", self.only_in_b, max_rows)
        differing = self.differing
        if differing:
            lines.append("")
            lines += _difference_table(differing[:max_rows])
            if len(differing) > max_rows:
                lines.append(f"... and {len(differing) - max_rows} more differing tensors")
        lines.append("")
        lines += self._totals()
        return "\n".join(lines)

    def _tolerance(self) -> str:
        tolerance = f"atol={self.atol:g}"
        if self.max_ulp is not None:
            tolerance += f" or {self.max_ulp} ULP"
        if self.scale_ulp is not None:
            tolerance += f" or {self.scale_ulp:g} ULP at the tensor's scale"
        if self.input_scale_ulp is not None:
            tolerance += f" or {self.input_scale_ulp:g} ULP at the inputs' scale"
        if self.max_fraction is not None:
            tolerance += f", at most {self.max_fraction:.3%} of each tensor differing"
        return tolerance

    def _totals(self) -> list[str]:
        fraction = self.num_differing / self.num_elements if self.num_elements else 0.0
        ulp = self.max_ulp_diff
        lines = [
            f"tensors compared: {len(self.tensors)}, differing: {len(self.differing)}",
            f"elements compared: {self.num_elements:,}, differing: {self.num_differing:,}"
            f" ({fraction:.3%})",
            f"largest absolute difference: {self.max_abs_diff:.6g}"
            + (f" ({ulp} ULP)" if ulp is not None else ""),
        ]
        if self.scale_ulp is not None or self.max_fraction is not None:
            steps = self.max_scale_ulp_diff
            lines.append(
                "at the tensors' scale: largest difference "
                + ("-" if steps is None else f"{steps:.3g} ULP")
                + f", largest share of a tensor differing {self.max_fraction_differing:.3%}"
            )
        if self.input_scale_ulp is not None:
            steps = self.max_input_scale_ulp_diff
            lines.append(
                "at the inputs' scale: largest difference "
                + ("-" if steps is None else f"{steps:.3g} ULP")
            )
        if self.identical:
            verdict = "identical"
        elif self.ok:
            verdict = f"equal within {self._tolerance()}"
        else:
            verdict = "DIFFERENT"
        lines.append(f"result: {verdict}")
        return lines


def verify(
    dir_a: str | Path,
    dir_b: str | Path,
    *,
    atol: float = 0.0,
    max_ulp: int | None = None,
    progress: Progress | None = None,
    scale_ulp: float | None = None,
    max_fraction: float | None = None,
    config: MergeConfig | str | Path | None = None,
    input_scale_ulp: float | None = None,
) -> VerifyReport:
    """Compare two model folders tensor by tensor and report every difference.

    The report is ``ok`` when every tensor is within ``atol``, or ``max_ulp`` units in the
    last place, or ``scale_ulp`` steps of its dtype at its largest value, or
    ``input_scale_ulp`` steps at each element's input scale (each test used when given),
    and, with ``max_fraction``, has at most that share of its elements differing.
    ``**NUMPY_ERA_TOLERANCE`` is the tolerance against the published Pearl.

    ``config`` is the merge both models were made by (anything `pearl_edu.load_config`
    takes); with it, each tensor's inputs are read from its models to measure the
    difference at the inputs' scale (`input_scale`), which ``input_scale_ulp`` needs.

    Only headers are read up front; values are read one tensor at a time from each model
    and compared in chunks of float64, so memory stays a few tensors whatever the model size.
    """
    from pearl_edu.io import ModelReader, read_header

    if not math.isfinite(atol) or atol < 0:
        raise ModelError(f"atol must be a finite number >= 0, got {atol}")
    if max_ulp is not None and (
        isinstance(max_ulp, bool) or not isinstance(max_ulp, int) or max_ulp < 0
    ):
        raise ModelError(f"max_ulp must be a whole number >= 0, got {max_ulp!r}")
    if scale_ulp is not None and (
        isinstance(scale_ulp, bool)
        or not isinstance(scale_ulp, int | float)
        or not math.isfinite(scale_ulp)
        or scale_ulp < 0
    ):
        raise ModelError(f"scale_ulp must be a finite number >= 0, got {scale_ulp!r}")
    if max_fraction is not None and (
        isinstance(max_fraction, bool)
        or not isinstance(max_fraction, int | float)
        or not 0 <= max_fraction <= 1
    ):
        raise ModelError(f"max_fraction must be a number from 0 to 1, got {max_fraction!r}")
    if input_scale_ulp is not None and (
        isinstance(input_scale_ulp, bool)
        or not isinstance(input_scale_ulp, int | float)
        or not math.isfinite(input_scale_ulp)
        or input_scale_ulp < 0
    ):
        raise ModelError(f"input_scale_ulp must be a finite number >= 0, got {input_scale_ulp!r}")
    if input_scale_ulp is not None and config is None:
        raise ModelError(
            "input_scale_ulp: the inputs' scale needs the merge's config (--config CONFIG)"
        )
    header_a, header_b = read_header(dir_a), read_header(dir_b)
    names_a, names_b = set(header_a.tensors), set(header_b.tensors)
    common = [name for name in header_a.tensors if name in names_b]

    inputs = MergeInputs(config) if config is not None else None
    comparisons = []
    try:
        with ModelReader(header_a) as reader_a, ModelReader(header_b) as reader_b:
            for done, name in enumerate(common, start=1):
                meta_a, meta_b = header_a.tensors[name], header_b.tensors[name]
                comparisons.append(_compare_one(name, meta_a, meta_b, reader_a, reader_b, inputs))
                if progress is not None:
                    progress(done, len(common), name)
    finally:
        if inputs is not None:
            inputs.close()

    return VerifyReport(
        dir_a=Path(dir_a),
        dir_b=Path(dir_b),
        atol=atol,
        max_ulp=max_ulp,
        scale_ulp=scale_ulp,
        max_fraction=max_fraction,
        input_scale_ulp=input_scale_ulp,
        tensors=tuple(comparisons),
        only_in_a=tuple(sorted(names_a - names_b)),
        only_in_b=tuple(sorted(names_b - names_a)),
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
        return _shape_mismatch(name, a, b)
    comparison = TensorComparison(
        name=name,
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=a.dtype,
        dtype_b=b.dtype,
        num_elements=a.numel(),
    )
    measure_ulps = a.dtype == b.dtype and a.dtype in _SAME_WIDTH_INT
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


def ulp_at(magnitude: float, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at ``magnitude``: the gap from a number of
    that size to the next. Below the smallest normal number, the gap there.

    >>> ulp_at(1.0, torch.bfloat16), ulp_at(3.0, torch.bfloat16)
    (0.0078125, 0.015625)
    """
    info = torch.finfo(dtype)
    _, exponent = math.frexp(max(abs(magnitude), info.smallest_normal))
    return math.ldexp(info.eps, exponent - 1)


def ulp_at_each(magnitudes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`ulp_at` elementwise: one step of ``dtype`` at each of ``magnitudes``, in float64.

    >>> ulp_at_each(torch.tensor([1.0, 3.0, 0.0]), torch.bfloat16).tolist()[:2]
    [0.0078125, 0.015625]
    """
    info = torch.finfo(dtype)
    floor = (
        magnitudes.to(torch.float64).abs().nan_to_num(posinf=info.max).clamp(info.smallest_normal)
    )
    _, exponent = torch.frexp(floor)
    return torch.ldexp(torch.full_like(floor, info.eps), exponent - 1)


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


def _shape_mismatch(name: str, a: _HasShape, b: _HasShape) -> TensorComparison:
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


def _compare_one(
    name: str, meta_a, meta_b, reader_a, reader_b, inputs: MergeInputs | None = None
) -> TensorComparison:
    """Compare one tensor of the two models, reading values only when the shapes agree."""
    if tuple(meta_a.shape) != tuple(meta_b.shape):
        return _shape_mismatch(name, meta_a, meta_b)
    scale = (lambda: inputs.scale(name)) if inputs is not None else None
    return compare_tensors(name, reader_a.read(name), reader_b.read(name), scale)


# --------------------------------------------------------------------------------------
# The inputs' scale: how large the numbers are that each output element is made from
# --------------------------------------------------------------------------------------


class InputScale:
    """The input scale of a tensor's elements, computed only for those asked for.

    ``formula`` maps the inputs' values at some elements (float64, one tensor per input,
    in the inputs' order) to those elements' scales.
    """

    def __init__(
        self,
        formula: Callable[[list[torch.Tensor]], torch.Tensor],
        inputs: Sequence[torch.Tensor],
    ) -> None:
        self.formula = formula
        self.shape = tuple(inputs[0].shape)
        self.flat = [x.reshape(-1) for x in inputs]

    def at(self, part: slice, selected: torch.Tensor | None = None) -> torch.Tensor:
        """The scales of the flat elements ``part`` (those of them ``selected``, when given)."""
        values = [x[part] for x in self.flat]
        if selected is not None:
            values = [v[selected] for v in values]
        return self.formula([v.to(torch.float64) for v in values])

    def full(self) -> torch.Tensor:
        """Every element's scale, in the tensor's shape."""
        return self.at(slice(None)).reshape(self.shape)


def input_scale(
    method: str,
    inputs: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    *,
    name: str = "tensor",
) -> InputScale:
    r"""Each output element's input scale: the size of the terms its method adds.

    - ``slerp``: $|w_0 x_i| + |w_1 y_i|$, with the reference's weights
      (`pearl_edu.backends.cuda.slerp_input_scale`);
    - ``linear``: $\sum_k |w_k x_{k,i}|$, over $|\sum_k w_k|$ when ``normalize``;
    - ``task_arithmetic`` and ``ties``: $|b_i| + |\lambda| \max_k |\delta_{k,i}|$ when
      ``normalize`` (an average of the task vectors), else
      $|b_i| + |\lambda| \sum_k |w_k \delta_{k,i}|$.

    Other methods (DARE's random drops among them) have no element-by-element agreement
    to measure: `ModelError`.
    """
    from pearl_edu.backends.cuda import reference_weights

    if method == "slerp":
        other = 1 - base_index
        w0, w1 = reference_weights(inputs[base_index], inputs[other], float(params["t"]))

        def slerp_scale(x: list[torch.Tensor]) -> torch.Tensor:
            return x[base_index].abs().mul_(abs(w0)).add_(x[other].abs().mul_(abs(w1)))

        return InputScale(slerp_scale, inputs)
    if method == "linear":
        weights = [values["weight"] for values in input_params]
        divisor = (abs(sum(weights)) if params.get("normalize") else 1.0) or 1.0

        def linear_scale(x: list[torch.Tensor]) -> torch.Tensor:
            total = sum(v.abs() * abs(w) for v, w in zip(x, weights, strict=True))
            return total / divisor  # type: ignore[operator]

        return InputScale(linear_scale, inputs)
    if method in ("task_arithmetic", "ties"):
        others = [k for k in range(len(inputs)) if k != base_index]
        weights = [abs(input_params[k]["weight"]) for k in others]
        scale = abs(float(params.get("lambda", 1.0)))
        normalize = bool(params.get("normalize"))

        def task_vector_scale(x: list[torch.Tensor]) -> torch.Tensor:
            base = x[base_index]
            deltas = [(x[k] - base).abs() for k in others]
            if not deltas:
                return base.abs()
            if normalize:  # an average of the agreeing task vectors: at most the largest
                mixed = torch.stack(deltas).amax(dim=0)
            else:
                mixed = sum(d * w for d, w in zip(deltas, weights, strict=True))
            return base.abs() + scale * mixed  # type: ignore[operator]

        return InputScale(task_vector_scale, inputs)
    raise ModelError(
        f"{name}: --input-scale-ulp: merge method {method!r} has no input scale (slerp, "
        "linear, task_arithmetic and ties have one); compare with --scale-ulp instead"
    )


class MergeInputs:
    """The inputs of each output tensor of a merge, read from its models to give `input_scale`."""

    def __init__(self, config: MergeConfig | str | Path) -> None:
        from pearl_edu.config import MergeConfig, load_config, torch_dtype
        from pearl_edu.hub import resolve_model
        from pearl_edu.io import ModelReader, read_header
        from pearl_edu.plan import plan

        if not isinstance(config, MergeConfig):
            config = load_config(config)
        self.dtype = (
            torch_dtype(config.dtype, where=config.source, key="dtype") if config.dtype else None
        )
        headers = {ref: read_header(resolve_model(ref)) for ref in config.models()}
        self.jobs = {job.name: job for job in plan(config, headers).tensors}
        self.readers = {ref: ModelReader(header) for ref, header in headers.items()}

    def scale(self, name: str) -> InputScale:
        """The input scale of output tensor ``name`` (`input_scale`), its inputs read."""
        job = self.jobs.get(name)
        if job is None:
            raise ModelError(f"{name}: not a tensor of the merge's config; verify its output")
        tensors = []
        for source in job.inputs:
            tensor = self.readers[source.model].read(source.tensor)
            tensors.append(tensor.to(self.dtype or tensor.dtype))
        input_params = job.input_params or [{}] * len(tensors)
        return input_scale(job.method, tensors, job.base_index, job.params, input_params, name=name)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


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


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps of the dtype's number line separate ``a`` from ``b``, elementwise.

    Both must have the same floating dtype (float16, bfloat16, float32 or float64); the
    result is int64. Neighbouring values are 1 apart; +0 and -0 are 0 apart.

    A float's bit pattern read as a sign-magnitude integer is ordered like the floats it
    encodes; turning it into an ordinary signed integer makes neighbours differ by one.
    """
    return (_ordered_bits(a) - _ordered_bits(b)).abs()


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``x`` as an int64 that increases by one from a float to the next."""
    int_dtype = _SAME_WIDTH_INT[x.dtype]
    bits = x.contiguous().view(int_dtype).to(torch.int64)
    magnitude_mask = (1 << (torch.iinfo(int_dtype).bits - 1)) - 1
    # Negative floats have the sign bit set: their magnitude counts downwards from zero.
    return torch.where(bits < 0, -(bits & magnitude_mask), bits)


def _badness(t: TensorComparison) -> tuple[bool, float, int]:
    """Sort key: layout mismatches first, then by largest difference, then by count."""
    return (not t.same_layout, t.max_abs_diff, t.num_differing)


def _missing_lines(label: str, names: tuple[str, ...], max_rows: int) -> list[str]:
    if not names:
        return []
    lines = [f"{len(names)} tensors {label}:"] + [f"  {name}" for name in names[:max_rows]]
    if len(names) > max_rows:
        lines.append(f"  ... and {len(names) - max_rows} more")
    return lines


def _difference_table(rows: list[TensorComparison]) -> list[str]:
    """Format differing tensors as an aligned text table."""
    header = ("tensor", "max |a-b|", "ULP", "differing", "note")
    body = [
        (
            t.name,
            f"{t.max_abs_diff:.4g}",
            "-" if t.max_ulp_diff is None else str(t.max_ulp_diff),
            f"{t.num_differing:,}/{t.num_elements:,}",
            _layout_note(t),
        )
        for t in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]


def _layout_note(t: TensorComparison) -> str:
    notes = []
    if t.shape_a != t.shape_b:
        notes.append(f"shape {list(t.shape_a)} vs {list(t.shape_b)}")
    if t.dtype_a != t.dtype_b:
        notes.append(f"dtype {_dtype_name(t.dtype_a)} vs {_dtype_name(t.dtype_b)}")
    return ", ".join(notes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
