r"""SLERP for more than two models, in plain torch: nuslerp, multislerp and the Karcher mean.

SLERP (`pearl_edu.core.slerp`) walks along the great circle between two tensors. Three of
mergekit's methods take that idea further, and this module is their reference core:

- **nuslerp** is SLERP with the knobs turned: its ``t`` comes from two weights, it may
  interpolate task vectors (differences from a base) instead of the weights themselves, and
  it may take the angle row by row or column by column instead of over the whole tensor.
- **multislerp** averages any number of directions with weights, by a shortcut: it projects
  the unit tensors onto the plane tangent to the sphere at their (normalized) Euclidean
  mean, averages there, and maps the average back onto the sphere.
- **karcher** computes the weighted mean on the sphere itself: the point that minimizes the
  weighted sum of squared geodesic distances (eq:karcher-objective), by the fixed-point
  iteration that the book derives (eq:karcher-step).

Every step is mergekit 0.1.5's: the same operations, in the same order and in the same
dtypes (bfloat16 inputs stay bfloat16 where mergekit keeps them so), so the results are
mergekit's, bit for bit. Callers give tensors of one dtype (the engine promotes first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# nuslerp: a row is colinear (interpolated linearly) when 1 - cos^2 <= NUSLERP_EPS^2,
# and is normalized by max(norm, NUSLERP_NORM_FLOOR).
NUSLERP_EPS = 1e-8
NUSLERP_NORM_FLOOR = 1e-7
# nuslerp: below this total weight, t is 1/2 (there is nothing to divide by).
NUSLERP_WEIGHT_EPS = 1e-6
# multislerp's default eps: added to norms before dividing, and the smallest mean norm.
MULTISLERP_EPS = 1e-8
# The Karcher iteration's defaults (mergekit's max_iter and tol).
KARCHER_MAX_ITER = 10
KARCHER_TOL = 1e-5


# ---------------------------------------------------------------------------------------
# nuslerp


def nuslerp_t(weights: Sequence[float]) -> float:
    r"""nuslerp's interpolation parameter from the two models' weights.

    $$ t = \frac{w_1}{w_0 + w_1}, \qquad t = \tfrac12 \text{ when } |w_0 + w_1| < 10^{-6} $$

    So ``t = 0`` is the first model and ``t = 1`` the second, as in SLERP.
    """
    total = sum(weights)
    return 0.5 if abs(total) < NUSLERP_WEIGHT_EPS else weights[1] / total


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row of ``v`` (its last axis) divided by its norm, a norm below 1e-7 by 1e-7."""
    return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)


def nuslerp_pair(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = NUSLERP_EPS,
) -> torch.Tensor:
    r"""SLERP of two tensors, over the whole tensor or vector by vector.

    With ``flatten`` (the default) each tensor is one vector, as in SLERP. Otherwise the
    angle is taken separately for each vector along the last axis (each row of a matrix),
    or, with ``row_wise``, along the first axis (each column): mergekit's names. For each
    pair of vectors, with $\cos\theta$ their cosine clamped to $[-1, 1]$:

    $$ \frac{\sin((1 - t)\theta)\, v_0 + \sin(t\theta)\, v_1}{\sin\theta} $$

    and $(1 - t)\, v_0 + t\, v_1$ where $1 - \cos^2\theta \le \varepsilon^2$ (parallel or
    opposite vectors). Unlike `pearl_edu.core.slerp`, there is no 0.9995 threshold: only
    exactly colinear vectors (to ``eps``) are interpolated linearly. The arithmetic is in
    the inputs' dtype.
    """
    shape = v0.shape
    axis = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif axis != -1:  # the vectors along the first axis become rows
        v0, v1 = v0.transpose(axis, -1), v1.transpose(axis, -1)
    cos_theta = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    # Where the vectors are colinear the angle is taken as 0, and that branch is discarded.
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if axis != -1 and not flatten:
        result = result.transpose(axis, -1)
    return result.reshape(shape)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    r"""mergekit's ``nuslerp`` of two models, optionally of their task vectors.

    With $t$ from the weights (`nuslerp_t`), the result is
    $\operatorname{slerp}(\theta_0, \theta_1; t)$, or with a base
    $\theta_\text{base} + \operatorname{slerp}(\theta_0 - \theta_\text{base},
    \theta_1 - \theta_\text{base}; t)$: SLERP of what fine-tuning changed (see
    `nuslerp_pair` for ``row_wise`` and ``flatten``).
    """
    if len(tensors) != 2 or len(weights) != 2:
        raise ValueError(f"nuslerp: needs 2 tensors and 2 weights, got {len(tensors)}")
    t = nuslerp_t(weights)
    options = {"row_wise": row_wise, "flatten": flatten}
    if base is None:
        return nuslerp_pair(tensors[0], tensors[1], t, **options)
    return base + nuslerp_pair(tensors[0] - base, tensors[1] - base, t, **options)


# ---------------------------------------------------------------------------------------
# multislerp


class AntipodalError(ValueError):
    """The weighted mean of the unit tensors is zero: there is no direction to average."""


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = MULTISLERP_EPS,
) -> torch.Tensor:
    r"""A weighted mean of directions through the tangent space at their Euclidean mean.

    With $u_i = x_i / (\lVert x_i \rVert + \varepsilon)$ (the $x_i$ are the tensors, or their
    task vectors when there is a base) and weights $w_i$ (divided by their sum when
    ``normalize_weights``), let $m = \sum_i w_i u_i / \lVert \sum_i w_i u_i \rVert$. Each
    $u_i$ is projected onto the plane tangent at $m$, the projections are averaged, and the
    average $v = \sum_i w_i (u_i - \langle u_i, m \rangle m)$ is mapped back to the sphere:

    $$ \operatorname{multislerp} = \Bigl(\cos\lVert v \rVert\, m
       + \frac{\sin\lVert v \rVert}{\lVert v \rVert}\, v\Bigr) \sum_i w_i \lVert x_i \rVert $$

    ($\lVert v \rVert$ taken with $+\varepsilon$), plus the base when there is one. This is
    a one-step approximation of the Karcher mean (`karcher_mean`): the projection is
    orthogonal, not the sphere's logarithm map. One tensor is returned as it is. When the
    weighted mean of the unit tensors vanishes (opposite tensors with equal weights), two
    tensors are averaged linearly and more raise `AntipodalError`. Arithmetic is in the
    inputs' dtype, the weights rounded to it first.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"multislerp: {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:  # nothing to average, and the base is not added back
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    column = w.view(-1, 1)

    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise AntipodalError(
                "the weighted mean of the unit tensors is zero (opposite tensors whose weights "
                "balance out); change the weights"
            )
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm

    # The orthogonal projections onto the plane tangent at the mean, averaged there.
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * column).sum(0)
    # Back onto the sphere along the great circle through the mean, in direction `tangent`.
    length = torch.norm(tangent) + eps
    direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (direction * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


# ---------------------------------------------------------------------------------------
# The Karcher mean


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    max_iter: int = KARCHER_MAX_ITER,
    tol: float = KARCHER_TOL,
) -> torch.Tensor:
    r"""The weighted Karcher mean of the tensors' directions, scaled by their mean norm.

    Each tensor, flattened and divided by its norm, is a point $u_i$ on the unit sphere.
    Their weighted Karcher mean is the point $m$ that minimizes

    $$ f(m) = \tfrac12 \sum_i \alpha_i\, d(m, u_i)^2, \qquad d(m, u) = \arccos\langle m, u
       \rangle $$ (eq:karcher-objective)

    with the weights $\alpha_i$ normalized to sum to 1. Starting from the normalized
    Euclidean mean, each step moves $m$ along the sphere by the weighted mean of the
    logarithm maps $\log_m u_i = \frac{\theta_i}{\sin\theta_i}(u_i - \cos\theta_i\, m)$,
    $\theta_i = d(m, u_i)$, which is $-\nabla f(m)$:

    $$ v = \sum_i \alpha_i \log_m u_i, \qquad m \leftarrow \cos\lVert v \rVert\, m
       + \sin\lVert v \rVert\, \frac{v}{\lVert v \rVert} $$ (eq:karcher-step)

    until $\lVert v \rVert <$ ``tol`` or after ``max_iter`` steps; points within ``tol`` of
    $m$ add nothing to $v$. The result is $m \sum_i \alpha_i \lVert x_i \rVert$ (with the
    weights as given). Tensors whose norm is at most ``tol`` take no part in the direction;
    when all are that small the result is zero. Norms, and the lengths of steps, are
    float32 (float64 for float64 inputs); the points themselves stay in the inputs' dtype.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"karcher: {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:
        return tensors[0]
    exact = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    def length(v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(v.to(exact))

    norms = [length(tensor) for tensor in tensors]
    points = [
        torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
        for tensor, norm in zip(tensors, norms, strict=True)
    ]
    kept = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not kept:
        return sum(tensor * 0 for tensor in tensors)
    kept_sum = sum(weights[i] for i in kept)
    alphas = [weights[i] / kept_sum for i in kept]
    points = [points[i] for i in kept]

    # Start from the Euclidean mean of the points, pushed back onto the sphere.
    mean = torch.zeros_like(points[0])
    for alpha, point in zip(alphas, points, strict=True):
        mean += alpha * point
    mean_norm = length(mean)
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for alpha, point in zip(alphas, points, strict=True):
            cos_theta = torch.clamp(torch.dot(mean.flatten(), point.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos_theta)
            if theta.item() < tol:  # this point is where the mean is: log_m u = 0
                continue
            step += alpha * (theta / torch.sin(theta)) * (point - cos_theta * mean)
        step_length = length(step)
        if step_length.item() < tol:
            break
        mean = (torch.cos(step_length) * mean + torch.sin(step_length) * (step / step_length)).to(
            mean.dtype
        )
        mean_norm = length(mean)  # rounding drifts off the sphere: step back onto it
        if mean_norm.item() > tol:
            mean = (mean / mean_norm).to(mean.dtype)

    scale = sum(alpha * norm for alpha, norm in zip(weights, norms, strict=True))
    return scale * mean
