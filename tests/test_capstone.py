"""The capstone's automatic check: it merges a recipe for mini-Pearl and scores it."""

from __future__ import annotations

import time

import pytest
import yaml

import pearl_edu
from pearl_edu.teaching import capstone, minipearl

BOTH_STEPS = """
models:
  - model: generalist
    parameters: {weight: 1.0}
  - model: math
    parameters: {weight: 1.0}
base_model: base
merge_method: task_arithmetic
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def mini() -> minipearl.MiniPearl:
    return capstone.models()  # from chapter 07's cache, or trained once here


def test_resolve_replaces_the_three_words_by_folders(mini):
    resolved = yaml.safe_load(capstone.resolve(BOTH_STEPS, mini))
    assert [m["model"] for m in resolved["models"]] == [str(mini.generalist), str(mini.math)]
    assert resolved["base_model"] == str(mini.base)
    slices = yaml.safe_load(capstone.resolve(capstone.baseline_recipe(mini), mini))
    assert slices == yaml.safe_load(capstone.baseline_recipe(mini))  # folders stay folders


def test_resolve_refuses_other_models_in_one_line(mini):
    with pytest.raises(pearl_edu.ConfigError, match="model 'mistral' is not one of mini-Pearl's"):
        capstone.resolve(BOTH_STEPS.replace("model: math", "model: mistral"), mini)
    with pytest.raises(pearl_edu.ConfigError, match="not valid YAML"):
        capstone.resolve("models: [", mini)
    with pytest.raises(pearl_edu.ConfigError, match="expected a mapping"):
        capstone.resolve("- a list", mini)


def test_the_worked_solution_beats_the_baseline_in_under_three_minutes(mini):
    started = time.perf_counter()
    result = capstone.evaluate(BOTH_STEPS, mini)  # includes scoring the baseline the first time
    seconds = time.perf_counter() - started
    assert seconds < 180, f"the check took {seconds:.0f} s"
    assert result.problem == "" and result.beats_baseline
    assert result.skills.text > result.baseline.text
    assert result.skills.addition > result.baseline.addition
    assert "It beats the baseline on both skills." in result.summary()


def test_the_baseline_does_not_beat_itself(mini):
    result = capstone.evaluate(capstone.baseline_recipe(mini), mini)
    assert result.skills == result.baseline and not result.beats_baseline
    assert "does not beat" in str(result)


def test_the_baseline_is_measured_like_chapter_07s_merge(mini, tmp_path):
    pearl_edu.merge(capstone.baseline_recipe(mini), tmp_path / "merged", progress=False)
    model = minipearl.load_model(tmp_path / "merged")
    tokenizer = minipearl.load_tokenizer(mini.base)
    assert capstone.baseline_skills(mini) == minipearl.measure_skills(
        model, tokenizer, mini.settings.corpus()
    )


def test_a_recipe_that_does_not_merge_is_not_scored(mini):
    result = capstone.evaluate(BOTH_STEPS.replace("task_arithmetic", "no_such_method"), mini)
    assert result.skills is None and not result.beats_baseline
    assert "no_such_method" in result.problem
    assert result.summary().startswith("The recipe was not scored: ")


def test_one_parent_alone_is_not_enough(mini):
    """Neither parent beats the baseline on both skills: the task needs a real merge."""
    for parent in ("generalist", "math"):
        alone = f"models:\n  - model: {parent}\nmerge_method: linear\ndtype: bfloat16\n"
        assert not capstone.evaluate(alone, mini).beats_baseline, parent
