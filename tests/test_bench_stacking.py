"""Tests of the stacking benchmark: what it builds, at toy size, and the record it wrote."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import pearl_edu
from pearl_edu.teaching import evaluation, minipearl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_stacking  # noqa: E402

TINY = minipearl.ModelShape(
    num_layers=4, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8, seed=3
)
DEPTHS = {
    "depth up-scaled": 6,
    "generalist twice": 8,
    "frankenmerge": 6,
    "interleaved": 6,
    "layer 2 removed": 3,
    "reversed frankenmerge": 6,
    "sibling base on top": 4,
    "stranger on top": 4,
}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors |= safetensors.torch.load_file(file)
    return tensors


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A toy mini-Pearl and every model the benchmark makes of it."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEARL_EDU_CACHE", str(cache))
        mini = minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)
        models = seeds_stacking.make(mini, tmp_path_factory.mktemp("scratch"))
    return mini, models


def test_make_builds_every_model_the_chapter_compares(built):
    _, models = built
    expected = set(seeds_stacking.STACKS)
    expected |= {f"scaled {s}" for s in seeds_stacking.SCALES}
    expected |= {f"{name} repaired" for name in seeds_stacking.REPAIRED}
    expected |= {"slerp 0.5"}
    assert set(models) == expected
    for name, depth in DEPTHS.items():
        assert minipearl.load_model(models[name]).config.num_hidden_layers == depth, name


def test_stacks_copy_the_layers_their_ranges_name(built):
    mini, models = built
    generalist, specialist = weights(mini.generalist), weights(mini.math)
    frank = weights(models["frankenmerge"])
    key = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(frank[key.format(2)], generalist[key.format(2)])
    assert torch.equal(frank[key.format(3)], specialist[key.format(1)])
    assert torch.equal(frank["lm_head.weight"], specialist["lm_head.weight"])


def test_the_stranger_is_another_start_on_the_same_data(built):
    mini, models = built
    stranger = seeds_stacking.stranger_settings(mini.settings)
    assert stranger.corpus() == mini.settings.corpus() and stranger.init_seed == 4
    on_top, base = weights(models["stranger on top"]), weights(mini.base)
    key = "model.layers.3.self_attn.q_proj.weight"
    assert not torch.equal(on_top[key], base[key])
    assert torch.equal(weights(models["sibling base on top"])[key], base[key])


def test_scaled_copies_multiply_only_the_output_projections(built):
    mini, models = built
    generalist, scaled = weights(mini.generalist), weights(models["scaled 0.5"])
    for name in ("self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj"):
        factor = 0.5 if name != "self_attn.q_proj" else 1.0
        copy = scaled[f"model.layers.3.{name}.weight"].float()
        original = generalist[f"model.layers.1.{name}.weight"].float()
        assert torch.equal(copy, factor * original), name


def test_repair_trains_and_keeps_float32(built):
    mini, models = built
    repaired = weights(models["generalist repaired"])
    original = weights(mini.generalist)
    assert all(t.dtype == torch.float32 for t in repaired.values())
    assert any(not torch.equal(repaired[k], original[k].float()) for k in original)


def test_passthrough_recipe_reads_back_as_its_slices():
    config = pearl_edu.load_config(
        seeds_stacking.passthrough_recipe(seeds_stacking.STACKS["interleaved"])
    )
    rows = pearl_edu.schedule(config).rows
    assert [row.sources[0] for row in rows] == [
        ("generalist", 0),
        ("generalist", 1),
        ("math", 1),
        ("math", 2),
        ("generalist", 2),
        ("generalist", 3),
    ]


def test_the_record_holds_every_model_for_three_seeds_on_both_splits():
    record = evaluation.Record.load("stacking")
    assert record.seeds == [0, 1, 2]
    names = {"base", "generalist", "math"} | set(seeds_stacking.STACKS)
    names |= {f"scaled {s}" for s in seeds_stacking.SCALES}
    names |= {f"{name} repaired" for name in seeds_stacking.REPAIRED} | {"slerp 0.5"}
    meta = seeds_stacking.meta()
    for key in ("stacks", "scales", "repaired", "repair_steps"):
        assert record.meta[key] == meta[key], key
    assert record.meta["settings"] == repr(minipearl.SIBLING_SETTINGS)
    tokenizer = minipearl.build_tokenizer()
    for seed in record.seeds:
        assert set(record.scores[seed]) == names
        corpus = dataclasses.replace(minipearl.SIBLING_SETTINGS, seed=seed).corpus()
        for split in ("validation", "test"):
            sentences, problems = corpus.held_out(split)
            mask = minipearl.sentence_examples(tokenizer, sentences).loss_mask[:, 1:]
            for name in names:  # scored on this seed's held-out items of this split
                items = record.get(seed, name, split)
                assert items.text_total == tuple(mask.sum(1).tolist()), (seed, name, split)
                assert len(items.addition_right) == len(problems) == 300
    # Seeds differ: the record is not one seed copied three times.
    assert record.get(0, "generalist") != record.get(1, "generalist")
