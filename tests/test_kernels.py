"""The compiled elementwise loops: loaded here, and equal to torch's arithmetic bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pearl_edu
from pearl_edu import kernels
from pearl_edu.backends import cpu
from pearl_edu.core import interpolation

KERNEL_DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def library(monkeypatch):
    """The compiled library, loaded for every test here whatever PEARL_EDU_KERNELS says."""
    opened = kernels._open_library()
    assert opened is not None, "pearl_edu._kernels is not built: reinstall with a C compiler"
    monkeypatch.setattr(kernels, "_LIBRARY", opened)
    return opened


def _special_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Random values of many magnitudes, with zeros, infinities, NaNs and subnormals mixed in."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen) * torch.exp2(
        torch.randint(-140, 120, (n,), generator=gen)
    )
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-41, 3.4e38, -3.4e38]
    )
    where = torch.randint(0, n, (n // 20,), generator=gen)
    values[where] = specials[torch.randint(0, len(specials), (n // 20,), generator=gen)]
    return values.to(dtype)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bit for bit, except that a NaN's sign and payload may differ (as between CPUs)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    nan = x.isnan()
    if not torch.equal(nan, y.isnan()):
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return torch.equal(x[~nan].view(as_int), y[~nan].view(as_int))


def test_the_package_loads_its_kernels_unless_told_not_to(monkeypatch):
    # `make setup` builds them (the library fixture fails without them); a reader's install
    # without a C compiler runs the same arithmetic in torch.
    monkeypatch.delenv("PEARL_EDU_KERNELS", raising=False)
    assert kernels._load() is not None
    monkeypatch.setenv("PEARL_EDU_KERNELS", "0")
    assert kernels._load() is None


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 65_539])
def test_weighted_sum_rounds_as_torch_does(dtype, n):
    a, b = _special_values(dtype, n, seed=n), _special_values(dtype, n, seed=n + 1)
    for w0, w1 in [(0.7, 0.3), (1.2345678, -0.2345678), (0.0, 1.0), (3e-39, 1e30)]:
        w0_, w1_ = torch.tensor(w0), torch.tensor(w1)
        expected = (a.float() * w0_ + b.float() * w1_).to(dtype)
        out = torch.full_like(a, 7)
        assert kernels.weighted_sum(a, b, out, w0_.item(), w1_.item())
        assert _same_bits(out, expected), (dtype, n, w0, w1)


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_loops_split_between_threads_give_the_same_bits(threads):
    n = 1_000_003  # several slices of at least 2**17 elements, and a ragged last one
    a, b = _special_values(torch.bfloat16, n, seed=8), _special_values(torch.bfloat16, n, seed=9)
    one, many = torch.empty_like(a), torch.empty_like(a)
    assert kernels.weighted_sum(a, b, one, 0.3, 0.7, threads=1)
    assert kernels.weighted_sum(a, b, many, 0.3, 0.7, threads=threads)
    assert _same_bits(many, one)
    assert _same_bits(
        one, (a.float() * torch.tensor(0.3) + b.float() * torch.tensor(0.7)).bfloat16()
    )
    products, widened = torch.empty(n), torch.empty(n)
    assert kernels.normalized_products(a, b, products, 2.5, 0.75, threads=threads)
    assert _same_bits(products, (a.float() / 2.5) * (b.float() / 0.75))
    assert kernels.widen(a, widened, threads=threads)
    assert _same_bits(widened, a.float())


def test_a_bfloat16_tie_rounds_to_even():
    # Near 1, bfloat16 numbers lie 2**-7 apart. 1 + 2**-8 is halfway between 1 and
    # 1 + 2**-7: it goes to the even one, 1. 1 + 3 * 2**-8 is halfway between 1 + 2**-7 and
    # 1 + 2**-6: it goes up, to the even one. Just above halfway goes up, to 1 + 2**-7.
    one = torch.ones(1, dtype=torch.bfloat16)
    out = torch.empty_like(one)
    for w1, expected in [
        (2.0**-8, 1.0),
        (3 * 2.0**-8, 1 + 2.0**-6),
        (2.0**-8 + 2.0**-20, 1 + 2.0**-7),
    ]:
        assert kernels.weighted_sum(one, one, out, 1.0, w1)
        assert out.item() == expected
        assert _same_bits(out, (one.float() + one.float() * torch.tensor(w1)).bfloat16())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_normalized_products_divide_then_multiply_as_torch_does(dtype):
    n = 70_001
    a, b = _special_values(dtype, n, seed=3), _special_values(dtype, n, seed=4)
    for norm_a, norm_b in [(3.75, 0.0123), (1.0, 1.0), (1e-30, 7e20)]:
        na, nb = torch.tensor(norm_a), torch.tensor(norm_b)
        expected = (a.float() / na) * (b.float() / nb)
        out = torch.empty(n)
        assert kernels.normalized_products(a, b, out, na.item(), nb.item())
        assert _same_bits(out, expected)


def test_widening_bfloat16_is_exact():
    a = _special_values(torch.bfloat16, 4099, seed=5)
    out = torch.empty(4099)
    assert kernels.widen(a, out)
    assert _same_bits(out, a.float())


def test_tensors_the_kernels_do_not_take_are_left_untouched():
    a = torch.ones(8, 4)
    out = torch.zeros(4, 8).t()  # not contiguous
    assert not kernels.weighted_sum(a, a, out, 1.0, 1.0)
    assert not kernels.weighted_sum(a.half(), a.half(), out.half(), 1.0, 1.0)  # float16
    assert not kernels.weighted_sum(a, a.bfloat16(), torch.zeros(8, 4), 1.0, 1.0)  # mixed
    assert not kernels.normalized_products(a.double(), a.double(), torch.zeros(32), 1.0, 1.0)
    assert not kernels.widen(a, torch.zeros(32))  # float32 needs no widening
    assert torch.count_nonzero(out) == 0


def test_sizes_that_differ_are_an_error_not_a_partial_write():
    a, out = torch.ones(10, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sizes differ"):
        kernels.weighted_sum(a, a, out, 1.0, 1.0)
    assert torch.count_nonzero(out) == 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.floats(-0.5, 1.5, allow_nan=False),
    correlation=st.floats(-1.2, 1.2, allow_nan=False),
    dtype=st.sampled_from(KERNEL_DTYPES),
)
def test_slerp_gives_the_same_bits_with_and_without_the_kernels(seed, t, correlation, dtype):
    # More than two chunks, and a ragged last one: every pass of SLERP goes through both.
    n = 2 * interpolation.CHUNK_ELEMENTS + 4097
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen)
    b = correlation * a + torch.randn(n, generator=gen)
    a, b = a.to(dtype), b.to(dtype)
    with_kernels = pearl_edu.slerp(a, b, t)
    library, kernels._LIBRARY = kernels._LIBRARY, None
    try:
        without = pearl_edu.slerp(a, b, t)
    finally:
        kernels._LIBRARY = library
    assert _same_bits(with_kernels, without)


def test_the_cosine_is_the_same_with_and_without_the_kernels(monkeypatch, library):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3 * interpolation.CHUNK_ELEMENTS + 5, generator=gen).bfloat16()
    b = (0.4 * a.float() + torch.randn(a.numel(), generator=gen)).bfloat16()
    with_kernels = cpu.cosine(a, b, eps=interpolation.NORM_EPS, work=torch.float32)
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    without = cpu.cosine(a, b, eps=interpolation.NORM_EPS, work=torch.float32)
    assert _same_bits(with_kernels, without)
