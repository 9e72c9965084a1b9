r"""Model Stock in plain torch: the reference core of mergekit's ``model_stock``.

Fine-tuned siblings $\theta_1, \dots, \theta_N$ of a base $\theta_0$ lie, Jang et al.
(2024) observe, at about the same distance from their centre and at about the same angle
$\theta$ to each other, seen from the base. Model Stock uses that angle to choose how far
to go from the base towards the siblings' average $\bar\theta = \frac1N \sum_i \theta_i$:

$$ \theta_\text{merged} = t\, \bar\theta + (1 - t)\, \theta_0, \qquad
   t = \frac{N \cos\theta}{1 + (N - 1) \cos\theta} $$ (eq:model-stock)

where $\cos\theta$ is the mean of the cosines between the task vectors
$\theta_i - \theta_0$, pair by pair. Identical siblings ($\cos\theta = 1$) give $t = 1$,
their average; unrelated ones ($\cos\theta = 0$) give $t = 0$, the base. Every step is
mergekit 0.1.5's, in the inputs' dtype, so the results are mergekit's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A product of norms below this is taken as this (mergekit's clamp).
NORM_PRODUCT_FLOOR = 1e-6
# A denominator 1 + (N - 1) cos(theta) smaller than this has no finite t: the base is kept.
SINGULAR_EPS = 1e-6


def mean_cosine(base: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The mean cosine between the task vectors $\theta_i - \theta_0$, over all pairs.

    Each tensor is one vector, or, for a matrix whose last axis has been kept (see
    `model_stock`'s ``filter_wise``), one cosine per row. The result has a trailing axis of
    size 1, ready to broadcast against the tensors.
    """
    offsets = [other - base for other in others]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock_t(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    r"""Model Stock's interpolation weight $t = N\cos\theta / (1 + (N - 1)\cos\theta)$.

    Where the denominator is within 1e-6 of zero (siblings pointing away from each other),
    $t = 0$: the base is kept rather than an average blown up by opposing updates.
    """
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def model_stock(
    base: torch.Tensor, others: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    r"""Model Stock (eq:model-stock) of one tensor: from the base towards the siblings' mean.

    At least two fine-tuned tensors are needed (one pair to measure an angle). By default a
    tensor is one vector, with one $t$; with ``filter_wise`` each row of a matrix (each
    output "filter") gets its own angle and its own $t$ (a vector is one row).
    """
    if len(others) < 2:
        raise ValueError(
            f"model_stock: needs at least 2 tensors besides the base, got {len(others)}"
        )
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, others = base.unsqueeze(0), [other.unsqueeze(0) for other in others]
    else:
        base, others = base.reshape(-1), [other.reshape(-1) for other in others]
    t = model_stock_t(mean_cosine(base, others), len(others))
    average = sum(others) / len(others)
    return (t * average + (1 - t) * base).reshape(shape)
