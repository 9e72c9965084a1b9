"""Units in the last place: the steps of a float dtype's number line.

A float dtype's numbers are spaced evenly between consecutive powers of two, and the gap
doubles from one power to the next: one **unit in the last place** (ULP) of a dtype at a
magnitude is the gap from a number of that size to the next (`ulp_at`, `ulp_at_each`). Two
numbers of one dtype are as many ULPs apart as there are steps of its number line between
them (`ulp_distance`), and the same number when their bits are the same (`same_bits`), a
test stricter than ``==``, for which -0.0 is +0.0 and a NaN is not itself.
"""

from __future__ import annotations

import math

import torch

# Integer types with the same width as each float type, to read a float's bit pattern.
SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
# Integer types by width in bytes, to read any element's bits.
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    int_dtype = SAME_WIDTH_INT[x.dtype]
    bits = x.contiguous().view(int_dtype).to(torch.int64)
    magnitude_mask = (1 << (torch.iinfo(int_dtype).bits - 1)) - 1
    # Negative floats have the sign bit set: their magnitude counts downwards from zero.
    return torch.where(bits < 0, -(bits & magnitude_mask), bits)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits: same dtype, same shape, and every element
    the same bit pattern.

    Stricter than ``torch.equal``, for which -0.0 is +0.0 and a NaN is not itself: each
    element is read as an integer of its width, so -0.0 and +0.0 differ, and two NaNs are
    the same only with the same sign and payload. This is how a merge's output is
    compared with a reference that it must reproduce to the last bit.

    >>> same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    False
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bits(a), _bits(b).to(a.device))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bits of ``x``: an integer view of the same width (bytes of a wider element)."""
    int_dtype = _INT_OF_WIDTH.get(x.element_size())
    if int_dtype is None:  # complex128: its bytes
        return x.reshape(-1).view(torch.uint8)
    return x.view(int_dtype)
