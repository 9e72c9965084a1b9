"""Tests of weight matching (`pearl_edu.teaching.alignment`) on small random Mistrals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pearl_edu.teaching import alignment, minipearl

SHAPE = minipearl.ModelShape(
    num_layers=2, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2
)


@pytest.fixture(scope="module")
def model():
    return minipearl.new_model(minipearl.build_tokenizer(), SHAPE, seed=7)


@pytest.fixture(scope="module")
def shape(model):
    return alignment.Shape.of(model.config)


@pytest.fixture(scope="module")
def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def logits(model, weights) -> torch.Tensor:
    model.load_state_dict(weights)
    ids = torch.randint(4, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_shape_is_read_from_the_config(shape):
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (2, 32, 48)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.group) == (4, 2, 8, 2)
    assert alignment.permutation_groups(shape) == {
        "residual": 32,
        "mlp.0": 48,
        "heads.0": 4,
        "mlp.1": 48,
        "heads.1": 4,
    }


def test_every_weight_of_the_model_has_its_axes(model, shape):
    assert set(alignment.axes(shape)) == set(model.state_dict())


def test_a_permuted_model_computes_the_same_function(model, shape, weights):
    permutations = alignment.random_permutations(shape, torch.Generator().manual_seed(1))
    permuted = alignment.permute(weights, permutations, shape)
    assert not torch.equal(
        permuted["model.layers.0.mlp.up_proj.weight"], weights["model.layers.0.mlp.up_proj.weight"]
    )
    original = logits(model, weights)
    torch.testing.assert_close(logits(model, permuted), original, atol=1e-5, rtol=1e-5)


def test_heads_moved_without_their_key_value_head_change_the_function(model, shape, weights):
    permutations = alignment.identity(shape)
    permutations["heads.0"] = np.array([2, 1, 0, 3])  # splits both groups
    assert not alignment.is_valid_head_order(permutations["heads.0"], shape)
    with pytest.raises(ValueError, match="heads.0"):
        alignment.permute(weights, permutations, shape)
    # the same move done by hand, past the check: the function changes
    moved = dict(weights)
    rows = np.concatenate([np.arange(h * 8, h * 8 + 8) for h in (2, 1, 0, 3)])
    for name, axis in (("q_proj", 0), ("o_proj", 1)):
        key = f"model.layers.0.self_attn.{name}.weight"
        moved[key] = weights[key].index_select(axis, torch.as_tensor(rows))
    assert (logits(model, moved) - logits(model, weights)).abs().max() > 1e-3


def test_dimensions_within_a_head_cannot_be_reordered(model, shape, weights):
    """RoPE rotates dimension i with i + head_dim / 2: reordering them changes the function."""
    moved = dict(weights)
    order = torch.as_tensor(np.concatenate([np.roll(np.arange(8), 1) + 8 * h for h in range(4)]))
    for name, axis in (("q_proj", 0), ("o_proj", 1)):
        key = f"model.layers.0.self_attn.{name}.weight"
        moved[key] = weights[key].index_select(axis, order)
    kv = order[:16]
    for name in ("k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        moved[key] = weights[key].index_select(0, kv)
    assert (logits(model, moved) - logits(model, weights)).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weight_matching_finds_a_random_permutation_again(shape, weights, seed):
    permutations = alignment.random_permutations(shape, torch.Generator().manual_seed(seed))
    permuted = alignment.permute(weights, permutations, shape)
    found = alignment.weight_matching(weights, permuted, shape, seed=seed)
    back = alignment.permute(permuted, found.permutations, shape)
    assert all(torch.equal(back[name], weights[name]) for name in weights)
    assert found.objectives[-1] == pytest.approx(
        alignment.objective(weights, weights, alignment.identity(shape), shape)
    )


def test_weight_matching_only_raises_the_objective(model, shape, weights):
    other = minipearl.new_model(minipearl.build_tokenizer(), SHAPE, seed=8)
    second = {name: tensor.detach().clone() for name, tensor in other.state_dict().items()}
    found = alignment.weight_matching(weights, second, shape)
    steps = np.diff(found.objectives)
    assert (steps >= -1e-9).all() and steps[0] > 0 and found.sweeps >= 2
    assert found.objectives[-1] == pytest.approx(
        alignment.objective(weights, second, found.permutations, shape)
    )
    for name, order in found.permutations.items():
        assert sorted(order) == list(range(len(order))), name
        if name.startswith("heads."):
            assert alignment.is_valid_head_order(order, shape)


def test_unit_cosines_of_a_model_with_itself_are_one_on_the_diagonal(weights):
    cosines = alignment.unit_cosines(weights, weights, 1)
    assert cosines.shape == (48, 48)
    np.testing.assert_allclose(np.diag(cosines), 1.0)
    assert (np.abs(cosines) <= 1 + 1e-12).all()


def test_write_permuted_keeps_the_bits_and_the_files(model, shape, tmp_path):
    tokenizer = minipearl.build_tokenizer()
    source = minipearl.save_model(model, tokenizer, tmp_path / "source")
    permutations = alignment.random_permutations(shape, torch.Generator().manual_seed(4))
    target = alignment.write_permuted(source, permutations, tmp_path / "aligned")
    written = minipearl.load_weights(target)
    expected = alignment.permute(minipearl.load_weights(source), permutations, shape)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert written["lm_head.weight"].dtype == torch.bfloat16
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())


def test_folded_and_turned_models_compute_the_same_function(model, shape, weights):
    folded = alignment.fold_norms(weights, shape)
    assert torch.equal(folded["model.norm.weight"], torch.ones(32))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    turned = alignment.rotate_residual(folded, q, shape)
    original = logits(model, weights)
    torch.testing.assert_close(logits(model, folded), original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, turned), original, atol=1e-4, rtol=1e-4)
    # without folding, a rotation is not a symmetry: the norms' weights are not all ones
    model.load_state_dict(
        {k: torch.randn_like(v) if k.endswith("norm.weight") else v for k, v in weights.items()}
    )
    skewed = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert (
        logits(model, alignment.rotate_residual(skewed, q, shape)) - logits(model, skewed)
    ).abs().max() > 1e-3


def test_best_rotation_undoes_a_rotation(shape, weights):
    folded = alignment.fold_norms(weights, shape)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    turned = alignment.rotate_residual(folded, q, shape)
    found = alignment.best_rotation(folded, turned, shape)
    torch.testing.assert_close(found, q.T, atol=1e-4, rtol=0)


def test_rotation_matching_raises_the_objective_and_keeps_the_function(model, shape, weights):
    other = minipearl.new_model(minipearl.build_tokenizer(), SHAPE, seed=9)
    second = {name: tensor.detach().clone() for name, tensor in other.state_dict().items()}
    found = alignment.rotation_matching(weights, second, shape, rounds=3)
    assert found.objectives[-1] > found.objectives[0] and len(found.objectives) == 4
    torch.testing.assert_close(
        logits(model, found.second), logits(model, second), atol=1e-4, rtol=1e-4
    )
