"""The reference `pearl_edu.core.slerp` is the textbook SLERP, to one ULP of its output.

The textbook version below is chapter 04's formula (eq:slerp) on whole tensors (chapter
05's eq:slerp-tensor) in ten lines of float32 torch, as the core computes it: the cosine of
the normalized copies, clamped, the two weights from the angle, the weighted sum of the
original tensors cast to the input dtype, and the linear fallback beyond |cos| > 0.9995.
What it leaves out is the core's order of the sums, mergekit's chunks of 2^20 elements.

The yardstick is one unit in the last place of the output dtype at the scale of the two
terms, |w0 a| + |w1 b|: where the terms nearly cancel, the output is tiny and so is its own
ULP, so the rounding of the terms is measured at the size at which it happens. Within one
chunk the textbook takes the core's sums (and gave its bits when this was written). Beyond,
it sums the whole tensor at once, and the two float32 cosines differ in their last digits:
float32 outputs then move by more than one of their ULPs (by 14 on the related pair here),
while the bfloat16 and float16 outputs that models are stored in stay within one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from pearl_edu import core
from pearl_edu.core.interpolation import CHUNK_ELEMENTS
from pearl_edu.ulp import ulp_at_each

Formula = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, ...]]


def textbook_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """SLERP as the textbook writes it, in float32: the result and its two weights."""
    x, y, t_ = a.flatten().float(), b.flatten().float(), torch.tensor(t, dtype=torch.float32)
    cos = (x / x.norm() * (y / y.norm())).sum().clamp(-1, 1)  # the dot product of unit vectors
    if cos.abs() > 0.9995:  # nearly parallel: sin(theta) is too small, interpolate linearly
        w0, w1 = 1 - t_, t_
    else:
        theta = torch.acos(cos)
        w0 = torch.sin((1 - t_) * theta) / torch.sin(theta)
        w1 = torch.sin(t_ * theta) / torch.sin(theta)
    return (w0 * x + w1 * y).reshape(a.shape).to(a.dtype), w0, w1


def linear_second_weight(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """A wrong SLERP: the textbook's, with LERP's weight ``t`` for the second tensor."""
    _, w0, _ = textbook_slerp(a, b, t)
    w1 = torch.tensor(t, dtype=torch.float32)
    return (w0 * a.float() + w1 * b.float()).to(a.dtype), w0, w1


def bfloat16_weights(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """A subtly wrong SLERP: the textbook's weights rounded to bfloat16 before the sum."""
    _, w0, w1 = textbook_slerp(a, b, t)
    w0, w1 = (w.to(torch.bfloat16).float() for w in (w0, w1))
    return (w0 * a.float() + w1 * b.float()).to(a.dtype), w0, w1


# (7,) and (64, 33) fit in one chunk; (1100, 1000) is two chunks, the second ragged.
SHAPES = [(7,), (64, 33), (1100, 1000)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TS = [0.0, 0.3, 0.5, 1.0, 1.2]
# Unrelated (cos ~ 0), related (cos ~ 0.89, about 27 degrees) and near-parallel (cos ~
# 0.99995: the linear fallback) pairs.
NOISE = {"unrelated": None, "related": 0.5, "near-parallel": 0.01}


@functools.cache
def pair(shape: tuple[int, ...], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 tensors of ``shape`` whose angle ``kind`` names, the same at each call."""
    generator = torch.Generator().manual_seed(len(shape) * 1000 + len(kind))
    a = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    return a, noise if NOISE[kind] is None else a + NOISE[kind] * noise


def steps_apart(formula: Formula, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """How far ``formula``'s SLERP is from the core's, element by element, in ULPs of the
    output dtype at the scale of the two terms."""
    ours, w0, w1 = formula(a, b, t)
    reference = core.slerp(a, b, t)
    assert ours.dtype == reference.dtype == a.dtype and ours.shape == reference.shape
    scale = (w0 * a.float()).abs() + (w1 * b.float()).abs()
    return (ours.double() - reference.double()).abs() / ulp_at_each(scale, a.dtype)


def beyond_one_chunk_in_float32(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether the core sums ``shape`` in several chunks and returns float32."""
    return dtype == torch.float32 and torch.Size(shape).numel() > CHUNK_ELEMENTS


@pytest.mark.parametrize("kind", list(NOISE))
@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_core_is_the_textbook_slerp_to_one_ulp(shape, dtype, t, kind):
    a, b = (x.to(dtype) for x in pair(shape, kind))
    apart = steps_apart(textbook_slerp, a, b, t)
    if beyond_one_chunk_in_float32(shape, dtype):
        # Sums in another order than the core's: a cosine off in its last digits moves
        # float32 outputs by more than one of their ULPs, and by far less than bfloat16's.
        one_bfloat16_ulp = torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float32).eps
        assert apart.max() <= one_bfloat16_ulp  # 2^16 float32 ULPs
    else:
        assert apart.max() <= 1


def test_beyond_one_chunk_the_textbook_is_not_the_core_bit_for_bit():
    """The big cases test something: there the textbook's sums differ from the core's."""
    a, b = pair((1100, 1000), "related")
    assert core.slerp(a, b, 0.3).ne(textbook_slerp(a, b, 0.3)[0]).any()
    assert steps_apart(textbook_slerp, a, b, 0.3).max() > 1  # float32: more than one ULP
    a16, b16 = a.bfloat16(), b.bfloat16()
    assert core.slerp(a16, b16, 0.3).ne(textbook_slerp(a16, b16, 0.3)[0]).sum() > 100
    assert steps_apart(textbook_slerp, a16, b16, 0.3).max() <= 1


def wrong(formula: Formula, dtype: torch.dtype, reason: str):
    """A case that must fail the one-ULP check (an unexpected pass fails the test)."""
    xfail = pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)
    return pytest.param(formula, dtype, marks=xfail, id=f"{formula.__name__}-{dtype}")


@pytest.mark.parametrize(
    ("formula", "dtype"),
    [pytest.param(textbook_slerp, dtype, id=f"textbook_slerp-{dtype}") for dtype in DTYPES]
    + [wrong(linear_second_weight, dtype, "LERP's second weight") for dtype in DTYPES]
    # (Weights rounded to bfloat16 are within a ULP of bfloat16 outputs: not a wrong result.)
    + [wrong(bfloat16_weights, dtype, "weights rounded") for dtype in DTYPES[1:]],
)
def test_a_wrong_weight_is_more_than_one_ulp_off(formula, dtype):
    """The check above fails on a SLERP whose weights are wrong, even slightly."""
    a, b = (x.to(dtype) for x in pair((64, 33), "related"))
    assert steps_apart(formula, a, b, 0.3).max() <= 1
