r"""Model Breadcrumbs and DELLA in plain torch: two more ways to prune a task vector.

TIES keeps the largest entries of each task vector $\delta = \theta - \theta_\text{base}$
and DARE keeps entries at random. Model Breadcrumbs (``breadcrumbs``,
``breadcrumbs_ties``) keeps a band of magnitudes instead: it drops the largest entries (the
outliers) as well as the smallest. DELLA (``della``, ``della_linear``) drops entries at
random, but with a probability that falls with the entry's magnitude rank: large entries are
kept more often than small ones. After the pruning, both end as the other task-vector
methods do (`pearl_edu.core.combine`: optional sign election, optional normalization,
``lambda``).

Every step is mergekit 0.1.5's (``mergekit.sparsify``: ``magnitude_outliers`` and
``della_magprune``), in the same order and dtypes, so Breadcrumbs gives mergekit's bits and
DELLA gives them too when it draws from the same generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pearl_edu.core.task_vectors import combine, rescaled, task_vectors

# mergekit's defaults: the fraction of largest entries Breadcrumbs drops, and the half-width
# of DELLA's band of keep probabilities around the density.
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15


def outlier_band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    r"""Where Breadcrumbs' kept band starts among the entries sorted by magnitude, and its size.

    With $N$ entries, $k = \lfloor \rho N \rfloor$ are kept and $t = \lfloor \gamma N
    \rfloor$ of the largest dropped; the band is the $k$ entries above the $b = \max(0, N -
    k - t)$ smallest. When $\rho + \gamma > 1$ there is no room for both, and the outlier
    drop shrinks (the $k$ smallest are kept), as in mergekit.
    """
    keep = int(density * numel)
    top = int(gamma * numel)
    return max(0, numel - keep - top), keep


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float = DEFAULT_GAMMA, *, rescale: bool = False
) -> torch.Tensor:
    r"""Breadcrumbs' trim: drop the ``gamma`` fraction largest in magnitude and the smallest.

    $$ \operatorname{crumbs}_{\rho,\gamma}(\delta)_j = \delta_j\, [\, |\delta_j| \text{ ranks
       between } b \text{ and } b + k \text{ from the smallest} \,] $$

    with $k = \lfloor \rho N \rfloor$ kept and $b$ from `outlier_band`. Magnitudes are
    ranked in float32 on the CPU (mergekit's choice) by ``torch.sort``, which decides among
    equal magnitudes. Unlike TIES, a density below $1/N$ keeps nothing. ``rescale`` scales
    the survivors back to the L1 norm of ``delta`` (`pearl_edu.core.rescaled`).
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    bottom, keep = outlier_band(numel, density, gamma)
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    ascending = torch.sort(magnitudes, descending=False).indices
    mask = torch.zeros(numel, dtype=delta.dtype, device=delta.device)
    mask[ascending[bottom : bottom + keep]] = 1
    return rescaled(delta, mask.reshape_as(delta), rescale)


def check_epsilon(density: float, epsilon: float) -> None:
    r"""Refuse an ``epsilon`` that would take DELLA's keep probabilities out of $(0, 1)$.

    DELLA keeps entries with probabilities from $\rho - \epsilon$ to $\rho + \epsilon$; both
    ends must lie strictly between 0 and 1 (mergekit's rule). A density of 0 or 1 draws
    nothing, so any ``epsilon`` goes with it.
    """
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(
            f"epsilon {epsilon:g} with density {density:g} gives keep probabilities from "
            f"{density - epsilon:g} to {density + epsilon:g}; della needs density - epsilon > 0 "
            "and density + epsilon < 1"
        )


def della_work_dtype(delta: torch.Tensor) -> torch.dtype:
    """DELLA's working dtype: bfloat16 stays bfloat16 on the CPU, the rest is float32 there."""
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        return delta.dtype
    return torch.float32


def row_length(shape: tuple[int, ...]) -> int:
    """How many entries DELLA ranks together: a 1-D tensor's all, else a row along axis 1."""
    if not shape:
        return 1
    return shape[0] if len(shape) == 1 else shape[1]


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    r"""DELLA's probability of keeping each entry: higher for larger magnitudes, row by row.

    In each row (all of a 1-D tensor; along the second axis of a larger one, as mergekit
    ranks them: `row_length`), the entry with magnitude rank $r$ (1 for the smallest, up to $n$)
    is kept with probability

    $$ p_j = (\rho - \epsilon) + 2 \epsilon\, \frac{r_j - 1}{n - 1}, $$

    from $\rho - \epsilon$ for the smallest to $\rho + \epsilon$ for the largest, $\rho$ on
    average. The ranks are counted in the working dtype (`della_work_dtype`): in bfloat16,
    ranks above 256 round, as in mergekit. Rows must hold at least 2 entries. Returns a
    tensor of the row-shaped ``delta`` (2-D for a 1-D ``delta``).
    """
    check_epsilon(density, epsilon)
    if row_length(tuple(delta.shape)) < 2:
        raise ValueError(
            f"della ranks each row's entries and shape {tuple(delta.shape)} has rows of one "
            "entry; give it density 1 or merge it with another method"
        )
    work = della_work_dtype(delta)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(work) + 1
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - lowest) / (highest - lowest)).clamp(0, 1)
    return (density - epsilon) + spread * 2 * epsilon


def della_prune(
    delta: torch.Tensor,
    density: float,
    epsilon: float = DEFAULT_EPSILON,
    generator: torch.Generator | None = None,
    *,
    rescale: bool = True,
) -> torch.Tensor:
    r"""DELLA's drop: keep each entry with its `keep_probabilities`; rescale to the L1 norm.

    $$ \operatorname{della}_{\rho,\epsilon}(\delta) = \frac{\lVert \delta \rVert_1}{\lVert
       m \odot \delta \rVert_1}\; m \odot \delta, \qquad m_j \sim
       \operatorname{Bernoulli}(p_j) $$

    (The DELLA paper divides each survivor by its own $p_j$, which keeps the norm only on
    average; mergekit, and so this, rescales the whole tensor to its L1 norm, or not at all
    without ``rescale``.) The mask is drawn from ``generator`` (torch's global generator,
    as in mergekit, when ``None``), in the working dtype.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    work = della_work_dtype(delta)
    probabilities = keep_probabilities(delta, density, epsilon)
    mask = torch.bernoulli(probabilities, generator=generator).to(work)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    return rescaled(rows.to(work), mask, rescale).to(delta.dtype).reshape(delta.shape)


def breadcrumbs(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    rescale: bool = False,
) -> torch.Tensor:
    r"""Model Breadcrumbs: trim each task vector to a band of magnitudes, then add them.

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\,
       \operatorname{crumbs}_{\rho_i,\gamma_i}(\delta_i)}{D} $$

    With ``sign_election`` it is ``breadcrumbs_ties``: the trimmed task vectors go through
    TIES' election (`pearl_edu.core.combine`).
    """
    base, deltas = task_vectors(base, others)
    trimmed = [
        magnitude_outliers(delta, density, gamma, rescale=rescale)
        for delta, density, gamma in zip(deltas, densities, gammas, strict=True)
    ]
    return combine(
        base, trimmed, weights, sign_election=sign_election, normalize=normalize, scale=scale
    )


def della(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    sign_election: bool = True,
    normalize: bool = True,
    scale: float = 1.0,
    rescale: bool = True,
) -> torch.Tensor:
    r"""DELLA: drop entries with magnitude-ranked probabilities, rescale, elect signs, add.

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\,
       \operatorname{della}_{\rho_i,\epsilon_i}(\delta_i)\,[\text{agrees}]}{D} $$

    Model ``i`` draws from ``generators[i]``; with ``None`` every model draws in turn from
    torch's global generator, as mergekit does. Without ``sign_election`` it is
    ``della_linear`` (whose mergekit defaults are ``normalize=False``).
    """
    base, deltas = task_vectors(base, others)
    generators = generators if generators is not None else [None] * len(deltas)
    dropped = [
        della_prune(delta, density, epsilon, generator, rescale=rescale)
        for delta, density, epsilon, generator in zip(
            deltas, densities, epsilons, generators, strict=True
        )
    ]
    return combine(
        base, dropped, weights, sign_election=sign_election, normalize=normalize, scale=scale
    )
