r"""SCE and RAM in plain torch: task-vector merges that weigh each entry by who changed it.

The task-vector methods of `pearl_edu.core.task_vectors` give each model one weight per
tensor. The methods here let the task vectors $\delta_i = \theta_i - \theta_\text{base}$
themselves decide, entry by entry:

- **SCE** (``sce``, Wan et al., 2024: Select, Calculate, Erase) keeps the entries where the
  models disagree most (the largest variance across models), weighs each model by the mean
  square of its task vector, erases the entries whose sign disagrees with the elected one
  (TIES' election, `pearl_edu.core.elect_signs`), and takes the weighted mean of the rest.
- **RAM** (``ram``, Yuan et al., 2026: Reinforced Agent Merging) sorts the entries by how
  many models changed them (by more than $\epsilon$): an entry changed by one model only
  keeps that model's change whole, an entry changed by several gets their mean, and an
  entry changed by none stays the base's. Averaging would dilute a change that only one
  model made; RAM does not.
- **RAM+** (``ramplus_tl``, its tensor-local form) also scales up each model's unique
  changes, by more when that model shares more of its changes with the others.

Every step is mergekit 0.1.5's (``mergekit/merge_methods/sce.py`` and ``ram.py``): the same
operations, order and dtypes, so the results are mergekit's bit for bit. Callers give
tensors of one dtype (the family promotes them first, as mergekit does). ``ramplus_tl``
returns float32 from bfloat16 or float16 inputs: its factors $\lambda_i$ are float32, and
mergekit does not cast back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pearl_edu.core.task_vectors import elect_signs

# SCE: a sum of the weights (or of the weights that survive the election) below this is
# taken as this (mergekit's floor, so that nothing is divided by zero).
SCE_WEIGHT_FLOOR = 1e-6
# RAM: an entry counts as changed by a model when |delta| > epsilon (mergekit's default).
RAM_EPSILON = 1e-5
# RAM+: the gain r and the cap alpha on the shared-to-unique ratio (mergekit's defaults).
RAMPLUS_R = 0.1
RAMPLUS_ALPHA = 0.2


# ---------------------------------------------------------------------------------------
# SCE: select, calculate, erase


def sce(base: torch.Tensor, others: Sequence[torch.Tensor], *, select_topk: float = 1.0):
    r"""SCE of one tensor: the base plus the weighted mean of the agreeing task vectors.

    With the stacked task vectors $\delta_i$, the selection mask $m$ (`sce_select`), the
    weights $w_i$ (`sce_weights`) and TIES' agreement $a_{ij}$ (`elect_signs`):

    $$ \theta = \theta_\text{base} + \frac{\sum_i w_i a_{ij}\, m_j \delta_{ij}}
       {\max\bigl(\sum_i w_i a_{ij},\ 10^{-6}\bigr)} $$ (eq:sce)

    ``select_topk`` below 1 keeps that fraction of the entries (`sce_select`); 1 or more
    keeps them all. With no model besides the base, the base.
    """
    if not others:
        return base
    deltas = torch.stack([other - base for other in others], dim=0)
    # Select: keep the entries where the models vary most (the mask has no model axis).
    if select_topk < 1:
        deltas = deltas * sce_select(deltas, select_topk).unsqueeze(0)
    # Erase: a_ij = 1 where delta_ij has the elected sign of the column sum, else 0.
    agree = elect_signs(deltas)
    # Calculate: one weight per model, shaped to broadcast over the tensor's axes.
    weights = sce_weights(deltas)
    while weights.dim() < deltas.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * agree
    merged = (deltas * kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=SCE_WEIGHT_FLOOR)


def sce_select(deltas: torch.Tensor, density: float) -> torch.Tensor:
    r"""SCE's selection: 1 on the ``density`` fraction of entries that vary most, else 0.

    The variance across models (population variance, over the first axis) ranks the
    entries; of the $n$ entries whose variance is not zero, the $k = \lfloor n\rho \rfloor$
    largest are kept (``torch.topk`` decides among equal variances). A density of 0 or less
    keeps nothing, 1 or more everything. The mask has one entry per weight (no model axis),
    in the deltas' dtype. (mergekit's ``int8_mask`` only stores it in less memory: same
    result.)
    """
    if density <= 0:
        return torch.zeros_like(deltas[0])
    if density >= 1:
        return torch.ones_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    # n * rho as mergekit takes it: a count tensor times a float, then truncated.
    keep = int(torch.count_nonzero(variance) * density)
    mask = torch.zeros_like(variance)
    if keep == 0:
        return mask
    _, largest = torch.topk(variance.abs().view(-1), k=keep, largest=True)
    mask.view(-1)[largest] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    r"""SCE's weight of each model: the mean square of its task vector, over their sum.

    $$ w_i = \frac{\overline{\delta_i^2}}{\sum_k \overline{\delta_k^2}} $$

    The sum is taken to a Python float (mergekit's ``.item()``); when it is below
    $10^{-6}$ in magnitude (no model changed anything), every model weighs $1/N$.
    """
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < SCE_WEIGHT_FLOOR:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


# ---------------------------------------------------------------------------------------
# RAM and RAM+: shared entries averaged, unique ones kept


def ram(base: torch.Tensor, others: Sequence[torch.Tensor], *, epsilon: float = RAM_EPSILON):
    r"""RAM of one tensor: unique changes kept whole, shared ones averaged.

    With $c_{ij} = [\,|\delta_{ij}| > \epsilon\,]$ (model $i$ changed entry $j$) and
    $n_j = \sum_i c_{ij}$ (how many did):

    $$ \theta_j = \theta_{\text{base},j} + \sum_i c_{ij}\,\delta_{ij}\,
       \Bigl([n_j = 1] + \frac{[n_j > 1]}{n_j}\Bigr) $$ (eq:ram)

    An entry no model changed by more than $\epsilon$ stays the base's (changes of
    $\epsilon$ or less are dropped). With no model besides the base, the base.
    """
    if not others:
        return base
    deltas, changed, counts, shared, unique = ram_regions(base, others, epsilon)
    kept = deltas * changed
    merged = ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    *,
    r: float = RAMPLUS_R,
    alpha: float = RAMPLUS_ALPHA,
    epsilon: float = RAM_EPSILON,
) -> torch.Tensor:
    r"""RAM+ of one tensor (tensor-local): RAM with each model's unique changes scaled up.

    Model $i$'s unique changes are multiplied by $\lambda_i = 1 + r \min(\max(\rho_i, 0),
    \alpha)$, where $\rho_i$ is the ratio of its shared changes to its unique ones, counted
    in this tensor (the paper counts them over the whole model; mergekit's ``_tl`` form,
    and this one, per tensor):

    $$ \rho_i = \frac{\sum_j c_{ij} [n_j > 1]}{\max(\sum_j c_{ij} [n_j = 1],\ \epsilon)},
       \qquad \theta_j = \theta_{\text{base},j} + \sum_i c_{ij}\,\delta_{ij}\,
       \Bigl(\lambda_i [n_j = 1] + \frac{[n_j > 1]}{n_j}\Bigr) $$ (eq:ramplus)

    The $\lambda_i$ are float32, so bfloat16 and float16 inputs give a float32 result, as
    in mergekit. With no model besides the base, the base.
    """
    if not others:
        return base
    deltas, changed, counts, shared, unique = ram_regions(base, others, epsilon)
    shared_counts = (changed & shared).sum(dim=1)
    unique_counts = (changed & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    gain = 1 + r * rho.clamp(min=0, max=alpha)
    kept = deltas * changed
    merged = (kept * unique * gain.unsqueeze(-1)) + (kept * shared / counts.clamp(min=1))
    return base + merged.sum(dim=0, keepdim=True).reshape_as(base)


def ram_regions(
    base: torch.Tensor, others: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The task vectors, one row per model, and where each model changed what.

    Returns the flattened $\delta$ (models x entries), $c$ (``changed``: $|\delta| >
    \epsilon$), $n$ (``counts``: how many models changed each entry, one row), and the
    entries changed by several models (``shared``: $n > 1$) and by one (``unique``: $n = 1$).
    """
    deltas = torch.stack([other - base for other in others], dim=0).view(len(others), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas, changed, counts, counts > 1, counts == 1
