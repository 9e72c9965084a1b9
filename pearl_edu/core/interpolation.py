r"""SLERP and linear interpolation of one tensor, in plain torch: the reference core.

This is the arithmetic the book derives (chapter 04's eq:slerp, applied to a whole tensor
as chapter 05's eq:slerp-tensor), written to be read top-down: `slerp` first, then the
pieces it calls, each after its caller: `slerp_weights` (the two weights, from the angle),
`cosine` and `norm` (the angle, from sums taken chunk by chunk), `lerp` (the fallback)
and `weighted_sum` (the result). The angle $\theta$ here is the book's $\Omega$.

The engine's fast version (`pearl_edu.backends.cpu`, with threads, compiled loops and
reused buffers) is tested to give exactly these bits, and these are mergekit 0.1.5's bits.

Why chunks: a float32 sum of 10^8 terms depends on the order in which it is added up, and
a cosine that differs in its last digit moves the bfloat16 rounding of some outputs. So
the sums are taken in mergekit's order: the tensor is one row, cut into chunks of 2^20
elements; the norm is the norm of the chunks' norms, and the dot product is the sum of the
chunks' dot products of the normalized chunks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Beyond this |cos theta| (about 1.8 degrees), sin(theta) is too small to divide by:
# interpolate linearly instead, as mergekit does.
DOT_THRESHOLD = 0.9995
# A norm at most this is "no direction": the vector is left undivided (mergekit's eps).
NORM_EPS = 1e-8
# Elements per chunk: mergekit's 1024 * 1024, which fixes the order of the sums.
CHUNK_ELEMENTS = 1 << 20


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    r"""Spherical linear interpolation of two tensors, each taken as one flat vector.

    With $\cos\theta = \frac{\langle v_0, v_1 \rangle}{\lVert v_0 \rVert \lVert v_1 \rVert}$
    (eq:slerp-tensor, with eq:slerp's weights):

    $$ \operatorname{slerp}(v_0, v_1; t)
       = \frac{\sin((1 - t)\theta)}{\sin\theta}\, v_0 + \frac{\sin(t\theta)}{\sin\theta}\, v_1 $$

    and $(1 - t)\, v_0 + t\, v_1$ when $|\cos\theta| > 0.9995$. The weights apply to the
    original tensors, so the result is not renormalized. ``t`` is not clamped. Arithmetic
    is float32 (float64 for float64 inputs); the result has ``v0``'s dtype.
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    if v0.numel() == 0:  # no direction: nothing to measure an angle from
        return lerp(v0, v1, t)
    # Step 1 (eq:slerp-tensor): cos theta of the whole flattened tensors, from their
    # normalized copies.
    cos_theta = cosine(v0, v1, eps)
    # Step 2 (eq:slerp): the weights s0 = sin((1 - t) theta) / sin theta and
    # s1 = sin(t theta) / sin theta, or (1 - t, t) past the threshold.
    w0, w1 = slerp_weights(cos_theta, t, dot_threshold)
    # Step 3 (eq:slerp-tensor): s0 v0 + s1 v1 on the original tensors, not renormalized
    # (its norm is eq:slerp-norm's), rounded to v0's dtype.
    return weighted_sum(v0, v1, w0, w1)


def slerp_weights(
    cos_theta: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""SLERP's two weights from $\cos\theta$: eq:slerp's, or $(1 - t, t)$ past the threshold.

    Both are computed in ``cos_theta``'s dtype (the work dtype), from ``t`` rounded to it,
    as mergekit computes them. Which pair applies is chosen by `torch.where`, not by an
    ``if`` on the cosine's value, as in mergekit: nothing waits for the sums to finish (on
    a GPU, no host synchronisation), and the angle of a (nearly) parallel pair is taken as
    0 so that the unused branch stays finite.
    """
    # t in float64 first, then rounded as torch.tensor(t, dtype=...) rounds it (1e308: inf).
    t_ = torch.full((), t, dtype=torch.float64, device=cos_theta.device).to(cos_theta.dtype)
    linear = cos_theta.abs() > dot_threshold  # nearly parallel or opposite: sin(theta) ~ 0
    theta = torch.acos(torch.where(linear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    w0 = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    w1 = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return w0, w1


def cosine(v0: torch.Tensor, v1: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    r"""$\cos\theta = \sum_i \frac{v_{0,i}}{\lVert v_0 \rVert} \frac{v_{1,i}}{\lVert v_1 \rVert}$.

    Normalizing before multiplying keeps the products far from float16's overflow. Rounding
    can push the sum just past 1, hence the clamp (it matters only beyond the fallback
    threshold, where the result is linear anyway). The result is a ``(1, 1)`` tensor.
    """
    n0, n1 = norm(v0, eps), norm(v1, eps)
    dots = [
        ((x / n0) * (y / n1)).sum(dim=1, keepdim=True)
        for (_, x), (_, y) in zip(_chunks(v0), _chunks(v1), strict=True)
    ]
    return torch.stack(dots).sum(dim=0).clamp(-1, 1)


def norm(v: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    r"""$\lVert v \rVert_2$ as the norm of its chunks' norms, or 1 when it is at most ``eps``.

    The result is a ``(1, 1)`` tensor. A (near-)zero vector is not normalized: dividing by
    1 leaves it as it is, and its cosine with anything is 0.
    """
    parts = [torch.linalg.vector_norm(chunk, dim=1, keepdim=True) for _, chunk in _chunks(v)]
    return norm_of_norms(parts, eps)


def norm_of_norms(parts: list[torch.Tensor], eps: float = NORM_EPS) -> torch.Tensor:
    """The norm of the chunks' norms ``parts``, or 1 when it is at most ``eps``."""
    total = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(total > eps, total, 1)


def lerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    r"""Linear interpolation, $(1 - t)\, v_0 + t\, v_1$, in ``v0``'s dtype.

    ``t`` is not clamped. This is SLERP's fallback, bit for bit.
    """
    t_ = torch.tensor(t, dtype=work_dtype(v0), device=v0.device)
    return weighted_sum(v0, v1, 1 - t_, t_)


def weighted_sum(
    v0: torch.Tensor, v1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor
) -> torch.Tensor:
    """``w0 * v0 + w1 * v1`` in the work dtype, chunk by chunk, returned in ``v0``'s dtype.

    Each product and the sum are rounded on their own (no fused multiply-add), as mergekit
    evaluates ``coef_a * x + coef_b * y``.
    """
    out = torch.empty((1, v0.numel()), dtype=v0.dtype, device=v0.device)
    for (part, x), (_, y) in zip(_chunks(v0), _chunks(v1), strict=True):
        out[:, part] = w0 * x + w1 * y  # the assignment rounds to v0's dtype
    return out.reshape(v0.shape)


def _chunks(v: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``v`` as one row (mergekit's batch of one output), chunk by chunk, in the work dtype.

    Each chunk is widened only when it is used, so no full-size float32 copy is made.
    """
    row = v.reshape(1, -1)
    for start in range(0, row.shape[1], CHUNK_ELEMENTS):
        part = slice(start, start + CHUNK_ELEMENTS)
        yield part, row[:, part].to(work_dtype(v))


def work_dtype(v: torch.Tensor) -> torch.dtype:
    """The precision of the arithmetic: float32, or float64 for float64 inputs (as mergekit)."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32
