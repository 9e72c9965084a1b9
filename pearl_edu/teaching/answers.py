"""Checks of the exercises' answers, for the student edition of the book.

In the student edition (``python -m pearl_edu.teaching.student``), each exercise with an
answer that can be computed is followed by a cell to fill in and a cell that checks it:

    t_shortest = ...  # the t at which the straight path is shortest
    length_shortest = ...  # its length there

    answers.check("ex-unequal", t_shortest=t_shortest, length_shortest=length_shortest)

`check` works the right answer out itself, with `pearl_edu`, and says which values are
right. For a wrong one it gives a hint towards the method, never the answer: what it prints
depends only on which values are right, not on what the right values are.

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
class Blank:
    """One value a student fills in: its variable name, the question, and how it is judged.

    ``expected`` (when the answer is one value) computes the right answer: the checks use
    it, and the tests use it to make sure no message ever shows it.
    """

    name: str
    question: str
    judge: Judge
    hint: str
    expected: Callable[[], Any] | None = None


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
    a wrong value gets the blank's hint. The right answer is never shown.
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
        message = note if ok else f"{note} Hint: {blank.hint}"
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


def close_to(expected: Callable[[], float], *, abs_tol: float = 0.0, rel_tol: float = 0.0):
    """A judge: a number within ``abs_tol`` or ``rel_tol`` of ``expected()``."""

    def judge(given: Any) -> tuple[bool, str]:
        value = _number(given)
        ok = math.isclose(value, expected(), abs_tol=abs_tol, rel_tol=rel_tol)
        return ok, "" if ok else "Not this value."

    return judge


def within_factor(expected: Callable[[], float], factor: float):
    """A judge: a positive number within a factor ``factor`` of ``expected()``.

    For an order of magnitude, where a measurement and the prediction are both right.
    """

    def judge(given: Any) -> tuple[bool, str]:
        value = _number(given)
        ok = value > 0 and expected() / factor <= value <= expected() * factor
        return ok, "" if ok else "Not of the right size."

    return judge


def numbers_close(expected: Callable[[], Sequence[float]], *, abs_tol: float):
    """A judge: a sequence of numbers, each within ``abs_tol`` of ``expected()``'s."""

    def judge(given: Any) -> tuple[bool, str]:
        values = [_number(v) for v in (given.tolist() if hasattr(given, "tolist") else given)]
        wanted = list(expected())
        if len(values) != len(wanted):
            return False, f"Expected {len(wanted)} numbers, got {len(values)}."
        ok = all(math.isclose(v, w, abs_tol=abs_tol) for v, w in zip(values, wanted, strict=True))
        return ok, "" if ok else "Not these values."

    return judge


def same_items(expected: Callable[[], Sequence[int]]):
    """A judge: the same whole numbers as ``expected()``, in increasing order."""

    def judge(given: Any) -> tuple[bool, str]:
        if isinstance(given, str) or not isinstance(given, Sequence | set | frozenset):
            if not hasattr(given, "tolist"):
                raise TypeError(f"expected a list of numbers, got {type(given).__name__}")
            given = given.tolist()
        values = sorted(int(_number(v)) for v in given)
        ok = values == sorted(expected())
        return ok, "" if ok else "Not this list."

    return judge


def truth(expected: Callable[[], bool]):
    """A judge: ``True`` or ``False``, as ``expected()``."""

    def judge(given: Any) -> tuple[bool, str]:
        _require_type(given, bool, "True or False")
        ok = given == expected()
        return ok, "" if ok else "Not so."

    return judge


def _words(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def one_of_the_parents(expected: Callable[[], str]):
    """A judge: the name of one of Pearl's parents (``OmniBeagle`` or ``WizardMath``).

    Any spelling that names the expected parent and not the other one is right.
    """

    def judge(given: Any) -> tuple[bool, str]:
        _require_type(given, str, "a model's name")
        named = [p for p in _pearl_parents() if _words(p) in _words(given)]
        if len(named) != 1:
            return False, f"Name one of the two parents, {' or '.join(_pearl_parents())}."
        ok = named[0] == expected()
        return ok, "" if ok else "Not this parent."

    return judge


def same_words(expected: Callable[[], str]):
    """A judge: a text equal to ``expected()``, ignoring case, spaces and punctuation."""

    def judge(given: Any) -> tuple[bool, str]:
        _require_type(given, str, "a text")
        ok = _words(given) == _words(expected())
        return ok, "" if ok else "Not this one."

    return judge


# ---------------------------------------------------------------------------------------
# The right answers, computed with pearl_edu (each once per session)


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


def _parent_at(t: float) -> str:
    """The parent a tensor with this ``t`` comes from (0: the base model, 1: the other)."""
    if t not in (0, 1):
        raise ValueError(f"t = {t} takes from both parents")
    return _pearl_parents()[int(t)]


def _closer_parent(t: float) -> str:
    return _pearl_parents()[0 if t < 0.5 else 1]


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


def _jump_visible_in_bfloat16() -> bool:
    import torch

    return _fallback_jump() > torch.finfo(torch.bfloat16).eps / 2  # bfloat16's rounding at 1


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


def _failing_colab_check() -> str:
    """ex-full-colab: the one check that fails on the notebook machine of the exercise."""
    import tempfile

    from pearl_edu.teaching import fullrun, preflight

    needs = preflight.requirements(
        [fullrun.OMNIBEAGLE, fullrun.WIZARDMATH],
        tempfile.gettempdir(),
        published=fullrun.PUBLISHED,
        online=False,
    )
    machine = preflight.Resources(
        disk={folder: preflight.DiskSpace(70 * 10**9, 1) for folder in needs.disk_bytes},
        ram_available_bytes=12 * 10**9,
        gpus=(preflight.Gpu("T4", 15 * 10**9),),
    )
    (failed,) = [c.what for c in preflight.decide(needs, machine).checks if not c.ok]
    return failed


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


@functools.cache
def _peft_linear_is_sum() -> bool:
    """Whether PEFT's ``linear`` combination of two LoRA adapters changes a weight by the sum
    of their changes, tried on one small layer with two random adapters."""
    import torch

    from pearl_edu.teaching import lora

    peft = lora.peft()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]), adapter_name="one"
        )
        wrapped.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
        layer = wrapped.base_model.model[0]
        with torch.no_grad():
            for name in ("one", "two"):
                layer.lora_B[name].weight.normal_()
        wrapped.add_weighted_adapter(["one", "two"], [1.0, 1.0], "both", combination_type="linear")
        summed = layer.get_delta_weight("one") + layer.get_delta_weight("two")
        return bool(torch.allclose(layer.get_delta_weight("both"), summed, atol=1e-5))


def _capstone(given: Any) -> tuple[bool, str]:
    from pearl_edu.teaching import capstone

    # The student's check scores on validation, like the search: the test split, on which
    # the recipe is judged, stays unseen until the teacher runs `capstone.evaluate`.
    result = capstone.try_recipe(given)
    note = "Your teacher judges the recipe on the test split, which this check never uses."
    return result.beats_baseline, f"{result.summary()}\n{note}"


def _attention_parent(layer: int) -> Callable[[], str]:
    return lambda: _parent_at(_pearl_schedule().column("t", "self_attn")[layer])


def _mlp_16() -> float:
    return _pearl_schedule().column("t", "mlp")[16]


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


def _cheap_embed_rows_differ() -> bool:
    """ex-moe-cheap: whether `cheap_embed`'s rows of one expert differ between layers."""
    import torch

    from pearl_edu.moe import router

    embed = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    tokens = {"input_ids": torch.tensor([[1, 5, 7]]), "attention_mask": torch.ones(1, 3)}
    rows = router.cheap_embedding(embed, tokens, num_layers=4)
    return not all(torch.equal(rows[0], row) for row in rows)


def _reorderings_log10() -> float:
    """ex-align-count: log10 of the reorderings of mini-Pearl's units that keep its function:
    the residual stream's, each layer's MLP units' and each layer's heads' (groups kept)."""
    from pearl_edu.teaching import minipearl

    shape = minipearl.ModelShape()
    group = shape.num_heads // shape.num_kv_heads
    heads = math.lgamma(shape.num_kv_heads + 1) + shape.num_kv_heads * math.lgamma(group + 1)
    per_layer = math.lgamma(shape.intermediate_size + 1) + heads
    natural = math.lgamma(shape.hidden_size + 1) + shape.num_layers * per_layer
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


def _gram_numbers() -> int:
    """ex-data-grams: how many numbers the Gram matrices of one mini-Pearl parent hold, one
    (in x in) matrix per linear layer, by the shapes of `minipearl.ModelShape`."""
    import torch

    from pearl_edu.teaching import minipearl

    shape = minipearl.ModelShape()
    model = minipearl.new_model(minipearl.build_tokenizer(), shape, seed=0)
    return sum(m.in_features**2 for m in model.modules() if isinstance(m, torch.nn.Linear))


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
                    "attention_layer_0",
                    "the parent of layer 0's attention: OmniBeagle or WizardMath",
                    one_of_the_parents(_attention_parent(0)),
                    "t = 0 takes the base_model of the recipe, t = 1 the other model.",
                    _attention_parent(0),
                ),
                Blank(
                    "attention_layer_31",
                    "the parent of layer 31's attention",
                    one_of_the_parents(_attention_parent(31)),
                    "Read the last value of the self_attn list: layer 31 is the last layer.",
                    _attention_parent(31),
                ),
                Blank(
                    "mlp_t_layer_16",
                    "the t of layer 16's MLP (a number)",
                    close_to(_mlp_16, abs_tol=0.01),
                    'Read the MLP\'s column, not the attention\'s: schedule.column("t", "mlp").',
                    _mlp_16,
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
                    "Take p0 = (1, 0) and p1 = (0, 1) and the norm of pearl_edu.lerp(p0, p1, "
                    "0.5); the midpoint is shorter than both ends.",
                    _midpoint_length_90,
                ),
            ),
        ),
        Exercise(
            "ex-meet-recipe",
            (
                Blank(
                    "recipe",
                    "the YAML text of your recipe",
                    _flat_recipe,
                    "Start from pearl_edu.recipe_text() and replace its whole parameters "
                    "block by a single t.",
                ),
                Blank(
                    "closer_parent",
                    "the parent that dominates: OmniBeagle or WizardMath",
                    one_of_the_parents(lambda: _closer_parent(0.3)),
                    "Which end of the path does a t below one half lie closer to?",
                    lambda: _closer_parent(0.3),
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
                    "Take the arccos of torch.nn.functional.cosine_similarity(-2 * p0, p1, "
                    "dim=0), in degrees: a negative factor flips the sign of the cosine.",
                    _angle_of_negated,
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
                    "At 90 degrees the cross term vanishes: minimise (1 - t)**2 + 9 * t**2. "
                    "The shortest point lies closer to the shorter vector.",
                    lambda: _shortest_straight_path()[0],
                ),
                Blank(
                    "length_shortest",
                    "the path's length there",
                    close_to(lambda: _shortest_straight_path()[1], abs_tol=2e-3),
                    "The length is the square root of (1 - t)**2 + 9 * t**2 at that t.",
                    lambda: _shortest_straight_path()[1],
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
                    "Unrelated vectors are nearly perpendicular: the squared length of their "
                    "sum is about the sum of their squared lengths.",
                    _three_unrelated,
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
                    "The midpoint keeps cos(theta / 2) of the length: solve cos(theta / 2) "
                    "= 0.95 for theta, then take cos(theta).",
                    _cosine_losing_5_percent,
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
                    "Just outside the threshold, compare pearl_edu.slerp and pearl_edu.lerp "
                    "at t = 0.5: the difference is about Omega**2 / 8.",
                    _fallback_jump,
                ),
                Blank(
                    "visible_in_bfloat16",
                    "True or False: does the jump survive rounding to bfloat16?",
                    truth(_jump_visible_in_bfloat16),
                    "Compare the jump with the spacing of bfloat16 numbers near 1, "
                    "torch.finfo(torch.bfloat16).eps.",
                    _jump_visible_in_bfloat16,
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
                    "Rescale b to a's norm first (b * a.norm() / b.norm()), then merge.",
                    _equal_norm_ratio,
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
                    "A value survives only if every mantissa bit that bfloat16 drops is zero: "
                    "count the bits float32 has and bfloat16 keeps (torch.finfo).",
                    lambda: _survivors("bfloat16"),
                ),
                Blank(
                    "unchanged_float16",
                    "the same fraction for float16",
                    within_factor(lambda: _survivors("float16"), 2),
                    "float16 keeps more mantissa bits than bfloat16: fewer are dropped.",
                    lambda: _survivors("float16"),
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
                    "down_proj's name contains mlp: read the mlp list at x = 5 / 31 with "
                    "eq:gradient, between its first two anchors.",
                    lambda: _layer5("mlp"),
                ),
                Blank(
                    "t_post_attention_layernorm",
                    "the t of model.layers.5.post_attention_layernorm.weight",
                    close_to(lambda: _layer5("other"), abs_tol=1e-6),
                    "Does the name contain self_attn, or mlp? If neither, which rule is left?",
                    lambda: _layer5("other"),
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
                    "Anchor k sits at x = k / 4 and layer i at x = i / (n - 1): keep the i "
                    "for which 4 * i / (n - 1) is a whole number.",
                    lambda: _layers_on_anchors(33),
                ),
                Blank(
                    "anchor_layers_32",
                    "the same list when n = 32",
                    same_items(lambda: _layers_on_anchors(32)),
                    "With n = 32, (n - 1) / 4 is not a whole number: which layers can still "
                    "sit on an anchor?",
                    lambda: _layers_on_anchors(32),
                ),
            ),
        ),
        Exercise(
            "ex-recipe-share",
            (
                Blank(
                    "early_layers_from",
                    "the parent whole early layers now come from",
                    one_of_the_parents(lambda: _closer_parent(0)),
                    "With both lists equal, what t do the first layers' attention and MLP get?",
                    lambda: _closer_parent(0),
                ),
                Blank(
                    "mean_t",
                    "the parameter-weighted mean t of the new recipe",
                    close_to(_shared_list_mean_t, abs_tol=2e-3),
                    "Every layer has the same tensors, so weight each layer's t by its size, "
                    "with the catch-all for the norms, embeddings and lm_head.",
                    _shared_list_mean_t,
                ),
            ),
        ),
        Exercise(
            "ex-full-colab",
            (
                Blank(
                    "failing_check",
                    "the name (what) of the preflight check that fails",
                    same_words(_failing_colab_check),
                    "Run preflight.decide on the full run's requirements and that machine, and "
                    "read the `what` of the check whose `ok` is False.",
                    _failing_colab_check,
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
                    "Only the tensors that take the catch-all change: count those whose name "
                    "contains neither self_attn nor mlp (len(report.differing)).",
                    _catch_all_tensors,
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
                    "Elect each entry's sign from the sum of the two task vectors, then "
                    "average only the entries that agree with it.",
                    lambda: _ties((-0.4, 0.3)),
                ),
                Blank(
                    "ties_second",
                    "TIES of (0.5, -0.2) and (0.3, -0.4)",
                    numbers_close(lambda: _ties((0.3, -0.4)), abs_tol=1e-4),
                    "Here the two agree on every sign: the disjoint mean averages, it does "
                    "not add.",
                    lambda: _ties((0.3, -0.4)),
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
                    "The variance is delta_j**2 * (1 - p) / p: take its square root.",
                    _dare_noise_ratio,
                ),
            ),
        ),
        Exercise(
            "ex-capstone",
            (
                Blank(
                    "recipe",
                    "your mergekit recipe (YAML text) for mini-Pearl",
                    _capstone,
                    "Interpolating trades one skill for the other; look for a merge that "
                    "keeps more of both parents' steps than t = 0.5 does.",
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
                    "Set 1.96 * sqrt(2 * p * (1 - p) / (n - 1)) equal to 0.01 with p = 0.72 "
                    "and solve for n.",
                    _items_for_one_point,
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
                    "Count the seeds of record.compare(...).by_seed whose excludes_zero is True.",
                    _seeds_excluding_zero,
                ),
                Blank(
                    "verdict",
                    'the verdict over seeds: "higher", "lower" or "indistinguishable"',
                    same_words(lambda: _seed_comparison().verdict),
                    "A verdict over seeds needs every seed's interval to exclude zero the "
                    "same way.",
                    lambda: _seed_comparison().verdict,
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
                    "Solve wins - losses = 971 - 924 and wins + losses = 151, then call "
                    "evaluation.mcnemar(wins, losses).",
                    _paired_gsm8k_p,
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
                    "A rank-r LoRA of a d x k layer trains B (d x r) and A (r x k): add r (d + k) "
                    "over the seven linear layers of a block, then over the blocks.",
                    lambda: _lora_parameters(4),
                ),
                Blank(
                    "break_even_rank",
                    "the smallest rank at which the adapter trains as many numbers as the layers",
                    close_to(_lora_break_even_rank, abs_tol=0),
                    "Compare r times the sum of (d + k) with the sum of d * k over the same layers.",
                    _lora_break_even_rank,
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
                    "By Eckart-Young it is the root of the sum of the squared singular values "
                    "left out, over the root of the sum of all of them "
                    "(torch.linalg.svdvals of the float32 task vector).",
                    lambda: _truncation_error(8),
                ),
                Blank(
                    "rank_for_half",
                    "the smallest rank whose relative error is below 0.5",
                    close_to(lambda: _rank_for_error(0.5), abs_tol=0),
                    "Compute the error for every rank from 1 up and keep the first below 0.5.",
                    lambda: _rank_for_error(0.5),
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
                    "cat stacks the A factors of the adapters (and their B factors side by side).",
                    _cat_rank,
                ),
                Blank(
                    "linear_is_sum",
                    "whether PEFT's linear combination (weights 1, 1) changes a weight by the "
                    "sum of the two adapters' changes, True or False",
                    truth(_peft_linear_is_sum),
                    "Multiply out (B1 + B2)(A1 + A2), each scaled by the square root of its "
                    "weight times its scale, as PEFT's linear combination builds it.",
                    _peft_linear_is_sum,
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
                    "objectives(1, winner(1)) gives both; subtract the test one from the "
                    "validation one.",
                    _winner_drop,
                ),
                Blank(
                    "excess_drop",
                    "how much further the winner falls than the average trial of seed 1",
                    close_to(_excess_drop, abs_tol=0.002),
                    "Average validation minus test over every trial of seed 1, and subtract "
                    "that average from the winner's fall.",
                    _excess_drop,
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
                    "One t for the attention and one for the MLP of each layer, and one t "
                    "for all the rest.",
                    _search_dimensions,
                ),
                Blank(
                    "population",
                    "how many recipes cma tries in a generation by default",
                    close_to(_cma_population, abs_tol=0),
                    "cma's default popsize is 4 + 3 ln N rounded down, for N numbers.",
                    _cma_population,
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
                    "Compare each trial's test objective with winner(2)'s, and count.",
                    _beaten_on_test,
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
                    "The union has every token of either tokenizer, each once: count the "
                    "tokens of the two vocabularies together.",
                    lambda: _union_rows()[0],
                ),
                Blank(
                    "filled_rows",
                    "how many of the generalist's aligned rows are filled from the specialist",
                    close_to(lambda: _union_rows()[1], abs_tol=0),
                    "A row is filled for each output token the generalist lacks.",
                    lambda: _union_rows()[1],
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
                    "Take the softmax of the two scores: exp(1.1) / (exp(0.3) + exp(1.1)).",
                    _moe_top2_weight,
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
                    "Per layer: one more MLP (gate, up and down projections, each hidden size "
                    "by MLP size) and a router with one row of hidden size per expert.",
                    _moe_extra_parameters,
                ),
            ),
        ),
        Exercise(
            "ex-moe-cheap",
            (
                Blank(
                    "rows_differ_by_layer",
                    "whether cheap_embed's router rows differ from layer to layer: True or False",
                    truth(_cheap_embed_rows_differ),
                    "Where in the model do token embeddings come from, before or after the "
                    "first layer?",
                    _cheap_embed_rows_differ,
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
                    "Multiply the counts: 64! for the residual stream, and per layer 128! for "
                    "the MLP units times the reorderings of heads that keep each group whole; "
                    "math.lgamma(n + 1) is ln(n!).",
                    _reorderings_log10,
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
                    "Weigh each parent's value by its Fisher and divide by the summed Fishers.",
                    _fisher_merged_weight,
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
                    "One square matrix per linear layer, as wide as the layer's input: the "
                    "attention projections and the MLP's gate and up read the hidden size, "
                    "down_proj the MLP size; do not forget lm_head.",
                    _gram_numbers,
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
                    "With alpha = 0 each Gram is diagonal, so each input column is an average "
                    "of the parents' columns weighted by that input's energy.",
                    _diagonal_regmean_share,
                ),
            ),
        ),
    ]
    return {exercise.label: exercise for exercise in exercises}


EXERCISES: dict[str, Exercise] = _exercises()
