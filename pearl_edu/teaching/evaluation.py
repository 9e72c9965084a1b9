r"""Is this merge better? Scores with their noise, for comparing merges of mini-Pearl.

A skill score is an average over held-out items, so it carries the noise of which items
were drawn; a model is one draw of its training seed, so it carries that noise too. This
module measures both, the way the book reads every comparison:

- `item_scores`: a model's result on every held-out item of a split (tokens right per
  sentence, right or wrong per addition), from which both skills are averages;
- `paired`: the difference between two models scored on the **same** items, with a 95%
  interval from the paired bootstrap and, for the exact-match additions, the exact
  McNemar test on the items where the two disagree;
- `unpaired`: the same difference with each model's items resampled on their own, to show
  what pairing buys;
- `spread`: a quantity measured once per training seed, as mean, standard deviation and range;
- `Record`: item scores of named merges for several seeds, kept in a JSON file made by a
  ``bench/`` script, from which a chapter reads any paired comparison and its spread.

A difference is called out only when its interval excludes zero; otherwise the two models
are *indistinguishable here*.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pearl_edu.errors import ModelError
from pearl_edu.teaching import minipearl

SKILLS = ("text", "addition")
RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class ItemScores:
    """One model's result on each held-out item of one split.

    ``text_right[i]`` of the ``text_total[i]`` predicted tokens of sentence ``i`` are the
    model's most likely token; ``addition_right[j]`` says whether its greedy answer to
    problem ``j`` is exactly right. The skills are the pooled averages, as
    `minipearl.measure_skills` reports them.
    """

    text_right: tuple[int, ...]
    text_total: tuple[int, ...]
    addition_right: tuple[bool, ...]

    @property
    def text(self) -> float:
        return sum(self.text_right) / sum(self.text_total)

    @property
    def addition(self) -> float:
        return sum(self.addition_right) / len(self.addition_right)

    def skills(self) -> minipearl.Skills:
        return minipearl.Skills(text=self.text, addition=self.addition)

    def to_json(self) -> dict:
        """A compact form: the additions as a string of 0s and 1s."""
        return {
            "text_right": list(self.text_right),
            "text_total": list(self.text_total),
            "addition_right": "".join("1" if right else "0" for right in self.addition_right),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> ItemScores:
        return cls(
            text_right=tuple(data["text_right"]),
            text_total=tuple(data["text_total"]),
            addition_right=tuple(bit == "1" for bit in data["addition_right"]),
        )


@torch.no_grad()
def item_scores(model, tokenizer, corpus: minipearl.Corpus, split: str = "test") -> ItemScores:
    """Score ``model`` on every held-out item of ``split`` (``"validation"`` or ``"test"``)."""
    sentences, problems = corpus.held_out(split)
    examples = minipearl.sentence_examples(tokenizer, sentences)
    with minipearl.torch_threads(1):
        predicted = model(input_ids=examples.input_ids).logits[:, :-1].argmax(-1)
        mask = examples.loss_mask[:, 1:].bool()
        right = (predicted == examples.input_ids[:, 1:]) & mask
        prompts = [minipearl.addition_prompt(a, b) for a, b in problems]
        answers = minipearl.greedy_answers(model, tokenizer, prompts, minipearl.ANSWER_DIGITS)
    return ItemScores(
        text_right=tuple(right.sum(1).tolist()),
        text_total=tuple(mask.sum(1).tolist()),
        addition_right=tuple(
            answer == minipearl.addition_answer(a, b)
            for answer, (a, b) in zip(answers, problems, strict=True)
        ),
    )


def load_model(folder: str | Path):
    """Load any causal language model folder with `transformers`, in float32, for scoring.

    `minipearl.load_model` loads a `MistralForCausalLM`, the architecture of mini-Pearl and
    of its merges. A mixture of experts built from them (`pearl_edu.moe.build_moe`) is a
    `MixtralForCausalLM`, whose experts a Mistral would not read (it would score its own
    freshly initialised MLPs instead): the class is the one ``config.json`` names.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder}: no config.json; expected a Hugging Face model")
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if architectures == ["MistralForCausalLM"] or not architectures:
        return minipearl.load_model(folder)
    transformers = minipearl._transformers()
    with minipearl.quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def score_folder(folder: str | Path, corpus: minipearl.Corpus, split: str = "test") -> ItemScores:
    """Load the model saved in ``folder`` (a Mistral, or a Mixtral of experts) and score it on
    ``split``."""
    model = load_model(folder)
    return item_scores(model, minipearl.load_tokenizer(folder), corpus, split)


# ---------------------------------------------------------------------------------------
# Differences with intervals


@dataclass(frozen=True)
class Difference:
    """``first`` minus ``second`` on one skill, with its 95% interval.

    For additions, ``wins`` and ``losses`` count the problems that only the first model
    (only the second) gets right, and ``p`` is the exact McNemar test's two-sided p-value
    on them; for text, ``p`` is ``None``.
    """

    skill: str
    estimate: float
    low: float
    high: float
    items: int
    paired: bool = True
    wins: int | None = None
    losses: int | None = None
    p: float | None = None

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero."""
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        """``"higher"``, ``"lower"`` or ``"indistinguishable"``."""
        if not self.excludes_zero:
            return "indistinguishable"
        return "higher" if self.estimate > 0 else "lower"

    def __str__(self) -> str:
        text = (
            f"{self.skill} {100 * self.estimate:+.1f} points "
            f"[{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        )
        if self.wins is not None:
            text += f", {self.wins} won / {self.losses} lost, McNemar p = {self.p:.2g}"
        return text


def _rows(first: ItemScores, second: ItemScores, skill: str) -> tuple[torch.Tensor, ...]:
    if skill == "text":
        if first.text_total != second.text_total:
            raise ValueError("the two models were not scored on the same sentences")
        return (
            torch.tensor(first.text_right, dtype=torch.float64),
            torch.tensor(second.text_right, dtype=torch.float64),
            torch.tensor(first.text_total, dtype=torch.float64),
        )
    if skill == "addition":
        if len(first.addition_right) != len(second.addition_right):
            raise ValueError("the two models were not scored on the same problems")
        ones = torch.ones(len(first.addition_right), dtype=torch.float64)
        return (
            torch.tensor(first.addition_right, dtype=torch.float64),
            torch.tensor(second.addition_right, dtype=torch.float64),
            ones,
        )
    raise ValueError(f"skill must be one of {SKILLS}, not {skill!r}")


def _interval(draws: torch.Tensor) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=draws.dtype))
    return low.item(), high.item()


def paired(
    first: ItemScores,
    second: ItemScores,
    skill: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Difference:
    r"""``first`` minus ``second`` on ``skill``, both scored on the same items.

    The paired bootstrap draws the items with replacement, the same draw for both models,
    and takes the pooled score's difference each time,
    $\hat\Delta^* = \sum_i (a_i - b_i)^* / \sum_i n_i^*$; the interval holds the middle 95%
    of ``resamples`` draws. Because both models meet the same easy and hard items, the
    items' difficulty cancels, and the interval is much narrower than `unpaired`'s.
    """
    a, b, n = _rows(first, second, skill)
    estimate = ((a.sum() - b.sum()) / n.sum()).item()
    index = torch.randint(
        len(a), (resamples, len(a)), generator=torch.Generator().manual_seed(seed)
    )
    draws = (a - b)[index].sum(1) / n[index].sum(1)
    low, high = _interval(draws)
    if skill != "addition":
        return Difference(skill, estimate, low, high, len(a))
    wins = int(((a == 1) & (b == 0)).sum())
    losses = int(((a == 0) & (b == 1)).sum())
    return Difference(
        skill, estimate, low, high, len(a), wins=wins, losses=losses, p=mcnemar(wins, losses)
    )


def unpaired(
    first: ItemScores,
    second: ItemScores,
    skill: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Difference:
    """The same difference as `paired`, but each model's items drawn independently.

    This is the interval one would get by forgetting that both models were scored on the
    same items (or by comparing scores measured on different items).
    """
    a, b, n = _rows(first, second, skill)
    estimate = ((a.sum() - b.sum()) / n.sum()).item()
    generator = torch.Generator().manual_seed(seed)
    first_index = torch.randint(len(a), (resamples, len(a)), generator=generator)
    second_index = torch.randint(len(b), (resamples, len(b)), generator=generator)
    draws = a[first_index].sum(1) / n[first_index].sum(1) - b[second_index].sum(1) / n[
        second_index
    ].sum(1)
    low, high = _interval(draws)
    return Difference(skill, estimate, low, high, len(a), paired=False)


def mcnemar(wins: int, losses: int) -> float:
    """The exact McNemar test: the two-sided p-value of ``wins`` against ``losses``.

    Only the items on which the two models disagree say anything about which is better;
    if neither were, each of those ``wins + losses`` items would go either way with
    probability one half. The p-value is the binomial probability of a split at least as
    lopsided as the one seen, counted on both sides (capped at 1).
    """
    total = wins + losses
    if total == 0:
        return 1.0
    extreme = min(wins, losses)
    tail = sum(math.comb(total, k) for k in range(extreme + 1)) / 2**total
    return min(1.0, 2 * tail)


def standard_error(scores: ItemScores, skill: str) -> float:
    r"""The standard error of one model's score on ``skill`` over its items.

    Each item $i$ of the $m$ items has $r_i$ right of $n_i$ (for additions, $n_i = 1$; for
    text, the predicted tokens of sentence $i$), and the score is the ratio of sums
    $\hat p = \sum_i r_i / \sum_i n_i$. Items, not tokens, are drawn independently, so the
    standard error is taken over the items' residuals $r_i - \hat p\,n_i$:

    $$\operatorname{SE}(\hat p) = \frac{1}{\bar n}
    \sqrt{\frac{1}{m}\cdot\frac{1}{m-1}\sum_i (r_i - \hat p\,n_i)^2},$$

    with $\bar n$ the mean of the $n_i$: a linear (first-order) approximation of the ratio
    around its mean, with each sentence one cluster of tokens. For additions this is
    $\sqrt{s^2/m}$ with the sample variance $s^2 = \frac{m}{m-1}\hat p(1-\hat p)$, that is
    $\sqrt{\hat p(1-\hat p)/(m-1)}$, as `share_standard_error` and lm-evaluation-harness
    compute it.
    """
    right, _, total = _rows(scores, scores, skill)
    mean = right.sum() / total.sum()
    residuals = right - mean * total
    variance = (residuals**2).sum() / (len(right) - 1) / len(right)
    return (variance.sqrt() / total.mean()).item()


def share_standard_error(score: float, items: int) -> float:
    r"""The standard error of a published score: a mean ``score`` over ``items`` items.

    For right-or-wrong items, $\sqrt{p(1-p)/(n-1)}$, the same as `standard_error` gives for
    a model with that share right (and what lm-evaluation-harness reports). For items
    scored anywhere in $[0, 1]$ (a probability, say), their variance is at most
    $p(1-p)$, so this is an upper bound.
    """
    if items < 2:
        raise ValueError(f"a standard error needs at least two items, not {items}")
    if not 0 <= score <= 1:
        raise ValueError(f"a score must be a share between 0 and 1, not {score}")
    return math.sqrt(score * (1 - score) / (items - 1))


# ---------------------------------------------------------------------------------------
# Seeds


@dataclass(frozen=True)
class Spread:
    """A quantity measured once per training seed."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        """The sample standard deviation over seeds (0 for a single seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def same_sign(self) -> bool:
        """Whether every seed's value lies strictly on the same side of zero."""
        return all(v > 0 for v in self.values) or all(v < 0 for v in self.values)

    def __str__(self) -> str:
        return (
            f"{100 * self.mean:+.1f} points (sd {100 * self.sd:.1f} over "
            f"{len(self.values)} seeds, range {100 * self.low:+.1f} to {100 * self.high:+.1f})"
        )


def spread(values: Sequence[float]) -> Spread:
    """Mean, standard deviation and range of one value per training seed."""
    if not values:
        raise ValueError("spread needs at least one value")
    return Spread(tuple(float(v) for v in values))


# ---------------------------------------------------------------------------------------
# Recorded scores over seeds


@dataclass(frozen=True)
class Comparison:
    """One comparison, seed by seed: each seed's paired difference, and their spread."""

    first: str
    second: str
    skill: str
    by_seed: dict[int, Difference]

    @property
    def spread(self) -> Spread:
        return spread([d.estimate for d in self.by_seed.values()])

    @property
    def verdict(self) -> str:
        """``"higher"`` or ``"lower"`` only if every seed's interval excludes zero that way."""
        verdicts = {d.verdict for d in self.by_seed.values()}
        return verdicts.pop() if len(verdicts) == 1 else "indistinguishable"

    def __str__(self) -> str:
        lines = [f"{self.first} - {self.second}, {self.skill}:"]
        lines += [f"  seed {seed}: {d}" for seed, d in sorted(self.by_seed.items())]
        lines.append(f"  over seeds: {self.spread}; verdict: {self.verdict}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Record:
    """Item scores of named models for several training seeds and both held-out splits.

    ``scores[seed][name][split]`` is an `ItemScores`. Made by a ``bench/`` script (which
    trains each seed's mini-Pearl, merges it and scores it) and kept as JSON in
    ``pearl_edu/data/``, so a chapter prints every seed's result while it runs only one.
    """

    scores: dict[int, dict[str, dict[str, ItemScores]]]
    meta: dict

    @property
    def seeds(self) -> list[int]:
        return sorted(self.scores)

    @property
    def names(self) -> list[str]:
        return list(self.scores[self.seeds[0]])

    def get(self, seed: int, name: str, split: str = "test") -> ItemScores:
        return self.scores[seed][name][split]

    def skill(self, name: str, skill: str, split: str = "test") -> Spread:
        """One model's skill over the seeds."""
        return spread([getattr(self.get(s, name, split), skill) for s in self.seeds])

    def compare(self, first: str, second: str, skill: str, split: str = "test") -> Comparison:
        """``first`` minus ``second`` on ``skill``: paired per seed, and spread over seeds."""
        return Comparison(
            first,
            second,
            skill,
            {
                s: paired(self.get(s, first, split), self.get(s, second, split), skill)
                for s in self.seeds
            },
        )

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "scores": {
                str(seed): {
                    name: {split: items.to_json() for split, items in splits.items()}
                    for name, splits in models.items()
                }
                for seed, models in self.scores.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Record:
        return cls(
            scores={
                int(seed): {
                    name: {split: ItemScores.from_json(items) for split, items in splits.items()}
                    for name, splits in models.items()
                }
                for seed, models in data["scores"].items()
            },
            meta=dict(data["meta"]),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")
        return path

    @classmethod
    def load(cls, name_or_path: str | Path) -> Record:
        """A record by file path, or by name from ``pearl_edu/data/seeds/NAME.json``."""
        path = Path(name_or_path)
        if not path.suffix:
            path = DATA_DIR / f"{name_or_path}.json"
        return cls.from_json(json.loads(path.read_text()))


DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "seeds"


def seeds_command(
    doc: str,
    name: str,
    measure: Callable[[tuple[int, ...]], Record],
    summary: Callable[[Record], str],
    argv: Sequence[str] | None = None,
) -> Record:
    """The command line of a ``bench/seeds_*.py`` script: ``--seeds`` (0 1 2) and ``--out``
    (``pearl_edu/data/seeds/NAME.json``); measures the seeds, saves the record, prints
    ``summary`` of it and where it went. ``doc``'s first line is the command's description."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DATA_DIR / f"{name}.json")
    args = parser.parse_args(argv)
    record = measure(tuple(args.seeds))
    record.save(args.out)
    print(summary(record))
    print(f"\nwritten to {args.out}")
    return record


def mini_pearl(
    seed: int = 0, settings: minipearl.MiniPearlSettings | None = None
) -> minipearl.MiniPearl:
    """Mini-Pearl (the sibling regime unless ``settings`` says otherwise) for one training
    seed, trained once and then read from the cache (`minipearl.load_or_build_mini_pearl`)."""
    settings = dataclasses.replace(settings or minipearl.SIBLING_SETTINGS, seed=seed)
    return minipearl.load_or_build_mini_pearl(settings=settings)


def with_folders(recipe: str | Mapping, mini: minipearl.MiniPearl) -> str:
    """The recipe's YAML with the words ``base``, ``generalist`` and ``math`` replaced by
    ``mini``'s folders wherever they name a model (``model:`` or ``base_model:``)."""
    folders = {"base": mini.base, "generalist": mini.generalist, "math": mini.math}

    def swap(node):
        if isinstance(node, Mapping):
            return {
                key: str(folders[value])
                if key in ("model", "base_model") and isinstance(value, str) and value in folders
                else swap(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [swap(item) for item in node]
        return node

    loaded = yaml.safe_load(recipe) if isinstance(recipe, str) else recipe
    return yaml.safe_dump(swap(loaded), sort_keys=False)


def record(
    make: Callable[[minipearl.MiniPearl, Path], Mapping[str, str | Path]],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    settings: minipearl.MiniPearlSettings | None = None,
    splits: Sequence[str] = ("validation", "test"),
    meta: Mapping | None = None,
) -> Record:
    """Score the models that ``make(mini, scratch)`` returns, for every seed, on ``splits``.

    ``make`` gets each seed's mini-Pearl and a scratch folder, merges what it wants there,
    and returns ``{name: model folder}``; the three models of mini-Pearl itself are scored
    too, as ``base``, ``generalist`` and ``math``. The record's meta holds the date, the
    versions of pearl_edu and torch, the settings, and ``meta``.
    """
    scores: dict[int, dict[str, dict[str, ItemScores]]] = {}
    for seed in seeds:
        mini = mini_pearl(seed, settings)
        corpus = mini.settings.corpus()
        with tempfile.TemporaryDirectory(prefix="pearl-edu-record-") as scratch:
            folders = {"base": mini.base, "generalist": mini.generalist, "math": mini.math}
            folders.update(make(mini, Path(scratch)))
            scores[seed] = {
                name: {split: score_folder(folder, corpus, split) for split in splits}
                for name, folder in folders.items()
            }
    import pearl_edu

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "pearl_edu": pearl_edu.__version__,
        "torch": torch.__version__,
        "settings": repr(dataclasses.replace(settings or minipearl.SIBLING_SETTINGS)),
    }
    info.update(meta or {})
    return Record(scores, info)
