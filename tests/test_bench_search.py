"""Tests of the recipe search over seeds (bench/seeds_search.py): what it merges, that it runs
again to the same recipes, at toy size, and the record it wrote."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_search  # noqa: E402

TINY = minipearl.ModelShape(
    num_layers=seeds_search.LAYERS,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    num_kv_heads=1,
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8, seed=3
)


def raw_skills(scores, parents):
    """A toy trained for a few steps gains nothing over its base: score the skills as they are."""
    return [scores.text, scores.addition]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A toy mini-Pearl with mini-Pearl's four layers, trained for a few steps."""
    return minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)


def test_a_point_is_a_recipe_with_a_t_per_attention_and_mlp_and_one_for_the_rest():
    point = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.12345]
    schedule = pearl_edu.schedule(pearl_edu.load_config(seeds_search.schedule_recipe(point)))
    assert schedule.column("t", "self_attn") == [0.1, 0.2, 0.3, 0.4]
    assert schedule.column("t", "mlp") == [0.5, 0.6, 0.7, 0.8]
    assert set(schedule.column("t", "other")) == {0.123}  # rounded to three decimals
    assert {v["t"] for v in schedule.outside_layers.values()} == {0.123}


def test_the_fixed_schedules_are_pearls_and_the_midpoint():
    pearl = pearl_edu.schedule(pearl_edu.load_config(seeds_search.pearl_schedule_recipe()))
    assert pearl.column("t", "self_attn")[0] == 0 and pearl.column("t", "self_attn")[-1] == 1
    assert pearl.column("t", "mlp")[0] == 1 and pearl.column("t", "mlp")[-1] == 0
    uniform = yaml.safe_load(seeds_search.uniform_recipe())["parameters"]["t"]
    assert [f["value"] for f in uniform] == [[0.5] * 4, [0.5] * 4, 0.5]


def test_the_search_is_seeded_bounded_and_runs_again_to_the_same_recipes(
    mini, tmp_path, monkeypatch
):
    monkeypatch.setattr(seeds_search, "GENERATIONS", 1)
    monkeypatch.setattr(seeds_search, "shares", raw_skills)
    first, folders = seeds_search.search(mini, tmp_path / "first")
    again, _ = seeds_search.search(mini, tmp_path / "again")
    assert first == again
    assert len(first) == 10  # cma's default population for nine numbers: 4 + 3 ln 9
    for text in first:
        t = yaml.safe_load(text)["parameters"]["t"]
        values = [*t[0]["value"], *t[1]["value"], t[2]["value"]]
        assert len(values) == 9 and all(0 <= v <= 1 for v in values)
    merged = minipearl.load_weights(folders[0])
    config = pearl_edu.load_config(evaluation.with_folders(first[0], mini))
    pearl_edu.merge(config, tmp_path / "by-hand", progress=False)
    by_hand = minipearl.load_weights(tmp_path / "by-hand")
    assert all(merged[k].equal(by_hand[k]) for k in by_hand)  # the first trial's merge


def test_make_names_every_trial_and_the_two_fixed_schedules(mini, tmp_path, monkeypatch):
    monkeypatch.setattr(seeds_search, "GENERATIONS", 1)
    monkeypatch.setattr(seeds_search, "shares", raw_skills)
    folders = seeds_search.make(mini, tmp_path)
    assert list(folders) == [f"trial {i}" for i in range(10)] + ["Pearl schedule", "t 0.5"]
    assert all((folder / "config.json").is_file() for folder in folders.values())
    assert seeds_search.RECIPES[mini.settings.seed]["t 0.5"] == seeds_search.uniform_recipe()


def test_the_record_holds_every_trial_of_three_seeds_on_both_splits():
    record = evaluation.Record.load(seeds_search.NAME)
    assert record.seeds == [0, 1, 2]
    trials = seeds_search.trials(record)
    assert trials == [f"trial {i}" for i in range(50)]
    assert set(record.names) == {*trials, "Pearl schedule", "t 0.5", "base", "generalist", "math"}
    assert record.meta["generations"] == seeds_search.GENERATIONS == 5
    assert record.meta["search_seed"] == seeds_search.SEARCH_SEED
    for seed in record.seeds:
        recipes = record.meta["recipes"][str(seed)]
        assert recipes["Pearl schedule"] == seeds_search.pearl_schedule_recipe()
        assert set(record.scores[seed]["trial 0"]) == {"validation", "test"}
    assert [seeds_search.winner(record, s) for s in record.seeds] == [
        "trial 47",
        "trial 40",
        "trial 33",
    ]
