"""Tests of `pearl_edu.verify`: comparing two model folders tensor by tensor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

# The package exports the function `verify`, which hides the module of the same name.
import pearl_edu.verification as verify_module
from pearl_edu import comparison
from pearl_edu.comparison import compare_tensors
from pearl_edu.errors import ModelError
from pearl_edu.teaching.toy import edited_copy, load_state_dict, make_tiny_model
from pearl_edu.ulp import ulp_at, ulp_distance
from pearl_edu.verification import verify

NORM = "model.layers.0.input_layernorm.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("verify") / "model", seed=3)


def next_up(x: torch.Tensor) -> torch.Tensor:
    """The next representable value above each element, in x's own dtype."""
    bits = x.view(torch.int16)
    # For positive floats the next value up has the next bit pattern.
    assert bool((x > 0).all())
    return (bits + 1).view(x.dtype)


def test_a_model_is_identical_to_itself(model):
    report = verify(model, model)
    assert report.identical and report.ok
    assert report.num_differing == 0 and report.max_abs_diff == 0.0
    assert report.max_ulp_diff == 0
    assert len(report.tensors) == len(load_state_dict(model))
    assert "result: identical" in report.summary()


def test_sharding_and_file_format_do_not_matter(tmp_path, model):
    sharded = make_tiny_model(tmp_path / "sharded", seed=3, shard_count=3)
    pickled = make_tiny_model(tmp_path / "pickled", seed=3, fmt="bin")
    assert verify(model, sharded).identical
    assert verify(sharded, pickled).identical


def test_a_different_seed_differs_everywhere(tmp_path, model):
    other = make_tiny_model(tmp_path / "other", seed=4)
    report = verify(model, other)
    assert not report.ok
    assert len(report.differing) == len(report.tensors)
    # Random weights almost never coincide: nearly every element differs.
    assert report.num_differing > 0.9 * report.num_elements


def test_one_ulp_on_one_element_is_found_and_measured(tmp_path, model):
    original = load_state_dict(model)[Q_PROJ]
    index = int(original.flatten().abs().argmax())
    value = original.flatten()[index].abs().reshape(1)
    bumped_value = next_up(value)

    def bump(weights):
        flat = weights[Q_PROJ].flatten().clone()
        flat[index] = bumped_value[0] * torch.sign(flat[index])
        weights[Q_PROJ] = flat.reshape(original.shape)

    edited = edited_copy(model, tmp_path / "edited", bump)
    report = verify(model, edited)
    expected_diff = float(bumped_value[0].double() - value[0].double())
    assert not report.identical and not report.ok
    assert [t.name for t in report.differing] == [Q_PROJ]
    (q,) = report.differing
    assert q.num_differing == 1 and q.max_ulp_diff == 1
    assert q.max_abs_diff == pytest.approx(expected_diff, rel=0, abs=0)
    assert verify(model, edited, atol=expected_diff).ok
    assert not verify(model, edited, atol=expected_diff / 2).ok
    # The same tolerance in units in the last place, whatever the magnitude of the values.
    assert verify(model, edited, max_ulp=1).ok
    assert not verify(model, edited, max_ulp=0).ok
    assert "result: equal within atol=0 or 1 ULP" in verify(model, edited, max_ulp=1).summary()


def test_missing_and_extra_tensors_are_reported(tmp_path, model):
    edited = edited_copy(model, tmp_path / "edited", lambda w: w.pop(NORM))
    report = verify(model, edited, atol=1e9)
    assert report.only_in_a == (NORM,) and report.only_in_b == ()
    assert not report.ok, "a missing tensor is a difference whatever atol says"
    assert verify(edited, model).only_in_b == (NORM,)
    assert f"1 tensors only in A:\n  {NORM}" in report.summary()


def test_shape_and_dtype_mismatches_are_reported(tmp_path, model):
    def reshape_and_recast(weights):
        weights[NORM] = weights[NORM][:-1].clone()
        weights[Q_PROJ] = weights[Q_PROJ].to(torch.float32)

    edited = edited_copy(model, tmp_path / "edited", reshape_and_recast)
    report = verify(model, edited, atol=1e9)
    assert not report.ok
    assert not verify(model, edited, max_ulp=10**9).ok, "ULPs do not excuse a layout change"
    by_name = {t.name: t for t in report.differing}
    assert set(by_name) == {NORM, Q_PROJ}
    assert by_name[NORM].max_abs_diff == math.inf
    # bfloat16 -> float32 is exact, so the values agree but the dtype does not.
    assert by_name[Q_PROJ].num_differing == 0 and by_name[Q_PROJ].max_ulp_diff is None
    summary = report.summary()
    assert "shape [64] vs [63]" in summary
    assert "dtype bfloat16 vs float32" in summary
    assert "result: DIFFERENT" in summary


def test_compare_in_chunks_gives_the_same_answer(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=generator).to(torch.bfloat16)
    b = a.clone()
    b[::7] = torch.randn(b[::7].shape, generator=generator).to(torch.bfloat16)
    whole = compare_tensors("x", a, b)
    monkeypatch.setattr(comparison, "CHUNK_ELEMENTS", 64)
    chunked = compare_tensors("x", a, b)
    assert whole == chunked
    assert whole.num_differing == int((a != b).sum())
    assert whole.max_abs_diff == float((a.double() - b.double()).abs().max())


def test_nans_in_the_same_place_are_equal_and_elsewhere_infinitely_different():
    a = torch.tensor([1.0, math.nan, 3.0])
    assert compare_tensors("x", a, a.clone()).num_differing == 0
    b = torch.tensor([1.0, 2.0, 3.0])
    result = compare_tensors("x", a, b)
    assert result.num_differing == 1 and result.max_abs_diff == math.inf


def test_equal_infinities_are_equal():
    a = torch.tensor([math.inf, -math.inf, 0.0])
    assert compare_tensors("x", a, a.clone()).identical


def test_ulps_count_across_zero():
    tiny = torch.finfo(torch.bfloat16).smallest_normal
    a = torch.tensor([0.0, 0.0, tiny], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, tiny, -tiny], dtype=torch.bfloat16)
    ulps = ulp_distance(a, b)
    # +0 and -0 are the same number; the smallest normal lies above 127 subnormals and 0.
    assert ulps.tolist() == [0, 128, 256]


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_neighbouring_float32_values_are_one_ulp_apart(x):
    a = torch.tensor([x], dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor([math.inf]))
    if math.isinf(float(b)):
        return
    assert int(ulp_distance(a, b)[0]) == 1


def test_summary_lists_the_worst_tensors_first_and_caps_the_table(tmp_path, model):
    other = make_tiny_model(tmp_path / "other", seed=4)
    report = verify(model, other)
    summary = report.summary(max_rows=3)
    table_rows = [line for line in summary.splitlines() if line.startswith("model.")]
    assert len(table_rows) == 3
    worst = [t.name for t in report.differing[:3]]
    assert [row.split()[0] for row in table_rows] == worst
    diffs = [t.max_abs_diff for t in report.differing]
    assert diffs == sorted(diffs, reverse=True)
    assert f"... and {len(report.differing) - 3} more differing tensors" in summary


def test_progress_is_called_once_per_tensor(model):
    calls = []
    verify(model, model, progress=lambda done, total, name: calls.append((done, total, name)))
    total = len(load_state_dict(model))
    assert [c[0] for c in calls] == list(range(1, total + 1))
    assert {c[1] for c in calls} == {total}


def test_bad_input_raises_model_errors(tmp_path, model):
    with pytest.raises(ModelError, match="does not exist"):
        verify(tmp_path / "nowhere", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no weights found"):
        verify(model, tmp_path / "empty")
    with pytest.raises(ModelError, match="atol"):
        verify(model, model, atol=-1.0)
    for bad in (-1, 0.5, True):
        with pytest.raises(ModelError, match="max_ulp"):
            verify(model, model, max_ulp=bad)


def test_ulp_at_is_the_gap_to_the_next_number_of_the_dtype():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for value in (1.0, 0.75, 3.0, 0.0123, 1000.0):
            x = torch.tensor([value], dtype=dtype)
            gap = float(torch.nextafter(x, torch.tensor([math.inf], dtype=dtype)) - x)
            assert ulp_at(float(x), dtype) == gap, (dtype, value)
    tiny = torch.finfo(torch.bfloat16).smallest_normal
    assert ulp_at(0.0, torch.bfloat16) == ulp_at(tiny, torch.bfloat16)


def test_scale_ulp_measures_a_difference_at_the_tensor_s_largest_value():
    # Largest value 1.5 (its bfloat16 step 2^-7); a small element moved by 4 of its own steps.
    a = torch.tensor([1.5, 0.01, -0.5, 0.25], dtype=torch.bfloat16)
    b = a.clone()
    step = ulp_at(0.01, torch.bfloat16)
    b[1] = float(a[1]) + 4 * step
    result = compare_tensors("x", a, b)
    assert result.max_ulp_diff == 4
    assert result.max_scale_ulp_diff == pytest.approx(4 * step / 2**-7)
    assert result.max_scale_ulp_diff < 1
    assert result.within(0.0, scale_ulp=1.0) and not result.within(0.0, max_ulp=1)
    assert not result.within(0.0, scale_ulp=result.max_scale_ulp_diff / 2)
    # The same difference next to an infinity: the scale is the largest finite value.
    with_inf = compare_tensors(
        "x", torch.cat([a, a.new_tensor([math.inf])]), torch.cat([b, b.new_tensor([math.inf])])
    )
    assert with_inf.max_scale_ulp_diff == result.max_scale_ulp_diff
    # Not measurable across dtypes or shapes; NaN against a number is infinitely far.
    assert compare_tensors("x", a, b.float()).max_scale_ulp_diff is None
    assert compare_tensors("x", a, b[:3]).max_scale_ulp_diff is None
    nan = b.clone()
    nan[0] = math.nan
    assert compare_tensors("x", a, nan).max_scale_ulp_diff == math.inf


def test_max_fraction_rejects_many_small_differences(tmp_path, model):
    """One step on every element (as another t would give) passes scale_ulp, not max_fraction."""
    original = load_state_dict(model)[Q_PROJ]

    def every_element_up(weights):
        weights[Q_PROJ] = torch.nextafter(original, torch.full_like(original, math.inf))

    edited = edited_copy(model, tmp_path / "edited", every_element_up)
    report = verify(model, edited, scale_ulp=1.0)
    assert report.ok and report.max_scale_ulp_diff <= 1
    (q,) = report.differing
    assert q.fraction_differing == 1.0 and report.max_fraction_differing == 1.0
    assert not verify(model, edited, scale_ulp=1.0, max_fraction=0.01).ok
    assert not verify(model, edited, atol=1.0, max_fraction=0.5).ok, "max_fraction binds atol too"
    assert verify(model, edited, scale_ulp=1.0, max_fraction=1.0).ok


def test_numpy_era_tolerance_accepts_rare_rounding_and_rejects_a_nudge(tmp_path, model):
    original = load_state_dict(model)[Q_PROJ]
    flat = original.flatten()
    # The smallest nonzero element, 3 of its own steps away: a few ULPs, far under one step
    # at the tensor's scale, on one element of 4096.
    index = int(torch.where(flat == 0, math.inf, flat.float().abs()).argmin())
    moved = flat.clone()
    for _ in range(3):
        moved = torch.nextafter(moved, torch.full_like(moved, math.inf))
    rounding = flat.clone()
    rounding[index] = moved[index]
    rounded = edited_copy(
        model, tmp_path / "rounded", lambda w: w.update({Q_PROJ: rounding.reshape(original.shape)})
    )
    tolerance = verify_module.NUMPY_ERA_TOLERANCE
    report = verify(model, rounded, **tolerance)
    assert report.max_ulp_diff == 3 and not verify(model, rounded, max_ulp=1).ok
    assert report.ok
    summary = report.summary()
    assert (
        "result: equal within atol=0 or 1 ULP at the tensor's scale, at most 25.000% of" in summary
    )
    assert "at the tensors' scale: largest difference" in summary
    # A real change of one tensor, 1% of its values' spread on every element, is refused.
    nudged = edited_copy(
        model, tmp_path / "nudged", lambda w: w.update({Q_PROJ: original + 0.01 * original.std()})
    )
    assert not verify(model, nudged, **tolerance).ok
    assert "result: DIFFERENT" in verify(model, nudged, **tolerance).summary()


def test_defaults_leave_the_summary_as_it_was(model):
    assert "tensors' scale" not in verify(model, model).summary()


@pytest.mark.parametrize(
    ("keyword", "bad"),
    [("scale_ulp", -1.0), ("scale_ulp", math.nan), ("scale_ulp", math.inf), ("scale_ulp", True)]
    + [("scale_ulp", "1"), ("max_fraction", -0.1), ("max_fraction", 1.5), ("max_fraction", True)]
    + [("max_fraction", math.nan)],
)
def test_bad_tolerances_raise_one_line_model_errors(model, keyword, bad):
    with pytest.raises(ModelError, match=keyword) as error:
        verify(model, model, **{keyword: bad})
    assert "\n" not in str(error.value)
