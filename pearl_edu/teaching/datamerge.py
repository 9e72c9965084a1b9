r"""Merging with data: Fisher-weighted averaging and RegMean, from a sample of held-out items.

Every merge method of `pearl_edu.merge` reads weights and nothing else. The two methods here
read a few examples too, run each parent over them once, and keep one statistic per parent:

- **Fisher merging** (Matena & Raffel, 2022): each parent's posterior is approximated by a
  Gaussian around its weights whose precision is the diagonal of its Fisher information
  $F_i$; the merge maximises the summed log-densities, one weighted average per number,

  $$ \theta^\star = \frac{\sum_i F_i \odot \theta_i}{\sum_i F_i} ; $$

- **RegMean** (Jin et al., 2023): each linear layer $y = x W$ of the merge is chosen to give
  the outputs that every parent's own layer gives on that parent's inputs $X_i$, in the least-
  squares sense; with the Gram matrices $G_i = X_i^\top X_i$,

  $$ W^\star = \Big(\sum_i G_i\Big)^{-1} \sum_i G_i W_i , $$

  after the off-diagonal entries of every $G_i$ are scaled by $\alpha$; every other weight
  (embeddings, norms) is the plain average.

`fisher_diagonal` and `linear_grams` compute the statistics (the Grams with forward hooks on
every `torch.nn.Linear`), `fisher_merge` and `regmean_merge` combine weights, and
`merge_folders` writes the result as a model folder that `evaluation.score_folder` and the
engine read like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pearl_edu.teaching import minipearl

Weights = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------
# The examples a parent's statistics are computed on


def skill_examples(tokenizer, corpus: minipearl.Corpus, parent: str, count: int, split: str):
    """The first ``count`` held-out items of ``parent``'s own skill in ``split``.

    The generalist's statistics come from sentences, the specialist's from additions written
    out in full (``07+35=042``, only the answer predicted): each parent is measured on the
    kind of data it was fine-tuned on, as RegMean and Fisher merging assume.
    """
    sentences, problems = corpus.held_out(split)
    if parent == "generalist":
        return minipearl.sentence_examples(tokenizer, sentences[:count])
    if parent == "math":
        return minipearl.addition_examples(tokenizer, problems[:count])
    raise ValueError(f"parent must be 'generalist' or 'math', not {parent!r}")


def real_tokens(examples: minipearl.Examples) -> torch.Tensor:
    """A (examples, width) mask of the positions that hold a token rather than padding."""
    width = examples.input_ids.shape[1]
    return torch.arange(width)[None, :] < examples.lengths[:, None]


# ---------------------------------------------------------------------------------------
# Statistics


def linear_grams(
    model, examples: minipearl.Examples, *, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    r"""The Gram matrix $G = X^\top X$ of the inputs of every ``torch.nn.Linear`` of ``model``.

    $X$ stacks, as rows, the input vector of the layer at every real (not padding) token of
    every example. Keys are the weights' names (``model.layers.0.mlp.down_proj.weight``);
    values are (in, in) float64 matrices. A forward hook on each linear layer adds
    $X_b^\top X_b$ of each batch.
    """
    modules = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    grams = {
        key: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
        for key, m in modules.items()
    }
    keep: dict[str, torch.Tensor] = {}

    def add_gram(key):
        def hook(module, inputs, output):
            x = inputs[0].detach()[keep["mask"]].double()  # (real tokens, in)
            grams[key] += x.T @ x

        return hook

    handles = [m.register_forward_hook(add_gram(key)) for key, m in modules.items()]
    real = real_tokens(examples)
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                rows = slice(start, start + batch_size)
                keep["mask"] = real[rows]
                model(input_ids=examples.input_ids[rows])
    finally:
        for handle in handles:
            handle.remove()
    return grams


def fisher_diagonal(
    model, examples: minipearl.Examples, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    r"""The diagonal of ``model``'s Fisher information, estimated over ``examples``.

    $$ \hat F = \frac{1}{N} \sum_{n=1}^{N}
       \big(\nabla_\theta \log p_\theta(\tilde y_n \mid x_n)\big)^{2} , $$

    one squared gradient per example, with the predicted tokens $\tilde y_n$ (those the loss
    mask marks) drawn from the model's own next-token distribution, as the Fisher's
    expectation over $y \sim p_\theta(\cdot \mid x)$ asks (`seed` fixes the draws). Keys are
    the parameters' names; values float32 tensors of their shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    for n in range(len(examples)):
        ids, mask = examples.rows(torch.tensor([n]))
        logits = model(input_ids=ids).logits[0, :-1]
        log_probs = torch.log_softmax(logits, dim=-1)
        with torch.no_grad():
            drawn = torch.multinomial(log_probs.exp(), 1, generator=generator)[:, 0]
        predicted = mask[0, 1:].bool()
        log_likelihood = log_probs[predicted].gather(1, drawn[predicted, None]).sum()
        model.zero_grad()
        log_likelihood.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
    model.zero_grad()
    model.train(was_training)
    return {name: f / len(examples) for name, f in fisher.items()}


# ---------------------------------------------------------------------------------------
# The merges


def fisher_merge(
    weights: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    *,
    epsilon: float = 1e-10,
) -> Weights:
    r"""Fisher-weighted average of every tensor: $\sum_i (F_i + \epsilon)\,\theta_i /
    \sum_i (F_i + \epsilon)$, in float32.

    ``epsilon`` keeps the ratio defined where every Fisher is zero (a weight no example moves,
    such as the embedding of a character none of them contains): there the merge is the
    plain average.
    """
    if len(weights) != len(fishers) or not weights:
        raise ValueError("give one Fisher per model, and at least one model")
    merged = {}
    for name in weights[0]:
        numerator = sum(
            (f[name].float() + epsilon) * w[name].float()
            for w, f in zip(weights, fishers, strict=True)
        )
        denominator = sum(f[name].float() + epsilon for f in fishers)
        merged[name] = numerator / denominator
    return merged


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""$\alpha G + (1 - \alpha)\,\mathrm{diag}(G)$: the off-diagonal entries times ``alpha``.

    RegMean's regularisation: ``alpha = 1`` keeps the Gram matrix, ``alpha = 0`` keeps its
    diagonal only (each input feature weighted by its energy, no correlations).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    diagonal = torch.diag(torch.diagonal(gram))
    return alpha * gram + (1 - alpha) * diagonal


def regmean_linear(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""RegMean's solution for one linear layer, in torch's (out, in) layout, float64.

    torch stores $W^\top$ (a layer computes $y = x W^\top$), so the merge solves
    $\big(\sum_i G_i\big) M = \sum_i G_i W_i^\top$ and returns $M^\top$.
    """
    total = sum(g.double() for g in grams)
    right = sum(g.double() @ w.double().T for g, w in zip(grams, weights, strict=True))
    return torch.linalg.solve(total, right).T


def regmean_merge(
    weights: Sequence[Mapping[str, torch.Tensor]],
    grams: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float = 0.9,
) -> Weights:
    """RegMean over whole models: every weight with a Gram matrix (the linear layers) by
    `regmean_linear` on the Grams scaled by `scale_off_diagonal`, every other one the plain
    average. Results in float32."""
    if len(weights) != len(grams) or not weights:
        raise ValueError("give one set of Gram matrices per model, and at least one model")
    merged = {}
    for name in weights[0]:
        tensors = [w[name] for w in weights]
        if name in grams[0]:
            scaled = [scale_off_diagonal(g[name], alpha) for g in grams]
            merged[name] = regmean_linear(tensors, scaled).float()
        else:
            merged[name] = torch.stack([t.float() for t in tensors]).mean(0)
    return merged


def write_model(like: str | Path, weights: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Save ``weights`` as a model folder with the architecture and tokenizer of ``like``,
    in bfloat16 like mini-Pearl's models: any chapter, and `pearl_edu.merge`, reads it."""
    model = minipearl.model_from_weights(like, dict(weights))
    return minipearl.save_model(model, minipearl.load_tokenizer(like), out)


def parent_statistics(
    mini: minipearl.MiniPearl, kind: str, count: int, *, split: str = "validation"
) -> dict[str, dict[str, torch.Tensor]]:
    """Each parent's Fishers (``kind="fisher"``) or Grams (``kind="gram"``), computed on the
    first ``count`` items of its own skill in ``split``, on one thread."""
    corpus = mini.settings.corpus()
    tokenizer = minipearl.load_tokenizer(mini.base)
    stats = {}
    with minipearl.torch_threads(1):
        for parent in minipearl.PARENTS:
            model = minipearl.load_model(getattr(mini, parent))
            examples = skill_examples(tokenizer, corpus, parent, count, split)
            if kind == "fisher":
                stats[parent] = fisher_diagonal(model, examples)
            elif kind == "gram":
                stats[parent] = linear_grams(model, examples)
            else:
                raise ValueError(f"kind must be 'fisher' or 'gram', not {kind!r}")
    return stats


def merge_folders(
    mini: minipearl.MiniPearl,
    method: str,
    statistics: Mapping[str, Mapping[str, torch.Tensor]],
    out: str | Path,
    **options,
) -> Path:
    """Merge mini-Pearl's two parents with ``method`` (``"fisher"`` or ``"regmean"``) from
    their ``statistics`` (`parent_statistics`), and write the model folder ``out``."""
    weights = [minipearl.load_weights(getattr(mini, p)) for p in minipearl.PARENTS]
    stats = [statistics[p] for p in minipearl.PARENTS]
    if method == "fisher":
        merged = fisher_merge(weights, stats, **options)
    elif method == "regmean":
        merged = regmean_merge(weights, stats, **options)
    else:
        raise ValueError(f"method must be 'fisher' or 'regmean', not {method!r}")
    return write_model(mini.generalist, merged, out)
