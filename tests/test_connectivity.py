"""Tests of the straight path between two models, the loss on it and the barrier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pearl_edu.teaching import connectivity, minipearl

TINY = minipearl.ModelShape(
    num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)


def test_linear_path_runs_from_one_end_to_the_other_in_float32():
    first = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    second = {"w": torch.tensor([3.0, -2.0], dtype=torch.bfloat16)}
    assert torch.equal(connectivity.linear_path(first, second, 0.0)["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(connectivity.linear_path(first, second, 1.0)["w"], torch.tensor([3.0, -2.0]))
    middle = connectivity.linear_path(first, second, 0.25)["w"]
    assert middle.dtype == torch.float32
    assert torch.allclose(middle, torch.tensor([1.5, 1.0]))


def test_excess_over_chord_and_barrier():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    # A loss that falls from 2 to 1 in a straight line has no barrier at all.
    assert np.allclose(connectivity.excess_over_chord(ts, [2, 1.75, 1.5, 1.25, 1]), 0)
    assert connectivity.barrier(ts, [2, 1.75, 1.5, 1.25, 1]) == pytest.approx(0)
    # A bump of 0.7 above the chord in the middle.
    assert connectivity.barrier(ts, [2, 1.9, 2.2, 1.4, 1]) == pytest.approx(0.7)
    # A path below its chord: the largest excess is at the ends, 0.
    assert connectivity.barrier(ts, [2, 1.2, 1.0, 0.9, 1]) == pytest.approx(0)


def test_a_path_must_run_from_zero_to_one():
    with pytest.raises(ValueError, match="t = 0"):
        connectivity.barrier([0.1, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="t = 0"):
        connectivity.barrier([0.0, 0.9], [1.0, 1.0])


def _points(means: list[float], spread: float, seed: int = 0) -> list[connectivity.PathPoint]:
    """A path whose per-example losses scatter by ``spread`` around the given means."""
    rng = np.random.default_rng(seed)
    ts = np.linspace(0, 1, len(means))
    skills = minipearl.Skills(text=0.5, addition=0.5)
    noise_text = rng.normal(0, spread, 300)  # the same examples at every point
    noise_addition = rng.normal(0, spread, 300)
    return [
        connectivity.PathPoint(
            t=float(t),
            skills=skills,
            text_losses=mean + noise_text,
            addition_losses=mean + noise_addition,
        )
        for t, mean in zip(ts, means, strict=True)
    ]


def test_path_barrier_finds_a_clear_barrier():
    found = connectivity.path_barrier(_points([1.0, 1.6, 2.5, 1.5, 1.0], spread=0.5), draws=200)
    assert found.height == pytest.approx(1.5, abs=1e-9)
    assert found.at_t == 0.5
    assert found.clear and found.low < found.height < found.high
    assert found.dip == 0.0


def test_path_barrier_of_a_convex_path_is_not_clear():
    found = connectivity.path_barrier(_points([1.0, 0.8, 0.75, 0.8, 1.0], spread=0.5), draws=200)
    assert found.height == pytest.approx(0.0, abs=1e-9)
    assert found.dip == pytest.approx(0.25)
    assert not found.clear


def test_example_losses_average_to_the_training_loss(built):
    tokenizer = minipearl.load_tokenizer(built.base)
    model = minipearl.load_model(built.base)
    examples = minipearl.addition_examples(tokenizer, [(7, 35), (50, 50), (1, 1)])
    per_example = connectivity.example_losses(model, examples)
    assert per_example.shape == (3,)
    # Every addition has the same number of predicted tokens, so the token-weighted loss
    # of training equals the mean of the examples' losses.
    with torch.no_grad():
        whole = minipearl.language_model_loss(model, examples.input_ids, examples.loss_mask)
    assert per_example.mean().item() == pytest.approx(whole.item(), rel=1e-5)


def test_measure_path_ends_at_the_two_models(built):
    tokenizer = minipearl.load_tokenizer(built.base)
    corpus = minipearl.make_corpus(sentences=20, test_sentences=8, test_problems=8)
    first = minipearl.load_weights(built.generalist)
    second = minipearl.load_weights(built.math)
    points = connectivity.measure_path(built.base, first, second, [0, 0.5, 1], tokenizer, corpus)
    assert [p.t for p in points] == [0.0, 0.5, 1.0]
    for point, folder in ((points[0], built.generalist), (points[-1], built.math)):
        model = minipearl.load_model(folder)
        assert point.skills == minipearl.measure_skills(model, tokenizer, corpus)
        assert point.text_losses.shape == (8,) and point.addition_losses.shape == (8,)
        expected = 0.5 * (point.text_losses.mean() + point.addition_losses.mean())
        assert point.loss == pytest.approx(expected)


def test_permuting_mlp_units_keeps_the_function_and_moves_the_weights(built):
    weights = minipearl.load_weights(built.base)
    permuted = connectivity.permute_mlp_units(weights, torch.Generator().manual_seed(0))
    assert permuted.keys() == weights.keys()
    changed = [k for k in weights if not torch.equal(weights[k], permuted[k])]
    assert changed and all("mlp" in k for k in changed)
    assert {k.rsplit(".", 2)[-2] for k in changed} == {"gate_proj", "up_proj", "down_proj"}
    tokenizer = minipearl.load_tokenizer(built.base)
    examples = minipearl.addition_examples(tokenizer, [(7, 35), (50, 50)])
    before = minipearl.model_from_weights(built.base, weights)(input_ids=examples.input_ids)
    after = minipearl.model_from_weights(built.base, permuted)(input_ids=examples.input_ids)
    assert torch.allclose(before.logits, after.logits, atol=1e-5)
    for name in changed:  # the same numbers, in another order
        assert torch.equal(
            weights[name].flatten().sort().values, permuted[name].flatten().sort().values
        )


def test_measure_point_is_the_point_of_the_path(built):
    tokenizer = minipearl.load_tokenizer(built.base)
    corpus = minipearl.make_corpus(sentences=20, test_sentences=8, test_problems=8)
    first = minipearl.load_weights(built.generalist)
    second = minipearl.load_weights(built.math)
    middle = connectivity.linear_path(first, second, 0.5)
    alone = connectivity.measure_point(built.base, middle, tokenizer, corpus, t=0.5)
    on_path = connectivity.measure_path(built.base, first, second, [0, 0.5, 1], tokenizer, corpus)[
        1
    ]
    assert alone.t == on_path.t == 0.5 and alone.skills == on_path.skills
    assert np.array_equal(alone.text_losses, on_path.text_losses)
