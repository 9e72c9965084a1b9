"""The reference core (`pearl_edu.core`) against mergekit 0.1.5 and against the fast engine.

Three implementations of each method's math for one tensor: mergekit's (through its own
method objects, which promote dtypes and pack the tensor as a batch of one), the core's
(plain torch, printed in the book) and the engine's (`pearl_edu.slerp` and the others on
the CPU backend, and `pearl_edu.methods.merge_tensor`: threads, compiled loops, reused
buffers). All three must agree bit for bit (`same_bits`, same
dtype; NaNs in the same places) on ragged shapes, tensors of several 2^20-element chunks,
near-parallel pairs (the linear fallback), zero tensors, each input dtype and several ``t``.

DARE draws at random. mergekit draws each model's mask in turn from torch's global
generator; the core draws the same way (or from generators it is given); the engine draws
from one generator per model, seeded from the tensor's seed. So the core is compared with
mergekit after seeding the global generator, and with the engine given the engine's
generators.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.registry import get as mergekit_method

import pearl_edu
from pearl_edu import core, methods
from pearl_edu.backends.reference import input_generators

# The modules themselves: `pearl_edu.core.slerp` is also the name of the function.
from pearl_edu.core import interpolation as core_slerp
from pearl_edu.ulp import same_bits

mergekit_slerp = importlib.import_module("mergekit.merge_methods.slerp")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
TS = [0.0, 0.3, 0.5, 0.7, 1.0, -0.25, 1.5]
TASK_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties"]
# mergekit's defaults for the shared parameters (normalize, rescale), per method.
DEFAULTS = {
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_linear": (False, True),
    "dare_ties": (False, True),
}


# --- the three implementations ------------------------------------------------------------


def mergekit_merge(
    name: str, tensors: Sequence[torch.Tensor], base_index: int | None, **parameters
) -> torch.Tensor:
    """One output tensor from mergekit's method object, as its merge loop calls it."""
    group = TensorGroup.from_tensors(list(tensors), base_index=base_index)
    return mergekit_method(name)([group], parameters=parameters)[0]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, label: str) -> None:
    assert ours.dtype == theirs.dtype, f"{label}: {ours.dtype} vs {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{label}: {ours.shape} vs {theirs.shape}"
    both_nan = ours.isnan() & theirs.isnan()
    differ = (ours != theirs) & ~both_nan
    assert not differ.any(), f"{label}: {int(differ.sum())} of {ours.numel()} elements differ"
    # == takes -0.0 for +0.0; the bits tell them apart.
    assert same_bits(ours[~both_nan], theirs[~both_nan]), f"{label}: the signs of zeros differ"


def check_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """The core's SLERP, checked against mergekit's and the engine's."""
    ours = core.slerp(v0, v1, t)
    label = f"slerp {tuple(v0.shape)} {v0.dtype} t={t}"
    assert_same(ours, mergekit_merge("slerp", [v0, v1], 0, t=t), f"{label} vs mergekit")
    assert_same(ours, pearl_edu.slerp(v0, v1, t), f"{label} vs pearl_edu.slerp")
    return ours


def pair(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int = 0):
    """Two tensors: siblings (as fine-tunes are), strangers, near-parallel, opposite, zero."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    b = {
        "siblings": a + 0.3 * noise,
        "strangers": noise,
        "near-parallel": a + 1e-3 * noise,  # cos theta > 0.9995: the linear fallback
        "opposite": -2 * a + 1e-3 * noise,
        "zero": torch.zeros(shape, dtype=torch.float64),
    }[kind]
    return a.to(dtype), b.to(dtype)


# --- SLERP -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4), (33, 1, 17), (0,), (4, 0)])
@pytest.mark.parametrize("kind", ["siblings", "strangers", "near-parallel", "opposite", "zero"])
def test_slerp_small_shapes(shape, dtype, kind):
    v0, v1 = pair(shape, dtype, kind)
    for t in TS:
        check_slerp(v0, v1, t)
    check_slerp(v1, v0, 0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_slerp_of_several_chunks(dtype):
    # 3 million elements: two full chunks of 2^20 and a ragged third.
    v0, v1 = pair((3000, 1000), dtype, "siblings", seed=1)
    for t in (0.3, 0.5):
        check_slerp(v0, v1, t)
    check_slerp(*pair((3000, 1000), dtype, "near-parallel", seed=2), 0.4)


def test_slerp_of_a_chunk_and_one_element():
    v0, v1 = pair(((1 << 20) + 1,), torch.bfloat16, "strangers", seed=3)
    check_slerp(v0, v1, 0.6)


def test_slerp_of_zero_tensors():
    zero = torch.zeros(3000, 1000, dtype=torch.bfloat16)
    other = pair((3000, 1000), torch.bfloat16, "siblings", seed=4)[0]
    for v0, v1 in [(zero, other), (other, zero), (zero, zero)]:
        check_slerp(v0, v1, 0.3)


def test_slerp_of_many_chunks_in_mergekits_order(monkeypatch):
    # A 58M-element weight has 56 chunks; the order in which their sums are added must be
    # mergekit's. Smaller chunks give as many sums on a small tensor, in every implementation
    # (the engine's CPU backend reads the core's chunk size).
    for module, name in [
        (mergekit_slerp, "_CHUNK_ELEMENTS"),
        (core_slerp, "CHUNK_ELEMENTS"),
    ]:
        monkeypatch.setattr(module, name, 1000)
    for dtype in (torch.bfloat16, torch.float32):
        v0, v1 = pair((240, 250), dtype, "strangers", seed=5)  # 60 chunks
        check_slerp(v0, v1, 0.3)
        v0, v1 = pair((60_001,), dtype, "siblings", seed=6)  # 61 chunks, the last of 1
        check_slerp(v0, v1, 0.7)


def test_lerp_is_slerps_fallback():
    for dtype in DTYPES:
        v0, v1 = pair((3, 7), dtype, "near-parallel", seed=7)
        for t in TS:
            ours = core.lerp(v0, v1, t)
            assert_same(ours, check_slerp(v0, v1, t), f"lerp {dtype} t={t} vs slerp")
            assert_same(ours, pearl_edu.lerp(v0, v1, t), f"lerp {dtype} t={t} vs pearl_edu")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["siblings", "strangers", "near-parallel", "opposite", "zero"]),
    t=st.floats(-0.5, 1.5, allow_nan=False) | st.sampled_from(TS),
    seed=st.integers(0, 2**16),
)
def test_slerp_property(shape, dtype, kind, t, seed):
    check_slerp(*pair(shape, dtype, kind, seed), t)


def test_slerp_refuses_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        core.slerp(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)


# --- linear ------------------------------------------------------------------------------


def check_linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> None:
    ours = core.linear(tensors, weights, normalize=normalize)
    label = f"linear {tuple(tensors[0].shape)} {[t.dtype for t in tensors]} {weights}"
    theirs = mergekit_merge("linear", tensors, None, weight=weights, normalize=normalize)
    assert_same(ours, theirs, f"{label} vs mergekit")
    engine = pearl_edu.linear(tensors, weights, normalize=normalize)
    assert_same(ours, engine, f"{label} vs pearl_edu.linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (3000, 1000)])
def test_linear(shape, dtype):
    a, b = pair(shape, dtype, "siblings", seed=8)
    c = pair(shape, dtype, "strangers", seed=9)[1]
    check_linear([a, b, c], [0.25, 0.7, 0.3], normalize=True)
    check_linear([a, b], [0.6, -0.2], normalize=False)
    check_linear([a, torch.zeros_like(a)], [0.5, 0.5], normalize=True)


def test_linear_promotes_mixed_dtypes():
    a, b = pair((5, 6), torch.bfloat16, "siblings", seed=10)
    check_linear([a, b.to(torch.float16)], [0.3, 0.7], normalize=True)


# --- task arithmetic, TIES, DARE ----------------------------------------------------------


def core_task_merge(
    name: str,
    base: torch.Tensor,
    others: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    generators: list[torch.Generator] | None,
    *,
    normalize: bool,
    scale: float,
    rescale: bool,
) -> torch.Tensor:
    if name == "task_arithmetic":
        return core.task_arithmetic(base, others, weights, normalize=normalize, scale=scale)
    if name == "ties":
        options = {"normalize": normalize, "scale": scale, "rescale": rescale}
        return core.ties(base, others, weights, densities, **options)
    return core.dare(
        base,
        others,
        weights,
        densities,
        generators,
        sign_election=name == "dare_ties",
        normalize=normalize,
        scale=scale,
        rescale=rescale,
    )


def check_task_merge(
    name: str,
    base: torch.Tensor,
    others: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    *,
    normalize: bool | None = None,
    scale: float = 1.0,
    rescale: bool | None = None,
    seed: int = 1234,
    against: tuple[str, ...] = ("mergekit", "methods"),
) -> None:
    default_normalize, default_rescale = DEFAULTS[name]
    normalize = default_normalize if normalize is None else normalize
    rescale = default_rescale if rescale is None else rescale
    options = {"normalize": normalize, "scale": scale, "rescale": rescale}
    label = (
        f"{name} {tuple(base.shape)} {[t.dtype for t in (base, *others)]} "
        f"w={weights} density={densities} {options}"
    )
    if "mergekit" in against:
        # mergekit draws from torch's global generator; so does the core, given no generators.
        torch.manual_seed(seed)
        theirs = mergekit_merge(
            name,
            [base, *others],
            0,
            weight=weights,
            density=densities,
            normalize=normalize,
            rescale=rescale,
            **{"lambda": scale},
        )
        torch.manual_seed(seed)
        ours = core_task_merge(name, base, others, weights, densities, None, **options)
        assert_same(ours, theirs, f"{label} vs mergekit")
    if "methods" in against:
        # The engine draws model i's mask from a generator seeded seed + i.
        generators = input_generators(seed, len(others))
        ours = core_task_merge(name, base, others, weights, densities, generators, **options)
        engine = methods.merge_tensor(
            name,
            [base, *others],
            0,
            {"normalize": normalize, "lambda": scale, "rescale": rescale, "int8_mask": 0},
            input_params=[{}]
            + [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
            seed=seed,
        )
        assert_same(ours, engine, f"{label} vs pearl_edu.methods")


def family(shape, dtype, seed: int = 0, count: int = 2):
    """A base and ``count`` fine-tuned siblings of it (the base plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    others = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(count)]
    return base.to(dtype), [other.to(dtype) for other in others]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TASK_METHODS)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (64, 33)])
def test_task_vector_methods(name, shape, dtype):
    # Densities exact in bfloat16, where the engine's draws are mergekit's (see below).
    base, others = family(shape, dtype, seed=11)
    check_task_merge(name, base, others, [0.5, 0.5], [0.5, 0.75])
    check_task_merge(name, base, others, [0.7, -0.2], [0.25, 1.0], normalize=True, scale=1.3)
    check_task_merge(name, base, others, [1.0, 0.3], [0.125, 0.5], normalize=False, rescale=False)


@pytest.mark.parametrize("name", TASK_METHODS)
def test_task_vector_methods_on_a_large_tensor(name):
    base, others = family((3000, 1000), torch.bfloat16, seed=12)
    check_task_merge(name, base, others, [0.6, 0.4], [0.5, 0.25], normalize=True)


@pytest.mark.parametrize("name", TASK_METHODS)
def test_task_vector_methods_at_the_edges(name):
    base, (a, b, c) = family((5, 8), torch.bfloat16, seed=13, count=3)
    # Zero task vectors (a model equal to the base), a zero base, density 0 and 1,
    # weights that sum to 0, a single other model.
    check_task_merge(name, base, [base.clone(), a], [0.5, 0.5], [0.5, 0.5])
    check_task_merge(name, torch.zeros_like(base), [a, b], [0.5, 0.5], [0.5, 0.5])
    check_task_merge(name, base, [a, b], [0.5, 0.5], [0.0, 1.0])
    check_task_merge(name, base, [a, b], [0.5, -0.5], [1.0, 1.0], normalize=True)
    check_task_merge(name, base, [a, b, c], [0.2, 0.3, 0.5], [0.5, 0.25, 0.75])
    check_task_merge(name, base, [c], [0.8], [0.5])


@pytest.mark.parametrize("name", TASK_METHODS)
def test_task_vector_methods_promote_mixed_dtypes(name):
    base, (a, b) = family((6, 7), torch.bfloat16, seed=14)
    check_task_merge(name, base, [a, b.to(torch.float16)], [0.5, 0.5], [0.3, 0.5])


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(TASK_METHODS),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    weights=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=3),
    density=st.floats(0, 1),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_task_vector_property(name, shape, dtype, weights, density, normalize, seed):
    base, others = family(shape, dtype, seed=seed, count=len(weights))
    densities = [density] * len(weights)
    check_task_merge(name, base, others, weights, densities, normalize=normalize, seed=seed)


@pytest.mark.parametrize("density", [0.3, 0.7, 0.9])
def test_dare_draws_with_mergekits_probability_in_bfloat16(density):
    # mergekit fills the probability tensor in the delta's dtype, so bfloat16 deltas are
    # kept with probability bfloat16(0.3) = 0.30078125; the core does the same.
    delta = torch.ones(4000, 1000, dtype=torch.bfloat16)
    torch.manual_seed(0)
    mask = core.random_drop(delta, density, rescale=False)
    torch.manual_seed(0)
    uniform = torch.rand(delta.shape)
    kept_with = torch.tensor(density, dtype=torch.bfloat16).float()
    assert torch.equal(mask, (uniform < kept_with).to(torch.bfloat16))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_in_bfloat16_with_an_inexact_density_matches_the_engine(name):
    # The density is compared in the delta's dtype, as mergekit does: 0.3 is 0.30078125.
    base, others = family((64, 33), torch.bfloat16, seed=15)
    check_task_merge(name, base, others, [0.5, 0.5], [0.3, 0.3], against=("methods",))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_in_bfloat16_with_an_inexact_density_matches_mergekit(name):
    base, others = family((64, 33), torch.bfloat16, seed=15)
    check_task_merge(name, base, others, [0.5, 0.5], [0.3, 0.3], against=("mergekit",))
