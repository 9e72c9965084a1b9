"""The device backend's contract with the reference core, checked on the CPU.

A GPU adds up SLERP's long sums in another order than the core (mergekit's chunks of 2^20,
each through torch's CPU norm), so its cosine differs and so do some outputs. The device
backend (`pearl_edu.backends.device`) keeps a contract (`pearl_edu.contract`) instead of
the core's bits: the cosine within ``COSINE_TOLERANCE`` (2e-4) of the core's, and every
output element within ``CONTRACT_STEPS`` steps of the output dtype at the element's input
scale $|w_0 x_i| + |w_1 y_i|$. Here the device backend runs on CPU tensors (whole-tensor
sums, not the core's chunks) and, to move the sums' order further, on permuted, reversed
and float64-summed copies of the same vectors; the contract must hold on every pair tried
(siblings, strangers, near-parallel, near-zero, zero, several chunks), must fail for a
result that is wrong, and must hold end to end through a merge and ``pearl-edu verify``.
"""

from __future__ import annotations

import math

import pytest
import torch

from pearl_edu import contract, core
from pearl_edu.backends import device
from pearl_edu.cli import main
from pearl_edu.core import interpolation
from pearl_edu.engine import merge
from pearl_edu.teaching.toy import make_tiny_model
from pearl_edu.ulp import ulp_at_each
from pearl_edu.verification import verify

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PEARL_TS = [0.0, 0.3, 0.5, 0.7, 1.0]
CHUNK = 1 << 20
UNIT = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff, 2^-24


def pair(kind: str, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat vectors of ``n`` elements of a kind SLERP meets (or must survive)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    b = {
        "siblings": a + 0.5 * noise,  # cos 0.89, the benchmark's stand-ins
        "close siblings": a + 0.05 * noise,
        "strangers": noise + 0.05 * a,  # nearly orthogonal, cos > 0
        "near-parallel": a + 0.02 * noise,  # cos just below the fallback's 0.9995
        "parallel": a + 1e-3 * noise,  # the linear fallback
        "obtuse": -a + 2 * noise,  # cos about -0.45
    }.get(kind)
    if kind == "near-zero":  # tiny values: norms far above eps, products near float32's floor
        a, b = a * 1e-6, (a + 0.5 * noise) * 1e-6
    elif kind == "below-eps":  # norms under NORM_EPS: left undivided, cosine about 0
        a, b = a * 1e-13, (a + 0.5 * noise) * 1e-13
    elif kind == "zero":
        b = torch.zeros(n, dtype=torch.float64)
    elif kind == "sparse":  # mostly zeros, as in a pruned layer
        a = a * (torch.rand(n, generator=g, dtype=torch.float64) < 0.05)
        b = a + 0.3 * noise * (a != 0)
    return a.to(dtype), b.to(dtype)


def steps_at_input_scale(
    got: torch.Tensor, expected: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, t: float
) -> float:
    """The largest difference in steps of the dtype at each element's input scale."""
    scale = contract.slerp_input_scale(v0, v1, t)
    diff = (got.double() - expected.double()).abs()
    return float((diff / ulp_at_each(scale, expected.dtype)).max())


def core_cosine(v0: torch.Tensor, v1: torch.Tensor) -> float:
    return float(interpolation.cosine(v0, v1))


def device_cosine(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    work = interpolation.work_dtype(v0)
    return device.cosine(v0.reshape(-1).to(work), v1.reshape(-1).to(work))


def in_domain(cos: float, dtype: torch.dtype) -> bool:
    return cos >= contract.CONTRACT_MIN_COSINE[dtype]


KINDS = [
    "siblings",
    "close siblings",
    "strangers",
    "near-parallel",
    "parallel",
    "obtuse",
    "near-zero",
    "below-eps",
    "zero",
    "sparse",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_contract_holds_on_many_pairs(kind, dtype):
    checked = 0
    for seed, n in enumerate((1, 7, 4099, 65_537, 300_001)):
        v0, v1 = pair(kind, n, dtype, seed)
        reference_cos = core_cosine(v0, v1)
        assert abs(float(device_cosine(v0, v1)) - reference_cos) <= contract.COSINE_TOLERANCE
        if not in_domain(reference_cos, dtype):
            continue  # the cosine bound holds everywhere; the element bound in its domain
        for t in [*PEARL_TS, 0.123 + 0.1 * seed]:
            steps = steps_at_input_scale(device.slerp(v0, v1, t), core.slerp(v0, v1, t), v0, v1, t)
            assert steps <= contract.CONTRACT_STEPS[dtype], (kind, n, t, steps)
            checked += 1
    if kind == "obtuse" and contract.CONTRACT_MIN_COSINE[dtype] > -0.45:
        assert checked == 0  # outside the element bound's domain: the cosine bound only
    else:
        assert checked >= 18  # all but a one-element pair lie in the contract's domain


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contract_holds_across_several_of_the_cores_chunks(dtype):
    # 2.5 chunks: the core sums per chunk and then the chunks; the device, in one go.
    for kind, seed in (("siblings", 1), ("near-parallel", 2), ("strangers", 3)):
        v0, v1 = pair(kind, 2 * CHUNK + CHUNK // 2 + 3, dtype, seed)
        reference_cos = core_cosine(v0, v1)
        assert abs(float(device_cosine(v0, v1)) - reference_cos) <= contract.COSINE_TOLERANCE
        for t in (0.3, 0.7):
            steps = steps_at_input_scale(device.slerp(v0, v1, t), core.slerp(v0, v1, t), v0, v1, t)
            assert steps <= contract.CONTRACT_STEPS[dtype], (kind, t, steps)


def perturbed_cosines(v0: torch.Tensor, v1: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """The device backend's cosine of the same vectors summed in other orders."""
    work = interpolation.work_dtype(v0)
    x, y = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    order = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))
    wide = device.cosine(x.double(), y.double()).to(work)  # exact enough: float64 sums
    return [
        device.cosine(x[order], y[order]),
        device.cosine(x.flip(0), y.flip(0)),
        device.cosine(x.reshape(-1, 1).expand(-1, 1).reshape(-1), y),  # the plain order again
        wide,
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["siblings", "strangers", "near-parallel", "near-zero"])
def test_contract_holds_for_sums_in_any_order(kind, dtype):
    for seed in range(3):
        v0, v1 = pair(kind, 200_003, dtype, seed)
        reference_cos = core_cosine(v0, v1)
        expected = {t: core.slerp(v0, v1, t) for t in (0.25, 0.5, 0.8)}
        for cos in perturbed_cosines(v0, v1, seed):
            assert abs(float(cos) - reference_cos) <= contract.COSINE_TOLERANCE
            work = interpolation.work_dtype(v0)
            x, y = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
            for t, reference in expected.items():
                w0, w1 = interpolation.slerp_weights(cos, t)
                got = device.weighted_sum(x, y, w0, w1, like=v0)
                steps = steps_at_input_scale(got, reference, v0, v1, t)
                assert steps <= contract.CONTRACT_STEPS[dtype], (kind, t, steps)


def test_the_branches_meet_at_the_threshold_within_the_bound():
    """Near |cos| = 0.9995 the two sides may take different branches: harmless at +0.9995."""
    for dtype in (torch.bfloat16, torch.float16):
        v0, v1 = pair("near-parallel", 100_003, dtype, 4)
        work = interpolation.work_dtype(v0)
        x, y = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
        below = torch.tensor(
            interpolation.DOT_THRESHOLD - contract.COSINE_TOLERANCE
        )  # SLERP's weights
        above = torch.tensor(interpolation.DOT_THRESHOLD + 1e-7)  # the linear fallback
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            slerped = device.weighted_sum(x, y, *interpolation.slerp_weights(below, t), like=v0)
            lerped = device.weighted_sum(x, y, *interpolation.slerp_weights(above, t), like=v0)
            weights = tuple(float(w) for w in interpolation.slerp_weights(below, t))
            scale = contract.slerp_input_scale(v0, v1, t, weights)
            steps = (slerped.double() - lerped.double()).abs() / ulp_at_each(scale, dtype)
            assert steps.max() <= contract.CONTRACT_STEPS[dtype], (dtype, t)
    # At -0.9995 the branches do not meet: the reason the domain stops short of it.
    w_slerp = interpolation.slerp_weights(torch.tensor(-interpolation.DOT_THRESHOLD + 4e-7), 0.5)
    w_lerp = interpolation.slerp_weights(torch.tensor(-interpolation.DOT_THRESHOLD - 4e-7), 0.5)
    assert float(w_slerp[0]) > 10 * float(w_lerp[0])


def test_a_wrong_result_breaks_the_contract():
    for dtype in DTYPES:
        v0, v1 = pair("siblings", 50_001, dtype, 7)
        expected = core.slerp(v0, v1, 0.3)
        allowed = contract.CONTRACT_STEPS[dtype]
        # Another t, even close by.
        assert steps_at_input_scale(device.slerp(v0, v1, 0.31), expected, v0, v1, 0.3) > allowed
        # The weights from a cosine that is off (by far more than any order of sums).
        work = interpolation.work_dtype(v0)
        x, y = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
        w0, w1 = interpolation.slerp_weights(device_cosine(v0, v1) - 0.05, 0.3)
        wrong = device.weighted_sum(x, y, w0, w1, like=v0)
        assert steps_at_input_scale(wrong, expected, v0, v1, 0.3) > allowed
        # One element moved by two steps at its own scale.
        moved = expected.clone()
        scale = contract.slerp_input_scale(v0, v1, 0.3)
        index = int(scale.argmax())
        moved[index] = (
            moved[index].double() + 2.01 * allowed * ulp_at_each(scale, dtype)[index]
        ).to(dtype)
        assert steps_at_input_scale(moved, expected, v0, v1, 0.3) > allowed


def test_the_sensitivity_is_the_weights_derivative():
    """weight_sensitivity is |d ln w / d cos|: compare with finite differences."""
    for cos in (0.99, 0.5, 0.0, -0.5, -0.99):
        for t in (0.1, 0.5, 0.9):
            h = 1e-7

            def log_weights(c, t=t):
                theta = math.acos(c)
                return [math.log(math.sin(tau * theta) / math.sin(theta)) for tau in (1 - t, t)]

            slopes = [
                abs(hi - lo) / (2 * h)
                for hi, lo in zip(log_weights(cos + h), log_weights(cos - h), strict=True)
            ]
            assert contract.weight_sensitivity(cos, t) == pytest.approx(max(slopes), rel=1e-5)
    assert contract.weight_sensitivity(0.9999, 0.5) == 0.0  # the fallback's weights are fixed


def test_the_bounds_follow_from_the_derivation():
    """Each dtype's budget: K (2e-4 + 11 u) + 14 u, against a quarter of its precision.

    The weights move by K times the cosine's error, where the two sides' acos count as 11
    more units u of float32 of cosine (3 units in the last place of theta, at most 6 u
    theta, times sin theta, with theta sin theta <= 1.82); the sines and the division add
    10 units, the two float32 sums 4.
    """
    ts = [i / 200 for i in range(201)]

    def largest_sensitivity(lowest_cos: float) -> float:
        lowest_cos -= 2 * contract.COSINE_TOLERANCE
        cosines = [
            lowest_cos + (interpolation.DOT_THRESHOLD - lowest_cos) * i / 400 for i in range(401)
        ]
        return max(contract.weight_sensitivity(c, t) for c in cosines for t in ts)

    theta_sin_theta = max(x / 1000 * math.sin(x / 1000) for x in range(3142))
    assert 6 * theta_sin_theta <= 11
    for dtype, steps in contract.CONTRACT_STEPS.items():
        k = largest_sensitivity(contract.CONTRACT_MIN_COSINE[dtype])
        moved = k * (contract.COSINE_TOLERANCE + 11 * UNIT) + 14 * UNIT
        precision = torch.finfo(dtype).eps  # the step at s is at least s * eps / 2
        if steps == 1:  # the two roundings land on the same or neighbouring values
            assert moved <= precision / 4, dtype
        else:
            assert math.ceil(moved / (precision / 2)) <= steps, dtype
    # The branches at +0.9995: the weights' relative gap, from as far as the cosine's
    # tolerance below the threshold, inside float16's budget.
    theta = math.acos(interpolation.DOT_THRESHOLD - contract.COSINE_TOLERANCE)
    gap = max(abs(math.sin(tau * theta) / math.sin(theta) / tau - 1) for tau in ts[1:] if tau < 1)
    assert gap + 14 * UNIT <= torch.finfo(torch.float16).eps / 4


# --------------------------------------------------------------------------------------
# End to end: a merge on the device backend (on the CPU), checked by `verify`.


@pytest.fixture(scope="module")
def pearl_pair(tmp_path_factory):
    """Pearl's real case at toy size: a float16 parent and a bfloat16 one."""
    root = tmp_path_factory.mktemp("contract")
    a = make_tiny_model(root / "a", num_layers=4, dtype=torch.float16)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    return a, b


def slerp_config(a, b, t="[0, 0.5, 0.3, 0.7, 1]") -> str:
    return (
        "slices:\n  - sources:\n"
        f"      - model: {a}\n        layer_range: [0, 4]\n"
        f"      - model: {b}\n        layer_range: [0, 4]\n"
        "merge_method: slerp\n"
        f"base_model: {a}\n"
        "parameters:\n  t:\n    - filter: self_attn\n"
        f"      value: {t}\n"
        "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
        "dtype: bfloat16\n"
    )


def test_a_merge_on_the_device_backend_keeps_the_contract(pearl_pair, tmp_path):
    a, b = pearl_pair
    config = slerp_config(a, b)
    exact = merge(config, tmp_path / "exact", device="cpu", progress=False)
    device = merge(config, tmp_path / "device", device="cpu", progress=False, backend="device")
    report = verify(exact.output_dir, device.output_dir, config=config, input_scale_ulp=1)
    assert report.ok, report.summary()
    assert report.max_input_scale_ulp_diff <= 1
    assert "at the inputs' scale" in report.summary()
    # A merge with another t for one tensor group is not within the contract.
    wrong = merge(slerp_config(a, b, t="[0, 0.5, 0.31, 0.7, 1]"), tmp_path / "wrong", device="cpu")
    report = verify(exact.output_dir, wrong.output_dir, config=config, input_scale_ulp=1)
    assert not report.ok
    assert report.max_input_scale_ulp_diff > 1


def test_ties_on_the_device_backend_is_fast_trims_ties(pearl_pair, tmp_path):
    a, b = pearl_pair
    config = (
        f"models:\n  - model: {a}\n  - model: {b}\n    parameters:\n"
        "      weight: 1.0\n      density: 0.4\n"
        f"merge_method: ties\nbase_model: {a}\ndtype: bfloat16\n"
    )
    exact = merge(config, tmp_path / "exact", device="cpu", progress=False, fast_trim=True)
    device = merge(config, tmp_path / "device", device="cpu", progress=False, backend="device")
    report = verify(exact.output_dir, device.output_dir, config=config, input_scale_ulp=1)
    assert report.ok, report.summary()


def test_verify_command_takes_the_config_and_the_input_scale(pearl_pair, tmp_path, capsys):
    a, b = pearl_pair
    config_file = tmp_path / "slerp.yml"
    config_file.write_text(slerp_config(a, b))
    exact = merge(config_file, tmp_path / "exact", device="cpu", progress=False)
    device = merge(config_file, tmp_path / "device", device="cpu", backend="device")
    dirs = [str(exact.output_dir), str(device.output_dir)]
    assert (
        main(["verify", *dirs, "--quiet", "--config", str(config_file), "--input-scale-ulp", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "at the inputs' scale: largest difference" in out
    assert main(["verify", *dirs, "--quiet", "--input-scale-ulp", "1"]) == 2
    assert "--config" in capsys.readouterr().err


def test_input_scale_of_each_method_and_only_where_asked():
    from pearl_edu.contract import input_scale
    from pearl_edu.errors import ModelError

    x = torch.tensor([1.0, -2.0, 0.5, 0.0])
    y = torch.tensor([-1.0, 3.0, 0.5, 4.0])
    z = torch.tensor([0.0, 1.0, -0.5, 2.0])
    slerp = input_scale("slerp", [x, y], 0, {"t": 0.3}, [{}, {}])
    w0, w1 = contract.reference_weights(x, y, 0.3)
    expected = x.double().abs() * abs(w0) + y.double().abs() * abs(w1)
    assert torch.equal(slerp.full(), expected)
    assert torch.equal(slerp.at(slice(1, 4), torch.tensor([True, False, True])), expected[[1, 3]])
    linear = input_scale(
        "linear", [x, y], 0, {"normalize": 1.0}, [{"weight": 1.0}, {"weight": 3.0}]
    )
    assert linear.full().tolist() == [1.0, 2.75, 0.5, 3.0]  # (|x| + 3 |y|) / 4
    rows = [{}, {"weight": 0.5}, {"weight": 2.0}]
    ties = input_scale("ties", [x, y, z], 0, {"normalize": 1.0, "lambda": 2.0}, rows)
    # |x| + 2 max(|y - x|, |z - x|)
    assert ties.full().tolist() == [1.0 + 2 * 2.0, 2.0 + 2 * 5.0, 0.5 + 2 * 1.0, 0.0 + 2 * 4.0]
    plain = input_scale("task_arithmetic", [x, y, z], 0, {"normalize": 0.0}, rows)
    # |x| + 0.5 |y - x| + 2 |z - x|
    assert plain.full().tolist() == [
        1 + 0.5 * 2 + 2 * 1,
        2 + 0.5 * 5 + 2 * 3,
        0.5 + 0 + 2,
        0 + 2 + 4,
    ]
    with pytest.raises(ModelError, match="dare_ties.*--scale-ulp"):
        input_scale("dare_ties", [x, y], 0, {}, rows[:2], name="w")
