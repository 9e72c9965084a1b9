"""Compare two model folders tensor by tensor, without loading either model whole.

`verify` answers the question a reader asks after re-running a merge: "is my model the
same as the published one?". It streams both folders through `pearl_edu.reading`, one
tensor at a time, compares each pair (`pearl_edu.comparison`: the largest absolute
difference, how many elements differ, how many units in the last place apart) and gathers
the result in a `VerifyReport`, which says whether the models agree and, in `summary`,
where they differ, as text.

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
the inputs that made it (``input_scale_ulp``, `pearl_edu.contract`), the measure in which a
GPU merge's contract with the reference is stated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from pearl_edu.comparison import TensorComparison, compare_tensors, shape_mismatch
from pearl_edu.contract import MergeInputs
from pearl_edu.errors import ModelError

if TYPE_CHECKING:
    from pearl_edu.config import MergeConfig

# The tolerance for a fresh merge against the published Pearl-7B-slerp, made by a NumPy-era
# mergekit: every element within one step of bfloat16 at its tensor's largest value, and at
# most a quarter of each tensor's elements differing at all (about twice the 13% measured).
# See the module's docstring.
NUMPY_ERA_TOLERANCE = {"scale_ulp": 1.0, "max_fraction": 0.25}

Progress = Callable[[int, int, str], None]
"""Called as ``progress(done, total, tensor_name)`` after each tensor is compared."""
Number = TypeVar("Number", int, float)


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
        return _largest_measured([t.max_ulp_diff for t in self.tensors], default=0)

    @property
    def max_scale_ulp_diff(self) -> float | None:
        """The largest difference in steps at its tensor's scale; None when some tensor
        could not be measured so."""
        return _largest_measured([t.max_scale_ulp_diff for t in self.tensors], default=0.0)

    @property
    def max_input_scale_ulp_diff(self) -> float | None:
        """The largest difference in steps at its element's input scale; None when some
        tensor was not measured so."""
        return _largest_measured([t.max_input_scale_ulp_diff for t in self.tensors], default=0.0)

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
    from pearl_edu.reading import ModelReader, read_header

    if not math.isfinite(atol) or atol < 0:
        raise ModelError(f"atol must be a finite number >= 0, got {atol}")
    if max_ulp is not None and (
        isinstance(max_ulp, bool) or not isinstance(max_ulp, int) or max_ulp < 0
    ):
        raise ModelError(f"max_ulp must be a whole number >= 0, got {max_ulp!r}")
    _check_steps("scale_ulp", scale_ulp)
    if max_fraction is not None and (
        isinstance(max_fraction, bool)
        or not isinstance(max_fraction, int | float)
        or not 0 <= max_fraction <= 1
    ):
        raise ModelError(f"max_fraction must be a number from 0 to 1, got {max_fraction!r}")
    _check_steps("input_scale_ulp", input_scale_ulp)
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


def _check_steps(option: str, steps: float | None) -> None:
    """Raise `ModelError` unless ``steps`` (the value of ``option``) is None or a finite
    number >= 0."""
    if steps is not None and (
        isinstance(steps, bool)
        or not isinstance(steps, int | float)
        or not math.isfinite(steps)
        or steps < 0
    ):
        raise ModelError(f"{option} must be a finite number >= 0, got {steps!r}")


def _compare_one(
    name: str, meta_a, meta_b, reader_a, reader_b, inputs: MergeInputs | None = None
) -> TensorComparison:
    """Compare one tensor of the two models, reading values only when the shapes agree."""
    if tuple(meta_a.shape) != tuple(meta_b.shape):
        return shape_mismatch(name, meta_a, meta_b)
    scale = (lambda: inputs.scale(name)) if inputs is not None else None
    return compare_tensors(name, reader_a.read(name), reader_b.read(name), scale)


def _largest_measured(values: list[Number | None], *, default: Number) -> Number | None:
    """The largest of the tensors' ``values`` (``default`` when there are none); None when
    some tensor was not measured."""
    if any(v is None for v in values):
        return None
    return max(values, default=default)  # type: ignore[type-var]


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
