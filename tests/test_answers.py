"""The student edition's answer checks: right answers pass, wrong ones get a hint, not the answer.

The right answers are the teacher's edition's: the worked answers kept in the metadata of
each exercise's cell (`pearl_edu.teaching.student.teacher_answers`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from pearl_edu.teaching import answers, student

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _all_teacher_answers() -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    for notebook in NOTEBOOKS:
        for label, values in student.teacher_answers(notebook).items():
            assert label not in found, f"{label}: answers in two notebooks"
            found[label] = values
    return found


TEACHER = _all_teacher_answers()
LABELS = sorted(answers.EXERCISES)


def test_every_checked_exercise_has_the_teachers_answer_and_no_other():
    assert sorted(TEACHER) == LABELS
    for label, values in TEACHER.items():
        blanks = [b.name for b in answers.EXERCISES[label].blanks]
        assert sorted(values) == sorted(blanks), label


def test_every_checked_exercise_is_in_a_chapter():
    text = "\n".join(path.read_text() for path in NOTEBOOKS)
    for label in LABELS:
        assert f":label: {label}" in text, f"{label} is not an exercise of any chapter"


@pytest.mark.parametrize("label", LABELS)
def test_the_teachers_answer_passes(label):
    verdict = answers.check(label, **TEACHER[label])
    assert verdict.passed, str(verdict)
    assert str(verdict).startswith(f"{label}: all right.")


def _wrong(label: str, name: str, right: object) -> object:
    """A wrong answer of the same kind as the right one."""
    if label == "ex-capstone":  # the baseline itself does not beat the baseline
        from pearl_edu.teaching import capstone

        return capstone.baseline_recipe(capstone.models())
    if label == "ex-meet-recipe" and name == "recipe":  # Pearl's own schedule, not t = 0.3
        import pearl_edu

        return pearl_edu.recipe_text()
    if isinstance(right, int | float):
        return right * 1.7 + 0.3
    if isinstance(right, list):
        return [right[0] + 1, *right[1:]]
    raise TypeError(f"no wrong answer for {label}.{name}")


def _shown_forms(value: object) -> list[str]:
    """How a right value could appear in a message: its digits at a few roundings."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(value)] + [form for v in value for form in _shown_forms(v)]
    value = float(value)
    forms = {repr(value), f"{value:g}"}
    for digits in (2, 3, 4):
        forms.add(f"{value:.{digits}f}")
        forms.add(f"{value:.{digits}g}")
    return sorted(forms)


@pytest.mark.parametrize("label", LABELS)
def test_a_wrong_answer_gets_a_hint_and_not_the_answer(label):
    exercise = answers.EXERCISES[label]
    for blank in exercise.blanks:
        given = dict(TEACHER[label])
        given[blank.name] = _wrong(label, blank.name, given[blank.name])
        verdict = answers.check(label, **given)
        assert not verdict.passed, f"{label}: {blank.name} = {given[blank.name]!r} passed"
        (result,) = [r for r in verdict.results if r[0] == blank.name]
        assert not result[1]
        mistake = blank.anticipated(given[blank.name])
        assert blank.hint in result[2] or (mistake and mistake.message == result[2]), result[2]
        others = [r for r in verdict.results if r[0] != blank.name]
        assert all(ok for _, ok, _ in others), str(verdict)
        if blank.expected is not None:
            _assert_not_shown(blank.expected(), result[2], label)


def _assert_not_shown(right: object, message: str, label: str) -> None:
    """The message shows none of the forms of the right value (a number standing alone)."""
    for form in _shown_forms(right):
        if isinstance(right, str):
            assert form.lower() not in message.lower(), f"{label}: the message shows {form!r}"
        else:
            shown = re.search(rf"(?<![\w.]){re.escape(form)}(?!\w)", message)
            assert not shown, f"{label}: the message shows the answer {form!r}: {message}"


MISTAKES = [
    (label, blank.name, index)
    for label in LABELS
    for blank in answers.EXERCISES[label].blanks
    for index in range(len(blank.mistakes))
]


def _blank(label: str, name: str) -> answers.Blank:
    (blank,) = [b for b in answers.EXERCISES[label].blanks if b.name == name]
    return blank


@pytest.mark.parametrize(("label", "name", "index"), MISTAKES)
def test_an_anticipated_mistake_gets_its_own_message_and_not_the_answer(label, name, index):
    """Entering the wrong value that a mistake's own function computes shows that mistake's
    message, not the general hint and not the answer; the right answer still passes."""
    blank = _blank(label, name)
    mistake = blank.mistakes[index]
    given = dict(TEACHER[label])
    given[name] = mistake.wrong()
    verdict = answers.check(label, **given)
    (result,) = [r for r in verdict.results if r[0] == name]
    assert not result[1], f"{label}.{name}: the mistake {mistake.message!r} passes"
    assert result[2] == mistake.message, f"{label}.{name}: {result[2]!r}"
    assert blank.hint not in result[2]
    if blank.expected is not None:
        _assert_not_shown(blank.expected(), mistake.message, label)
    assert all(ok for n, ok, _ in verdict.results if n != name), str(verdict)
    assert answers.check(label, **TEACHER[label]).passed


def test_every_mistake_message_is_a_sentence_that_shows_no_answer():
    for label in LABELS:
        for blank in answers.EXERCISES[label].blanks:
            for mistake in blank.mistakes:
                assert mistake.message.endswith((".", "?")), mistake.message
                if blank.expected is not None:
                    _assert_not_shown(blank.expected(), mistake.message, label)
            if blank.expected is not None:
                _assert_not_shown(blank.expected(), blank.hint, label)


# Blanks where no plausible wrong value exists (see the comment at each in answers.py).
NO_PLAUSIBLE_MISTAKE = {("ex-recipe-share", "mean_t")}


def test_every_exercise_anticipates_mistakes():
    for label in LABELS:
        blanks = answers.EXERCISES[label].blanks
        assert any(b.mistakes for b in blanks), f"{label} anticipates no mistake"
        for blank in blanks:
            assert blank.mistakes or (label, blank.name) in NO_PLAUSIBLE_MISTAKE, (
                f"{label}.{blank.name} anticipates no mistake"
            )


def test_no_question_can_be_answered_by_trying_every_option():
    """No blank is judged as True or False, one of the two parents, or a word among a few."""
    for label in LABELS:
        for blank in answers.EXERCISES[label].blanks:
            assert getattr(blank.judge, "options", None) is None, f"{label}.{blank.name}"
            if blank.expected is not None:
                right = blank.expected()
                assert not isinstance(right, bool | str), f"{label}.{blank.name}: {right!r}"


def test_a_closed_question_is_flagged():
    assert answers.truth(lambda: True).options == 2
    assert answers.same_words(lambda: "higher", options=3).options == 3


def test_an_anticipated_mistake_needs_a_judge_that_can_compare():
    with pytest.raises(TypeError, match="anticipated mistakes need a judge with matches"):
        answers.Blank(
            "x", "?", lambda given: (True, ""), "hint", None, (answers.Mistake(lambda: 1, "One."),)
        )


def test_a_mistake_is_matched_with_the_judges_tolerance():
    blank = _blank("ex-dare-expectation", "noise_over_entry")
    variance = blank.mistakes[0].wrong()
    assert blank.anticipated(variance * 1.01) is blank.mistakes[0]  # within rel_tol 0.02
    assert blank.anticipated(variance * 1.05) is None
    verdict = answers.check("ex-dare-expectation", noise_over_entry=variance * 1.05)
    assert blank.hint in verdict.results[0][2]


def test_the_student_values_of_chapters_07_and_08_come_from_their_models():
    expected = {
        (label, b.name): b.expected()
        for label in ("ex-mini-carry", "ex-mini-predict", "ex-lmc-chord")
        for b in answers.EXERCISES[label].blanks
    }
    assert expected["ex-mini-carry", "carrying_additions"] == 206
    assert math.isclose(expected["ex-mini-carry", "merge_gain_on_carries"], 100 * 40 / 206)
    assert 0.3 < expected["ex-mini-predict", "far_text_share_half"] < 0.4
    assert expected["ex-mini-predict", "sibling_text_share_half"] > 0.5
    assert 0.07 < expected["ex-lmc-chord", "merge_minus_generalist"] < 0.10
    assert expected["ex-lmc-chord", "merge_minus_chord"] < 0


def test_an_unanswered_blank_says_so():
    verdict = answers.check("ex-unequal", t_shortest=..., length_shortest=...)
    assert not verdict.passed
    assert all("not answered yet" in message for _, _, message in verdict.results)


def test_an_answer_of_the_wrong_kind_is_a_message_not_an_error():
    verdict = answers.check("ex-unequal", t_shortest="one tenth", length_shortest=[1, 2])
    assert not verdict.passed
    assert "expected a number, got str" in verdict.results[0][2]


def test_numbers_may_be_tensors_or_numpy():
    import numpy as np

    right = TEACHER["ex-unequal"]
    verdict = answers.check(
        "ex-unequal",
        t_shortest=torch.tensor(right["t_shortest"]),
        length_shortest=np.float32(right["length_shortest"]),
    )
    assert verdict.passed, str(verdict)


def test_unknown_exercise_or_blank_is_a_one_line_error():
    with pytest.raises(KeyError, match="no checked exercise 'ex-nothing'"):
        answers.check("ex-nothing")
    with pytest.raises(TypeError, match="ex-unequal takes the values t_shortest, length_shortest"):
        answers.check("ex-unequal", t=0.1)


def test_require_raises_with_the_verdict():
    with pytest.raises(AssertionError, match="ex-meet-dip: not yet"):
        answers.require("ex-meet-dip", midpoint_length=1.0)
    assert answers.require("ex-meet-dip", **TEACHER["ex-meet-dip"]).passed


def test_the_checks_work_the_answers_out_themselves():
    """The expected values come from pearl_edu, and agree with the chapters' mathematics."""
    expected = {
        (label, b.name): b.expected()
        for label, exercise in answers.EXERCISES.items()
        for b in exercise.blanks
        if b.expected is not None
    }
    assert math.isclose(expected["ex-unequal", "t_shortest"], 0.1, abs_tol=1e-4)
    assert math.isclose(expected["ex-unequal", "length_shortest"], math.sqrt(0.9), abs_tol=1e-4)
    assert math.isclose(
        expected["ex-meet-dip", "midpoint_length"], math.cos(math.pi / 4), abs_tol=1e-6
    )
    assert expected["ex-tensor-bf16", "unchanged_bfloat16"] == 2.0**-16
    assert expected["ex-recipe-layers", "anchor_layers_33"] == [0, 8, 16, 24, 32]
    assert expected["ex-full-verify", "differing_tensors"] == 2 + 1 + 2 * 32
