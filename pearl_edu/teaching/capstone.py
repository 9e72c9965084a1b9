"""The capstone: a merge recipe for mini-Pearl that beats a uniform t = 0.5 on both skills.

Chapter 07's mini-Pearl has a base model and two parents fine-tuned from it, a generalist
(text) and a specialist (additions). Merging the parents with SLERP at one ``t = 0.5`` for
every tensor keeps part of each parent's gain. The capstone asks for a mergekit recipe
whose merge scores higher than that baseline on **both** held-out skills at once.

`evaluate` is the automatic check: it merges the recipe with `pearl_edu.merge`, measures both
skills on the held-out data of chapter 07, and compares them with the baseline's, measured
the same way. A recipe names the models by folder, or by the words ``base``,
``generalist`` and ``math``, which `evaluate` replaces by mini-Pearl's folders:

    models:
      - model: generalist
        parameters: {weight: 1.0}
      - model: math
        parameters: {weight: 1.0}
    base_model: base
    merge_method: linear
    dtype: bfloat16

The models come from chapter 07's cache (``~/.cache/pearl-edu``), or are trained the first
time (a few minutes on a laptop); after that a check takes seconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import pearl_edu
from pearl_edu.teaching import minipearl

MODEL_WORDS = ("base", "generalist", "math")
BASELINE_T = 0.5


@dataclass(frozen=True)
class Result:
    """A recipe's scores next to the baseline's, or the reason it could not be scored."""

    skills: minipearl.Skills | None
    baseline: minipearl.Skills
    problems: int  # held-out additions, to say a difference in problems
    seconds: float
    problem: str = ""

    @property
    def beats_baseline(self) -> bool:
        """Higher than the baseline on both skills (strictly)."""
        return (
            self.skills is not None
            and self.skills.text > self.baseline.text
            and self.skills.addition > self.baseline.addition
        )

    def summary(self) -> str:
        """A few lines: both skills of the recipe and of the baseline, and the verdict."""
        if self.skills is None:
            return f"The recipe was not scored: {self.problem}"
        extra = round((self.skills.addition - self.baseline.addition) * self.problems)
        lines = [
            f"{'':24s} {'text':>7s} {'addition':>9s}",
            f"{'your recipe':24s} {self.skills.text:7.1%} {self.skills.addition:9.1%}",
            f"{'uniform t = 0.5 (SLERP)':24s} {self.baseline.text:7.1%} "
            f"{self.baseline.addition:9.1%}",
            f"difference: text {100 * (self.skills.text - self.baseline.text):+.1f} points, "
            f"additions {extra:+d} of {self.problems}; merged and scored in "
            f"{self.seconds:.1f} s.",
            "It beats the baseline on both skills."
            if self.beats_baseline
            else "It does not beat the baseline on both skills.",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    __repr__ = __str__


def models(folder: str | Path | None = None) -> minipearl.MiniPearl:
    """Chapter 07's mini-Pearl (the sibling regime), read from the cache or trained once."""
    return minipearl.load_or_build_mini_pearl(folder)


def resolve(recipe: str | dict[str, Any], mini: minipearl.MiniPearl) -> str:
    """The recipe's YAML with ``base``, ``generalist`` and ``math`` replaced by folders.

    Raises `pearl_edu.ConfigError` if it names any other model.
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


def score(recipe_yaml: str, mini: minipearl.MiniPearl) -> minipearl.Skills:
    """Merge a resolved recipe into a scratch folder and measure both held-out skills."""
    scratch = Path(tempfile.mkdtemp(prefix="pearl-edu-capstone-"))
    try:
        pearl_edu.merge(pearl_edu.load_config(recipe_yaml), scratch / "merged", progress=False)
        model = minipearl.load_model(scratch / "merged")
        tokenizer = minipearl.load_tokenizer(mini.base)
        return minipearl.measure_skills(model, tokenizer, mini.settings.corpus())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_BASELINES: dict[Path, minipearl.Skills] = {}


def baseline_skills(mini: minipearl.MiniPearl) -> minipearl.Skills:
    """The baseline's skills, measured once per session for each set of models."""
    if mini.base not in _BASELINES:
        _BASELINES[mini.base] = score(baseline_recipe(mini), mini)
    return _BASELINES[mini.base]


def evaluate(recipe: str | dict[str, Any], mini: minipearl.MiniPearl | None = None) -> Result:
    """Merge ``recipe`` with mini-Pearl's models, score it, and compare with the baseline.

    A recipe that does not load or merge is not scored: the result says why
    (``result.problem``) instead of raising.
    """
    started = time.perf_counter()
    mini = mini or models()
    baseline = baseline_skills(mini)
    problems = len(mini.settings.corpus().test_problems)
    try:
        skills = score(resolve(recipe, mini), mini)
    except pearl_edu.PearlEduError as error:
        return Result(None, baseline, problems, time.perf_counter() - started, str(error))
    return Result(skills, baseline, problems, time.perf_counter() - started)
