"""Tests of the LoRA benchmark over seeds and of `pearl_edu.teaching.lora`: what they train,
apply, merge and extract, at toy size, and the record the benchmark wrote."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.teaching import evaluation, lora, minipearl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds_lora  # noqa: E402

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
def cache(tmp_path_factory):
    """A cache of its own, so that the tests train their adapters and leave the user's alone."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("PEARL_EDU_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def made(mini, cache, tmp_path_factory):
    return seeds_lora.make(mini, tmp_path_factory.mktemp("lora"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return minipearl.load_weights(folder)


def test_an_adapter_is_trained_once_then_read_from_the_cache(mini, cache):
    first = lora.load_or_train_adapter(mini, "math")
    assert first.parent == cache / "mini-pearl-lora"
    stamp = (first / "adapter_model.safetensors").stat().st_mtime_ns
    again = lora.load_or_train_adapter(mini, "math")
    assert again == first and (again / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    other = lora.load_or_train_adapter(mini, "math", lora.LoraSettings(rank=4, alpha=8))
    assert other != first
    factors = lora.adapter_factors(other)
    assert set(factors) == {
        f"model.layers.{i}.{part}.{name}.weight"
        for i in range(TINY.num_layers)
        for part, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for name in names
    }
    assert all(a.shape[0] == 4 and b.shape[1] == 4 for a, b in factors.values())
    assert lora.adapter_scale(other) == 2.0


def test_training_leaves_the_base_as_it_was_and_changes_only_the_factors(mini):
    model, losses = lora.train_adapter(mini, "generalist")
    assert len(losses) == FEW_STEPS.generalist_steps
    base = weights(mini.base)
    merged = model.merge_and_unload().state_dict()
    norms = [n for n in base if "norm" in n or "embed" in n or "lm_head" in n]
    assert all(torch.equal(merged[n].to(torch.bfloat16), base[n]) for n in norms)
    assert not torch.equal(merged[KEY].to(torch.bfloat16), base[KEY])


def test_every_model_of_the_record_is_made(made):
    extracted = {seeds_lora.extracted_name(p, r) for p, r in seeds_lora.extractions()}
    assert len(extracted) == 2 * (len(seeds_lora.RANKS) + 1)
    assert set(made) == set(seeds_lora.recipes()) | extracted


def test_an_applied_adapter_is_the_base_plus_its_change(mini, made):
    adapter = lora.load_or_train_adapter(mini, "math", seeds_lora.SETTINGS)
    a, b = lora.adapter_factors(adapter)[KEY]
    base = weights(mini.base)
    expected = (base[KEY].float() + seeds_lora.SETTINGS.scale * (b.float() @ a.float())).to(
        torch.bfloat16
    )
    applied = weights(made["LoRA math"])
    assert torch.equal(applied[KEY], expected)
    assert torch.equal(applied["model.norm.weight"], base["model.norm.weight"])


def test_task_arithmetic_of_adapters_adds_both_changes(mini, made):
    base = weights(mini.base)
    changes = [
        weights(made[f"LoRA {p}"])[KEY].float() - base[KEY].float() for p in ("generalist", "math")
    ]
    merged = weights(made["LoRA task_arithmetic"])[KEY].float()
    assert torch.allclose(merged, base[KEY].float() + sum(changes), atol=2e-2)
    full = weights(made["full task_arithmetic"])[KEY].float()
    tuned = [weights(getattr(mini, p))[KEY].float() for p in minipearl.PARENTS]
    assert torch.allclose(full, tuned[0] + tuned[1] - base[KEY].float(), atol=2e-2)


def test_extraction_at_full_rank_is_the_fine_tune(mini, made):
    base, tuned = weights(mini.base), weights(mini.math)
    full_rank = weights(made[seeds_lora.extracted_name("math", 64)])
    assert torch.allclose(full_rank[KEY].float(), tuned[KEY].float(), atol=2e-2)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(full_rank[name], tuned[name])  # saved whole
    linear_only = weights(made[seeds_lora.extracted_name("math", None)])
    assert torch.equal(linear_only[KEY], full_rank[KEY])
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(linear_only[name], base[name])  # left as the base's
    # A truncated SVD keeps less of the change at a lower rank (up to bfloat16's rounding).
    lengths = [
        (
            weights(made[seeds_lora.extracted_name("math", r)])[KEY].float() - base[KEY].float()
        ).norm()
        for r in (1, 4, 64)
    ]
    assert lengths[0] < lengths[1] < lengths[2] * 1.01


def test_the_recipes_name_the_models_as_words():
    recipes = seeds_lora.recipes()
    assert yaml.safe_load(recipes["LoRA ties"])["models"][0] == {
        "model": "base+lora-generalist",
        "parameters": {"weight": 1.0, "density": 0.5},
    }
    assert yaml.safe_load(recipes["full linear"])["models"][1]["model"] == "math"
    assert yaml.safe_load(recipes["LoRA math"])["merge_method"] == "passthrough"


def test_the_record_holds_every_model_for_three_seeds_on_both_splits():
    record = evaluation.Record.load(seeds_lora.NAME)
    assert record.seeds == [0, 1, 2]
    extracted = {seeds_lora.extracted_name(p, r) for p, r in seeds_lora.extractions()}
    names = {"base", "generalist", "math"} | set(seeds_lora.recipes()) | extracted
    assert {n: yaml.safe_load(t) for n, t in record.meta["recipes"].items()} == {
        n: yaml.safe_load(t) for n, t in seeds_lora.recipes().items()
    }
    assert record.meta["lora"] == repr(seeds_lora.SETTINGS)
    assert record.meta["ranks"] == list(seeds_lora.RANKS)
    tokenizer = minipearl.build_tokenizer()
    for seed in record.seeds:
        assert set(record.scores[seed]) == names
        corpus = dataclasses.replace(minipearl.SIBLING_SETTINGS, seed=seed).corpus()
        for split in ("validation", "test"):
            sentences, problems = corpus.held_out(split)
            mask = minipearl.sentence_examples(tokenizer, sentences).loss_mask[:, 1:]
            for model in names:
                items = record.get(seed, model, split)
                assert items.text_total == tuple(mask.sum(1).tolist()), (seed, model, split)
                assert len(items.addition_right) == len(problems)
