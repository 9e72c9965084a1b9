"""Tests of the data-merging benchmark over seeds: what it merges, at toy size, and the record
it wrote."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pearl_edu
from pearl_edu.teaching import datamerge, evaluation, minipearl
from pearl_edu.ulp import same_bits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_data_merging  # noqa: E402

TINY = minipearl.ModelShape(
    num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8, seed=3
)
KEY = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A toy mini-Pearl, trained for a few steps."""
    return minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)


def test_recipes_are_the_data_free_merges_of_the_parents():
    recipes = {name: yaml.safe_load(text) for name, text in seeds_data_merging.recipes().items()}
    assert set(recipes) == {"average", "task arithmetic", "SLERP t=0.5"}
    assert recipes["average"]["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in recipes["average"]["models"]] == [0.5, 0.5]
    arithmetic = recipes["task arithmetic"]
    assert arithmetic["base_model"] == "base"
    assert [m["parameters"]["weight"] for m in arithmetic["models"]] == [1.0, 1.0]
    assert recipes["SLERP t=0.5"]["parameters"] == {"t": 0.5}


def test_make_merges_every_method_and_size(mini, tmp_path, monkeypatch):
    monkeypatch.setattr(seeds_data_merging, "SIZES", (2, 4))
    seeds_data_merging.TIMINGS.clear()
    folders = seeds_data_merging.make(mini, tmp_path)
    expected = set(seeds_data_merging.recipes())
    expected |= {seeds_data_merging.fisher_name(n) for n in (2, 4)}
    expected |= {
        seeds_data_merging.regmean_name(n, a) for n in (2, 4) for a in seeds_data_merging.ALPHAS
    }
    assert set(folders) == expected
    parents = [minipearl.load_weights(getattr(mini, p)) for p in minipearl.PARENTS]
    slerp = minipearl.load_weights(folders["SLERP t=0.5"])[KEY]
    assert same_bits(slerp, pearl_edu.slerp(parents[0][KEY], parents[1][KEY], 0.5))
    grams = datamerge.parent_statistics(mini, "gram", 4)
    expected_regmean = datamerge.regmean_merge(
        parents, [grams[p] for p in minipearl.PARENTS], alpha=0.5
    )[KEY].bfloat16()
    written = minipearl.load_weights(folders[seeds_data_merging.regmean_name(4, 0.5)])[KEY]
    assert torch.equal(written, expected_regmean)
    timings = seeds_data_merging.TIMINGS[str(FEW_STEPS.seed)]
    assert timings["gram n=4"] > 0 and timings["fisher n=2"] > 0
    assert timings["gram bytes"] == 8 * sum(
        m.in_features**2
        for m in minipearl.load_model(mini.math).modules()
        if isinstance(m, torch.nn.Linear)
    )


def test_the_record_holds_every_model_for_three_seeds_on_both_splits():
    record = evaluation.Record.load(seeds_data_merging.NAME)
    assert record.seeds == [0, 1, 2]
    sizes, alphas = record.meta["sizes"], record.meta["alphas"]
    assert sizes == list(seeds_data_merging.SIZES) and alphas == list(seeds_data_merging.ALPHAS)
    names = {"base", "generalist", "math"} | set(seeds_data_merging.recipes())
    names |= {seeds_data_merging.fisher_name(n) for n in sizes}
    names |= {seeds_data_merging.regmean_name(n, a) for n in sizes for a in alphas}
    assert {n: yaml.safe_load(t) for n, t in record.meta["recipes"].items()} == {
        n: yaml.safe_load(t) for n, t in seeds_data_merging.recipes().items()
    }
    tokenizer = minipearl.build_tokenizer()
    for seed in record.seeds:
        assert set(record.scores[seed]) == names
        assert set(record.meta["seconds"][str(seed)]) >= {f"gram n={n}" for n in sizes}
        corpus = dataclasses.replace(minipearl.SIBLING_SETTINGS, seed=seed).corpus()
        for split in ("validation", "test"):
            sentences, problems = corpus.held_out(split)
            mask = minipearl.sentence_examples(tokenizer, sentences).loss_mask[:, 1:]
            for model in names:
                items = record.get(seed, model, split)
                assert items.text_total == tuple(mask.sum(1).tolist()), (seed, model, split)
                assert len(items.addition_right) == len(problems)
    assert record.get(0, "generalist") != record.get(1, "generalist")
