"""Tests of the benchmark over seeds of chapter 14 (merges with a specialist whose tokenizer
differs): what it trains and merges, at toy size, and the record it wrote."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.teaching import evaluation, minipearl, numbertokens

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_tokenizers  # noqa: E402

TINY = minipearl.ModelShape(
    num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8, seed=3
)
HEAD = "lm_head.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A toy mini-Pearl, its two specialists trained for a few steps in a cache of their own,
    and every merge of the benchmark."""
    mini = minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEARL_EDU_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(numbertokens, "NUMBER_STEPS", 3)
        folders = seeds_tokenizers.make(mini, tmp_path_factory.mktemp("merges"))
    return mini, folders


def test_every_merge_and_specialist_is_made(made):
    _, folders = made
    expected = set(seeds_tokenizers.OPTIONS) | {seeds_tokenizers.CONTROL, seeds_tokenizers.OWN}
    assert set(folders) == expected | {"number specialist", "control specialist"}
    assert all((folder / "config.json").is_file() for folder in folders.values())


def test_each_vocabulary_option_gives_its_rows(made):
    _, folders = made
    rows = {
        label: minipearl.load_weights(folder)[HEAD].shape[0] for label, folder in folders.items()
    }
    characters = len(minipearl.build_tokenizer())
    numbers = len(numbertokens.build_number_tokenizer())
    assert rows["base"] == characters == rows[seeds_tokenizers.CONTROL]
    assert rows["union"] == rows["union, zero fill"] == rows["union, zero forced"] == numbers
    assert rows[seeds_tokenizers.OWN] == characters and rows["number specialist"] == numbers
    forced = minipearl.load_weights(folders["union, zero forced"])[HEAD]
    union = minipearl.load_weights(folders["union"])[HEAD]
    assert torch.count_nonzero(forced[characters:]) == 0
    assert torch.count_nonzero(union[characters:]) > 0


def test_the_merges_use_the_right_specialist(made):
    mini, folders = made
    recorded = {
        label: yaml.safe_load((folders[label] / "mergekit_config.yml").read_text())
        for label in (seeds_tokenizers.CONTROL, seeds_tokenizers.OWN, "union")
    }
    models = {
        label: [m["model"] for m in config["slices"][0]["sources"]]
        for label, config in recorded.items()
    }
    assert models[seeds_tokenizers.CONTROL] == [
        str(mini.generalist),
        str(folders["control specialist"]),
    ]
    assert models[seeds_tokenizers.OWN] == [str(mini.generalist), str(mini.math)]
    assert models["union"] == [str(mini.generalist), str(folders["number specialist"])]
    assert recorded["union"]["tokenizer_source"] == "union"
    assert "tokenizer_source" not in recorded[seeds_tokenizers.OWN]


def test_the_record_holds_every_model_for_three_seeds():
    record = evaluation.Record.load(seeds_tokenizers.NAME)
    assert record.seeds == [0, 1, 2]
    expected = {"base", "generalist", "math", "number specialist", "control specialist"}
    expected |= set(seeds_tokenizers.OPTIONS) | {seeds_tokenizers.CONTROL, seeds_tokenizers.OWN}
    assert set(record.names) == expected
    assert record.meta["options"] == seeds_tokenizers.OPTIONS
    for seed in record.seeds:
        for name in expected:
            assert set(record.scores[seed][name]) == {"validation", "test"}
    for first, second in seeds_tokenizers.COMPARISONS.values():
        for skill in evaluation.SKILLS:
            assert len(record.compare(first, second, skill).by_seed) == 3
