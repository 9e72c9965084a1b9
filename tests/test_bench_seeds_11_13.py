"""Tests of the sphere and pruning benchmarks over seeds: what they merge, at toy size, and
the records they wrote."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pearl_edu
from pearl_edu.core import model_stock, sphere
from pearl_edu.teaching import evaluation, minipearl
from pearl_edu.ulp import same_bits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_pruning  # noqa: E402
import seeds_sphere  # noqa: E402

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


@pytest.fixture(scope="module")
def sphere_models(mini, tmp_path_factory):
    seeds_sphere.CHANGE_LENGTHS.clear()
    return seeds_sphere.make(mini, tmp_path_factory.mktemp("sphere"))


def parts(mini):
    return [minipearl.load_weights(getattr(mini, p)) for p in ("base", "generalist", "math")]


def test_with_folders_replaces_the_words_only_where_they_name_models(mini):
    text = seeds_sphere.with_folders(seeds_sphere.RECIPES["nuslerp"], mini)
    config = yaml.safe_load(text)
    assert config["base_model"] == str(mini.base)
    assert [m["model"] for m in config["models"]] == [str(mini.generalist), str(mini.math)]
    assert config["models"][0]["parameters"] == {"weight": 0.5}
    pruning_text = seeds_pruning.with_folders(seeds_pruning.recipe("ties", 0.5), mini)
    assert yaml.safe_load(pruning_text)["base_model"] == str(mini.base)


def test_sphere_merges_are_the_methods_of_the_chapter(mini, sphere_models):
    base, general, special = parts(mini)
    merged = {name: minipearl.load_weights(folder) for name, folder in sphere_models.items()}
    assert set(merged) == set(seeds_sphere.RECIPES)
    assert same_bits(
        merged["nuslerp"][KEY],
        sphere.nuslerp([general[KEY], special[KEY]], [0.5, 0.5], base=base[KEY]),
    )
    assert same_bits(
        merged["model_stock"][KEY], model_stock.model_stock(base[KEY], [general[KEY], special[KEY]])
    )
    assert same_bits(
        merged["karcher"][KEY],
        sphere.karcher_mean([general[KEY], special[KEY], base[KEY]], [1 / 3] * 3),
    )
    assert same_bits(merged["slerp"][KEY], pearl_edu.slerp(general[KEY], special[KEY], 0.5))


def test_change_length_is_one_for_the_plain_average(mini, tmp_path, sphere_models):
    average = (
        "merge_method: linear\nmodels:\n  - {model: generalist, parameters: {weight: 0.5}}\n"
        "  - {model: math, parameters: {weight: 0.5}}\ndtype: float32\n"
    )
    out = tmp_path / "average"
    pearl_edu.merge(
        pearl_edu.load_config(seeds_sphere.with_folders(average, mini)), out, progress=False
    )
    assert seeds_sphere.change_length(mini, out) == pytest.approx(1.0, abs=1e-6)
    assert seeds_sphere.change_length(mini, mini.base) == 0.0
    lengths = seeds_sphere.CHANGE_LENGTHS[str(FEW_STEPS.seed)]
    assert set(lengths) == set(seeds_sphere.RECIPES)
    assert lengths["karcher"] < lengths["slerp"]  # the base counts as a third model


def test_task_vector_cosines_per_tensor_and_whole(mini):
    base, general, special = parts(mini)
    cosines = seeds_sphere.task_vector_cosines(mini)
    assert set(cosines) == set(base) | {"(all)"}
    g, s = (
        (general[KEY].double() - base[KEY].double()),
        (special[KEY].double() - base[KEY].double()),
    )
    assert cosines[KEY] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(g.flatten(), s.flatten(), dim=0))
    )
    whole = [
        torch.cat([(w[n].double() - base[n].double()).flatten() for n in base])
        for w in (general, special)
    ]
    expected = float(whole[0] @ whole[1] / (whole[0].norm() * whole[1].norm()))
    assert cosines["(all)"] == pytest.approx(expected, abs=1e-12)


def test_exact_slerp_and_the_errors_of_bfloat16_results(mini):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    halfway = seeds_sphere.exact_slerp(a, b, 0.5)
    assert halfway.dtype == torch.float64
    assert torch.allclose(halfway, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]).double())
    errors = seeds_sphere.slerp_errors(mini)
    assert 0 < errors["slerp"] < 2**-8  # within bfloat16's rounding
    assert errors["nuslerp"] > errors["slerp"]


def test_pruning_recipes_cover_the_grid_the_gammas_and_the_sums():
    recipes = seeds_pruning.recipes()
    grid = 2 * len(seeds_pruning.DENSITIES) * (2 + 2 * len(seeds_pruning.DRAWS))
    assert len(recipes) == grid + len(seeds_pruning.GAMMAS) - 1 + len(seeds_pruning.DRAWS)
    dare = yaml.safe_load(recipes["DARE rescaled 0.3 draw 1"])
    assert dare["merge_method"] == "dare_ties" and dare["random_seed"] == 1
    assert dare["parameters"] == {"normalize": True, "rescale": True}
    assert dare["models"][1]["parameters"] == {"weight": 1.0, "density": 0.3}
    summed = yaml.safe_load(recipes["DARE summed 0.5 draw 0"])
    assert summed["parameters"] == {"normalize": False, "rescale": True}
    crumbs = yaml.safe_load(recipes["Breadcrumbs gamma 0.1"])
    assert crumbs["models"][0]["parameters"]["gamma"] == 0.1
    assert "Breadcrumbs gamma 0.01" not in recipes  # the default, in the grid
    assert seeds_pruning.model_name("TIES", False, 0.8) in recipes


def test_pruning_make_merges_every_recipe_with_its_draws(mini, tmp_path):
    folders = seeds_pruning.make(mini, tmp_path)
    assert set(folders) == set(seeds_pruning.recipes())
    first, second = (
        minipearl.load_weights(folders[f"DARE rescaled 0.5 draw {d}"])[KEY] for d in (0, 1)
    )
    assert not torch.equal(first, second)  # two draws, two masks
    base, general, special = parts(mini)
    ties = minipearl.load_weights(folders["TIES as kept 0.5"])[KEY]
    expected = pearl_edu.merge_tensor(
        "ties",
        [base[KEY], general[KEY], special[KEY]],
        0,
        {"normalize": 1.0, "rescale": 0.0, "lambda": 1.0, "int8_mask": 0.0},
        input_params=[{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
    )
    assert same_bits(ties, expected)


@pytest.mark.parametrize(
    ("name", "script"),
    [("sphere", seeds_sphere), ("pruning", seeds_pruning)],
)
def test_the_records_hold_every_model_for_three_seeds_on_both_splits(name, script):
    record = evaluation.Record.load(name)
    assert record.seeds == [0, 1, 2]
    recipes = script.recipes() if name == "pruning" else dict(script.RECIPES)
    names = {"base", "generalist", "math"} | set(recipes)
    assert {n: yaml.safe_load(t) for n, t in record.meta["recipes"].items()} == {
        n: yaml.safe_load(r) if isinstance(r, str) else r for n, r in recipes.items()
    }
    tokenizer = minipearl.build_tokenizer()
    for seed in record.seeds:
        assert set(record.scores[seed]) == names
        corpus = dataclasses.replace(minipearl.SIBLING_SETTINGS, seed=seed).corpus()
        for split in ("validation", "test"):
            sentences, problems = corpus.held_out(split)
            mask = minipearl.sentence_examples(tokenizer, sentences).loss_mask[:, 1:]
            expected_totals = tuple(mask.sum(1).tolist())
            for model in names:
                items = record.get(seed, model, split)
                assert items.text_total == expected_totals, (seed, model, split)
                assert len(items.addition_right) == len(problems)
    assert record.get(0, "generalist") != record.get(1, "generalist")
    if name == "sphere":
        for seed in ("0", "1", "2"):
            assert set(record.meta["change_lengths"][seed]) == set(recipes)
            assert 0 < record.meta["slerp_errors"][seed]["slerp"] < 2**-8
            assert -1 <= record.meta["task_vector_cosines"][seed]["(all)"] <= 1
