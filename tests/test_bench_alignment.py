"""Tests of the alignment benchmark over seeds: what it builds, at toy size, and the record it
wrote."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pearl_edu.teaching import alignment, evaluation, minipearl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_alignment  # noqa: E402

TINY = minipearl.ModelShape(
    num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)


def pretrain(folder: Path, init_seed: int | None) -> Path:
    settings = minipearl.MiniPearlSettings(
        shape=TINY, pretrain_steps=4, batch_size=8, seed=3, init_seed=init_seed
    )
    minipearl.pretrain_base(folder, settings)
    return folder


@pytest.fixture(scope="module")
def strangers(tmp_path_factory):
    root = tmp_path_factory.mktemp("strangers")
    return pretrain(root / "base", None), pretrain(root / "stranger", 4)


def test_a_stranger_differs_from_its_seed_only_in_its_initial_weights():
    settings = seeds_alignment.stranger_settings(2)
    assert settings.init_seed == 3 and settings.seed == 2
    assert settings == minipearl.MiniPearlSettings(seed=2, init_seed=3)


def test_recipes_name_both_models_at_the_midpoint():
    slerp = yaml.safe_load(seeds_alignment.recipe("SLERP", "/a", "/b"))
    assert slerp["merge_method"] == "slerp" and slerp["parameters"] == {"t": 0.5}
    assert slerp["base_model"] == "/a"
    assert [s["model"] for s in slerp["slices"][0]["sources"]] == ["/a", "/b"]
    linear = yaml.safe_load(seeds_alignment.recipe("linear", "/a", "/b"))
    assert linear["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in linear["models"]] == [0.5, 0.5]


def test_align_writes_a_permuted_copy_with_the_same_function(strangers, tmp_path):
    base, stranger = strangers
    found, aligned = seeds_alignment.align(base, stranger, tmp_path)
    original = minipearl.load_weights(stranger)
    written = minipearl.load_weights(aligned)
    shape = alignment.Shape.of(minipearl.load_model(base).config)
    expected = alignment.permute(original, found.permutations, shape)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert found.objectives[-1] >= found.objectives[0]
    ids = torch.arange(4, 20).reshape(2, 8)
    with torch.no_grad():
        before = minipearl.load_model(stranger)(input_ids=ids).logits
        after = minipearl.load_model(aligned)(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_the_record_holds_every_model_and_both_paths_for_three_seeds():
    record = evaluation.Record.load(seeds_alignment.NAME)
    assert record.seeds == [0, 1, 2]
    expected = {"base", "generalist", "math", "stranger", "stranger aligned"}
    expected |= {f"{m}{s}" for m in ("SLERP", "linear") for s in seeds_alignment.PAIRS}
    assert set(record.names) == expected
    assert record.meta["ts"] == list(seeds_alignment.TS)
    for seed in record.seeds:
        assert set(record.scores[seed]["SLERP aligned"]) == {"validation", "test"}
        for name in ("stranger", "stranger aligned"):
            found = record.meta["paths"][str(seed)][name]
            assert len(found["loss"]) == len(seeds_alignment.TS)
            assert found["low"] <= found["barrier"] <= found["high"]
        # both paths end at models with one function: the same loss at t = 1
        paths = record.meta["paths"][str(seed)]
        assert paths["stranger"]["loss"][-1] == pytest.approx(
            paths["stranger aligned"]["loss"][-1], abs=1e-4
        )
        permutations = record.meta["matchings"][str(seed)]["permutations"]
        assert sorted(permutations["residual"]) == list(range(64))
        assert np.all(np.diff(record.meta["matchings"][str(seed)]["objectives"]) >= -1e-9)
        # the aligned stranger computes what the stranger does: the same items right
        assert (
            record.get(seed, "stranger aligned").addition_right
            == record.get(seed, "stranger").addition_right
        )
