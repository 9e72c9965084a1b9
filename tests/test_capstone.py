"""The capstone's check: it merges a recipe for mini-Pearl, scores it on held-out items, and
declares a win only when both skills are better than the baseline's beyond the noise."""

from __future__ import annotations

import dataclasses
import time

import pytest
import yaml

import pearl_edu
from pearl_edu.teaching import capstone, evaluation, minipearl

BOTH_STEPS = """
models:
  - model: generalist
    parameters: {weight: 1.0}
  - model: math
    parameters: {weight: 1.0}
  - model: base
    parameters: {weight: -1.0}
merge_method: linear
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def mini() -> minipearl.MiniPearl:
    return capstone.models()  # from chapter 07's cache, or trained once here


def test_resolve_replaces_the_three_words_by_folders(mini):
    resolved = yaml.safe_load(capstone.resolve(BOTH_STEPS, mini))
    assert [m["model"] for m in resolved["models"]] == [
        str(mini.generalist),
        str(mini.math),
        str(mini.base),
    ]
    slices = yaml.safe_load(capstone.resolve(capstone.baseline_recipe(mini), mini))
    assert slices == yaml.safe_load(capstone.baseline_recipe(mini))  # folders stay folders


def test_resolve_refuses_other_models_and_methods_in_one_line(mini):
    with pytest.raises(pearl_edu.ConfigError, match="model 'mistral' is not one of mini-Pearl's"):
        capstone.resolve(BOTH_STEPS.replace("model: math", "model: mistral"), mini)
    with pytest.raises(pearl_edu.ConfigError, match="not valid YAML"):
        capstone.resolve("models: [", mini)
    with pytest.raises(pearl_edu.ConfigError, match="expected a mapping"):
        capstone.resolve("- a list", mini)
    for method in ("task_arithmetic", "ties", "nuslerp"):
        with pytest.raises(pearl_edu.ConfigError, match=f"merge_method '{method}' is not allowed"):
            capstone.resolve(BOTH_STEPS.replace("linear", method), mini)


def test_the_worked_solution_beats_the_baseline_on_the_test_split(mini):
    started = time.perf_counter()
    result = capstone.evaluate(capstone.WORKED_SOLUTION, mini)  # scores the baseline too
    seconds = time.perf_counter() - started
    assert seconds < 180, f"the check took {seconds:.0f} s"
    assert result.split == "test" and result.problem == "" and result.beats_baseline
    assert result.text.low > 0
    assert result.addition.p < capstone.ALPHA and result.addition.low > 0
    shown = result.summary()
    assert "on the test split" in shown and "It beats the baseline on both skills." in shown
    assert f"{result.addition.wins} won, {result.addition.losses} lost" in shown
    assert "95% interval" in shown.split("text:")[1] and "McNemar p" in shown


def test_the_worked_solution_was_chosen_on_validation_where_it_wins_too(mini):
    result = capstone.try_recipe(capstone.WORKED_SOLUTION, mini)
    assert result.split == "validation" and result.beats_baseline
    test = capstone.evaluate(capstone.WORKED_SOLUTION, mini)
    assert result.scores != test.scores  # other items: the search never sees the test split
    assert result.baseline != test.baseline


def test_the_baseline_and_near_copies_of_it_do_not_win(mini):
    itself = capstone.evaluate(capstone.baseline_recipe(mini), mini)
    assert itself.scores == itself.baseline and not itself.beats_baseline
    assert "does not beat" in str(itself)
    for t in (0.49, 0.51):
        nudged = minipearl.uniform_recipe("generalist", "math", capstone.num_layers(mini), t)
        result = capstone.evaluate(nudged, mini)
        assert result.problem == "" and not result.beats_baseline, t


def _with_additions(scores: evaluation.ItemScores, extra: int, lost: int = 0):
    """``scores`` with ``extra`` more additions right (and ``lost`` right ones wrong)."""
    right = list(scores.addition_right)
    wrong_at = [i for i, r in enumerate(right) if not r][:extra]
    right_at = [i for i, r in enumerate(right) if r][:lost]
    for i in wrong_at:
        right[i] = True
    for i in right_at:
        right[i] = False
    assert len(wrong_at) == extra and len(right_at) == lost
    return dataclasses.replace(scores, addition_right=tuple(right))


def _with_text(scores: evaluation.ItemScores, extra_tokens: int):
    """``scores`` with ``extra_tokens`` more tokens right, one per sentence where one is wrong."""
    right = list(scores.text_right)
    room = [i for i, (r, n) in enumerate(zip(right, scores.text_total, strict=True)) if r < n]
    for i in room[:extra_tokens]:
        right[i] += 1
    return dataclasses.replace(scores, text_right=tuple(right))


def test_a_lead_of_a_few_of_300_additions_is_not_a_win(mini):
    baseline = capstone.baseline_scores(mini)
    assert len(baseline.addition_right) == 300
    better_text = _with_text(baseline, 200)
    for extra in (1, 3, 5):
        result = capstone.Result("test", baseline, _with_additions(better_text, extra))
        assert result.text.low > 0  # the text is better beyond the noise ...
        assert not capstone.passes(result.addition) and not result.beats_baseline, extra
    # ... and the same lead reached with losses on the way, 20 won and 17 lost, neither.
    mixed = capstone.Result("test", baseline, _with_additions(better_text, 20, lost=17))
    assert mixed.addition.wins - mixed.addition.losses == 3 and not mixed.beats_baseline
    # The rule can say yes: 20 more additions with none lost is well outside the noise.
    clear = capstone.Result("test", baseline, _with_additions(better_text, 20))
    assert clear.addition.p < 1e-5 and clear.beats_baseline
    # Additions alone are not enough: the text must be better too.
    assert not capstone.Result("test", baseline, _with_additions(baseline, 20)).beats_baseline


def test_the_rule_for_additions_asks_for_the_test_and_the_interval():
    significant_but_touching = evaluation.Difference(
        "addition", 0.02, 0.0, 0.04, 300, wins=8, losses=0, p=0.0078
    )
    wide = evaluation.Difference("addition", 0.02, 0.001, 0.04, 300, wins=12, losses=6, p=0.24)
    both = evaluation.Difference("addition", 0.03, 0.01, 0.05, 300, wins=10, losses=1, p=0.012)
    assert not capstone.passes(significant_but_touching)
    assert not capstone.passes(wide)
    assert capstone.passes(both)
    assert capstone.passes(evaluation.Difference("text", 0.01, 0.002, 0.02, 300))
    assert not capstone.passes(evaluation.Difference("text", 0.01, -0.002, 0.02, 300))


def test_the_baseline_is_measured_like_chapter_07s_merge(mini, tmp_path):
    pearl_edu.merge(capstone.baseline_recipe(mini), tmp_path / "merged", progress=False)
    model = minipearl.load_model(tmp_path / "merged")
    tokenizer = minipearl.load_tokenizer(mini.base)
    for split in ("test", "validation"):
        ours = capstone.baseline_skills(mini, split)
        theirs = minipearl.measure_skills(model, tokenizer, mini.settings.corpus(), split=split)
        assert ours.addition == theirs.addition
        assert ours.text == pytest.approx(theirs.text, abs=1e-7)  # float32 against float64


def test_a_recipe_that_does_not_merge_is_not_scored(mini):
    result = capstone.evaluate(BOTH_STEPS.replace("dtype: bfloat16", "dtype: float7"), mini)
    assert result.scores is None and result.skills is None and not result.beats_baseline
    assert "float7" in result.problem
    assert result.summary().startswith("The recipe was not scored: ")
    refused = capstone.try_recipe(BOTH_STEPS.replace("linear", "task_arithmetic"), mini)
    assert not refused.beats_baseline and "is not allowed" in refused.problem


def test_one_parent_alone_or_an_interpolation_is_not_enough(mini):
    """Neither parent, nor SLERP at another uniform t, beats the baseline on both skills."""
    for parent in ("generalist", "math"):
        alone = f"models:\n  - model: {parent}\nmerge_method: linear\ndtype: bfloat16\n"
        assert not capstone.evaluate(alone, mini).beats_baseline, parent
    for t in (0.3, 0.7):
        slerp = minipearl.uniform_recipe("generalist", "math", capstone.num_layers(mini), t)
        assert not capstone.try_recipe(slerp, mini).beats_baseline, t
