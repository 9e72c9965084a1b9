"""The CPU backend gives the reference core's bits, and the seam hands the backends out.

`pearl_edu.backends.cpu` computes SLERP with compiled loops, a helper thread and reused
buffers; `pearl_edu.core` is the plain torch the book prints. Every case here must agree
bit for bit: ragged tensors, several chunks of 2^20 elements (with a ragged last one),
near-parallel pairs (the linear fallback), zero tensors, in bfloat16, float16 and float32.
`pearl_edu.backends.backend_for` hands out the reference, CPU and device backends, each
with every operation of the `Backend` protocol.
"""

from __future__ import annotations

import pytest
import torch

from pearl_edu import core, kernels
from pearl_edu.backends import BY_NAME, Backend, backend_for, cpu, device, reference
from pearl_edu.ulp import same_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TS = [0.0, 0.3, 0.5, 0.7, 1.0, -0.25]
CHUNK = 1 << 20


def pair(shape, dtype, kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    b = {
        "siblings": a + 0.3 * noise,
        "strangers": noise,
        "near-parallel": a + 1e-3 * noise,
        "opposite": -2 * a + 1e-3 * noise,
        "zero": torch.zeros(shape),
    }[kind]
    return a.to(dtype), b.to(dtype)


def check(v0: torch.Tensor, v1: torch.Tensor, ts=TS) -> None:
    for t in ts:
        expected = core.slerp(v0, v1, t)
        assert same_bits(cpu.slerp(v0, v1, t), expected), (v0.shape, v0.dtype, t)
        out = torch.empty_like(v0)
        assert cpu.slerp(v0, v1, t, out=out) is out
        assert same_bits(out, expected)
        assert same_bits(cpu.lerp(v0, v1, t), core.lerp(v0, v1, t))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["siblings", "strangers", "near-parallel", "opposite", "zero"])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (3, 5, 7), (0,)])
def test_ragged_shapes(shape, dtype, kind):
    check(*pair(shape, dtype, kind, seed=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_chunks_and_a_ragged_last_one(dtype):
    v0, v1 = pair((2 * CHUNK + 4097,), dtype, "siblings", seed=2)
    check(v0, v1, ts=[0.3, 0.7])
    check(v1.reshape(-1, 1), v0.reshape(-1, 1), ts=[0.5])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_near_parallel_falls_back_to_lerp(dtype):
    v0, v1 = pair((CHUNK + 3,), dtype, "near-parallel", seed=3)
    check(v0, v1, ts=[0.2, 0.8])
    assert same_bits(cpu.slerp(v0, v1, 0.2), core.lerp(v0, v1, 0.2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_tensors(dtype):
    zero = torch.zeros(CHUNK + 11, dtype=dtype)
    other = pair((CHUNK + 11,), dtype, "strangers", seed=4)[0]
    for v0, v1 in [(zero, other), (other, zero), (zero, zero)]:
        check(v0, v1, ts=[0.3])


def test_without_the_compiled_loops_and_on_one_thread(monkeypatch):
    v0, v1 = pair((2 * CHUNK + 5,), torch.bfloat16, "siblings", seed=5)
    expected = core.slerp(v0, v1, 0.4)
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    assert same_bits(cpu.slerp(v0, v1, 0.4), expected)
    monkeypatch.setattr(cpu.torch, "get_num_threads", lambda: 1)
    assert same_bits(cpu.slerp(v0, v1, 0.4), expected)


def test_the_seam():
    assert backend_for("cpu") is cpu.BACKEND
    assert backend_for(torch.device("cpu")) is cpu.BACKEND
    v0, v1 = pair((9, 4), torch.float32, "siblings", seed=6)
    out = torch.empty_like(v0)
    assert reference.BACKEND.slerp(v0, v1, 0.3, out=out) is out
    assert same_bits(out, cpu.slerp(v0, v1, 0.3))
    with pytest.raises(ValueError, match="out: expected"):
        cpu.slerp(v0, v1, 0.3, out=torch.empty(9, 4, dtype=torch.float64))


def test_reference_is_the_core_as_a_backend():
    for device_ in ("cpu", torch.device("cpu"), "cuda", "meta"):
        assert backend_for(device_, "reference") is reference.BACKEND
    assert reference.BACKEND.name == "reference"
    v0, v1 = pair((33, 17), torch.bfloat16, "siblings", seed=7)
    assert same_bits(backend_for("cpu", "reference").slerp(v0, v1, 0.3), core.slerp(v0, v1, 0.3))


OPERATIONS = [
    "slerp",
    "lerp",
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "della",
    "nuslerp",
    "multislerp",
    "karcher_mean",
    "model_stock",
    "sce",
    "ram",
    "ramplus_tl",
    "nearswap",
    "arcee_fusion",
    "generators",
]


def test_every_backend_has_every_operation_of_the_protocol():
    named = [name for name, member in vars(Backend).items() if callable(member)]
    named = [name for name in named if not name.startswith("_")]
    assert sorted(named) == sorted(OPERATIONS)
    backends = [reference.BACKEND, cpu.BACKEND, device.BACKEND]
    assert [BY_NAME[b.name] for b in backends] == backends
    assert [b.name for b in backends] == ["reference", "cpu", "device"]
    for backend in backends:
        for name in named:
            assert callable(getattr(backend, name, None)), (backend.name, name)
