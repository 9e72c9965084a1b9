"""Scores with their noise (pearl_edu.teaching.evaluation): paired intervals, McNemar, seeds."""

from __future__ import annotations

import math
import random

import pytest

from pearl_edu.teaching import evaluation, minipearl
from pearl_edu.teaching.evaluation import ItemScores


def scores(additions: list[bool], text_right: list[int] | None = None) -> ItemScores:
    text_right = text_right if text_right is not None else [5] * len(additions)
    return ItemScores(tuple(text_right), tuple([10] * len(text_right)), tuple(additions))


def test_mcnemar_matches_the_binomial_tail():
    # 30 won, 23 lost: the two-sided exact p-value is about 0.41.
    assert evaluation.mcnemar(30, 23) == pytest.approx(0.41, abs=0.01)
    assert evaluation.mcnemar(0, 0) == 1.0
    assert evaluation.mcnemar(5, 5) == 1.0
    assert evaluation.mcnemar(10, 0) == pytest.approx(2 / 2**10)
    assert evaluation.mcnemar(3, 9) == evaluation.mcnemar(9, 3)


def test_identical_models_differ_by_exactly_zero():
    rng = random.Random(0)
    a = scores([rng.random() < 0.6 for _ in range(200)], [rng.randrange(11) for _ in range(200)])
    for skill in evaluation.SKILLS:
        d = evaluation.paired(a, a, skill)
        assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
        assert d.verdict == "indistinguishable"


def test_pairing_narrows_the_interval_of_correlated_models():
    rng = random.Random(1)
    hard = [rng.random() < 0.5 for _ in range(300)]
    # The second model gets the same items right, plus 15 more: highly correlated.
    better = list(hard)
    flipped = [i for i, right in enumerate(hard) if not right][:15]
    for i in flipped:
        better[i] = True
    a, b = scores(better), scores(hard)
    p = evaluation.paired(a, b, "addition")
    u = evaluation.unpaired(a, b, "addition")
    assert p.estimate == pytest.approx(15 / 300) == u.estimate
    assert p.wins == 15 and p.losses == 0 and p.p < 1e-3
    assert p.high - p.low < (u.high - u.low) / 2
    assert p.verdict == "higher"
    assert u.verdict == "indistinguishable"


def test_a_few_flipped_items_are_within_the_noise():
    rng = random.Random(2)
    a_items = [rng.random() < 0.7 for _ in range(300)]
    b_items = list(a_items)
    # 10 won, 7 lost: +3 of 300.
    wrong = [i for i, right in enumerate(a_items) if not right]
    right = [i for i, r in enumerate(a_items) if r]
    for i in wrong[:10]:
        b_items[i] = True
    for i in right[:7]:
        b_items[i] = False
    d = evaluation.paired(scores(b_items), scores(a_items), "addition")
    assert (d.wins, d.losses) == (10, 7)
    assert d.low < 0 < d.high and d.verdict == "indistinguishable"
    assert d.p > 0.5


def test_text_difference_is_the_pooled_ratio_and_the_interval_covers_it():
    first = ItemScores((8, 3, 9), (10, 5, 12), (True, False, True))
    second = ItemScores((7, 3, 6), (10, 5, 12), (True, True, False))
    d = evaluation.paired(first, second, "text")
    assert d.estimate == pytest.approx((20 - 16) / 27)
    assert d.low <= d.estimate <= d.high
    assert first.text == pytest.approx(20 / 27)
    with pytest.raises(ValueError, match="same sentences"):
        evaluation.paired(first, ItemScores((1,), (2,), (True,)), "text")
    with pytest.raises(ValueError, match="skill"):
        evaluation.paired(first, second, "maths")


def test_standard_error_of_a_proportion():
    a = scores([True] * 60 + [False] * 40)
    expected = math.sqrt(0.6 * 0.4 / 100) * math.sqrt(100 / 99)
    assert evaluation.standard_error(a, "addition") == pytest.approx(expected)


def test_standard_error_of_a_published_score():
    # 60 of 100 right: the same as the item-level standard error.
    a = scores([True] * 60 + [False] * 40)
    assert evaluation.share_standard_error(0.6, 100) == pytest.approx(
        evaluation.standard_error(a, "addition")
    )
    # Scores in [0, 1] with mean 0.6 vary less than right-or-wrong ones: a bound.
    rng = random.Random(4)
    graded = [rng.uniform(0.2, 1.0) for _ in range(400)]
    mean = sum(graded) / len(graded)
    sd = math.sqrt(sum((g - mean) ** 2 for g in graded) / (len(graded) - 1))
    assert sd / math.sqrt(len(graded)) < evaluation.share_standard_error(mean, len(graded))
    with pytest.raises(ValueError):
        evaluation.share_standard_error(0.5, 1)
    with pytest.raises(ValueError):
        evaluation.share_standard_error(1.5, 10)


def test_spread_over_seeds():
    s = evaluation.spread([0.1, 0.3, 0.2])
    assert s.mean == pytest.approx(0.2) and s.sd == pytest.approx(0.1)
    assert (s.low, s.high) == (0.1, 0.3) and s.same_sign
    assert not evaluation.spread([0.1, -0.1]).same_sign
    assert evaluation.spread([0.4]).sd == 0.0
    with pytest.raises(ValueError):
        evaluation.spread([])


def test_record_round_trips_and_compares_seed_by_seed(tmp_path):
    rng = random.Random(3)

    def model(p):
        return scores([rng.random() < p for _ in range(120)])

    record = evaluation.Record(
        {seed: {"a": {"test": model(0.9)}, "b": {"test": model(0.3)}} for seed in (0, 1, 2)},
        {"note": "synthetic"},
    )
    again = evaluation.Record.load(record.save(tmp_path / "r.json"))
    assert again == record and again.seeds == [0, 1, 2] and again.names == ["a", "b"]
    comparison = again.compare("a", "b", "addition")
    assert comparison.verdict == "higher" and comparison.spread.same_sign
    assert "over seeds" in str(comparison)
    assert again.skill("a", "addition").mean > 0.8


def test_item_scores_agree_with_measure_skills(tiny_mini_pearl):
    mini, corpus = tiny_mini_pearl
    model = minipearl.load_model(mini)
    tokenizer = minipearl.load_tokenizer(mini)
    for split in ("validation", "test"):
        items = evaluation.item_scores(model, tokenizer, corpus, split)
        skills = minipearl.measure_skills(model, tokenizer, corpus, split=split)
        assert items.text == pytest.approx(skills.text, abs=1e-6)
        assert items.addition == skills.addition
        assert len(items.addition_right) == len(corpus.held_out(split)[1])


def test_the_splits_are_disjoint_and_kept_out_of_training():
    corpus = minipearl.make_corpus(sentences=200, test_sentences=30, test_problems=40)
    test_s, test_p = corpus.held_out("test")
    val_s, val_p = corpus.held_out("validation")
    assert len(val_s) == 30 and len(val_p) == 40
    assert not set(test_s) & set(val_s)
    assert not set(test_p) & set(val_p)
    training = set(corpus.train_problems) | set(corpus.pretrain_problems)
    assert not (set(test_p) | set(val_p)) & training
    assert not (set(test_s) | set(val_s)) & (
        set(corpus.train_sentences) | set(corpus.pretrain_sentences)
    )
    with pytest.raises(ValueError, match="split"):
        corpus.held_out("train")


@pytest.fixture(scope="module")
def tiny_mini_pearl(tmp_path_factory):
    """An untrained tiny mini-Pearl model and a small corpus: enough to compare scorers."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = minipearl.build_tokenizer()
    model = minipearl.new_model(tokenizer, minipearl.ModelShape(num_layers=1), seed=0)
    minipearl.save_model(model, tokenizer, folder)
    corpus = minipearl.make_corpus(sentences=50, test_sentences=12, test_problems=16)
    return folder, corpus


def test_with_folders_replaces_the_words_only_where_they_name_models(tmp_path):
    mini = minipearl.MiniPearl(
        tmp_path / "b", tmp_path / "g", tmp_path / "m", {}, minipearl.SIBLING_SETTINGS
    )
    recipe = """
models:
  - model: generalist
    parameters: {weight: 0.5}
  - model: math
    parameters: {weight: 0.5, note: base}
base_model: base
merge_method: ties
"""
    import yaml

    config = yaml.safe_load(evaluation.with_folders(recipe, mini))
    assert config["base_model"] == str(tmp_path / "b")
    assert [m["model"] for m in config["models"]] == [str(tmp_path / "g"), str(tmp_path / "m")]
    assert config["models"][1]["parameters"]["note"] == "base"  # not a model: left alone
    assert yaml.safe_load(evaluation.with_folders(yaml.safe_load(recipe), mini)) == config


def test_score_folder_loads_a_mixture_of_experts_as_a_mixtral(tiny_mini_pearl, tmp_path):
    """A Mixtral built from mini-Pearl is scored with its experts, not as a Mistral.

    Both experts are the model's own MLP and each token goes to one of them with weight 1,
    so the mixture computes what the model does and scores the same on every item; loaded
    as a Mistral, its MLPs would be missing and freshly initialised instead.
    """
    from pearl_edu.moe import build_moe

    folder, corpus = tiny_mini_pearl
    config = {
        "base_model": str(folder),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(folder)}, {"source_model": str(folder)}],
    }
    mixture = tmp_path / "mixture"
    build_moe(config, mixture, allow_all_same=True, progress=False)
    model = evaluation.load_model(mixture)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert type(evaluation.load_model(folder)).__name__ == "MistralForCausalLM"
    assert evaluation.score_folder(mixture, corpus) == evaluation.score_folder(folder, corpus)


def test_load_model_names_a_folder_without_config(tmp_path):
    from pearl_edu.errors import ModelError

    with pytest.raises(ModelError, match="no config.json"):
        evaluation.load_model(tmp_path)


def test_seeds_command_measures_the_seeds_saves_and_prints(tmp_path, capsys):
    class Measured:
        def __init__(self, seeds):
            self.seeds = seeds

        def save(self, path):
            path.write_text(repr(self.seeds))

    out = tmp_path / "x.json"
    argv = ["--seeds", "4", "5", "--out", str(out)]
    record = evaluation.seeds_command("A bench.\nMore.", "x", Measured, lambda r: "sum", argv)
    assert record.seeds == (4, 5) and out.read_text() == "(4, 5)"
    assert capsys.readouterr().out == f"sum\n\nwritten to {out}\n"
    with pytest.raises(SystemExit):
        evaluation.seeds_command("A bench.", "x", Measured, str, ["--seeds", "one"])
