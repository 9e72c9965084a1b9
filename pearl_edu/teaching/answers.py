"""Checks of the exercises' answers, for the student edition of the book.

In the student edition (``python -m pearl_edu.teaching.student``), each exercise with an
answer that can be computed is followed by a cell to fill in and a cell that checks it:

    t_shortest = ...  # the t at which the straight path is shortest
    length_shortest = ...  # its length there

    answers.check("ex-unequal", t_shortest=t_shortest, length_shortest=length_shortest)

`check` works the right answer out itself, with `pearl_edu`, and says which values are
right. For a wrong one it gives a hint towards the idea, never the answer: what it prints
depends only on which values are right, not on what the right values are. Each blank
also anticipates common mistakes (`Mistake`): the wrong value that a misconception gives,
computed from the exercise's own inputs (a variance where a standard deviation is asked,
radians for degrees, a fraction for a percentage, the neighbouring layer, ...). A value
that matches one, by the same tolerance as the right answer, gets the message that names
the misconception instead of the general hint.

Every answer is a number, a list of numbers or a text to build (a recipe): no answer is
one of a few options that could be found by trying each.

`EXERCISES` lists every checked exercise by its label in the book (``ex-unequal`` is
chapter 02's). The teacher's edition keeps the worked answers in the metadata of the
exercise's cell (``answers``), which the tests run through these same checks.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# A judgement: whether the value is right, and a note for the student (on a wrong value, what
# is wrong, never what would be right; the blank's hint follows it).
Judge = Callable[[Any], tuple[bool, str]]


@dataclass(frozen=True)
class Mistake:
    """An anticipated wrong answer to a blank.

    ``wrong()`` computes the wrong value that the misconception gives, from the same inputs
    as the right answer; ``message`` names the misconception, without the right answer and
    without dictating the method.
    """

    wrong: Callable[[], Any]
    message: str


@dataclass(frozen=True)
class Blank:
    """One value a student fills in: its variable name, the question, and how it is judged.

    ``expected`` (when the answer is one value) computes the right answer: the checks use
    it, and the tests use it to make sure no message ever shows it. ``mistakes`` are the
    anticipated wrong answers; they need a judge that can compare a value with another
    one by its own tolerance (a `Compare`).
    """

    name: str
    question: str
    judge: Judge
    hint: str
    expected: Callable[[], Any] | None = None
    mistakes: tuple[Mistake, ...] = ()

    def __post_init__(self) -> None:
        if self.mistakes and not hasattr(self.judge, "matches"):
            raise TypeError(f"{self.name}: anticipated mistakes need a judge with matches()")

    def anticipated(self, given: Any) -> Mistake | None:
        """The first anticipated mistake that ``given`` matches, by the judge's tolerance."""
        for mistake in self.mistakes:
            try:
                if self.judge.matches(given, mistake.wrong()):  # type: ignore[attr-defined]
                    return mistake
            except Exception:  # a value of another kind is not this mistake
                continue
        return None


@dataclass(frozen=True)
class Exercise:
    """A checked exercise: its label in the book and the blanks its answer fills."""

    label: str
    blanks: tuple[Blank, ...]

    def fill_in_cell(self) -> str:
        """The code of the cell a student fills in: one ``name = ...`` line per blank."""
        lines = [f"# Your answer to {self.label}: replace each ... with a value or code."]
        for blank in self.blanks:
            lines += [f"# {blank.question}", f"{blank.name} = ..."]
        return "\n".join(lines)

    def check_cell(self) -> str:
        """The code of the cell that checks the answer."""
        arguments = ", ".join(f"{b.name}={b.name}" for b in self.blanks)
        return (
            f'from pearl_edu.teaching import answers\n\nanswers.check("{self.label}", {arguments})'
        )


@dataclass(frozen=True)
class Verdict:
    """The result of a check: for each blank, whether it is right, and a message."""

    label: str
    results: tuple[tuple[str, bool, str], ...]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.results)

    def __str__(self) -> str:
        head = (
            f"{self.label}: all right."
            if self.passed
            else f"{self.label}: not yet ({sum(ok for _, ok, _ in self.results)} of "
            f"{len(self.results)} right)."
        )
        lines = [head]
        for name, ok, message in self.results:
            mark = "✓" if ok else "✗"
            if "\n" in message:  # a table, such as the capstone's: on lines of its own
                lines.append(f"  {mark} {name}:")
                lines += [f"      {line}" for line in message.split("\n")]
            else:
                lines.append(f"  {mark} {name}" + (f": {message}" if message else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def check(label: str, **given: Any) -> Verdict:
    """Check a student's answer to exercise ``label``; the result prints what is right.

    Each keyword is one blank of the exercise. A blank still ``...`` is "not answered yet";
    a wrong value that matches an anticipated mistake gets that mistake's message, any
    other wrong value the blank's hint. The right answer is never shown.
    """
    exercise = EXERCISES.get(label)
    if exercise is None:
        raise KeyError(f"no checked exercise {label!r}; the checked ones are {sorted(EXERCISES)}")
    names = [b.name for b in exercise.blanks]
    unknown = sorted(set(given) - set(names))
    missing = [n for n in names if n not in given]
    if unknown or missing:
        raise TypeError(
            f"{label} takes the values {', '.join(names)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    results = []
    for blank in exercise.blanks:
        value = given[blank.name]
        if value is ...:
            results.append((blank.name, False, "not answered yet: replace the ... with a value"))
            continue
        try:
            ok, note = blank.judge(value)
        except Exception as error:  # an answer that cannot even be compared: say why
            ok, note = False, f"Could not be checked ({type(error).__name__}: {error})."
        if ok:
            message = note
        elif (mistake := blank.anticipated(value)) is not None:
            message = mistake.message
        else:
            message = f"{note} Hint: {blank.hint}"
        results.append((blank.name, ok, message.strip()))
    return Verdict(label, tuple(results))


def require(label: str, **given: Any) -> Verdict:
    """`check`, raising ``AssertionError`` with the verdict unless every value is right."""
    verdict = check(label, **given)
    if not verdict.passed:
        raise AssertionError(str(verdict))
    return verdict


# ---------------------------------------------------------------------------------------
# Judges: how a value is compared with the right one, with a message that never shows it


def _number(given: Any) -> float:
    """``given`` as a float: a Python or NumPy number, or a tensor with one element."""
    if isinstance(given, bool | str):
        raise TypeError(f"expected a number, got {type(given).__name__}")
    if hasattr(given, "item"):  # a NumPy number, or a tensor or array of one element
        given = given.item()
    if not isinstance(given, numbers.Real):
        raise TypeError(f"expected a number, got {type(given).__name__}")
    return float(given)


def _require_type(given: Any, kind: type, what: str) -> None:
    """Raise ``TypeError`` unless ``given`` is a ``kind``; ``what`` names it in the message."""
    if not isinstance(given, kind):
        raise TypeError(f"expected {what}, got {type(given).__name__}")


@dataclass(frozen=True)
class Compare:
    """A judge: ``same(given, expected())``, with ``note`` on a wrong value.

    ``matches(given, value)`` applies the same comparison, tolerance included, to any
    other value: the anticipated mistakes use it. ``shape(given, wanted)``, if given,
    returns a note on a value of the wrong shape (a list of another length), or ``""``.
    ``options`` counts the possible answers when they are few (True or False, the two
    parents): such a question can be answered by trying each, and the book has none.
    """

    expected: Callable[[], Any]
    same: Callable[[Any, Any], bool]
    note: str
    shape: Callable[[Any, Any], str] | None = None
    options: int | None = None

    def matches(self, given: Any, value: Any) -> bool:
        if self.shape is not None and self.shape(given, value):
            return False
        return self.same(given, value)

    def __call__(self, given: Any) -> tuple[bool, str]:
        wanted = self.expected()
        if self.shape is not None and (problem := self.shape(given, wanted)):
            return False, problem
        ok = self.same(given, wanted)
        return ok, "" if ok else self.note


def close_to(expected: Callable[[], float], *, abs_tol: float = 0.0, rel_tol: float = 0.0):
    """A judge: a number within ``abs_tol`` or ``rel_tol`` of ``expected()``."""

    def same(given: Any, wanted: float) -> bool:
        return math.isclose(_number(given), wanted, abs_tol=abs_tol, rel_tol=rel_tol)

    return Compare(expected, same, "Not this value.")


def within_factor(expected: Callable[[], float], factor: float):
    """A judge: a positive number within a factor ``factor`` of ``expected()``.

    For an order of magnitude, where a measurement and the prediction are both right.
    """

    def same(given: Any, wanted: float) -> bool:
        value = _number(given)
        return value > 0 and wanted / factor <= value <= wanted * factor

    return Compare(expected, same, "Not of the right size.")


def _as_list(given: Any) -> list:
    return given.tolist() if hasattr(given, "tolist") else list(given)


def numbers_close(expected: Callable[[], Sequence[float]], *, abs_tol: float):
    """A judge: a sequence of numbers, each within ``abs_tol`` of ``expected()``'s."""

    def shape(given: Any, wanted: Sequence[float]) -> str:
        count = len(_as_list(given))
        return "" if count == len(wanted) else f"Expected {len(wanted)} numbers, got {count}."

    def same(given: Any, wanted: Sequence[float]) -> bool:
        values = [_number(v) for v in _as_list(given)]
        return all(math.isclose(v, w, abs_tol=abs_tol) for v, w in zip(values, wanted, strict=True))

    return Compare(expected, same, "Not these values.", shape)


def same_items(expected: Callable[[], Sequence[int]]):
    """A judge: the same whole numbers as ``expected()``, in increasing order."""

    def same(given: Any, wanted: Sequence[int]) -> bool:
        if isinstance(given, str) or not isinstance(given, Sequence | set | frozenset):
            if not hasattr(given, "tolist"):
                raise TypeError(f"expected a list of numbers, got {type(given).__name__}")
            given = given.tolist()
        return sorted(int(_number(v)) for v in given) == sorted(wanted)

    return Compare(expected, same, "Not this list.")


def same_yaml(expected: Callable[[], str]):
    """A comparison of two YAML texts by what they load to, for matching a recipe mistake."""
    import yaml

    def same(given: Any, wanted: str) -> bool:
        _require_type(given, str, "a YAML text")
        return yaml.safe_load(given) == yaml.safe_load(wanted)

    return Compare(expected, same, "Not this text.")


@dataclass(frozen=True)
class Built:
    """A judge of a text the student builds (a recipe): ``judge`` says whether it does what
    the exercise asks; ``like`` compares it with an anticipated mistake's text."""

    judge: Judge
    like: Callable[[Any, Any], bool]

    def matches(self, given: Any, value: Any) -> bool:
        return self.like(given, value)

    def __call__(self, given: Any) -> tuple[bool, str]:
        return self.judge(given)


def truth(expected: Callable[[], bool]):
    """A judge: ``True`` or ``False``, as ``expected()``. Two options: no exercise uses it."""

    def same(given: Any, wanted: bool) -> bool:
        _require_type(given, bool, "True or False")
        return given == wanted

    return Compare(expected, same, "Not so.", options=2)


def _words(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def same_words(expected: Callable[[], str], options: int | None = None):
    """A judge: a text equal to ``expected()``, ignoring case, spaces and punctuation.

    ``options`` counts the possible texts when they are few (a verdict word).
    """

    def same(given: Any, wanted: str) -> bool:
        _require_type(given, str, "a text")
        return _words(given) == _words(wanted)

    return Compare(expected, same, "Not this one.", options=options)


def one_of_the_parents(expected: Callable[[], str]):
    """A judge: the name of one of Pearl's parents (``OmniBeagle`` or ``WizardMath``).

    Any spelling that names the expected parent and not the other one is right. Two
    options: no exercise uses it.
    """

    def same(given: Any, wanted: str) -> bool:
        _require_type(given, str, "a model's name")
        named = [p for p in _pearl_parents() if _words(p) in _words(given)]
        return len(named) == 1 and named[0] == wanted

    return Compare(expected, same, "Not this parent.", options=2)


# ---------------------------------------------------------------------------------------
# The right answers, and the anticipated wrong ones, computed with pearl_edu (each once
# per session)


@functools.cache
def _pearl_config():
    import pearl_edu

    return pearl_edu.load_config("pearl-7b-slerp")


@functools.cache
def _pearl_schedule():
    import pearl_edu

    return pearl_edu.schedule(_pearl_config())


def _pearl_parents() -> tuple[str, ...]:
    """The short names of Pearl's parents, base model first: OmniBeagle, WizardMath."""
    config = _pearl_config()
    ordered = [config.base_model] + [m for m in config.models() if m != config.base_model]
    return tuple(m.split("/")[-1].split("-")[0] for m in ordered)


def _midpoint_length_90() -> float:
    import torch

    import pearl_edu

    midpoint = pearl_edu.lerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    return midpoint.norm().item()


def _flat_recipe(given: Any) -> tuple[bool, str]:
    """ex-meet-recipe: a recipe of Pearl's two models with t = 0.3 for every tensor."""
    import pearl_edu

    _require_type(given, str, "the recipe's YAML text")
    try:
        config = pearl_edu.load_config(given)
    except pearl_edu.PearlEduError as error:
        return False, f"The recipe does not load: {error}."
    if sorted(config.models()) != sorted(_pearl_config().models()):
        return False, "The recipe should merge Pearl's own two parents."
    schedule = pearl_edu.schedule(config)
    labels = schedule.columns.get("t", ())
    values = [t for label in labels for t in schedule.column("t", label)]
    values += [by_parameter.get("t") for by_parameter in schedule.outside_layers.values()]
    ok = bool(labels) and all(t == 0.3 for t in values)
    return ok, "" if ok else "Some tensors do not get t = 0.3."


def _angle_of_negated() -> float:
    import torch

    p0, p1 = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0])
    cosine = torch.nn.functional.cosine_similarity(-2 * p0, p1, dim=0)
    return math.degrees(math.acos(cosine.item()))


@functools.cache
def _shortest_straight_path() -> tuple[float, float]:
    """ex-unequal, by a search over t with pearl_edu.lerp: where and how short."""
    import torch

    import pearl_edu

    short, long_ = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    grid = [i / 10000 for i in range(10001)]
    lengths = [pearl_edu.lerp(short, long_, t).norm().item() for t in grid]
    best = min(range(len(grid)), key=lengths.__getitem__)
    return grid[best], lengths[best]


def _three_unrelated() -> float:
    import torch

    x, y, z = torch.randn(3, 4096, generator=torch.Generator().manual_seed(0))
    return (((x + y + z) / 3).norm() / x.norm()).item()


def _cosine_losing_5_percent() -> float:
    return math.cos(2 * math.acos(0.95))


def _fallback_jump() -> float:
    """ex-slerp-threshold: slerp - lerp at t = 0.5, just outside the fallback region."""
    import torch

    import pearl_edu
    from pearl_edu.core.interpolation import DOT_THRESHOLD

    omega = math.acos(DOT_THRESHOLD) * 1.005  # a hair outside: |cos| just below 0.9995
    p0 = torch.tensor([1.0, 0.0])
    p1 = torch.tensor([math.cos(omega), math.sin(omega)])
    return (pearl_edu.slerp(p0, p1, 0.5) - pearl_edu.lerp(p0, p1, 0.5)).norm().item()


def _equal_norm_ratio() -> float:
    import torch

    import pearl_edu

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, 64, generator=generator)
    b = b * (a.norm() / b.norm())
    return (pearl_edu.slerp(a, b, 0.3).norm() / a.norm()).item()


def _survivors(dtype_name: str) -> float:
    """The fraction of random float32 values a cast keeps exactly: 2**-(bits dropped)."""
    import torch

    dtype = getattr(torch, dtype_name)
    return torch.finfo(torch.float32).eps / torch.finfo(dtype).eps


def _layer5(label: str) -> float:
    return _pearl_schedule().column("t", label)[5]


def _layers_on_anchors(num_layers: int) -> list[int]:
    from pearl_edu.layer_schedule import layer_position

    anchors = 5
    return [
        i
        for i in range(num_layers)
        if math.isclose(
            layer_position(i, num_layers) * (anchors - 1),
            round(layer_position(i, num_layers) * (anchors - 1)),
            abs_tol=1e-9,
        )
    ]


MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_hidden_layers": 32,
}


@functools.cache
def _shared_list_schedule():
    """ex-recipe-share: Pearl's recipe with the MLP following the attention's list."""
    import yaml

    import pearl_edu

    recipe = yaml.safe_load(pearl_edu.recipe_text())
    rules = recipe["parameters"]["t"]
    attention = next(r["value"] for r in rules if r.get("filter") == "self_attn")
    for rule in rules:
        if rule.get("filter") == "mlp":
            rule["value"] = list(attention)
    return pearl_edu.schedule(pearl_edu.load_config(yaml.safe_dump(recipe)))


def _shared_list_mean_t() -> float:
    """The parameter-weighted mean t of the shared-list recipe, in Mistral-7B's shapes."""
    from pearl_edu.teaching.toy import tensor_shapes

    schedule = _shared_list_schedule()
    weighted = total = 0.0
    for name, shape in tensor_shapes(MISTRAL_7B).items():
        size = math.prod(shape)
        layer = re.search(r"\.layers\.(\d+)\.", name)
        label = next((w for w in ("self_attn", "mlp") if w in name), "other")
        t = schedule.column("t", label)[int(layer.group(1))] if layer else 0.5
        weighted, total = weighted + size * t, total + size
    return weighted / total


@functools.cache
def _catch_all_tensors() -> int:
    """ex-full-verify: how many tensors of a 32-layer Mistral take Pearl's catch-all t."""
    import shutil
    import tempfile
    from pathlib import Path

    import pearl_edu

    folder = Path(tempfile.mkdtemp(prefix="pearl-edu-answers-"))
    try:
        model = pearl_edu.make_tiny_model(
            folder / "mistral", num_layers=32, hidden_size=16, intermediate_size=32
        )
        header = pearl_edu.read_header(model)
        config = _pearl_config()
        merge_plan = pearl_edu.plan(config, {m: header for m in config.models()})
        return sum(1 for t in merge_plan.tensors if t.matched_filter["t"] is None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ties(second: tuple[float, float]) -> list[float]:
    import torch

    import pearl_edu

    vectors = [torch.tensor([0.5, -0.2]), torch.tensor(second)]
    return pearl_edu.ties(torch.zeros(2), vectors, [1.0, 1.0], [1.0, 1.0]).tolist()


def _dare_noise_ratio(kept: float = 0.1) -> float:
    """The standard deviation DARE adds to an entry, over the entry: sqrt((1 - p) / p)."""
    return math.sqrt((1 - kept) / kept)


def _linear_layer_sides() -> list[tuple[int, int]]:
    """(out, in) of the seven linear layers of one block of mini-Pearl."""
    from pearl_edu.teaching import minipearl

    shape = minipearl.ModelShape()
    h, m = shape.hidden_size, shape.intermediate_size
    kv = h // shape.num_heads * shape.num_kv_heads
    return [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]


def _lora_parameters(rank: int) -> int:
    """The numbers a rank-``rank`` LoRA of every linear layer of mini-Pearl trains: r (d + k)
    per layer."""
    from pearl_edu.teaching import minipearl

    layers = minipearl.ModelShape().num_layers
    return layers * sum(rank * (d + k) for d, k in _linear_layer_sides())


def _lora_break_even_rank() -> int:
    """The smallest rank at which the adapter trains as many numbers as the layers it adapts."""
    from pearl_edu.teaching import minipearl

    full = minipearl.ModelShape().num_layers * sum(d * k for d, k in _linear_layer_sides())
    return next(r for r in range(1, 10_000) if _lora_parameters(r) >= full)


@functools.cache
def _math_down_proj_spectrum() -> tuple[float, ...]:
    """Singular values of the specialist's task vector of layer 1's down_proj (seed 0)."""
    import torch

    from pearl_edu.teaching import evaluation, minipearl

    mini = evaluation.mini_pearl(0)
    name = "model.layers.1.mlp.down_proj.weight"
    base, math_w = minipearl.load_weights(mini.base), minipearl.load_weights(mini.math)
    return tuple(torch.linalg.svdvals(math_w[name].float() - base[name].float()).tolist())


def _truncation_error(rank: int) -> float:
    """The relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young)."""
    values = _math_down_proj_spectrum()
    return math.sqrt(sum(v * v for v in values[rank:]) / sum(v * v for v in values))


def _rank_for_error(limit: float) -> int:
    """The smallest rank whose best approximation is off by less than ``limit``."""
    return next(
        r for r in range(1, len(_math_down_proj_spectrum()) + 1) if _truncation_error(r) < limit
    )


def _cat_rank() -> int:
    """The rank of PEFT's ``cat`` combination of the chapter's two adapters: the sum of theirs."""
    from pearl_edu.teaching import lora

    return 2 * lora.LoraSettings().rank


def _capstone(given: Any) -> tuple[bool, str]:
    from pearl_edu.teaching import capstone

    # The student's check scores on validation, like the search: the test split, on which
    # the recipe is judged, stays unseen until the teacher runs `capstone.evaluate`.
    result = capstone.try_recipe(given)
    note = "Your teacher judges the recipe on the test split, which this check never uses."
    return result.beats_baseline, f"{result.summary()}\n{note}"


def _items_for_one_point(p: float = 0.72, gap: float = 0.01) -> int:
    """ex-eval-items: the fewest items for which an unpaired gap lies outside the 95% bound,
    1.96 * sqrt(2) * SE(p, n) < gap, with SE from `evaluation.share_standard_error`."""
    from pearl_edu.teaching import evaluation

    n = math.ceil(1 + 2 * p * (1 - p) * (1.96 / gap) ** 2)  # eq:standard-error, solved for n
    while 1.96 * math.sqrt(2) * evaluation.share_standard_error(p, n) >= gap:
        n += 1
    return n


@functools.cache
def _seed_comparison():
    """ex-eval-seeds: uniform t = 0.6 against t = 0.5 on additions, over the recorded seeds."""
    from pearl_edu.teaching import evaluation

    record = evaluation.Record.load("evaluation")
    return record.compare("slerp t=0.6", "slerp t=0.5", "addition")


def _seeds_excluding_zero() -> int:
    return sum(d.excludes_zero for d in _seed_comparison().by_seed.values())


def _paired_gsm8k_p(pearl: int = 971, omnibeagle: int = 924, disagree: int = 151) -> float:
    """ex-eval-paired: McNemar's p when the two disagree on ``disagree`` problems."""
    from pearl_edu.teaching import evaluation

    wins = (disagree + pearl - omnibeagle) // 2
    return evaluation.mcnemar(wins, disagree - wins)


@functools.cache
def _search_record():
    """The record of chapter 17's search (bench/seeds_search.py)."""
    from pearl_edu.teaching import evaluation

    return evaluation.Record.load("search")


def _search_trials() -> list[str]:
    return [name for name in _search_record().names if name.startswith("trial ")]


def _search_objective(seed: int, name: str, split: str) -> float:
    """The mean share of the two parents' gains that a recorded merge keeps on ``split``."""
    record = _search_record()
    base, generalist, specialist = (
        record.get(seed, m, split) for m in ("base", "generalist", "math")
    )
    merged = record.get(seed, name, split)
    text = (merged.text - base.text) / (generalist.text - base.text)
    addition = (merged.addition - base.addition) / (specialist.addition - base.addition)
    return (text + addition) / 2


def _search_winner(seed: int) -> str:
    return max(_search_trials(), key=lambda n: _search_objective(seed, n, "validation"))


def _search_drop(seed: int, name: str) -> float:
    return _search_objective(seed, name, "validation") - _search_objective(seed, name, "test")


def _winner_drop(seed: int = 1) -> float:
    """ex-search-optimism: how far the validation winner's objective falls on test."""
    return _search_drop(seed, _search_winner(seed))


def _excess_drop(seed: int = 1) -> float:
    """ex-search-optimism: the winner's fall less the average trial's."""
    trials = _search_trials()
    return _winner_drop(seed) - sum(_search_drop(seed, n) for n in trials) / len(trials)


def _beaten_on_test(seed: int = 2) -> int:
    """ex-search-rank: trials with a higher test objective than the validation winner."""
    best = _search_objective(seed, _search_winner(seed), "test")
    return sum(_search_objective(seed, n, "test") > best for n in _search_trials())


def _search_dimensions(layers: int = 32) -> int:
    """ex-search-population: a t per attention and per MLP of each layer, one for the rest."""
    return 2 * layers + 1


def _cma_population(dimensions: int | None = None) -> int:
    """ex-search-population: the cma package's default population, 4 + 3 ln N rounded down."""
    return math.floor(4 + 3 * math.log(dimensions or _search_dimensions()))


def _union_rows() -> tuple[int, int]:
    """ex-tok-rows: the union's rows, and the generalist's rows filled from the specialist."""
    from pearl_edu.teaching import minipearl, numbertokens

    characters = set(minipearl.build_tokenizer().get_vocab())
    numbers = set(numbertokens.build_number_tokenizer().get_vocab())
    return len(characters | numbers), len(numbers - characters)


def _fallback_row() -> list[float]:
    """ex-tok-average: the base's row of a token two other models have, with pearl_edu."""
    import torch

    import pearl_edu
    from pearl_edu.tokenizer_build import OutputVocabulary
    from pearl_edu.vocabulary_rows import align_rows

    vocabulary = OutputVocabulary(
        None, {"a": 0, "X": 1}, {"b": [0, -1], "m1": [0, 1], "m2": [0, 1]}, {}, rows=2
    )
    rows = {
        "b": torch.tensor([[0.5, 0.5]]),
        "m1": torch.tensor([[0.0, 0.0], [1.0, 2.0]]),
        "m2": torch.tensor([[0.0, 0.0], [3.0, -2.0]]),
    }
    config = pearl_edu.load_config(
        "merge_method: linear\nmodels:\n  - model: b\n  - model: m1\n  - model: m2\n"
        "parameters: {weight: 1.0}\ntokenizer_source: union\n"
    )
    aligned = align_rows(rows, "model.embed_tokens.weight", vocabulary, config, "b")
    return aligned["b"][1].tolist()


def _moe_top2_weight(generalist: float = 0.3, math_score: float = 1.1) -> float:
    """ex-moe-top2: the maths expert's weight when both experts run (top-2 of two)."""
    import torch

    return torch.softmax(torch.tensor([generalist, math_score], dtype=torch.float64), 0)[1].item()


def _moe_extra_parameters() -> int:
    """ex-moe-params: one more MLP and a two-row router per layer of mini-Pearl's shape."""
    from pearl_edu.teaching import minipearl

    shape = minipearl.ModelShape()
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    return shape.num_layers * (mlp + 2 * shape.hidden_size)


# ---------------------------------------------------------------------------------------
# Right answers of the questions that replace a choice among few options, of chapters 07
# and 08, and the anticipated mistakes' wrong values


def _recipe_mistake_yaml() -> str:
    """ex-meet-recipe's anticipated mistake: Pearl's published recipe left as it is."""
    import pearl_edu

    return pearl_edu.recipe_text()


def _same_recipe(given: Any, wanted: str) -> bool:
    import yaml

    _require_type(given, str, "a YAML text")
    return yaml.safe_load(given) == yaml.safe_load(wanted)


def _attention_t(layer: int) -> float:
    return _pearl_schedule().column("t", "self_attn")[layer]


def _mlp_t(layer: int) -> float:
    return _pearl_schedule().column("t", "mlp")[layer]


def _attention_nearer_second(side: int = 1) -> int:
    """ex-meet-parent: how many layers' attention lies nearer WizardMath (t > 1/2), or with
    ``side`` 0 nearer OmniBeagle (t < 1/2)."""
    column = _pearl_schedule().column("t", "self_attn")
    return sum((t > 0.5) if side else (t < 0.5) for t in column)


def _distance_ratio(t: float = 0.3) -> float:
    """ex-meet-recipe: on the straight path at ``t``, the distance to the model at t = 1 over
    the distance to the base at t = 0, with pearl_edu.lerp on two points."""
    import torch

    import pearl_edu

    p0, p1 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])
    merged = pearl_edu.lerp(p0, p1, t)
    return ((merged - p1).norm() / (merged - p0).norm()).item()


def _midpoint_length_radians_mistake() -> float:
    """cos(theta / 2) with theta = 90 taken as radians."""
    return math.cos(90 / 2)


def _angle_of_negated_in(unit: str) -> float:
    return math.radians(_angle_of_negated()) if unit == "radians" else _angle_of_negated()


def _straight_length(t: float, short: float = 1.0, long_: float = 3.0) -> float:
    """ex-unequal's path length at ``t``, for perpendicular vectors of lengths 1 and 3."""
    return math.sqrt(((1 - t) * short) ** 2 + (t * long_) ** 2)


def _half_angle_for_5_percent() -> float:
    """ex-hd-finetune: the angle (radians) between siblings whose midpoint keeps 95%."""
    return 2 * math.acos(0.95)


def _fallback_omega() -> float:
    from pearl_edu.core.interpolation import DOT_THRESHOLD

    return math.acos(DOT_THRESHOLD) * 1.005


def _jump_over_spacing(dtype_name: str = "bfloat16", factor: float = 1.0) -> float:
    """ex-slerp-threshold: the jump over the spacing of ``dtype``'s numbers near 1."""
    import torch

    return _fallback_jump() / (factor * torch.finfo(getattr(torch, dtype_name)).eps)


def _equal_norm_ratio_of(method: str, rescale: bool) -> float:
    """ex-tensor-equal-norms' ratio, with lerp for slerp or without b rescaled (mistakes)."""
    import torch

    import pearl_edu

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, 64, generator=generator)
    if rescale:
        b = b * (a.norm() / b.norm())
    merge = pearl_edu.slerp if method == "slerp" else pearl_edu.lerp
    return (merge(a, b, 0.3).norm() / a.norm()).item()


def _kept_bits_share(dtype_name: str) -> float:
    """The mistake of counting the mantissa bits a format keeps instead of those it drops."""
    import torch

    return torch.finfo(getattr(torch, dtype_name)).eps


def _layer5_at(label: str, position: float) -> float:
    """The t of layer 5's ``label`` tensor read at relative depth ``position``."""
    from pearl_edu.layer_schedule import gradient_value

    rules = {"mlp": [1, 0.5, 0.7, 0.3, 0], "self_attn": [0, 0.5, 0.3, 0.7, 1]}
    return gradient_value(rules[label], position)


def _layers_on_anchors_placed_at_n(num_layers: int) -> list[int]:
    """The mistake of placing layer i at i / n instead of i / (n - 1)."""
    return [
        i for i in range(num_layers) if math.isclose(4 * i / num_layers, round(4 * i / num_layers))
    ]


def _shared_list_t(layer: int) -> float:
    return _shared_list_schedule().column("t", "mlp")[layer]


def _memory_to_use_gb(unit: float = 1e9, factor: bool = True) -> float:
    """ex-full-colab: the memory that preflight asks to use the merged model, in GB."""
    import tempfile

    from pearl_edu.teaching import fullrun, preflight

    needs = preflight.requirements(
        [fullrun.OMNIBEAGLE, fullrun.WIZARDMATH],
        tempfile.gettempdir(),
        published=fullrun.PUBLISHED,
        online=False,
    )
    needed = needs.model_bytes * (preflight.USE_MEMORY_FACTOR if factor else 1)
    return needed / unit


def _layer_tensors(per_layer_only: bool) -> int:
    """ex-full-verify mistakes: the layers' catch-all tensors alone (2 per layer), or every
    tensor that keeps its t."""
    layers = 32
    return 2 * layers if per_layer_only else 3 + 9 * layers + 2 * layers - _catch_all_tensors()


def _ties_mistake(second: tuple[float, float], how: str) -> list[float]:
    """The plain sum or mean of the two task vectors, where TIES was asked."""
    first = (0.5, -0.2)
    scale = 1.0 if how == "sum" else 0.5
    return [scale * (a + b) for a, b in zip(first, second, strict=True)]


def _items_mistake(sides: int = 2, z: float = 1.96, gap: float = 0.01, p: float = 0.72) -> int:
    """ex-eval-items' n with one standard error instead of two, or z = 1."""
    return math.ceil(1 + sides * p * (1 - p) * (z / gap) ** 2)


def _lowest_low_points(which: str = "low") -> float:
    """ex-eval-seeds: the lowest lower end of the seeds' intervals, in points (or mistakes)."""
    differences = _seed_comparison().by_seed.values()
    if which == "highest low":
        return 100 * max(d.low for d in differences)
    if which == "estimate":
        return 100 * min(d.estimate for d in differences)
    return 100 * min(d.low for d in differences)


def _seeds_with_positive_estimate() -> int:
    return sum(d.estimate > 0 for d in _seed_comparison().by_seed.values())


def _paired_mistake(kind: str) -> float:
    from pearl_edu.teaching import evaluation

    if kind == "one-sided":
        return _paired_gsm8k_p() / 2
    difference = 971 - 924  # the difference taken as the problems won
    return evaluation.mcnemar(difference, 151 - difference)


def _lora_parameters_square_kv(rank: int = 4) -> int:
    """The mistake of taking k_proj and v_proj as square as q_proj."""
    from pearl_edu.teaching import minipearl

    shape = minipearl.ModelShape()
    h, m = shape.hidden_size, shape.intermediate_size
    sides = [(h, h)] * 4 + [(m, h), (m, h), (h, m)]
    return shape.num_layers * sum(rank * (d + k) for d, k in sides)


def _squared_truncation_error(rank: int) -> float:
    return _truncation_error(rank) ** 2


def _rank_for_squared_error(limit: float) -> int:
    values = _math_down_proj_spectrum()
    return next(r for r in range(1, len(values) + 1) if _squared_truncation_error(r) < limit)


@functools.cache
def _peft_linear_off_sum() -> float:
    """ex-lora-combine: how far PEFT's linear combination (weights 1, 1) of the chapter's two
    rank-8 adapters changes the weights from the sum of their changes, relative to the sum."""
    import torch

    from pearl_edu.teaching import evaluation, lora, minipearl

    peft = lora.peft()
    mini = evaluation.mini_pearl(0)
    settings = lora.LoraSettings()
    folders = {p: lora.load_or_train_adapter(mini, p, settings) for p in minipearl.PARENTS}
    combined = peft.PeftModel.from_pretrained(
        minipearl.load_model(mini.base), folders["generalist"], adapter_name="generalist"
    )
    combined.load_adapter(folders["math"], adapter_name="math")
    combined.add_weighted_adapter(["generalist", "math"], [1.0, 1.0], "linear", "linear")
    off = size = 0.0
    with torch.no_grad():
        for module in combined.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and "linear" in module.lora_A:
                summed = module.get_delta_weight("generalist") + module.get_delta_weight("math")
                off += float((module.get_delta_weight("linear") - summed).norm() ** 2)
                size += float(summed.norm() ** 2)
    return math.sqrt(off / size)


def _search_mistake(kind: str, seed: int = 1) -> float:
    """ex-search-optimism's mistakes: the average trial's fall."""
    trials = _search_trials()
    return sum(_search_drop(seed, n) for n in trials) / len(trials)


def _beaten_mistake(kind: str, seed: int = 2) -> int:
    """ex-search-rank's mistakes: counting on validation, the winner included, or below."""
    winner = _search_winner(seed)
    trials = _search_trials()
    if kind == "validation":
        best = _search_objective(seed, winner, "validation")
        return sum(_search_objective(seed, n, "validation") > best for n in trials)
    best = _search_objective(seed, winner, "test")
    if kind == "at least":
        return sum(_search_objective(seed, n, "test") >= best for n in trials)
    return sum(_search_objective(seed, n, "test") < best for n in trials)


def _vocabulary_sizes() -> tuple[int, int]:
    from pearl_edu.teaching import minipearl, numbertokens

    characters = minipearl.build_tokenizer().get_vocab()
    numbers = numbertokens.build_number_tokenizer().get_vocab()
    return len(characters), len(numbers)


def _moe_top2_mistake(kind: str) -> float:
    if kind == "no softmax":
        return 1.1 / (0.3 + 1.1)
    return 1 - _moe_top2_weight()


def _moe_extra_mistake(kind: str) -> int:
    from pearl_edu.teaching import minipearl

    shape = minipearl.ModelShape()
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    if kind == "no router":
        return shape.num_layers * mlp
    if kind == "one layer":
        return mlp + 2 * shape.hidden_size
    return shape.num_layers * (
        2 * shape.hidden_size * shape.intermediate_size + 2 * shape.hidden_size
    )


@functools.cache
def _cheap_embed_rows() -> Any:
    """The router rows, (layers, experts, hidden), of chapter 16's cheap_embed mixture."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    import yaml
    from safetensors.torch import load_file

    from pearl_edu.moe import build_moe
    from pearl_edu.teaching import evaluation, minipearl

    mini = evaluation.mini_pearl(0)
    corpus = mini.settings.corpus()
    additions = [
        minipearl.addition_prompt(a, b) + minipearl.addition_answer(a, b)
        for a, b in corpus.train_problems[:8]
    ]
    prompts = {"generalist": list(corpus.train_sentences[:8]), "math": additions}
    config = {
        "base_model": str(mini.generalist),
        "gate_mode": "cheap_embed",
        "dtype": "bfloat16",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(getattr(mini, p)), "positive_prompts": prompts[p]}
            for p in ("generalist", "math")
        ],
    }
    folder = Path(tempfile.mkdtemp(prefix="pearl-edu-answers-"))
    try:
        result = build_moe(yaml.safe_dump(config, sort_keys=False), folder / "moe", progress=False)
        tensors = load_file(next(result.output_dir.glob("*.safetensors")))
        layers = mini.settings.shape.num_layers
        return torch.stack(
            [tensors[f"model.layers.{i}.mlp.gate.weight"].float() for i in range(layers)]
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _cheap_cosine(kind: str = "experts", layer: int = 3) -> float:
    """ex-moe-cheap: the cosine between the two experts' rows in ``layer`` (or mistakes)."""
    import torch

    rows = _cheap_embed_rows()
    if kind == "layers":  # one expert's rows in layer 0 and in ``layer``
        return torch.nn.functional.cosine_similarity(rows[0, 0], rows[layer, 0], dim=0).item()
    cosine = torch.nn.functional.cosine_similarity(rows[layer, 0], rows[layer, 1], dim=0).item()
    return math.degrees(math.acos(cosine)) if kind == "degrees" else cosine


# Chapter 07: mini-Pearl's record (bench/mini_pearl_seeds.py), seed 0, item by item


@functools.cache
def _mini_record(regime: str = "siblings"):
    from pearl_edu.teaching import evaluation

    return evaluation.Record.load("mini_pearl" if regime == "siblings" else "mini_pearl_far")


@functools.cache
def _test_carries() -> tuple[bool, ...]:
    from pearl_edu.teaching import minipearl

    corpus = minipearl.SIBLING_SETTINGS.corpus()
    return tuple(minipearl.carries(*p) for p in corpus.test_problems)


def _carrying_additions(carry: bool = True, share: bool = False) -> float:
    """ex-mini-carry: how many held-out additions carry (or not), or their share."""
    count = sum(c == carry for c in _test_carries())
    return count / len(_test_carries()) if share else count


def _points_on(first: str, second: str, carry: bool | None, seed: int = 0) -> float:
    """``first`` minus ``second`` on the held-out additions with a carry (``carry`` True),
    without (False) or all (None), in points, from the record of chapter 07."""
    record = _mini_record()
    a = record.get(seed, first).addition_right
    b = record.get(seed, second).addition_right
    kept = [i for i, c in enumerate(_test_carries()) if carry is None or c == carry]
    return 100 * sum(a[i] - b[i] for i in kept) / len(kept)


def _half_step_share(regime: str = "far", seed: int = 0, skill: str = "text") -> float:
    """ex-mini-predict: the share of the generalist's gain on ``skill`` kept at half its
    step (`minipearl.along_task_vector` at 0.5), from chapter 07's records."""
    record = _mini_record(regime)
    base, half, full = (
        getattr(record.get(seed, n), skill) for n in ("base", "half generalist step", "generalist")
    )
    return (half - base) / (full - base)


def _half_step_gain_points(regime: str = "far", seed: int = 0) -> float:
    """The mistake of giving the half step's text gain in points, not as a share."""
    record = _mini_record(regime)
    return 100 * (record.get(seed, "half generalist step").text - record.get(seed, "base").text)


# Chapter 08: losses on the straight paths of mini-Pearl's seed-0 siblings


@functools.cache
def _sibling_losses(t: float) -> float:
    """The held-out loss (nats) at ``t`` on the straight path from the sibling generalist
    (t = 0) to the specialist (t = 1), as chapter 08 measures it."""
    from pearl_edu.teaching import connectivity, minipearl

    siblings = minipearl.load_or_build_mini_pearl()
    first, second = (minipearl.load_weights(f) for f in (siblings.generalist, siblings.math))
    corpus = minipearl.SIBLING_SETTINGS.corpus()
    tokenizer = minipearl.load_tokenizer(siblings.base)
    weights = connectivity.linear_path(first, second, t)
    return connectivity.measure_point(siblings.base, weights, tokenizer, corpus, t).loss


def _merge_minus(what: str = "generalist") -> float:
    """ex-lmc-chord: the siblings' midpoint loss minus the generalist's (or mistakes)."""
    middle, generalist, specialist = (_sibling_losses(t) for t in (0.5, 0.0, 1.0))
    if what == "specialist":
        return middle - specialist
    if what == "chord":
        return middle - 0.5 * (generalist + specialist)
    return middle - generalist


@functools.cache
def _reordered_losses(layers: str) -> tuple[float, float, float]:
    """The held-out losses at t = 0, 0.5 and 1 from the sibling base to a copy of it with the
    MLP hidden units of the first layer (``layers`` "first") or of every layer ("all")
    reordered, with chapter 08's generator (seed 0)."""
    import torch

    from pearl_edu.teaching import connectivity, minipearl

    siblings = minipearl.load_or_build_mini_pearl()
    base = minipearl.load_weights(siblings.base)
    generator = torch.Generator().manual_seed(0)
    if layers == "first":
        first = {k: v for k, v in base.items() if k.startswith("model.layers.0.mlp.")}
        reordered = dict(base, **connectivity.permute_mlp_units(first, generator))
    else:
        reordered = connectivity.permute_mlp_units(base, generator)
    corpus = minipearl.SIBLING_SETTINGS.corpus()
    tokenizer = minipearl.load_tokenizer(siblings.base)
    return tuple(
        connectivity.measure_point(
            siblings.base, connectivity.linear_path(base, reordered, t), tokenizer, corpus, t
        ).loss
        for t in (0.0, 0.5, 1.0)
    )


def _midpoint_above_chord(layers: str = "first", raw: bool = False) -> float:
    """ex-lmc-one-layer: how far the midpoint's loss lies above the chord (or its loss)."""
    start, middle, end = _reordered_losses(layers)
    return middle if raw else middle - 0.5 * (start + end)


def _minipearl_layers() -> int:
    """Mini-Pearl's number of blocks."""
    from pearl_edu.teaching import minipearl

    return minipearl.ModelShape().num_layers


def _capstone_baseline() -> str:
    """ex-capstone's anticipated mistake: the baseline recipe itself."""
    from pearl_edu.teaching import capstone

    return capstone.baseline_recipe(capstone.models())


def _mini_shape():
    from pearl_edu.teaching import minipearl

    return minipearl.ModelShape()


def _reorderings_log10(
    *, heads: bool = True, mlp_per_layer: bool = True, any_head_order: bool = False
) -> float:
    """ex-align-count: log10 of the reorderings of mini-Pearl's units that keep its function:
    the residual stream's, each layer's MLP units' and each layer's heads' (groups kept).
    The keywords give the counts of the anticipated mistakes: no heads, one order of the
    MLP units for all layers, or any order of the query heads."""
    shape = _mini_shape()
    group = shape.num_heads // shape.num_kv_heads
    head_orders = math.lgamma(shape.num_kv_heads + 1) + shape.num_kv_heads * math.lgamma(group + 1)
    if any_head_order:
        head_orders = math.lgamma(shape.num_heads + 1)
    mlp = math.lgamma(shape.intermediate_size + 1)
    per_layer = (mlp if mlp_per_layer else 0.0) + (head_orders if heads else 0.0)
    natural = math.lgamma(shape.hidden_size + 1) + shape.num_layers * per_layer
    if not mlp_per_layer:
        natural += mlp
    return natural / math.log(10)


def _head_orders(num_heads: int = 8, num_kv_heads: int = 2) -> int:
    """ex-align-split: the orders of a layer's query heads that keep its function, counted
    one by one: each query head must read the key/value head its group is moved to, the
    same for the whole group (``num_heads // num_kv_heads`` query heads read each one)."""
    import itertools

    group = num_heads // num_kv_heads
    kept = 0
    for order in itertools.permutations(range(num_heads)):
        # The query head now at position j is order[j]; it reads key/value head j // group,
        # which must be where its own group (order[j] // group) went, the same for all.
        moved = {}
        if all(
            moved.setdefault(order[j] // group, j // group) == j // group for j in range(num_heads)
        ):
            kept += 1
    return kept


def _projections_folded() -> int:
    """ex-align-rotation: the weight matrices of mini-Pearl that `alignment.fold_norms`
    changes, counted on a model whose norms have weights other than one."""
    import torch

    from pearl_edu.teaching import alignment, minipearl

    model = minipearl.new_model(minipearl.build_tokenizer(), minipearl.ModelShape(), seed=0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for name in weights:
        if name.endswith("norm.weight"):
            weights[name] = 1 + torch.rand(weights[name].shape, generator=generator)
    folded = alignment.fold_norms(weights, alignment.Shape.of(model.config))
    return sum(
        not torch.equal(folded[name], weights[name].float())
        for name in weights
        if not name.endswith("norm.weight")
    )


def _fisher_merged_weight() -> float:
    """ex-data-fisher: one weight, 1.0 in the generalist (Fisher 3) and 3.0 in the specialist
    (Fisher 1), merged by Fisher-weighted averaging."""
    import torch

    from pearl_edu.teaching import datamerge

    weights = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    fishers = [{"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])}]
    return datamerge.fisher_merge(weights, fishers, epsilon=0.0)["w"].item()


def _gram_numbers(*, lm_head: bool = True, side: str = "in") -> int:
    """ex-data-grams: how many numbers the Gram matrices of one mini-Pearl parent hold, one
    (in x in) matrix per linear layer, by the shapes of `minipearl.ModelShape`. The keywords
    give the anticipated mistakes' counts: without the output head, the layers' weights
    (``side="weights"``: in x out) or squares of their outputs (``side="out"``)."""
    import torch

    from pearl_edu.teaching import minipearl

    model = minipearl.new_model(minipearl.build_tokenizer(), _mini_shape(), seed=0)
    sizes = {
        "in": lambda m: m.in_features**2,
        "out": lambda m: m.out_features**2,
        "weights": lambda m: m.in_features * m.out_features,
    }[side]
    return sum(
        sizes(module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (lm_head or name != "lm_head")
    )


def _diagonal_regmean_share() -> float:
    """ex-data-alpha0: with alpha = 0, the specialist's share of one input column of a merged
    layer when that input's energy is 30 in the generalist's data and 10 in the specialist's."""
    import torch

    from pearl_edu.teaching import datamerge

    weights = [{"w": torch.zeros(1, 1)}, {"w": torch.ones(1, 1)}]
    grams = [{"w": torch.tensor([[30.0]])}, {"w": torch.tensor([[10.0]])}]
    return datamerge.regmean_merge(weights, grams, alpha=0.0)["w"].item()


def _exercises() -> dict[str, Exercise]:
    exercises = [
        Exercise(
            "ex-meet-parent",
            (
                Blank(
                    "attention_layers_nearer_wizardmath",
                    "how many of the 32 layers have an attention nearer WizardMath than "
                    "OmniBeagle (a whole number)",
                    close_to(_attention_nearer_second, abs_tol=0),
                    "Which value of t stands for which parent, and where along the attention's "
                    "list does it cross one half?",
                    _attention_nearer_second,
                    (
                        Mistake(
                            lambda: _attention_nearer_second(0),
                            "This many layers lean the other way: which parent does t = 0 stand "
                            "for in Pearl's recipe?",
                        ),
                        Mistake(
                            lambda: 32 // 2,
                            "Half the layers would lean each way if the list were symmetric "
                            "about the middle; is it?",
                        ),
                    ),
                ),
                Blank(
                    "mlp_t_layer_16",
                    "the t of layer 16's MLP (a number)",
                    close_to(lambda: _mlp_t(16), abs_tol=0.01),
                    "Which of the recipe's lists does a tensor of the MLP follow?",
                    lambda: _mlp_t(16),
                    (
                        Mistake(
                            lambda: _attention_t(16),
                            "This is the attention's t at that layer: the MLP follows a list "
                            "of its own.",
                        ),
                        Mistake(
                            lambda: _mlp_t(17),
                            "This is the t of a neighbouring layer: layers are counted from 0.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-meet-dip",
            (
                Blank(
                    "midpoint_length",
                    "the length of the straight path's midpoint at 90 degrees",
                    close_to(_midpoint_length_90, abs_tol=1e-3),
                    "The midpoint of two unit vectors lies inside the circle: how far inside, "
                    "for vectors at right angles?",
                    _midpoint_length_90,
                    (
                        Mistake(
                            lambda: _midpoint_length_90() ** 2,
                            "This looks like the squared length; the question asks for the "
                            "length itself.",
                        ),
                        Mistake(
                            _midpoint_length_radians_mistake,
                            "This looks like a cosine of an angle in degrees computed as if "
                            "it were in radians.",
                        ),
                        Mistake(
                            lambda: 1.0,
                            "This is the length the arc keeps; the question is about the "
                            "straight path.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-meet-recipe",
            (
                Blank(
                    "recipe",
                    "the YAML text of your recipe",
                    Built(_flat_recipe, _same_recipe),
                    "Which part of the recipe gives each tensor its t, and how short can it be?",
                    mistakes=(
                        Mistake(
                            _recipe_mistake_yaml,
                            "This is Pearl's published recipe unchanged: its tensors still "
                            "take their t from its lists.",
                        ),
                    ),
                ),
                Blank(
                    "distance_ratio",
                    "on the straight path, the merge's distance to WizardMath over its "
                    "distance to OmniBeagle",
                    close_to(_distance_ratio, rel_tol=0.01),
                    "Which parent sits at t = 0? What fraction of the path lies between the "
                    "merge and each end?",
                    _distance_ratio,
                    (
                        Mistake(
                            lambda: 1 / _distance_ratio(),
                            "This is the ratio the other way round: which parent does the "
                            "recipe's base_model put at t = 0?",
                        ),
                        Mistake(
                            lambda: 0.3,
                            "This is t itself, one fraction of the path; the question asks "
                            "for a ratio of two distances.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-angle-scaling",
            (
                Blank(
                    "angle_negated",
                    "the angle in degrees between -2 * p0 and p1, for p0 = (3, 1), p1 = (1, 2)",
                    close_to(_angle_of_negated, abs_tol=0.5),
                    "What does a negative factor do to the dot product, and what to the "
                    "product of the norms?",
                    _angle_of_negated,
                    (
                        Mistake(
                            lambda: 180 - _angle_of_negated(),
                            "This is the angle between p0 and p1 themselves: the factor's sign "
                            "changes something.",
                        ),
                        Mistake(
                            lambda: _angle_of_negated_in("radians"),
                            "This looks like an angle in radians; the question asks for degrees.",
                        ),
                        Mistake(
                            lambda: math.cos(math.radians(_angle_of_negated())),
                            "This is a cosine; the question asks for the angle.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-unequal",
            (
                Blank(
                    "t_shortest",
                    "the t at which the straight path is shortest",
                    close_to(lambda: _shortest_straight_path()[0], abs_tol=2e-3),
                    "Write the squared length as a function of t: at right angles, which term "
                    "drops out? Where is such a function smallest?",
                    lambda: _shortest_straight_path()[0],
                    (
                        Mistake(
                            lambda: 0.5,
                            "For vectors of equal length the midpoint would be shortest; these "
                            "lengths differ.",
                        ),
                        Mistake(
                            lambda: 1 - _shortest_straight_path()[0],
                            "This point lies nearer the longer vector; which end pulls the "
                            "shortest point towards it?",
                        ),
                    ),
                ),
                Blank(
                    "length_shortest",
                    "the path's length there",
                    close_to(lambda: _shortest_straight_path()[1], abs_tol=2e-3),
                    "Once you have the t, what is the length of (1 - t) p0 + t p1 there?",
                    lambda: _shortest_straight_path()[1],
                    (
                        Mistake(
                            lambda: _shortest_straight_path()[1] ** 2,
                            "This looks like a squared length; the question asks for the length.",
                        ),
                        Mistake(
                            lambda: _straight_length(0.5),
                            "This is the length at the path's midpoint, not at its shortest point.",
                        ),
                        Mistake(
                            _midpoint_length_90,
                            "This is the dip of two unit vectors at 90 degrees; here one "
                            "vector is longer.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-hd-three",
            (
                Blank(
                    "length_kept",
                    "the average's length over one vector's length (a fraction)",
                    close_to(_three_unrelated, abs_tol=0.03),
                    "How do the squared lengths of nearly perpendicular vectors combine in "
                    "their sum?",
                    _three_unrelated,
                    (
                        Mistake(
                            lambda: 1 / 3,
                            "This is each vector's weight; unrelated vectors neither cancel "
                            "nor line up.",
                        ),
                        Mistake(
                            lambda: 1 / math.sqrt(2),
                            "This is what the average of two unrelated vectors keeps; here "
                            "there are three.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-hd-finetune",
            (
                Blank(
                    "cosine_for_5_percent",
                    "the siblings' cosine at which the midpoint keeps 95% of its length",
                    close_to(_cosine_losing_5_percent, abs_tol=0.003),
                    "The chapter relates the midpoint's length to the angle between the two: "
                    "which angle keeps 95%, and what is its cosine?",
                    _cosine_losing_5_percent,
                    (
                        Mistake(
                            lambda: 0.95,
                            "This is the length the midpoint keeps, which depends on half the "
                            "angle; the question asks for the cosine of the whole angle.",
                        ),
                        Mistake(
                            lambda: math.degrees(_half_angle_for_5_percent()),
                            "This looks like an angle in degrees; the question asks for a cosine.",
                        ),
                        Mistake(
                            _half_angle_for_5_percent,
                            "This looks like an angle in radians; the question asks for a cosine.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-slerp-threshold",
            (
                Blank(
                    "jump",
                    "how far the result moves at the threshold, at t = 0.5, for unit vectors",
                    close_to(_fallback_jump, rel_tol=0.1),
                    "Just outside the threshold SLERP applies, just inside it the fallback: how "
                    "far apart are the two at t = 0.5 for such a small angle?",
                    _fallback_jump,
                    (
                        Mistake(
                            lambda: math.degrees(_fallback_omega()) ** 2 / 8,
                            "This looks like the angle entered in degrees where the formula "
                            "wants radians.",
                        ),
                        Mistake(
                            lambda: 1 - math.cos(_fallback_omega()),
                            "This is the gap for the whole angle; at t = 0.5 the result has "
                            "turned through only part of it.",
                        ),
                    ),
                ),
                Blank(
                    "jump_over_spacing",
                    "the jump divided by the spacing of bfloat16 numbers near 1",
                    close_to(_jump_over_spacing, rel_tol=0.1),
                    "Which number does torch.finfo give for the gap between 1 and the next "
                    "bfloat16 number?",
                    _jump_over_spacing,
                    (
                        Mistake(
                            lambda: 1 / _jump_over_spacing(),
                            "This is the ratio upside down: the spacing over the jump.",
                        ),
                        Mistake(
                            lambda: _jump_over_spacing("float16"),
                            "This compares the jump with float16's spacing; the question is "
                            "about bfloat16.",
                        ),
                        Mistake(
                            lambda: _jump_over_spacing("float32"),
                            "This compares the jump with float32's spacing; the question is "
                            "about bfloat16.",
                        ),
                        Mistake(
                            lambda: _jump_over_spacing(factor=0.5),
                            "This compares the jump with half the spacing, the largest rounding "
                            "error; the question asks about the spacing itself.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-tensor-equal-norms",
            (
                Blank(
                    "norm_ratio",
                    "pearl_edu.slerp(a, b, 0.3).norm() / a.norm() for a, b of equal norms",
                    close_to(_equal_norm_ratio, abs_tol=1e-4),
                    "What does eq:slerp-norm give when both norms are the same r?",
                    _equal_norm_ratio,
                    (
                        Mistake(
                            lambda: _equal_norm_ratio_of("slerp", rescale=False),
                            "This is the ratio for b at its own norm; the exercise merges two "
                            "matrices of equal norms.",
                        ),
                        Mistake(
                            lambda: _equal_norm_ratio_of("lerp", rescale=True),
                            "This is the straight path's result, which shrinks; the question "
                            "is about SLERP.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-tensor-bf16",
            (
                Blank(
                    "unchanged_bfloat16",
                    "the fraction of random float32 values a cast to bfloat16 leaves unchanged",
                    within_factor(lambda: _survivors("bfloat16"), 2),
                    "Which bits must a float32 value have at zero for the cast to leave it "
                    "as it is, and how likely is that for random values?",
                    lambda: _survivors("bfloat16"),
                    (
                        Mistake(
                            lambda: 1 - _survivors("bfloat16"),
                            "This is the share that changes; the question asks for the share "
                            "left unchanged.",
                        ),
                        Mistake(
                            lambda: _kept_bits_share("bfloat16"),
                            "This counts the mantissa bits bfloat16 keeps; a value survives "
                            "by the bits the cast drops.",
                        ),
                    ),
                ),
                Blank(
                    "unchanged_float16",
                    "the same fraction for float16",
                    within_factor(lambda: _survivors("float16"), 2),
                    "How many mantissa bits does float16 keep, compared with bfloat16?",
                    lambda: _survivors("float16"),
                    (
                        Mistake(
                            lambda: _survivors("bfloat16"),
                            "This is bfloat16's fraction; float16 keeps a different number of "
                            "mantissa bits.",
                        ),
                        Mistake(
                            lambda: _kept_bits_share("float16"),
                            "This counts the mantissa bits float16 keeps; a value survives by "
                            "the bits the cast drops.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-recipe-layer5",
            (
                Blank(
                    "t_down_proj",
                    "the t of model.layers.5.mlp.down_proj.weight",
                    close_to(lambda: _layer5("mlp"), abs_tol=5e-4),
                    "Which rule's filter does the name contain first, and at which relative "
                    "depth does layer 5 of 32 read its list (eq:gradient)?",
                    lambda: _layer5("mlp"),
                    (
                        Mistake(
                            lambda: _layer5("self_attn"),
                            "This is the attention's t at layer 5; down_proj belongs to "
                            "another block.",
                        ),
                        Mistake(
                            lambda: _layer5_at("mlp", 5 / 32),
                            "This places layer 5 at 5 / 32; where does a slice of 32 layers put "
                            "its last layer?",
                        ),
                        Mistake(
                            lambda: _mlp_t(4),
                            "This is the t of a neighbouring layer: layers are counted from 0.",
                        ),
                    ),
                ),
                Blank(
                    "t_post_attention_layernorm",
                    "the t of model.layers.5.post_attention_layernorm.weight",
                    close_to(lambda: _layer5("other"), abs_tol=1e-6),
                    "Does the name contain self_attn, or mlp? If neither, which rule is left?",
                    lambda: _layer5("other"),
                    (
                        Mistake(
                            lambda: _layer5("mlp"),
                            "This is the MLP's t: does this tensor's name contain mlp?",
                        ),
                        Mistake(
                            lambda: _layer5("self_attn"),
                            "This is the attention's t: does this tensor's name contain self_attn?",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-recipe-layers",
            (
                Blank(
                    "anchor_layers_33",
                    "the list of layers that sit on an anchor when n = 33",
                    same_items(lambda: _layers_on_anchors(33)),
                    "At which relative depth does each anchor sit, and at which does layer i of n?",
                    lambda: _layers_on_anchors(33),
                    (
                        Mistake(
                            lambda: _layers_on_anchors_placed_at_n(33),
                            "This places layer i at i / n; where does a slice put its last layer?",
                        ),
                        Mistake(
                            lambda: _layers_on_anchors(33)[:-1],
                            "The list stops short of the slice's last layer.",
                        ),
                    ),
                ),
                Blank(
                    "anchor_layers_32",
                    "the same list when n = 32",
                    same_items(lambda: _layers_on_anchors(32)),
                    "With n = 32, does the spacing of the layers divide the spacing of the "
                    "anchors? Which layers sit on an anchor whatever n is?",
                    lambda: _layers_on_anchors(32),
                    (
                        Mistake(
                            lambda: _layers_on_anchors_placed_at_n(32),
                            "This places layer i at i / n; where does a slice put its last layer?",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-recipe-share",
            (
                Blank(
                    "t_down_proj_layer_5",
                    "the t of model.layers.5.mlp.down_proj.weight in the new recipe",
                    close_to(lambda: _shared_list_t(5), abs_tol=5e-4),
                    "Which list does the MLP follow now, and where does layer 5 of 32 read it?",
                    lambda: _shared_list_t(5),
                    (
                        Mistake(
                            lambda: _layer5("mlp"),
                            "This is the t the MLP had in Pearl's recipe; the new recipe gives "
                            "it another list.",
                        ),
                        Mistake(
                            lambda: _layer5_at("self_attn", 5 / 32),
                            "This places layer 5 at 5 / 32; where does a slice of 32 layers put "
                            "its last layer?",
                        ),
                        Mistake(
                            lambda: 0.5,
                            "This is the catch-all's t; the MLP's name contains a filter of its "
                            "own.",
                        ),
                    ),
                ),
                # mean_t: no plausible wrong value: the usual slips (the mean of the list's
                # anchors, Pearl's own mean, the catch-all) all give the same 0.5.
                Blank(
                    "mean_t",
                    "the parameter-weighted mean t of the new recipe",
                    close_to(_shared_list_mean_t, abs_tol=2e-3),
                    "Every layer has the same tensors: what is the mean of a list read at "
                    "evenly spaced depths, and what do the other tensors get?",
                    _shared_list_mean_t,
                ),
            ),
        ),
        Exercise(
            "ex-mini-carry",
            (
                Blank(
                    "carrying_additions",
                    "how many of the held-out additions have a carry",
                    close_to(_carrying_additions, abs_tol=0),
                    "Which function of minipearl says whether an addition carries, and "
                    "which problems are held out?",
                    _carrying_additions,
                    (
                        Mistake(
                            lambda: _carrying_additions(carry=False),
                            "This counts the additions without a carry.",
                        ),
                        Mistake(
                            lambda: _carrying_additions(share=True),
                            "This looks like a share; the question asks how many.",
                        ),
                    ),
                ),
                Blank(
                    "merge_gain_on_carries",
                    "seed 0: the uniform merge minus its base on the additions with a carry, "
                    "in points",
                    close_to(lambda: _points_on("slerp t=0.5", "base", True), abs_tol=0.1),
                    "Which additions does the question keep, and which two models does it "
                    "compare on them?",
                    lambda: _points_on("slerp t=0.5", "base", True),
                    (
                        Mistake(
                            lambda: _points_on("slerp t=0.5", "base", True) / 100,
                            "This looks like a fraction; the question asks in points.",
                        ),
                        Mistake(
                            lambda: _points_on("slerp t=0.5", "base", None),
                            "This is the difference over all the held-out additions, not only "
                            "those with a carry.",
                        ),
                        Mistake(
                            lambda: _points_on("slerp t=0.5", "math", True),
                            "This compares the merge with the specialist, not with its base.",
                        ),
                        Mistake(
                            lambda: _points_on("base", "slerp t=0.5", True),
                            "The sign is reversed: the question asks for the merge minus its base.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-mini-predict",
            (
                Blank(
                    "far_text_share_half",
                    "seed 0: the share of the far generalist's text gain kept at half its step",
                    close_to(_half_step_share, abs_tol=0.01),
                    "A share of a gain compares two gains over the same base: which two?",
                    _half_step_share,
                    (
                        Mistake(
                            lambda: _half_step_share("siblings"),
                            "This is the sibling generalist's share; the question is about the "
                            "far one.",
                        ),
                        Mistake(
                            lambda: 100 * _half_step_share(),
                            "This looks like a percentage; the question asks for a share, a "
                            "fraction of the gain.",
                        ),
                        Mistake(
                            _half_step_gain_points,
                            "This is the half step's gain itself, in points; the question asks "
                            "for its share of the whole step's gain.",
                        ),
                    ),
                ),
                Blank(
                    "sibling_text_share_half",
                    "seed 0: the same share for the sibling generalist",
                    close_to(lambda: _half_step_share("siblings"), abs_tol=0.01),
                    "The same measurement as for the far generalist, on the sibling regime's "
                    "models.",
                    lambda: _half_step_share("siblings"),
                    (
                        Mistake(
                            _half_step_share,
                            "This is the far generalist's share; the question is about the "
                            "sibling.",
                        ),
                        Mistake(
                            lambda: 100 * _half_step_share("siblings"),
                            "This looks like a percentage; the question asks for a share, a "
                            "fraction of the gain.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-lmc-chord",
            (
                Blank(
                    "merge_minus_generalist",
                    "the siblings' loss at t = 0.5 minus the generalist's, in nats",
                    close_to(_merge_minus, abs_tol=0.005),
                    "Which two points of the siblings' path does the question compare, and "
                    "which is subtracted from which?",
                    _merge_minus,
                    (
                        Mistake(
                            lambda: -_merge_minus(),
                            "The sign is reversed: the question asks for the merge minus the "
                            "generalist.",
                        ),
                        Mistake(
                            lambda: _merge_minus("specialist"),
                            "This compares the merge with the specialist, not with the generalist.",
                        ),
                        Mistake(
                            lambda: _merge_minus("chord"),
                            "This compares the merge with the chord, the blend of both "
                            "parents' losses; the question asks about one parent.",
                        ),
                    ),
                ),
                Blank(
                    "merge_minus_chord",
                    "the siblings' loss at t = 0.5 minus the chord's value there, in nats",
                    close_to(lambda: _merge_minus("chord"), abs_tol=0.005),
                    "What is the chord's value halfway between the two parents?",
                    lambda: _merge_minus("chord"),
                    (
                        Mistake(
                            _merge_minus,
                            "This compares the merge with the generalist alone; the chord "
                            "blends both parents' losses.",
                        ),
                        Mistake(
                            lambda: -_merge_minus("chord"),
                            "The sign is reversed: the question asks for the merge minus the "
                            "chord.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-lmc-one-layer",
            (
                Blank(
                    "first_layer_midpoint_excess",
                    "with the first layer's MLP reordered: the loss at t = 0.5 minus the "
                    "chord's value there, in nats",
                    close_to(_midpoint_above_chord, abs_tol=0.01),
                    "What are the losses at the two ends of this path, and so the chord's "
                    "value at its middle?",
                    _midpoint_above_chord,
                    (
                        Mistake(
                            lambda: _midpoint_above_chord("all"),
                            "This is the path to the copy with every layer's MLP reordered; "
                            "the question reorders the first layer only.",
                        ),
                        Mistake(
                            lambda: _midpoint_above_chord(raw=True),
                            "This is the midpoint's loss itself; a barrier is measured from the "
                            "chord.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-full-colab",
            (
                Blank(
                    "memory_needed_gb",
                    "the memory, in GB (10**9 bytes), that the failing check asks for",
                    close_to(_memory_to_use_gb, abs_tol=0.05),
                    "Which check's `ok` is False, and what does its `needed` say?",
                    _memory_to_use_gb,
                    (
                        Mistake(
                            lambda: _memory_to_use_gb(unit=2**30),
                            "This looks like GiB (2**30 bytes); the question counts GB of "
                            "10**9 bytes.",
                        ),
                        Mistake(
                            lambda: _memory_to_use_gb(factor=False),
                            "This is the size of the model's weights; using the model needs "
                            "more than its weights.",
                        ),
                        Mistake(
                            lambda: _memory_to_use_gb() - 15,
                            "This is how much the GPU lacks; the question asks for what the "
                            "check needs.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-full-verify",
            (
                Blank(
                    "differing_tensors",
                    "how many tensors differ from the published stand-in",
                    close_to(_catch_all_tensors, abs_tol=0),
                    "Which rule of the recipe did the change touch, and which tensors does "
                    "that rule reach?",
                    _catch_all_tensors,
                    (
                        Mistake(
                            lambda: _layer_tensors(per_layer_only=True),
                            "This counts only the layers' norms; the catch-all also reaches "
                            "tensors outside the layers.",
                        ),
                        Mistake(
                            lambda: _layer_tensors(per_layer_only=False),
                            "This counts the tensors that keep their t; the question asks "
                            "which differ.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-ties-hand",
            (
                Blank(
                    "ties_first",
                    "TIES of (0.5, -0.2) and (-0.4, 0.3), as a list of two numbers",
                    numbers_close(lambda: _ties((-0.4, 0.3)), abs_tol=1e-4),
                    "What does TIES do with an entry whose sign disagrees with the elected one?",
                    lambda: _ties((-0.4, 0.3)),
                    (
                        Mistake(
                            lambda: _ties_mistake((-0.4, 0.3), "sum"),
                            "This is the plain sum of the two vectors: entries of opposite "
                            "signs still cancel in it.",
                        ),
                        Mistake(
                            lambda: _ties_mistake((-0.4, 0.3), "mean"),
                            "This is the plain average: entries of opposite signs still "
                            "cancel in it.",
                        ),
                    ),
                ),
                Blank(
                    "ties_second",
                    "TIES of (0.5, -0.2) and (0.3, -0.4)",
                    numbers_close(lambda: _ties((0.3, -0.4)), abs_tol=1e-4),
                    "When every sign agrees, what does the disjoint mean do with the "
                    "agreeing entries?",
                    lambda: _ties((0.3, -0.4)),
                    (
                        Mistake(
                            lambda: _ties_mistake((0.3, -0.4), "sum"),
                            "This adds the agreeing entries, as task arithmetic does; the "
                            "disjoint mean treats them otherwise.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-dare-expectation",
            (
                Blank(
                    "noise_over_entry",
                    "at p = 0.1, the added noise's standard deviation over |delta_j|",
                    close_to(_dare_noise_ratio, rel_tol=0.02),
                    "The exercise derives a variance; in which units is a standard "
                    "deviation, and how does it compare with |delta_j|?",
                    _dare_noise_ratio,
                    (
                        Mistake(
                            lambda: _dare_noise_ratio() ** 2,
                            "This looks like a variance; the question asks for a spread in "
                            "the units of the entry.",
                        ),
                        Mistake(
                            lambda: _dare_noise_ratio(0.9),
                            "This takes p as the fraction dropped; here p is the fraction kept.",
                        ),
                        Mistake(
                            lambda: 1 / 0.1,
                            "This is the rescaling factor, not the spread of the noise.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-capstone",
            (
                Blank(
                    "recipe",
                    "your mergekit recipe (YAML text) for mini-Pearl",
                    Built(_capstone, _same_recipe),
                    "Interpolating trades one skill for the other; look for a merge that "
                    "keeps more of both parents' steps than t = 0.5 does.",
                    mistakes=(
                        Mistake(
                            _capstone_baseline,
                            "This is the baseline itself: a recipe cannot beat itself.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-eval-items",
            (
                Blank(
                    "items_needed",
                    "how many items a one-point unpaired difference near 72% needs",
                    within_factor(_items_for_one_point, 1.1),
                    "How does the standard error of a share shrink with the number of items, "
                    "and how many standard errors does an unpaired difference carry?",
                    _items_for_one_point,
                    (
                        Mistake(
                            lambda: _items_mistake(sides=1),
                            "This counts one model's standard error; a difference of two "
                            "unpaired scores carries the noise of both.",
                        ),
                        Mistake(
                            lambda: _items_mistake(z=1.0),
                            "This sets one standard error equal to the gap; the question asks "
                            "for the 95% bound.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-eval-seeds",
            (
                Blank(
                    "seeds_excluding_zero",
                    "on how many seeds the paired interval excludes zero",
                    close_to(_seeds_excluding_zero, abs_tol=0),
                    "An interval excludes zero when both its ends lie on the same side of it: "
                    "is that so for each seed?",
                    _seeds_excluding_zero,
                    (
                        Mistake(
                            _seeds_with_positive_estimate,
                            "This counts the seeds whose estimate is above zero; the question "
                            "is about their intervals.",
                        ),
                    ),
                ),
                Blank(
                    "lowest_low_points",
                    "the lowest of the three seeds' interval lower ends, in points",
                    close_to(_lowest_low_points, abs_tol=0.05),
                    "Each seed's difference has a low and a high end: which seed's interval "
                    "reaches lowest?",
                    _lowest_low_points,
                    (
                        Mistake(
                            lambda: _lowest_low_points() / 100,
                            "This looks like a fraction; the question asks in points.",
                        ),
                        Mistake(
                            lambda: _lowest_low_points("estimate"),
                            "This is an estimate, the middle of an interval, not its lower end.",
                        ),
                        Mistake(
                            lambda: _lowest_low_points("highest low"),
                            "This is the highest of the lower ends; the question asks for the "
                            "lowest.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-eval-paired",
            (
                Blank(
                    "p_value",
                    "the exact McNemar p-value of Pearl's wins and losses",
                    close_to(_paired_gsm8k_p, rel_tol=0.05),
                    "What do the difference in problems solved and the number of "
                    "disagreements say about the wins and the losses?",
                    _paired_gsm8k_p,
                    (
                        Mistake(
                            lambda: _paired_mistake("difference"),
                            "This takes the difference in problems solved as the number won; "
                            "the problems both solve or both miss cancel out of it.",
                        ),
                        Mistake(
                            lambda: _paired_mistake("one-sided"),
                            "This looks like a one-sided p-value; evaluation.mcnemar's is "
                            "two-sided.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-lora-params",
            (
                Blank(
                    "lora_parameters_rank_4",
                    "how many numbers a rank-4 LoRA of every linear layer of mini-Pearl trains",
                    close_to(lambda: _lora_parameters(4), abs_tol=0),
                    "How many numbers do the two factors of one adapted d x k layer hold, and "
                    "how many such layers does mini-Pearl have?",
                    lambda: _lora_parameters(4),
                    (
                        Mistake(
                            lambda: _lora_parameters(8),
                            "This is the count at the chapter's rank, 8; the question asks "
                            "about rank 4.",
                        ),
                        Mistake(
                            lambda: _lora_parameters(4) // _minipearl_layers(),
                            "This counts one block; the adapter covers every block.",
                        ),
                        Mistake(
                            _lora_parameters_square_kv,
                            "This takes k_proj and v_proj as square; their key-value heads "
                            "are fewer than the query heads.",
                        ),
                    ),
                ),
                Blank(
                    "break_even_rank",
                    "the smallest rank at which the adapter trains as many numbers as the layers",
                    close_to(_lora_break_even_rank, abs_tol=0),
                    "How does the adapter's count grow with r, and what do the layers hold?",
                    _lora_break_even_rank,
                    (
                        Mistake(
                            lambda: 64,
                            "This is the largest rank the square layers can have, not where the "
                            "two counts meet.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-lora-error",
            (
                Blank(
                    "relative_error_rank_8",
                    "the relative Frobenius error of the best rank-8 approximation",
                    close_to(lambda: _truncation_error(8), rel_tol=1e-3),
                    "By Eckart and Young, which singular values does the best rank-8 "
                    "approximation leave out, and how do they make up a Frobenius norm?",
                    lambda: _truncation_error(8),
                    (
                        Mistake(
                            lambda: _squared_truncation_error(8),
                            "This looks like a ratio of squared norms; the question compares "
                            "the norms themselves.",
                        ),
                        Mistake(
                            lambda: 1 - _squared_truncation_error(8),
                            "This is the share of the squared norm kept; the question asks "
                            "how far the approximation misses.",
                        ),
                        Mistake(
                            lambda: _truncation_error(9),
                            "This is the error at a neighbouring rank: how many singular "
                            "values does rank 8 keep?",
                        ),
                        Mistake(
                            lambda: _truncation_error(7),
                            "This is the error at a neighbouring rank: how many singular "
                            "values does rank 8 keep?",
                        ),
                    ),
                ),
                Blank(
                    "rank_for_half",
                    "the smallest rank whose relative error is below 0.5",
                    close_to(lambda: _rank_for_error(0.5), abs_tol=0),
                    "How does the error fall as the rank grows? Where does it first drop "
                    "below one half?",
                    lambda: _rank_for_error(0.5),
                    (
                        Mistake(
                            lambda: _rank_for_squared_error(0.5),
                            "This is where the squared error falls below one half; the "
                            "question is about the error itself.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-lora-combine",
            (
                Blank(
                    "cat_rank",
                    "the rank of PEFT's cat combination of the two rank-8 adapters",
                    close_to(_cat_rank, abs_tol=0),
                    "What does cat do with the A and B factors of the two adapters?",
                    _cat_rank,
                    (
                        Mistake(
                            lambda: _cat_rank() // 2,
                            "This is one adapter's rank; cat keeps the factors of both.",
                        ),
                    ),
                ),
                Blank(
                    "linear_off_sum",
                    "how far PEFT's linear combination (weights 1, 1) changes the weights from "
                    "the sum of the two adapters' changes, relative to the sum's norm",
                    close_to(_peft_linear_off_sum, rel_tol=0.01),
                    "Multiply out the product that eq:linear-cross describes: which terms does "
                    "it have that the sum has not?",
                    _peft_linear_off_sum,
                    (
                        Mistake(
                            lambda: 0.0,
                            "This would be so if the combined change were the sum of the two; "
                            "is it?",
                        ),
                        Mistake(
                            lambda: 100 * _peft_linear_off_sum(),
                            "This looks like a percentage; the question asks for a fraction "
                            "of the sum's norm.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-search-optimism",
            (
                Blank(
                    "winner_drop",
                    "seed 1's winner: its objective on validation minus its objective on test",
                    close_to(_winner_drop, abs_tol=0.002),
                    "Which trial won on validation, and what does the same objective read on "
                    "the test items?",
                    _winner_drop,
                    (
                        Mistake(
                            lambda: -_winner_drop(),
                            "This is test minus validation; the question asks how far it falls.",
                        ),
                    ),
                ),
                Blank(
                    "excess_drop",
                    "how much further the winner falls than the average trial of seed 1",
                    close_to(_excess_drop, abs_tol=0.002),
                    "Every trial falls a little between the splits: what part of the winner's "
                    "fall does its selection alone explain?",
                    _excess_drop,
                    (
                        Mistake(
                            lambda: _search_mistake("average"),
                            "This is the average trial's fall; the question asks how much "
                            "further the winner falls.",
                        ),
                        Mistake(
                            lambda: -_excess_drop(),
                            "The sign is reversed: the winner falls further than the average "
                            "trial.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-search-population",
            (
                Blank(
                    "dimensions",
                    "how many numbers the box has for Pearl's 32 layers",
                    close_to(_search_dimensions, abs_tol=0),
                    "Which tensors get a number of their own in this chapter's search, and "
                    "which share one?",
                    _search_dimensions,
                    (
                        Mistake(
                            lambda: _search_dimensions() - 1,
                            "This leaves out the one t that all the other tensors share.",
                        ),
                    ),
                ),
                Blank(
                    "population",
                    "how many recipes cma tries in a generation by default",
                    close_to(_cma_population, abs_tol=0),
                    "How does cma's default population grow with the number of dimensions? "
                    "(Its documentation gives the formula.)",
                    _cma_population,
                    (
                        Mistake(
                            lambda: math.floor(4 + 3 * math.log10(_search_dimensions())),
                            "This uses a base-10 logarithm; cma's formula uses the natural one.",
                        ),
                        Mistake(
                            lambda: math.ceil(4 + 3 * math.log(_search_dimensions())),
                            "This rounds up; cma rounds its population down.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-search-rank",
            (
                Blank(
                    "beaten",
                    "how many of seed 2's trials score higher on test than its validation winner",
                    close_to(_beaten_on_test, abs_tol=0),
                    "On which split is the winner the best, and on which is the question asked?",
                    _beaten_on_test,
                    (
                        Mistake(
                            lambda: _beaten_mistake("validation"),
                            "This ranks the trials on validation, where the winner is the best "
                            "by construction; the question is about test.",
                        ),
                        Mistake(
                            lambda: _beaten_mistake("at least"),
                            "This counts the winner itself; the question asks for the trials "
                            "that score higher.",
                        ),
                        Mistake(
                            lambda: _beaten_mistake("below"),
                            "This counts the trials below the winner on test; the question asks "
                            "for those above.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-tok-rows",
            (
                Blank(
                    "rows_union",
                    "how many rows the union's lm_head has",
                    close_to(lambda: _union_rows()[0], abs_tol=0),
                    "The union has every token of either tokenizer once: which tokens do the "
                    "two tokenizers share?",
                    lambda: _union_rows()[0],
                    (
                        Mistake(
                            lambda: sum(_vocabulary_sizes()),
                            "This counts the tokens both tokenizers have twice.",
                        ),
                    ),
                ),
                Blank(
                    "filled_rows",
                    "how many of the generalist's aligned rows are filled from the specialist",
                    close_to(lambda: _union_rows()[1], abs_tol=0),
                    "Which output tokens does the generalist lack, and who has them?",
                    lambda: _union_rows()[1],
                    (
                        Mistake(
                            lambda: _union_rows()[0],
                            "This counts every row of the union; the generalist has many of "
                            "them itself.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-tok-average",
            (
                Blank(
                    "fallback_row",
                    "the base's row for X, as a list of two numbers",
                    numbers_close(_fallback_row, abs_tol=1e-6),
                    "The base lacks X and two models have it: neither the base's row nor a "
                    "single owner's row applies.",
                    _fallback_row,
                    (
                        Mistake(
                            lambda: [1.0, 2.0],
                            "This is one owner's row; X has two owners here.",
                        ),
                        Mistake(
                            lambda: [4.0, 0.0],
                            "This adds the owners' rows; no rule of the union adds them.",
                        ),
                        Mistake(
                            lambda: [0.0, 0.0],
                            "This is the zero row of a tokens: entry; the first question has none.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-moe-top2",
            (
                Blank(
                    "math_weight",
                    "the weight of the maths expert's output (a number)",
                    close_to(_moe_top2_weight, abs_tol=0.002),
                    "How does eq:moe-layer turn the scores of the experts that run into weights?",
                    _moe_top2_weight,
                    (
                        Mistake(
                            lambda: _moe_top2_mistake("no softmax"),
                            "This divides the raw scores by their sum; the router's weights "
                            "come from the scores another way.",
                        ),
                        Mistake(
                            lambda: _moe_top2_mistake("generalist"),
                            "This is the generalist's weight, not the maths expert's.",
                        ),
                        Mistake(
                            lambda: 1.0,
                            "With two experts per token both run, so neither gets all the weight.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-moe-params",
            (
                Blank(
                    "extra_parameters",
                    "how many parameters the mixture has beyond one parent (a whole number)",
                    close_to(_moe_extra_parameters, abs_tol=0),
                    "What does each layer of the mixture hold that a parent's layer does not?",
                    _moe_extra_parameters,
                    (
                        Mistake(
                            lambda: _moe_extra_mistake("no router"),
                            "This counts the extra MLPs but leaves out the routers.",
                        ),
                        Mistake(
                            lambda: _moe_extra_mistake("one layer"),
                            "This counts one layer; the mixture has an expert and a router in "
                            "every layer.",
                        ),
                        Mistake(
                            lambda: _moe_extra_mistake("two matrices"),
                            "This counts two matrices per MLP; a Mistral MLP has three.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-moe-cheap",
            (
                Blank(
                    "cosine_layer_3",
                    "the cosine between the two experts' router rows in layer 3 of the "
                    "cheap_embed mixture",
                    close_to(_cheap_cosine, abs_tol=0.005),
                    "Which tensor of the mixture holds the router's rows, and how are they "
                    "laid out (experts by hidden size)?",
                    _cheap_cosine,
                    (
                        Mistake(
                            lambda: _cheap_cosine("degrees"),
                            "This looks like an angle in degrees; the question asks for its "
                            "cosine.",
                        ),
                        Mistake(
                            lambda: _cheap_cosine("layers"),
                            "This compares one expert's rows in two layers; the question "
                            "compares the two experts' rows in one layer.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-align-count",
            (
                Blank(
                    "log10_reorderings",
                    "log10 of the number of reorderings that keep mini-Pearl's function",
                    close_to(_reorderings_log10, abs_tol=0.01),
                    "Which groups of units can each be reordered on their own, and are the "
                    "counts of independent choices added or multiplied?",
                    _reorderings_log10,
                    (
                        Mistake(
                            lambda: _reorderings_log10(heads=False),
                            "This leaves out the reorderings of the attention heads.",
                        ),
                        Mistake(
                            lambda: _reorderings_log10(mlp_per_layer=False),
                            "Each layer's MLP units can be reordered on their own, not only "
                            "all layers together.",
                        ),
                        Mistake(
                            lambda: _reorderings_log10(any_head_order=True),
                            "Not every order of the heads keeps the function: a query head "
                            "must keep reading its own key/value head.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-align-split",
            (
                Blank(
                    "function_keeping_orders",
                    "how many orders of a layer's 8 query heads keep its function, with 2 "
                    "key/value heads",
                    close_to(lambda: _head_orders(8, 2), abs_tol=0.5),
                    "Which orders keep every query head reading the keys and values it read "
                    "before? Count what may move, and what must move with it.",
                    lambda: _head_orders(8, 2),
                    (
                        Mistake(
                            lambda: math.factorial(8),
                            "This counts every order of the query heads; most of them send a "
                            "query head to the other group's keys and values.",
                        ),
                        Mistake(
                            lambda: math.factorial(4) ** 2,
                            "The two groups can also trade places, their key/value heads "
                            "moving with them.",
                        ),
                        Mistake(
                            lambda: 2 * math.factorial(4),
                            "Each group orders its query heads on its own: the two orders are "
                            "independent.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-align-rotation",
            (
                Blank(
                    "matrices_folded",
                    "how many of mini-Pearl's weight matrices folding the norms changes",
                    close_to(_projections_folded, abs_tol=0.5),
                    "Which projections read each norm's output? Go through one layer, then "
                    "what reads the final norm.",
                    _projections_folded,
                    (
                        Mistake(
                            lambda: _projections_folded() - 1,
                            "The final norm has a reader too.",
                        ),
                        Mistake(
                            lambda: 7 * _mini_shape().num_layers + 1,
                            "Some projections write to the residual stream and read no norm's "
                            "output.",
                        ),
                        Mistake(
                            lambda: 2 * _mini_shape().num_layers + 1,
                            "This counts the norms; the question asks for the matrices that "
                            "read them.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-data-fisher",
            (
                Blank(
                    "merged_weight",
                    "the Fisher-merged value of the weight (a number)",
                    close_to(_fisher_merged_weight, abs_tol=1e-6),
                    "Which parent is more sure of this weight, and how much more should its "
                    "value count?",
                    _fisher_merged_weight,
                    (
                        Mistake(
                            lambda: 2.0,
                            "This is the plain average: the Fishers play no part in it.",
                        ),
                        Mistake(
                            lambda: (1.0 * 1.0 + 3.0 * 3.0) / 4.0,
                            "This weighs each value by the other parent's Fisher.",
                        ),
                        Mistake(
                            lambda: 3.0 * 1.0 + 1.0 * 3.0,
                            "A weighted average divides by the total weight.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-data-grams",
            (
                Blank(
                    "gram_numbers",
                    "how many numbers one parent's Gram matrices hold (a whole number)",
                    close_to(_gram_numbers, abs_tol=0),
                    "A Gram matrix is square: which size of its layer sets its side, and "
                    "which layers of the model are linear?",
                    _gram_numbers,
                    (
                        Mistake(
                            lambda: _gram_numbers(lm_head=False),
                            "The output head is a linear layer too.",
                        ),
                        Mistake(
                            lambda: _gram_numbers(side="weights"),
                            "This counts the layers' weights; a Gram matrix pairs each input "
                            "with every input.",
                        ),
                        Mistake(
                            lambda: _gram_numbers(side="out"),
                            "A layer's Gram matrix is built from what it reads, not from what "
                            "it writes.",
                        ),
                    ),
                ),
            ),
        ),
        Exercise(
            "ex-data-alpha0",
            (
                Blank(
                    "specialist_share",
                    "the specialist's share of that input's column (a number between 0 and 1)",
                    close_to(_diagonal_regmean_share, abs_tol=1e-6),
                    "With alpha = 0 each Gram is diagonal: what does each parent's entry for "
                    "this input measure, and how does that weigh its column?",
                    _diagonal_regmean_share,
                    (
                        Mistake(
                            lambda: 1 - _diagonal_regmean_share(),
                            "This is the generalist's share.",
                        ),
                        Mistake(
                            lambda: 0.5,
                            "This is the plain average: the energies of the input still "
                            "weigh the parents.",
                        ),
                        Mistake(
                            lambda: 10.0 / 30.0,
                            "This divides one energy by the other rather than by their total.",
                        ),
                    ),
                ),
            ),
        ),
    ]
    return {exercise.label: exercise for exercise in exercises}


EXERCISES: dict[str, Exercise] = _exercises()
