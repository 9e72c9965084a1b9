"""Tests of the data-aware merges: Fisher merging and RegMean, their statistics and folders."""

from __future__ import annotations

import pytest
import torch

from pearl_edu.teaching import datamerge, evaluation, minipearl

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


def random_weights(seed: int, shape=(3, 5)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(*shape, generator=g), "norm.weight": torch.rand(5)}


def random_gram(seed: int, rows: int = 40, width: int = 5) -> torch.Tensor:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


def test_regmean_of_one_model_is_that_model():
    weights = random_weights(0)
    merged = datamerge.regmean_merge([weights], [{"layer.weight": random_gram(1)}], alpha=0.7)
    assert torch.allclose(merged["layer.weight"], weights["layer.weight"], atol=1e-6)
    assert torch.equal(merged["norm.weight"], weights["norm.weight"])


def test_regmean_with_identical_grams_is_the_plain_average():
    first, second = random_weights(0), random_weights(1)
    gram = random_gram(2)
    merged = datamerge.regmean_merge(
        [first, second], [{"layer.weight": gram}, {"layer.weight": gram}], alpha=1.0
    )
    for name in first:
        assert torch.allclose(merged[name], (first[name] + second[name]) / 2, atol=1e-6)


def test_regmean_with_unequal_grams_is_not_the_average():
    first, second = random_weights(0), random_weights(1)
    merged = datamerge.regmean_merge(
        [first, second],
        [{"layer.weight": random_gram(2)}, {"layer.weight": 5 * random_gram(3)}],
        alpha=1.0,
    )
    average = (first["layer.weight"] + second["layer.weight"]) / 2
    assert not torch.allclose(merged["layer.weight"], average, atol=1e-3)


def test_regmean_minimises_the_summed_squared_output_error():
    """On one linear layer, RegMean is the least-squares fit of both parents' outputs."""
    g = torch.Generator().manual_seed(4)
    w = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]  # (out, in)
    x = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (30, 12)]
    merged = datamerge.regmean_linear(w, [xi.T @ xi for xi in x])
    stacked_x = torch.cat(x)
    stacked_y = torch.cat([xi @ wi.T for xi, wi in zip(x, w, strict=True)])
    solution = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    assert torch.allclose(merged, solution, atol=1e-10)

    def error(m):
        return sum(((xi @ m.T - xi @ wi.T) ** 2).sum() for xi, wi in zip(x, w, strict=True))

    for scale in (1e-3, -1e-3):  # any step away makes the error larger
        nudged = merged + scale * torch.randn(3, 5, generator=g, dtype=torch.float64)
        assert error(nudged) > error(merged)
    assert error(merged) < error((w[0] + w[1]) / 2)


def test_scale_off_diagonal_keeps_the_diagonal_and_scales_the_rest():
    gram = random_gram(5)
    scaled = datamerge.scale_off_diagonal(gram, 0.25)
    assert torch.equal(torch.diagonal(scaled), torch.diagonal(gram))
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.allclose(scaled[off], 0.25 * gram[off])
    assert torch.equal(datamerge.scale_off_diagonal(gram, 1.0), gram)
    with pytest.raises(ValueError, match="alpha"):
        datamerge.scale_off_diagonal(gram, 1.5)


def test_regmean_with_alpha_zero_weighs_each_input_column_by_its_energy():
    first, second = random_weights(0), random_weights(1)
    grams = [{"layer.weight": random_gram(6)}, {"layer.weight": random_gram(7)}]
    merged = datamerge.regmean_merge([first, second], grams, alpha=0.0)["layer.weight"]
    d1, d2 = (torch.diagonal(g["layer.weight"]).float() for g in grams)
    expected = (d1 * first["layer.weight"] + d2 * second["layer.weight"]) / (d1 + d2)
    assert torch.allclose(merged, expected, atol=1e-6)


def test_fisher_merge_with_equal_fishers_is_the_average_and_follows_the_larger_fisher():
    first, second = random_weights(0), random_weights(1)
    ones = {name: torch.ones_like(t) for name, t in first.items()}
    merged = datamerge.fisher_merge([first, second], [ones, ones])
    for name in first:
        assert torch.allclose(merged[name], (first[name] + second[name]) / 2, atol=1e-6)
    heavy = {name: 1e6 * torch.ones_like(t) for name, t in first.items()}
    leaning = datamerge.fisher_merge([first, second], [ones, heavy])
    for name in first:
        assert torch.allclose(leaning[name], second[name], atol=1e-4)
    zeros = {name: torch.zeros_like(t) for name, t in first.items()}
    unmoved = datamerge.fisher_merge([first, second], [zeros, zeros])
    assert torch.allclose(
        unmoved["norm.weight"], (first["norm.weight"] + second["norm.weight"]) / 2
    )


def test_merges_refuse_mismatched_statistics():
    with pytest.raises(ValueError, match="one Fisher per model"):
        datamerge.fisher_merge([random_weights(0)], [])
    with pytest.raises(ValueError, match="Gram"):
        datamerge.regmean_merge([random_weights(0), random_weights(1)], [{}])


def test_linear_grams_match_the_inputs_captured_by_hand(mini):
    model = minipearl.load_model(mini.math)
    tokenizer = minipearl.load_tokenizer(mini.math)
    corpus = mini.settings.corpus()
    examples = datamerge.skill_examples(tokenizer, corpus, "math", 5, "validation")
    grams = datamerge.linear_grams(model, examples, batch_size=2)
    linear_names = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert set(grams) == linear_names
    assert "lm_head.weight" in grams and "model.embed_tokens.weight" not in grams
    captured = []
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=examples.input_ids)
    handle.remove()
    rows = captured[0].reshape(-1, layer.in_features).double()  # additions: no padding
    assert int(examples.lengths.min()) == examples.input_ids.shape[1]
    expected = rows.T @ rows
    assert torch.allclose(grams["model.layers.1.mlp.down_proj.weight"], expected, rtol=1e-9)


def test_linear_grams_leave_padding_out(mini):
    model = minipearl.load_model(mini.generalist)
    tokenizer = minipearl.load_tokenizer(mini.generalist)
    sentences = ["the cat sees a dog.", "two big owls help the hen."]
    both = minipearl.sentence_examples(tokenizer, sentences)
    assert int(both.lengths.min()) < both.input_ids.shape[1]  # the first one is padded
    alone = [minipearl.sentence_examples(tokenizer, [s]) for s in sentences]
    total = datamerge.linear_grams(model, both)
    parts = [datamerge.linear_grams(model, a) for a in alone]
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(total[key], parts[0][key] + parts[1][key], rtol=1e-5)


def test_fisher_diagonal_is_a_mean_of_squared_gradients(mini):
    model = minipearl.load_model(mini.generalist)
    tokenizer = minipearl.load_tokenizer(mini.generalist)
    examples = datamerge.skill_examples(
        tokenizer, mini.settings.corpus(), "generalist", 3, "validation"
    )
    fisher = datamerge.fisher_diagonal(model, examples, seed=1)
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all(bool((f >= 0).all()) for f in fisher.values())
    again = datamerge.fisher_diagonal(model, examples, seed=1)
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)  # the draws are seeded
    # The embedding rows of characters no example contains get no gradient at all.
    used = set(examples.input_ids[examples.input_ids != tokenizer.pad_token_id].tolist())
    embed = fisher["model.embed_tokens.weight"]
    unused = [i for i in range(embed.shape[0]) if i not in used]
    assert unused and bool((embed[unused] == 0).all())
    assert float(embed[sorted(used)].sum()) > 0
    # One example: the Fisher is the square of that example's gradient.
    one = minipearl.Examples(examples.input_ids[:1], examples.loss_mask[:1], examples.lengths[:1])
    single = datamerge.fisher_diagonal(model, one, seed=1)
    generator = torch.Generator().manual_seed(1)
    ids, mask = one.rows(torch.tensor([0]))
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    drawn = torch.multinomial(log_probs.exp().detach(), 1, generator=generator)[:, 0]
    keep = mask[0, 1:].bool()
    model.zero_grad()
    log_probs[keep].gather(1, drawn[keep, None]).sum().backward()
    grad = model.lm_head.weight.grad
    assert torch.allclose(single["lm_head.weight"], grad**2, rtol=1e-5, atol=1e-12)


def test_merge_folders_write_models_the_book_can_score(mini, tmp_path):
    grams = datamerge.parent_statistics(mini, "gram", 4)
    fishers = datamerge.parent_statistics(mini, "fisher", 4)
    assert set(grams) == set(fishers) == {"generalist", "math"}
    corpus = mini.settings.corpus()
    for method, stats, options in (
        ("regmean", grams, {"alpha": 0.9}),
        ("fisher", fishers, {}),
    ):
        out = datamerge.merge_folders(mini, method, stats, tmp_path / method, **options)
        scores = evaluation.score_folder(out, corpus, "validation")
        assert 0 <= scores.text <= 1
        weights = minipearl.load_weights(out)
        parent = minipearl.load_weights(mini.generalist)
        assert set(weights) == set(parent)
        assert all(w.dtype == torch.bfloat16 for w in weights.values())
    # Norms have no Gram matrix: RegMean averages them.
    merged = minipearl.load_weights(tmp_path / "regmean")
    parents = [minipearl.load_weights(getattr(mini, p)) for p in minipearl.PARENTS]
    key = "model.norm.weight"
    average = ((parents[0][key].float() + parents[1][key].float()) / 2).bfloat16()
    assert torch.equal(merged[key], average)
    with pytest.raises(ValueError, match="method"):
        datamerge.merge_folders(mini, "ties", grams, tmp_path / "x")
    with pytest.raises(ValueError, match="kind"):
        datamerge.parent_statistics(mini, "hessian", 2)
    with pytest.raises(ValueError, match="parent"):
        datamerge.skill_examples(None, corpus, "base", 2, "validation")
