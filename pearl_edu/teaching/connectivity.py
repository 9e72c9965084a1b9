r"""The loss along the straight path between two models, and the barrier on it.

Two models are *linearly mode connected* when the loss does not rise on the straight line
between their weights,

$$ \theta(t) = (1 - t)\,\theta_A + t\,\theta_B, \qquad t \in [0, 1], $$

above the straight chord between the losses of the two ends. The height of the rise is the
**barrier**:

$$ B = \max_{t \in [0, 1]} \Big( \mathcal{L}\big(\theta(t)\big)
        - \big[(1 - t)\,\mathcal{L}(\theta_A) + t\,\mathcal{L}(\theta_B)\big] \Big). $$

The excess over the chord is zero at both ends, so $B \ge 0$, and $B = 0$ means the loss
never rises above the chord. A merge by interpolation picks one point of that path: where
there is a barrier, that merge is worse than the same blend of its parents' losses. This
module measures the path on mini-Pearl's held-out data (`pearl_edu.teaching.minipearl`), with a
bootstrap over the held-out examples to tell a barrier from the noise of a finite test
set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pearl_edu.teaching import minipearl


def linear_path(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    r"""The point ``t`` of the straight path between two sets of weights, in float32.

    $$ \theta(t) = (1 - t)\,\theta_A + t\,\theta_B $$

    Unlike a merge it is not rounded to the models' bfloat16, so a path of many points shows
    the loss landscape and not the rounding.
    """
    return {name: (1 - t) * first[name].float() + t * second[name].float() for name in first}


@torch.no_grad()
def example_losses(model, examples: minipearl.Examples) -> torch.Tensor:
    """Each example's mean cross-entropy over its masked tokens (the loss of chapter 07)."""
    logits = model(input_ids=examples.input_ids).logits[:, :-1]
    targets = examples.input_ids[:, 1:]
    mask = examples.loss_mask[:, 1:].float()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (losses * mask).sum(dim=1) / mask.sum(dim=1)


@dataclass(frozen=True)
class PathPoint:
    """What one point of a path can do: both skills, and the held-out loss per example."""

    t: float
    skills: minipearl.Skills
    text_losses: np.ndarray  # one per held-out sentence
    addition_losses: np.ndarray  # one per held-out addition

    @property
    def loss(self) -> float:
        """The held-out loss: the mean of the text loss and the addition loss."""
        return 0.5 * (float(self.text_losses.mean()) + float(self.addition_losses.mean()))


def measure_point(
    folder, weights: dict[str, torch.Tensor], tokenizer, corpus: minipearl.Corpus, t: float = 0.0
) -> PathPoint:
    """Both skills and the held-out losses of one set of weights (``t`` labels the point).

    ``folder`` is a model folder of the same architecture (its ``config.json`` is used).
    """
    model = minipearl.model_from_weights(folder, weights)
    sentences = minipearl.sentence_examples(tokenizer, corpus.test_sentences)
    additions = minipearl.addition_examples(tokenizer, corpus.test_problems)
    with minipearl.torch_threads(1):
        text_losses = example_losses(model, sentences).numpy()
        addition_losses = example_losses(model, additions).numpy()
    return PathPoint(
        t=float(t),
        skills=minipearl.measure_skills(model, tokenizer, corpus),
        text_losses=text_losses,
        addition_losses=addition_losses,
    )


def measure_path(
    folder,
    first: dict[str, torch.Tensor],
    second: dict[str, torch.Tensor],
    ts: Sequence[float],
    tokenizer,
    corpus: minipearl.Corpus,
) -> list[PathPoint]:
    """`measure_point` at each ``t`` of the straight path from ``first`` to ``second``."""
    return [
        measure_point(folder, linear_path(first, second, float(t)), tokenizer, corpus, t)
        for t in ts
    ]


def excess_over_chord(ts: Sequence[float], losses: Sequence[float]) -> np.ndarray:
    """How far each loss on the path lies above the chord between the two ends' losses."""
    ts, losses = np.asarray(ts, dtype=float), np.asarray(losses, dtype=float)
    if ts[0] != 0 or ts[-1] != 1:
        raise ValueError(f"the path must start at t = 0 and end at t = 1, not {ts[0]}, {ts[-1]}")
    chord = (1 - ts) * losses[0] + ts * losses[-1]
    return losses - chord


def barrier(ts: Sequence[float], losses: Sequence[float]) -> float:
    """The barrier: the largest excess of the loss over the chord (0: none, the least)."""
    return float(excess_over_chord(ts, losses).max())


@dataclass(frozen=True)
class Barrier:
    """A barrier measured on held-out data, with a bootstrap interval."""

    height: float  # in nats
    at_t: float  # where the excess is largest
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th percentile
    dip: float  # how far the loss falls below the chord at most (0 if it never does)

    @property
    def clear(self) -> bool:
        """Whether the whole 95% interval lies above zero: a barrier beyond test-set noise."""
        return self.low > 0


def path_barrier(points: Sequence[PathPoint], *, draws: int = 1000, seed: int = 0) -> Barrier:
    """The barrier of a measured path, with a 95% bootstrap interval over the held-out examples.

    Each bootstrap draw resamples the held-out sentences and additions (the same resample at
    every point of the path, since every point is measured on the same examples) and
    recomputes the barrier.
    """
    ts = [p.t for p in points]
    excess = excess_over_chord(ts, [p.loss for p in points])
    rng = np.random.default_rng(seed)
    text = np.stack([p.text_losses for p in points])  # (points, sentences)
    addition = np.stack([p.addition_losses for p in points])  # (points, additions)
    heights = np.empty(draws)
    for draw in range(draws):
        rows_text = rng.integers(0, text.shape[1], text.shape[1])
        rows_addition = rng.integers(0, addition.shape[1], addition.shape[1])
        losses = 0.5 * (text[:, rows_text].mean(axis=1) + addition[:, rows_addition].mean(axis=1))
        heights[draw] = barrier(ts, losses)
    low, high = np.percentile(heights, [2.5, 97.5])
    return Barrier(
        height=float(excess.max()),
        at_t=float(ts[int(excess.argmax())]),
        low=float(low),
        high=float(high),
        dip=float(max(0.0, -excess.min())),
    )


def permute_mlp_units(
    weights: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    r"""The same network with the hidden units of every MLP in a random new order.

    A Mistral MLP computes $W_{\text{down}}\,\big(\operatorname{silu}(W_{\text{gate}} x)
    \odot W_{\text{up}} x\big)$. Reordering the rows of $W_{\text{gate}}$ and
    $W_{\text{up}}$ and the columns of $W_{\text{down}}$ by one permutation reorders the
    hidden units and nothing else: the function is unchanged (up to the rounding of sums
    taken in another order), the weights are not.
    """
    permuted = dict(weights)
    for name, tensor in weights.items():
        if not name.endswith("mlp.gate_proj.weight"):
            continue
        prefix = name.removesuffix("gate_proj.weight")
        order = torch.randperm(tensor.shape[0], generator=generator)
        permuted[prefix + "gate_proj.weight"] = weights[prefix + "gate_proj.weight"][order]
        permuted[prefix + "up_proj.weight"] = weights[prefix + "up_proj.weight"][order]
        permuted[prefix + "down_proj.weight"] = weights[prefix + "down_proj.weight"][:, order]
    return permuted
