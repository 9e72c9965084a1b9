"""Tests of `pearl_edu.ulp.same_bits`: two tensors compared bit for bit."""

from __future__ import annotations

import pytest
import torch

from pearl_edu.ulp import same_bits

FLOATS = [
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` whose elements have the given bit patterns (as unsigned)."""
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    width = 8 * dtype.itemsize
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in bits]
    return torch.tensor(signed, dtype=int_dtype).view(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_tensor_has_the_same_bits_as_its_copy(dtype):
    x = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]).to(dtype)
    assert same_bits(x, x.clone())
    assert same_bits(x[::2], x.clone()[::2])  # views with strides
    assert same_bits(x[0], x.clone()[0])  # no dimensions


@pytest.mark.parametrize("dtype", FLOATS)
def test_minus_zero_is_not_plus_zero(dtype):
    plus = torch.zeros(3, dtype=dtype)
    minus = from_bits([1 << (8 * dtype.itemsize - 1)] * 3, dtype)  # the sign bit alone
    assert torch.equal(plus.float(), minus.float())  # what == cannot tell apart
    assert not same_bits(plus, minus)
    assert same_bits(minus, minus.clone())


@pytest.mark.parametrize(
    ("dtype", "one_nan", "another_nan"),
    [
        (torch.float64, 0x7FF8_0000_0000_0000, 0x7FF8_0000_0000_0001),
        (torch.float32, 0x7FC0_0000, 0x7FC0_0001),
        (torch.float32, 0x7FC0_0000, 0xFFC0_0000),  # the sign of a NaN counts too
        (torch.bfloat16, 0x7FC0, 0x7FC1),
        (torch.float16, 0x7E00, 0x7E01),
        (torch.float8_e5m2, 0x7E, 0x7F),
        (torch.float8_e4m3fn, 0x7F, 0xFF),  # its only NaNs: one of each sign
    ],
)
def test_nans_are_the_same_only_with_the_same_payload(dtype, one_nan, another_nan):
    a, b = from_bits([0x00, one_nan], dtype), from_bits([0x00, another_nan], dtype)
    assert a.isnan()[1] and b.isnan()[1]
    assert not torch.equal(a, a.clone())  # torch.equal never takes a NaN for itself
    assert same_bits(a, a.clone()) and same_bits(b, b.clone())
    assert not same_bits(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
def test_neighbouring_values_differ(dtype):
    x = torch.tensor([1.0, 0.25]).to(dtype)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    neighbour = (x.view(bits) + 1).view(dtype)
    assert not same_bits(x, neighbour)
    assert same_bits(x, (neighbour.view(bits) - 1).view(dtype))


def test_other_dtypes_compare_their_bits_too():
    assert same_bits(torch.tensor([True, False]), torch.tensor([True, False]))
    assert not same_bits(torch.tensor([1, 2]), torch.tensor([1, 3]))
    z = torch.complex(torch.tensor([1.0, 0.0]).double(), torch.tensor([2.0, -0.0]).double())
    assert same_bits(z, z.clone())
    assert not same_bits(z, torch.tensor([1 + 2j, 0j], dtype=torch.complex128))


def test_another_dtype_or_shape_is_not_the_same():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert not same_bits(x, x.double())
    assert not same_bits(x.bfloat16(), x.half())  # two bytes each, other numbers
    assert not same_bits(x, x.reshape(2, 2))
    assert not same_bits(x, x[:3])
    assert not same_bits(x, x.view(torch.int32))  # the same bytes, read as other numbers
    assert same_bits(torch.empty(0, 3), torch.empty(0, 3))
    assert not same_bits(torch.empty(0, 3), torch.empty(3, 0))
