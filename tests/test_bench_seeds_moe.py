"""Tests of the mixture-of-experts benchmark over seeds: what it builds, at toy size, and the
record it wrote."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pearl_edu.teaching import evaluation, minipearl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_moe  # noqa: E402

TINY = minipearl.ModelShape(
    num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8, seed=3
)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A toy mini-Pearl, trained for a few steps."""
    return minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)


@pytest.fixture(scope="module")
def built(mini, tmp_path_factory):
    return seeds_moe.make(mini, tmp_path_factory.mktemp("moe"))


def test_prompts_come_from_the_training_split():
    corpus = minipearl.make_corpus()
    by_expert = seeds_moe.prompts(corpus)
    assert set(by_expert) == {"generalist", "math"}
    assert all(len(p) == seeds_moe.PROMPTS for p in by_expert.values())
    assert set(by_expert["generalist"]) <= set(corpus.train_sentences)
    held_out = {minipearl.addition_prompt(a, b) for a, b in corpus.test_problems}
    held_out |= {minipearl.addition_prompt(a, b) for a, b in corpus.validation_problems}
    assert not any(p[:6] in held_out for p in by_expert["math"])
    assert by_expert["math"][0].count("=") == 1 and len(by_expert["math"][0]) == 9


def test_with_folders_names_the_parents(mini):
    config = yaml.safe_load(
        seeds_moe.with_folders(seeds_moe.moe_config("hidden", mini.settings.corpus()), mini)
    )
    assert config["base_model"] == str(mini.generalist)
    assert [e["source_model"] for e in config["experts"]] == [str(mini.generalist), str(mini.math)]
    assert config["experts_per_token"] == 1 and config["gate_mode"] == "hidden"


def test_make_builds_three_mixtures_and_the_slerp_merge(mini, built):
    assert set(built) == {seeds_moe.moe_name(m) for m in seeds_moe.GATE_MODES} | {seeds_moe.SLERP}
    generalist = minipearl.load_weights(mini.generalist)
    specialist = minipearl.load_weights(mini.math)
    for mode in seeds_moe.GATE_MODES:
        folder = built[seeds_moe.moe_name(mode)]
        assert type(evaluation.load_model(folder)).__name__ == "MixtralForCausalLM"
        weights = load_file(next(folder.glob("*.safetensors")))
        down = weights["model.layers.1.mlp.experts.down_proj"]
        assert torch.equal(down[0], generalist["model.layers.1.mlp.down_proj.weight"])
        assert torch.equal(down[1], specialist["model.layers.1.mlp.down_proj.weight"])
        key = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(weights[key], generalist[key])
    gates = [
        load_file(next(built[seeds_moe.moe_name(m)].glob("*.safetensors")))[
            "model.layers.0.mlp.gate.weight"
        ]
        for m in seeds_moe.GATE_MODES
    ]
    assert not torch.equal(gates[0], gates[1]) and not torch.equal(gates[1], gates[2])
    assert (built[seeds_moe.SLERP] / "config.json").is_file()


def test_the_record_holds_every_model_for_three_seeds():
    record = evaluation.Record.load(seeds_moe.NAME)
    assert record.seeds == [0, 1, 2]
    expected = {"base", "generalist", "math", seeds_moe.SLERP}
    expected |= {seeds_moe.moe_name(m) for m in seeds_moe.GATE_MODES}
    assert set(record.names) == expected
    assert record.meta["configs"] == {
        seeds_moe.moe_name(m): seeds_moe.moe_config(m, minipearl.make_corpus())
        for m in seeds_moe.GATE_MODES
    }
    for seed in record.seeds:
        assert set(record.scores[seed]["MoE hidden"]) == {"validation", "test"}
