"""The task-vector backend gives the reference core's bits, slice by slice.

`pearl_edu.backends.task_vectors` runs task arithmetic, TIES and DARE on slices, keeps
masks instead of copies, and (with ``position=True``, ``--fast-trim``) finds TIES' cut by
counting bit patterns instead of sorting. Each case must equal the core: the core's
``ties`` (``stable`` for the counting trim), ``dare`` and ``task_arithmetic``, on ragged and
multi-slice tensors, ties at the cut, NaNs, zeros, densities 0 and 1, rescaled or not, in
bfloat16, float16, float32, float64 and mixed dtypes.
"""

from __future__ import annotations

import pytest
import torch

from pearl_edu import core
from pearl_edu.backends import task_vectors as backend
from pearl_edu.ulp import same_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def models(shape, dtype, count=3, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base.to(dtype)] + [
        (base + scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(count - 1)
    ]


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Slices of 1000 entries, so that tensors of a few thousand span several."""
    monkeypatch.setattr(backend, "SLICE_ELEMENTS", 1000)


def run_both(name, tensors, weights, densities, *, position=False, out=None, **options):
    base, others = tensors[0], tensors[1:]
    normalize = options.pop("normalize", name == "ties")
    scale = options.pop("scale", 1.0)
    rescale = options.pop("rescale", name.startswith("dare"))
    common = dict(normalize=normalize, scale=scale)
    if name == "ties":
        expected = core.ties(
            base, others, weights, densities, rescale=rescale, stable=position, **common
        )
        pruning, election = "magnitude", True
    elif name.startswith("dare"):
        election = name == "dare_ties"
        gens = [torch.Generator().manual_seed(7 + i) for i in range(len(others))]
        expected = core.dare(
            base,
            others,
            weights,
            densities,
            gens,
            sign_election=election,
            rescale=rescale,
            **common,
        )
        pruning = "random"
    else:
        expected = core.task_arithmetic(base, others, weights, **common)
        pruning, election = None, False
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(others))]
    got = backend.merge(
        base,
        others,
        weights,
        densities,
        pruning=pruning,
        sign_election=election,
        rescale=rescale,
        generators=gens,
        position=position,
        out=out,
        **common,
    )
    return got, expected


METHODS = ["ties", "dare_linear", "dare_ties", "task_arithmetic"]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (61, 97), (4096,)])
@pytest.mark.parametrize("position", [False, True])
def test_equals_the_core(name, dtype, shape, position):
    tensors = models(shape, dtype)
    got, expected = run_both(name, tensors, [0.6, 0.4], [0.5, 0.3], position=position)
    assert same_bits(got, expected)


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "task_arithmetic"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options(name, rescale, normalize, dtype):
    """Three models over the base: the sums over models are taken in the core's order."""
    tensors = models((50, 80), dtype, count=4, seed=3)
    got, expected = run_both(
        name,
        tensors,
        [1.0, 0.3, 0.7],
        [0.2, 0.9, 0.6],
        rescale=rescale,
        normalize=normalize,
        scale=0.8,
    )
    assert same_bits(got, expected)


@pytest.mark.parametrize("name", ["ties", "dare_ties"])
@pytest.mark.parametrize("densities", [[0.0, 0.5], [1.0, 0.5], [0.0, 1.0], [1e-6, 0.999]])
def test_densities_at_the_edges(name, densities):
    tensors = models((40, 50), torch.bfloat16, seed=5)
    for rescale in (False, True):
        got, expected = run_both(name, tensors, [0.5, 0.5], densities, rescale=rescale)
        assert same_bits(got, expected)


@pytest.mark.parametrize("position", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_ties_at_the_cut(dtype, position):
    """Task vectors of a few distinct magnitudes: the cut falls among hundreds of equal ones."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(5000, generator=g).to(dtype)
    steps = torch.randint(-3, 4, (2, 5000), generator=g).to(dtype) * 0.125
    tensors = [base, base + steps[0], base + steps[1]]
    for density in (0.1, 0.37, 0.5, 0.8):
        got, expected = run_both("ties", tensors, [0.5, 0.5], [density, density], position=position)
        assert same_bits(got, expected), density


def test_nans_zeros_and_infinities():
    tensors = models((3000,), torch.bfloat16, seed=2)
    tensors[1][::97] = float("nan")
    tensors[2][::89] = float("inf")
    tensors[2][5:900] = tensors[0][5:900]  # a long run of zero deltas
    for position in (False, True):
        got, expected = run_both("ties", tensors, [0.5, 0.5], [0.5, 0.5], position=position)
        assert same_bits(got, expected)


@pytest.mark.parametrize("name", METHODS)
def test_mixed_dtypes_and_out(name):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2500, generator=g)
    tensors = [
        base.to(torch.bfloat16),
        (base + 0.01 * torch.randn(2500, generator=g)).to(torch.float16),
        (base + 0.01 * torch.randn(2500, generator=g)).to(torch.bfloat16),
    ]
    got, expected = run_both(name, tensors, [0.5, 0.5], [0.4, 0.6])
    assert got.dtype == torch.float32 and same_bits(got, expected)
    out = torch.empty(2500, dtype=torch.float32)
    got, _ = run_both(name, tensors, [0.5, 0.5], [0.4, 0.6], out=out)
    assert got is out and same_bits(out, expected)


def test_the_counting_trim_keeps_the_first_of_the_tied():
    """What ``--fast-trim`` promises, stated without the core: the first tied entries stay."""
    delta = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -2.0, 3.0], dtype=torch.bfloat16)
    mask = backend.first_largest_mask(lambda part: delta[part], delta.numel(), 3)
    assert mask.tolist() == [False, True, True, False, False, False, True]


@pytest.mark.parametrize("bits", [15, 31])
def test_kth_largest_key_against_a_sort(bits):
    g = torch.Generator().manual_seed(bits)
    keys = torch.randint(0, 1 << bits, (4000,), generator=g)
    keys[::3] = keys[7]  # many equal keys
    ordered = keys.sort(descending=True).values
    for k in (1, 2, 1000, 1333, 3999, 4000):
        cut, above = backend.kth_largest_key(lambda part: keys[part], keys.numel(), k, bits)
        assert cut == int(ordered[k - 1])
        assert above == int((keys > cut).sum())
