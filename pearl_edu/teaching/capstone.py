"""The capstone: with Pearl's own tools, a merge of mini-Pearl better than SLERP at t = 0.5.

Chapter 07's mini-Pearl has a base model and two parents fine-tuned from it, a generalist
(text) and a specialist (additions). Merging the parents with SLERP at one ``t = 0.5`` for
every tensor keeps part of each parent's gain. The capstone asks for a mergekit recipe that
uses only the two methods of the Pearl chapters, ``slerp`` and ``linear``, whose merge is
better than that baseline on **both** held-out skills, beyond the noise of the test items.

The search and the verdict use different items, as the book chooses and reports:

- `try_recipe` scores a recipe on the **validation** split, next to the baseline, with the
  paired intervals of `pearl_edu.teaching.evaluation`: search with it as often as you like;
- `evaluate` scores it on the **test** split, which the search never sees: the verdict.

A recipe names the models by folder, or by the words ``base``, ``generalist`` and ``math``,
which are replaced by mini-Pearl's folders (training seed 0, the sibling regime):

    models:
      - model: generalist
        parameters: {weight: 0.5}
      - model: math
        parameters: {weight: 0.5}
    merge_method: linear
    dtype: bfloat16

**The decision rule** (`decide`): a recipe beats the baseline when both paired differences
against it, recipe minus baseline on the same items, are above zero beyond the noise:

- text: the lower end of the paired-bootstrap 95% interval is above zero;
- additions: the exact McNemar test on the problems only one of the two solves gives
  p < 0.05, *and* the lower end of the 95% interval is above zero.

A difference of a few of 300 additions is not enough: chance alone gives that often.

The models come from chapter 07's cache (``~/.cache/pearl-edu``), or are trained the first
time (a few minutes on a laptop); after that a check takes seconds.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

MODEL_WORDS = ("base", "generalist", "math")
METHODS = ("slerp", "linear")  # the methods of the Pearl chapters, 04 to 08
BASELINE_T = 0.5
ALPHA = 0.05  # the McNemar test's level for the additions
SEED = 0  # mini-Pearl's training seed

WORKED_SOLUTION = """\
models:
  - model: generalist
    parameters: {weight: 0.7}
  - model: math
    parameters: {weight: 0.7}
  - model: base
    parameters: {weight: -0.4}
merge_method: linear
dtype: bfloat16
"""
"""The teacher's worked solution, chosen on the validation split: the capstone notebook's
solution (in the teacher's edition, which keeps the solution dropdowns) derives it."""


def passes(difference: evaluation.Difference) -> bool:
    """Whether one paired difference (recipe minus baseline) is above zero beyond the noise.

    Text: the 95% interval's lower end is above zero. Additions: the exact McNemar test is
    significant at `ALPHA` and the interval's lower end is above zero.
    """
    if difference.skill == "addition":
        return difference.p is not None and difference.p < ALPHA and difference.low > 0
    return difference.low > 0


def decide(text: evaluation.Difference, addition: evaluation.Difference) -> bool:
    """The verdict: both skills better than the baseline's beyond the noise (`passes`)."""
    return passes(text) and passes(addition)


@dataclass(frozen=True)
class Result:
    """A recipe's paired differences from the baseline on one split, or why it was not scored."""

    split: str
    baseline: evaluation.ItemScores
    scores: evaluation.ItemScores | None = None
    seconds: float = 0.0
    problem: str = ""

    @property
    def skills(self) -> minipearl.Skills | None:
        return None if self.scores is None else self.scores.skills()

    @property
    def baseline_skills(self) -> minipearl.Skills:
        return self.baseline.skills()

    @property
    def problems(self) -> int:
        """How many held-out additions the split has."""
        return len(self.baseline.addition_right)

    @functools.cached_property
    def text(self) -> evaluation.Difference | None:
        """Text, recipe minus baseline, with its paired 95% interval."""
        return (
            None if self.scores is None else evaluation.paired(self.scores, self.baseline, "text")
        )

    @functools.cached_property
    def addition(self) -> evaluation.Difference | None:
        """Additions, recipe minus baseline: interval, wins, losses and McNemar p."""
        if self.scores is None:
            return None
        return evaluation.paired(self.scores, self.baseline, "addition")

    @property
    def beats_baseline(self) -> bool:
        """Better than the baseline on both skills, beyond the noise (`decide`)."""
        return self.scores is not None and decide(self.text, self.addition)

    def summary(self) -> str:
        """Both skills of the recipe and the baseline, both differences with intervals, verdict.

        Differences are in points with two decimals, so that an interval's end near zero
        shows its sign (``-0.03``, not ``-0.0``).
        """
        if self.scores is None:
            return f"The recipe was not scored: {self.problem}"
        skills, baseline, text, addition = (
            self.skills,
            self.baseline_skills,
            self.text,
            self.addition,
        )
        extra = sum(self.scores.addition_right) - sum(self.baseline.addition_right)
        lines = [
            f"on the {self.split} split ({len(self.baseline.text_total)} sentences, "
            f"{self.problems} additions)",
            f"{'':24s} {'text':>7s} {'addition':>9s}",
            f"{'your recipe':24s} {skills.text:7.1%} {skills.addition:9.1%}",
            f"{'uniform t = 0.5 (SLERP)':24s} {baseline.text:7.1%} {baseline.addition:9.1%}",
            f"text:      {100 * text.estimate:+.2f} points, 95% interval "
            f"[{100 * text.low:+.2f}, {100 * text.high:+.2f}]",
            f"additions: {extra:+d} of {self.problems} ({100 * addition.estimate:+.2f} points), "
            f"95% interval [{100 * addition.low:+.2f}, {100 * addition.high:+.2f}]; "
            f"{addition.wins} won, {addition.losses} lost, McNemar p = {addition.p:.2g}",
        ]
        verdicts = {
            skill: "better" if passes(d) else "not better beyond the noise"
            for skill, d in (("text", text), ("additions", addition))
        }
        lines.append(f"text: {verdicts['text']}; additions: {verdicts['additions']}.")
        lines.append(
            "It beats the baseline on both skills."
            if self.beats_baseline
            else "It does not beat the baseline on both skills."
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    __repr__ = __str__


def models(seed: int = SEED) -> minipearl.MiniPearl:
    """Chapter 07's mini-Pearl (the sibling regime), read from the cache or trained once."""
    return evaluation.mini_pearl(seed)


def resolve(recipe: str | dict[str, Any], mini: minipearl.MiniPearl) -> str:
    """The recipe's YAML with ``base``, ``generalist`` and ``math`` replaced by folders.

    Raises `pearl_edu.ConfigError` if it names any other model, or a method other than
    `METHODS`.
    """
    if isinstance(recipe, str):
        try:
            loaded = yaml.safe_load(recipe)
        except yaml.YAMLError as error:
            raise pearl_edu.ConfigError(f"capstone recipe: not valid YAML ({error})") from None
    else:
        loaded = recipe
    if not isinstance(loaded, dict):
        raise pearl_edu.ConfigError("capstone recipe: expected a mapping (a mergekit recipe)")
    method = loaded.get("merge_method")
    if method not in METHODS:
        raise pearl_edu.ConfigError(
            f"capstone recipe: merge_method {method!r} is not allowed; the capstone asks for "
            f"one of {', '.join(METHODS)}"
        )
    folders = {"base": mini.base, "generalist": mini.generalist, "math": mini.math}
    allowed = {str(f) for f in folders.values()}

    def replace(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: (
                    _model_folder(value, folders, allowed)
                    if key in ("model", "base_model") and isinstance(value, str)
                    else replace(value)
                )
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [replace(item) for item in node]
        return node

    return yaml.safe_dump(replace(loaded), sort_keys=False)


def _model_folder(name: str, folders: dict[str, Path], allowed: set[str]) -> str:
    if name in folders:
        return str(folders[name])
    if name in allowed:
        return name
    raise pearl_edu.ConfigError(
        f"capstone recipe: model {name!r} is not one of mini-Pearl's: "
        f"{', '.join(MODEL_WORDS)} (or their folders)"
    )


def baseline_recipe(mini: minipearl.MiniPearl) -> str:
    """SLERP of the two parents with ``t = 0.5`` for every tensor: the score to beat."""
    return minipearl.uniform_recipe(mini.generalist, mini.math, num_layers(mini), BASELINE_T)


def num_layers(mini: minipearl.MiniPearl) -> int:
    """How many layers mini-Pearl's models have (for recipes with a ``layer_range``)."""
    return json.loads((mini.base / "config.json").read_text())["num_hidden_layers"]


def score(
    recipe_yaml: str, mini: minipearl.MiniPearl, split: str = "test"
) -> evaluation.ItemScores:
    """Merge a resolved recipe into a scratch folder and score every held-out item of ``split``."""
    scratch = Path(tempfile.mkdtemp(prefix="pearl-edu-capstone-"))
    try:
        pearl_edu.merge(pearl_edu.load_config(recipe_yaml), scratch / "merged", progress=False)
        return evaluation.score_folder(scratch / "merged", mini.settings.corpus(), split)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_BASELINES: dict[tuple[Path, str], evaluation.ItemScores] = {}


def baseline_scores(mini: minipearl.MiniPearl, split: str = "test") -> evaluation.ItemScores:
    """The baseline's item scores on ``split``, measured once per session for each models."""
    if (mini.base, split) not in _BASELINES:
        _BASELINES[mini.base, split] = score(baseline_recipe(mini), mini, split)
    return _BASELINES[mini.base, split]


def baseline_skills(mini: minipearl.MiniPearl, split: str = "test") -> minipearl.Skills:
    """The baseline's two skills on ``split``."""
    return baseline_scores(mini, split).skills()


def evaluate(
    recipe: str | dict[str, Any],
    mini: minipearl.MiniPearl | None = None,
    *,
    split: str = "test",
) -> Result:
    """Merge ``recipe`` with mini-Pearl's models, score it on ``split``, compare with the baseline.

    The verdict is on the test split; `try_recipe` is the same on the validation split, for
    the search. A recipe that does not load or merge, or uses a method other than
    `METHODS`, is not scored: the result says why (``result.problem``) instead of raising.
    """
    started = time.perf_counter()
    mini = mini or models()
    baseline = baseline_scores(mini, split)
    try:
        scores = score(resolve(recipe, mini), mini, split)
    except pearl_edu.PearlEduError as error:
        return Result(split, baseline, None, time.perf_counter() - started, str(error))
    return Result(split, baseline, scores, time.perf_counter() - started)


def try_recipe(recipe: str | dict[str, Any], mini: minipearl.MiniPearl | None = None) -> Result:
    """`evaluate` on the validation split: the scores to search with (the test split stays unseen)."""
    return evaluate(recipe, mini, split="validation")
