"""SLERP and LERP: their properties, agreement with mergekit; the registry of methods."""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pearl_edu import core, methods
from pearl_edu.backends import cpu
from pearl_edu.backends.threads import set_threads_for_new_threads, threads_for_new_threads
from pearl_edu.core.interpolation import DOT_THRESHOLD
from pearl_edu.errors import ModelError
from pearl_edu.functions import lerp, slerp
from pearl_edu.method_parameters import PER_INPUT, PER_NON_BASE, PerInput, PerNonBase
from pearl_edu.methods import (
    METHODS,
    REQUIRED,
    MergeContext,
    MergeInputs,
    merge_method,
    merge_tensor,
)
from pearl_edu.ulp import same_bits

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pair(seed: int, shape: tuple[int, ...], correlation: float = 0.3, dtype=torch.float32):
    """Two random tensors with a chosen cosine-ish similarity, deterministic from seed."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen)
    b = correlation * a + torch.randn(shape, generator=gen)
    return a.to(dtype), b.to(dtype)


def _angle(u: torch.Tensor, v: torch.Tensor) -> float:
    u64, v64 = u.double().flatten(), v.double().flatten()
    cos = torch.dot(u64, v64) / (u64.norm() * v64.norm())
    return math.acos(max(-1.0, min(1.0, cos.item())))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


seeds = st.integers(min_value=0, max_value=2**31 - 1)
ts = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
sizes = st.integers(min_value=2, max_value=300)


# --- properties --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=seeds, size=sizes, dtype=st.sampled_from(FLOAT_DTYPES))
def test_endpoints_give_the_inputs(seed, size, dtype):
    v0, v1 = _pair(seed, (size,), dtype=dtype)
    # The weights are exactly (1, 0) and (0, 1): sin(theta) / sin(theta) and sin(0).
    assert torch.equal(slerp(v0, v1, 0.0), v0)
    assert torch.equal(slerp(v0, v1, 1.0), v1)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, size=st.integers(min_value=8, max_value=300), t=ts)
def test_angle_of_result_is_t_times_angle_for_unit_vectors(seed, size, t):
    gen = torch.Generator().manual_seed(seed)
    v0 = _unit(torch.randn(size, generator=gen, dtype=torch.float64)).float()
    v1 = _unit(torch.randn(size, generator=gen, dtype=torch.float64)).float()
    theta = _angle(v0, v1)
    if abs(math.cos(theta)) > DOT_THRESHOLD:
        return  # the lerp fallback region is tested separately
    result = slerp(v0, v1, t)
    assert _angle(v0, result) == pytest.approx(t * theta, abs=2e-3)
    assert _angle(result, v1) == pytest.approx((1 - t) * theta, abs=2e-3)
    # On the unit sphere, SLERP stays on it.
    assert result.double().norm().item() == pytest.approx(1.0, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, size=sizes, t=ts, scale=st.floats(min_value=1e-4, max_value=5e-3))
def test_nearly_parallel_tensors_give_exactly_lerp(seed, size, t, scale):
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(size, generator=gen)
    v1 = v0 + scale * torch.randn(size, generator=gen) * v0.abs().mean()
    assert abs(math.cos(_angle(v0, v1))) > DOT_THRESHOLD
    assert torch.equal(slerp(v0, v1, t), lerp(v0, v1, t))
    # Opposite directions fall back to lerp too.
    assert torch.equal(slerp(v0, -v0, t), lerp(v0, -v0, t))


def test_lerp_weights_the_original_tensors():
    v0 = torch.tensor([2.0, 0.0])
    v1 = torch.tensor([4.0, 0.0])
    assert torch.equal(slerp(v0, v1, 0.25), torch.tensor([2.5, 0.0]))


def test_result_is_not_renormalized_when_norms_differ():
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 3.0])
    result = slerp(v0, v1, 0.5)
    # theta = pi/2: weights sin(pi/4)/1 on both ORIGINAL vectors.
    expected = torch.tensor([math.sin(math.pi / 4), 3 * math.sin(math.pi / 4)])
    torch.testing.assert_close(result, expected)
    assert result.norm().item() != pytest.approx(1.0)


def test_zero_tensor_is_left_undivided_and_gives_a_right_angle():
    v0 = torch.zeros(5)
    v1 = torch.arange(5, dtype=torch.float32)
    t = 0.3
    # dot = 0 so theta = pi/2; the zero vector contributes nothing.
    expected = math.sin(t * math.pi / 2) * v1
    torch.testing.assert_close(slerp(v0, v1, t), expected)
    assert torch.equal(slerp(v0, torch.zeros(5), t), torch.zeros(5))


def test_t_is_not_clamped():
    v0, v1 = (_unit(v) for v in _pair(3, (50,)))
    theta = _angle(v0, v1)
    result = slerp(v0, v1, 1.5)  # goes past v1 along the same great circle
    assert _angle(v0, result) == pytest.approx(1.5 * theta, abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, size=sizes, t=ts, dtype=st.sampled_from(FLOAT_DTYPES))
def test_dtype_shape_and_device_are_those_of_v0(seed, size, t, dtype):
    v0, v1 = _pair(seed, (size, 3), dtype=dtype)
    v1 = v1.float()  # inputs of different dtypes are allowed; the result follows v0
    for result in (slerp(v0, v1, t), lerp(v0, v1, t)):
        assert result.dtype == dtype
        assert result.shape == v0.shape
        assert result.device == v0.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_agrees_with_cpu():
    v0, v1 = _pair(0, (300, 70), dtype=torch.bfloat16)
    exact = "cpu"
    on_gpu = slerp(v0.cuda(), v1.cuda(), 0.3, backend=exact)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.dtype == torch.bfloat16
    # The cosine is summed on the CPU, the weighted sum is elementwise: the same bits.
    assert same_bits(on_gpu.cpu(), slerp(v0, v1, 0.3))
    assert same_bits(lerp(v0.cuda(), v1.cuda(), 0.3, backend=exact).cpu(), lerp(v0, v1, 0.3))
    out = torch.empty_like(v0, device="cuda")
    assert slerp(v0.cuda(), v1.cuda(), 0.3, out=out, backend=exact) is out
    assert same_bits(out.cpu(), on_gpu.cpu())
    # As the engine runs it: the cosine summed from the host copies the inputs came from.
    g0, g1 = v0.cuda(), v1.cuda()
    with cpu.host_copies([g0, g1], [v0, v1]):
        assert same_bits(slerp(g0, g1, 0.3, backend=exact).cpu(), on_gpu.cpu())
    # By default, everything on the GPU: within the device backend's contract.
    from pearl_edu import contract
    from pearl_edu.ulp import ulp_at_each

    on_device = slerp(v0.cuda(), v1.cuda(), 0.3)
    steps = (on_device.cpu().double() - on_gpu.cpu().double()).abs() / ulp_at_each(
        contract.slerp_input_scale(v0, v1, 0.3), torch.bfloat16
    )
    assert steps.max() <= contract.CONTRACT_STEPS[torch.bfloat16]


def test_a_host_copy_stands_in_for_a_device_tensor():
    # A tensor on the "meta" device has no values: whatever SLERP sums must come from its
    # host copy (on a GPU, that saves copying each input back).
    v0, v1 = _pair(3, (40, 30), dtype=torch.bfloat16)
    m0, m1 = torch.empty_like(v0, device="meta"), torch.empty_like(v1, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        slerp(m0, m1, 0.3)  # no host copy: nothing to sum
    with cpu.host_copies([m0, m1], [v0, v1]):
        assert cpu.on_cpu(m0) is v0
        result = slerp(m0, m1, 0.3)
    assert result.device.type == "meta" and result.shape == v0.shape
    # The copies stand in within the block only.
    with pytest.raises((NotImplementedError, RuntimeError)):
        cpu.on_cpu(m0)
    # A copy of another dtype or shape does not stand in.
    other = torch.empty_like(v0, device="meta")
    for copy in (v0.float(), v0[:3]):
        with cpu.host_copies([other], [copy]), pytest.raises((NotImplementedError, RuntimeError)):
            cpu.on_cpu(other)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, size=sizes, t=ts)
def test_symmetry(seed, size, t):
    v0, v1 = _pair(seed, (size,))
    torch.testing.assert_close(slerp(v0, v1, t), slerp(v1, v0, 1 - t), rtol=1e-5, atol=1e-5)


def test_chunked_loop_covers_every_element(monkeypatch):
    # With tiny chunks the loop runs many times, including a short last chunk.
    v0, v1 = _pair(5, (7, 11))
    whole = slerp(v0, v1, 0.4)
    monkeypatch.setattr(cpu.reference, "CHUNK_ELEMENTS", 10)  # the core's, which it reads
    assert same_bits(slerp(v0, v1, 0.4), whole)


def test_empty_tensors():
    v0 = torch.empty(0, 4, dtype=torch.bfloat16)
    assert slerp(v0, v0, 0.5).shape == (0, 4)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "device"])
def test_slerp_refuses_shapes_that_differ_on_every_backend(backend):
    # pearl_edu.slerp is the core's function: it refuses as the core does.
    with pytest.raises(ValueError, match=r"\(4, 2\) vs \(2, 4\)"):
        slerp(torch.ones(4, 2), torch.ones(2, 4), 0.5, backend=backend)


def test_shapes_that_differ_are_refused():
    with pytest.raises(ModelError) as err:
        merge_tensor(
            "slerp",
            [torch.ones(32000, 8), torch.ones(32007, 8)],
            0,
            {"t": 0.5},
            name="lm_head.weight",
        )
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("lm_head.weight: ")
    assert "(32000, 8)" in message and "(32007, 8)" in message


# --- the definition, computed independently ---------------------------------------------


def _reference_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """The definition in float64 NumPy, weights rounded to float32 as the engine applies them.

    The engine sums in float32 in mergekit's order, so it agrees with this to float32
    precision, not bit for bit."""
    a = v0.double().numpy().ravel()
    b = v1.double().numpy().ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = np.dot(a / (na if na > 1e-8 else 1.0), b / (nb if nb > 1e-8 else 1.0))
    if abs(cos) > 0.9995:
        w0, w1 = 1.0 - t, t
    else:
        theta = np.arccos(cos)
        w0, w1 = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    out = np.float32(w0) * a32 + np.float32(w1) * b32
    return torch.from_numpy(out.reshape(v0.shape)).to(v0.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_float64_definition(dtype):
    v0, v1 = _pair(11, (3000, 700), correlation=0.5, dtype=dtype)  # 2.1M elements, 3 chunks
    for t in (0.0, 0.25, 0.5, 0.9):
        ours, exact = slerp(v0, v1, t), _reference_slerp(v0, v1, t)
        if t == 0.0:
            assert torch.equal(ours, exact)
        # float32 sums of 10^6 terms carry ~1e-5 relative error into the two weights; in
        # bfloat16 that can flip a rounding by one step (2^-8 relative) on a few elements.
        step = 2e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(ours, exact, rtol=step, atol=1e-5)


# --- agreement with mergekit's own slerp -------------------------------------------------


def _mergekit_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit 0.1.5's own slerp function, called as its merge method calls it.

    Its first axis is a batch of output tensors, each taken as one flat vector; a single
    tensor is passed as a batch of one, exactly as mergekit does when it merges a model.
    """
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    flat = mergekit_slerp(torch.tensor(t), v0.reshape(1, -1), v1.reshape(1, -1))
    return flat.reshape(v0.shape).to(v0.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_agrees_with_mergekit_on_small_tensors(dtype, t):
    for seed in range(5):
        v0, v1 = _pair(seed, (64, 48), correlation=0.4, dtype=dtype)
        assert same_bits(slerp(v0, v1, t), _mergekit_slerp(v0, v1, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_agrees_with_mergekit_bit_for_bit_on_a_multi_chunk_tensor(dtype):
    # float32 sums of 10^6 terms depend on their order; pearl_edu sums in mergekit's order
    # (chunk norms, then the norm of the norms; normalized chunk dots, then their sum), so
    # every bit agrees, where float64 sums would flip the rounding of ~0.3% of bf16 outputs.
    v0, v1 = _pair(11, (2000, 1100), correlation=0.5, dtype=dtype)  # 2.2M elements, 3 chunks
    for t in (0.3, 0.5, 0.77):
        assert same_bits(slerp(v0, v1, t), _mergekit_slerp(v0, v1, t))


def test_the_norms_taken_side_by_side_equal_the_norms_taken_in_turn(monkeypatch):
    # With more than one torch thread, a helper thread takes one input's chunk norms while
    # the calling thread takes the other's; with one, both are taken in turn.
    v0, v1 = _pair(12, (3000, 1000), correlation=0.5, dtype=torch.bfloat16)  # 3 chunks
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        side_by_side = [slerp(v0, v1, t) for t in (0.3, 0.6)]
        used = []
        helper = ThreadPoolExecutor(1)

        @contextlib.contextmanager
        def counted_helper():
            used.append(1)
            yield helper

        monkeypatch.setattr(cpu, "helper_thread", counted_helper)
        assert same_bits(slerp(v0, v1, 0.3), side_by_side[0]) and used == [1]
        monkeypatch.setattr(cpu.torch, "get_num_threads", lambda: 1)
        in_turn = [slerp(v0, v1, t) for t in (0.3, 0.6)]
        assert used == [1], "one torch thread: no helper"
        assert all(same_bits(x, y) for x, y in zip(side_by_side, in_turn, strict=True))
    finally:
        helper.shutdown()
        torch.set_num_threads(threads)


def test_slerp_leaves_torchs_thread_settings_as_they_were():
    # The helper thread runs torch on one thread; torch.set_num_threads also sets the number
    # that threads started later take, which must stay as it was, as must this thread's.
    # The helper thread itself lives as long as the block that holds it (a merge's), or
    # as the call that needed it.
    v0, v1 = _pair(13, (3000, 1000), correlation=0.5, dtype=torch.bfloat16)  # 3 chunks
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # more than one: the helper thread is used

    def settings():
        return torch.get_num_threads(), threads_for_new_threads()

    try:
        before, count = settings(), threading.active_count()
        slerp(v0, v1, 0.3)  # a helper of its own, stopped on return
        assert (settings(), threading.active_count()) == (before, count)
        with cpu.helper_thread() as helper:
            slerp(v0, v1, 0.3)
            assert threading.active_count() == count + 1, "the block's helper thread was used"
            assert settings() == before
            assert helper.submit(torch.get_num_threads).result() == 1
            slerp(v0, v1, 0.6)
            assert (settings(), threading.active_count()) == (before, count + 1)
        assert (settings(), threading.active_count()) == (before, count)
    finally:
        torch.set_num_threads(threads)


def test_the_thread_count_of_new_threads_is_read_and_set_without_changing_this_threads():
    threads = torch.get_num_threads()
    for_new = threads_for_new_threads()
    try:
        set_threads_for_new_threads(for_new + 1)
        assert torch.get_num_threads() == threads
        assert threads_for_new_threads() == for_new + 1
    finally:
        set_threads_for_new_threads(for_new)
    assert threads_for_new_threads() == for_new


def test_agrees_with_mergekit_in_the_lerp_region_bit_for_bit():
    v0, _ = _pair(1, (256, 64), dtype=torch.bfloat16)
    v1 = (v0.float() * 1.01).to(torch.bfloat16)
    for t in (0.2, 0.5, 0.7):
        assert same_bits(slerp(v0, v1, t), _mergekit_slerp(v0, v1, t))


def test_mergekit_agrees_on_every_tensor_of_a_batch():
    # mergekit batches several output tensors along a new first axis; each tensor of the
    # batch is still one flat vector, which is the meaning pearl_edu implements.
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    pairs = [_pair(seed, (16, 32), correlation=0.5) for seed in (7, 8)]
    batch0 = torch.stack([v0 for v0, _ in pairs])
    batch1 = torch.stack([v1 for _, v1 in pairs])
    theirs = mergekit_slerp(torch.tensor([0.3, 0.6]), batch0, batch1)
    for k, (v0, v1) in enumerate(pairs):
        ours = slerp(v0, v1, [0.3, 0.6][k])
        torch.testing.assert_close(ours, theirs[k], rtol=2e-6, atol=1e-6)  # batch sums differ
        # Taking each row as its own vector would be a different merge altogether.
        by_rows = torch.stack([slerp(r0, r1, [0.3, 0.6][k]) for r0, r1 in zip(v0, v1, strict=True)])
        assert not torch.allclose(by_rows, theirs[k], atol=1e-4)


# --- the registry ------------------------------------------------------------------------


def test_merge_tensor_uses_the_base_index():
    v0, v1 = _pair(4, (40,))
    assert same_bits(merge_tensor("slerp", [v0, v1], 0, {"t": 0.3}), slerp(v0, v1, 0.3))
    assert same_bits(merge_tensor("slerp", [v1, v0], 1, {"t": 0.3}), slerp(v0, v1, 0.3))


def test_registry_describes_slerp():
    assert "slerp" in methods.known_methods()
    spec = methods.METHODS["slerp"]
    assert spec.required_parameters() == ["t"]
    assert (spec.min_models, spec.max_models, spec.needs_base) == (2, 2, True)
    with pytest.raises(ValueError, match="already registered"):
        methods.register(spec)
    with pytest.raises(ValueError, match="unknown merge method 'no_such_method'"):
        merge_tensor("no_such_method", [torch.ones(2), torch.ones(2)], 0, {})


def test_the_registry_reads_typed_parameters_off_the_signature():
    ties = METHODS["ties"]
    assert ties.types["normalize"] is bool and ties.types["rescale"] is bool
    assert ties.types["lambda"] is float and ties.types["weight"] is float
    # ``lambda_`` in the signature is ``lambda`` in configs.
    assert "lambda" in ties.parameters and "lambda_" not in ties.parameters
    assert ties.input_scopes == {"weight": PER_NON_BASE, "density": PER_NON_BASE}
    assert not ties.base_has_input_parameters
    assert METHODS["linear"].input_scopes == {"weight": PER_INPUT}
    assert METHODS["linear"].base_has_input_parameters
    assert METHODS["karcher"].types["max_iter"] is int
    assert METHODS["passthrough"].optional_inputs == {"scale"}


def test_a_method_function_receives_typed_parameters_and_its_context():
    calls = []
    try:

        @merge_method("typed_probe", models=(2, None), base=REQUIRED)
        def probe(
            inputs: MergeInputs,
            run: MergeContext,
            *,
            t: float,
            steps: int = 3,
            flag: bool = False,
            lambda_: float = 1.0,
            weight: PerNonBase[float],
            scale: PerInput[float] = 1.0,
        ) -> torch.Tensor:
            arguments = {"t": t, "steps": steps, "flag": flag, "lambda_": lambda_}
            calls.append((inputs, run, arguments | {"weight": weight, "scale": scale}))
            return inputs.base

        spec = METHODS["typed_probe"]
        assert spec.parameters == {"t": None, "steps": 3.0, "flag": 0.0, "lambda": 1.0}
        assert spec.input_parameters == {"weight": None, "scale": 1.0}
        assert spec.types == {
            "t": float,
            "steps": int,
            "flag": bool,
            "lambda": float,
            "weight": float,
            "scale": float,
        }
        assert spec.input_scopes == {"weight": PER_NON_BASE, "scale": PER_INPUT}
        assert spec.function is probe and spec.needs_base

        tensors = [torch.full((2, 3), float(i)) for i in range(3)]
        out = torch.empty(2, 3)
        rows = [{"weight": 0.5, "scale": 2.0}, {"weight": 9.0, "scale": 3.0}, {"weight": 0.25}]
        merge_tensor(
            "typed_probe",
            tensors,
            1,  # the base in the middle: the lists must still line up with the inputs
            {"t": 0.5, "steps": 4.0, "flag": 1.0, "lambda": 2.0},
            input_params=rows,
            seed=17,
            name="model.probe.weight",
            out=out,
            fast_trim=True,
            backend="reference",
        )
        inputs, run, arguments = calls[-1]
        assert arguments == {
            "t": 0.5,
            "steps": 4,
            "flag": True,
            "lambda_": 2.0,
            "weight": [0.5, 0.25],  # per model but the base: the base's 9.0 is absent
            "scale": [2.0, 3.0, 1.0],  # per input, the base too; the default where not given
        }
        assert {name: type(value) for name, value in arguments.items()} == {
            "t": float,
            "steps": int,
            "flag": bool,
            "lambda_": float,
            "weight": list,
            "scale": list,
        }
        assert all(type(value) is float for value in arguments["weight"] + arguments["scale"])
        assert inputs.base is tensors[1] and inputs.base_index == 1 and inputs.has_base
        assert inputs.others == [tensors[0], tensors[2]]
        # The context: the out buffer, the seed, the name, fast_trim and the backend.
        assert run.out is out and run.seed == 17 and run.name == "model.probe.weight"
        assert run.fast_trim and run.backend.name == "reference"

        merge_tensor("typed_probe", tensors, 0, {"t": 0.5}, input_params=[{"weight": 1.0}] * 3)
        _, run, arguments = calls[-1]
        assert (arguments["steps"], arguments["flag"], arguments["lambda_"]) == (3, False, 1.0)
        assert type(arguments["steps"]) is int and type(arguments["flag"]) is bool
        assert run.out is None and not run.fast_trim and run.backend.name == "cpu"
        assert run.seed == methods.tensor_seed(0, "tensor") and run.name == "tensor"
    finally:
        METHODS.pop("typed_probe", None)
    assert "typed_probe" not in methods.known_methods()


def test_the_boolean_parameters_are_the_flags_some_method_takes():
    flags = methods.boolean_parameters()
    assert {"normalize", "rescale", "int8_mask", "nuslerp_flatten", "filter_wise"} <= flags
    assert "t" not in flags and "weight" not in flags
    assert all(
        spec.types[name] is bool for spec in METHODS.values() for name in flags & set(spec.types)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.75, 0.9])
def test_dares_mask_is_drawn_on_the_generators_device(dtype, density):
    # The core draws DARE's mask on its generator's device, whatever the task vector's:
    # with a CPU generator, the CPU's Bernoulli draw, which compares uniform draws with the
    # density (rounded to the working dtype, as mergekit fills it).
    shape = (300, 70)
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    draws = torch.rand(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    engine_mask = (draws < torch.tensor(density, dtype=work).item()).to(work)
    mask = core.task_vectors.drop_mask(shape, density, torch.Generator().manual_seed(7), dtype)
    assert mask.device.type == "cpu" and mask.dtype == work
    assert torch.equal(mask, engine_mask)
    ones = torch.ones(shape, dtype=dtype)
    core_mask = core.random_drop(ones, density, torch.Generator().manual_seed(7), rescale=False)
    assert torch.equal(core_mask.to(work), engine_mask)
    # A task vector elsewhere (on "meta", which holds no values) takes the CPU's draw, moved
    # to its device.
    elsewhere = torch.ones(shape, dtype=dtype, device="meta")
    moved = core.random_drop(elsewhere, density, torch.Generator().manual_seed(7), rescale=False)
    assert moved.device.type == "meta" and moved.shape == shape and moved.dtype == dtype
    if torch.cuda.is_available():
        on_gpu = core.random_drop(
            ones.cuda(), density, torch.Generator().manual_seed(7), rescale=False
        )
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu().to(work), engine_mask)
        gpu_generator = torch.Generator(device="cuda").manual_seed(7)
        assert core.task_vectors.drop_mask(shape, density, gpu_generator, dtype).is_cuda
