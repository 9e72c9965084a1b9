"""The math of a merge: one output tensor from its input tensors.

This module knows nothing of files, configs or layers. The engine calls
:func:`merge_tensor` once per output tensor; the methods it dispatches to are registered in
:data:`METHODS`, so that new methods (linear, task arithmetic, TIES, DARE) slot in beside
SLERP without touching the engine.

SLERP follows mergekit's meaning exactly (see the book's equation ``eq:slerp``): the whole
tensor is one vector, the angle comes from normalized copies, the weights are applied to the
original tensors, and nearly parallel (or opposite) tensors fall back to linear
interpolation. Arithmetic is float32 as in mergekit, and the sums behind the angle are
taken in mergekit's order, chunk by chunk, so that the results agree with mergekit's bit for
bit (see ``_cosine`` for why the order matters).

Large tensors are processed in chunks of about a million elements, so that no full-size
float32 copy of a 58M-element bfloat16 weight is ever made: memory stays at the output
tensor plus a few small buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pearl_edu.errors import ModelError

# Below this angle, |cos theta| > 0.9995 (about 1.8 degrees), sin(theta) is too small to
# divide by safely, so SLERP falls back to linear interpolation, as mergekit does.
DOT_THRESHOLD = 0.9995
# A tensor whose L2 norm is at most this is treated as "no direction" and left undivided.
NORM_EPS = 1e-8
# Elements per chunk: 4 MiB of float32 per buffer, small enough to stay in cache-friendly
# sizes and large enough that the Python loop costs nothing measurable.
CHUNK_ELEMENTS = 1 << 20


def lerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    r"""Linear interpolation of two tensors, in float32, returned in ``v0``'s dtype.

    $$ \operatorname{lerp}(v_0, v_1; t) = (1 - t)\, v_0 + t\, v_1 $$

    ``t = 0`` gives ``v0``, ``t = 1`` gives ``v1``; ``t`` is not clamped. This is exactly
    SLERP's fallback branch, bit for bit.
    """
    _check_same_shape(v0, v1, name="tensor")
    t_ = torch.tensor(t, dtype=_work_dtype(v0), device=v0.device)
    return _weighted_sum(v0, v1, 1 - t_, t_)


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
    (eq:slerp):

    $$ \operatorname{slerp}(v_0, v_1; t)
       = \frac{\sin((1 - t)\theta)}{\sin\theta}\, v_0 + \frac{\sin(t\theta)}{\sin\theta}\, v_1 $$

    and, when $|\cos\theta| > 0.9995$, $(1 - t)\, v_0 + t\, v_1$ instead. Both weights
    apply to the original tensors, so the result is not renormalized: its norm equals the
    inputs' only when their norms are equal. A norm at most ``eps`` is left undivided (an
    all-zero tensor gives $\cos\theta = 0$). ``t`` is not clamped. The result has ``v0``'s
    dtype and device.
    """
    _check_same_shape(v0, v1, name="tensor")
    work = _work_dtype(v0)
    t_ = torch.tensor(t, dtype=work, device=v0.device)
    if v0.numel() == 0:  # an empty tensor has no direction: nothing to interpolate
        return _weighted_sum(v0, v1, 1 - t_, t_)
    cos_theta = _cosine(v0.reshape(-1), v1.reshape(-1), eps=eps, work=work)

    if abs(cos_theta.item()) > dot_threshold:
        # Nearly parallel or opposite: sin(theta) ~ 0, so interpolate linearly instead.
        return _weighted_sum(v0, v1, 1 - t_, t_)

    # eq:slerp, with every scalar in the working precision, as mergekit computes it.
    theta = torch.acos(cos_theta)
    sin_theta = torch.sin(theta)
    weight0 = torch.sin((1 - t_) * theta) / sin_theta
    weight1 = torch.sin(t_ * theta) / sin_theta
    return _weighted_sum(v0, v1, weight0, weight1)


def _work_dtype(v: torch.Tensor) -> torch.dtype:
    """The precision of the arithmetic: float32, or float64 for float64 inputs (as mergekit)."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _cosine(a: torch.Tensor, b: torch.Tensor, *, eps: float, work: torch.dtype) -> torch.Tensor:
    r"""Cosine of the angle between two flat vectors, summed in mergekit's order.

    $$ \cos\theta = \sum_i \frac{a_i}{\lVert a \rVert} \frac{b_i}{\lVert b \rVert} $$

    where a norm of at most ``eps`` counts as 1 (the vector is not normalized).

    A float32 sum of 10^8 terms depends on the order in which it is taken, and a different
    cosine in its last digits changes the bfloat16 rounding of a fraction of the output.
    To reproduce mergekit's models bit for bit, the sums are taken exactly as mergekit takes
    them: per chunk of CHUNK_ELEMENTS, the norm of each chunk and then the norm of those norms;
    then the dot product of the normalized chunks and the sum of the chunk sums. (Summing in
    float64 would give a more accurate cosine, and outputs that differ from mergekit's.)
    """
    rows_a, rows_b = a.reshape(1, -1), b.reshape(1, -1)
    norm_parts_a, norm_parts_b = [], []
    for part in _chunks(a.numel()):
        norm_parts_a.append(torch.linalg.vector_norm(rows_a[:, part].to(work), dim=1, keepdim=True))
        norm_parts_b.append(torch.linalg.vector_norm(rows_b[:, part].to(work), dim=1, keepdim=True))
    norm_a = _norm_or_one(torch.linalg.vector_norm(torch.stack(norm_parts_a), dim=0), eps)
    norm_b = _norm_or_one(torch.linalg.vector_norm(torch.stack(norm_parts_b), dim=0), eps)
    dot_parts = []
    for part in _chunks(a.numel()):
        x = rows_a[:, part].to(work) / norm_a
        y = rows_b[:, part].to(work) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    # The clamp matters only beyond the fallback threshold, where the result is lerp anyway.
    return torch.stack(dot_parts).sum(dim=0).clamp(-1, 1).reshape(())


def _norm_or_one(norm: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm to divide by: mergekit leaves a (near-)zero vector undivided."""
    return torch.where(norm > eps, norm, 1)


def _weighted_sum(
    v0: torch.Tensor, v1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor
) -> torch.Tensor:
    """``w0 * v0 + w1 * v1`` in the working precision, chunk by chunk, in ``v0``'s dtype.

    Each product and the sum are rounded separately (no fused multiply-add), as mergekit
    evaluates ``coef_a * x + coef_b * y``: the same weights give the same bits.
    """
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    out = torch.empty(flat0.shape, dtype=v0.dtype, device=v0.device)
    if flat0.numel() == 0:
        return out.reshape(v0.shape)
    size = min(CHUNK_ELEMENTS, flat0.numel())
    buf0 = torch.empty(size, dtype=w0.dtype, device=v0.device)
    buf1 = torch.empty(size, dtype=w0.dtype, device=v0.device)
    for part in _chunks(flat0.numel()):
        n = part.stop - part.start
        x, y = buf0[:n], buf1[:n]
        x.copy_(flat0[part])
        y.copy_(flat1[part])
        x.mul_(w0)
        y.mul_(w1)
        x.add_(y)
        out[part] = x
    return out.reshape(v0.shape)


def _chunks(numel: int) -> Iterator[slice]:
    """Consecutive slices of at most CHUNK_ELEMENTS covering ``range(numel)``."""
    for start in range(0, numel, CHUNK_ELEMENTS):
        yield slice(start, min(start + CHUNK_ELEMENTS, numel))


def _check_same_shape(v0: torch.Tensor, v1: torch.Tensor, *, name: str) -> None:
    """Refuse to merge tensors of different shapes (mergekit 0.1.5 refuses too)."""
    if v0.shape != v1.shape:
        raise ModelError(
            f"{name}: shapes differ: base {tuple(v0.shape)} vs {tuple(v1.shape)}; merge only "
            "models of the same architecture and size (for different vocabularies, align "
            "the tokenizers and resize the embeddings first)"
        )


# ---------------------------------------------------------------------------------------
# The registry: what the config and the engine know about each method.


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the config, the plan and the engine see it.

    ``parameters`` are the method's shared parameters (one value per output tensor, such
    as SLERP's ``t``), each mapped to its default, or to ``None`` when it is required.
    ``merge`` takes the input tensors, the index of the base model's tensor among them
    and the resolved parameters, and returns the merged tensor.
    """

    name: str
    merge: Callable[[Sequence[torch.Tensor], int, Mapping[str, float]], torch.Tensor]
    parameters: Mapping[str, float | None] = field(default_factory=dict)
    min_models: int = 2
    max_models: int | None = None
    needs_base: bool = False

    def required_parameters(self) -> list[str]:
        """Names of the parameters a config must give (those with no default)."""
        return [name for name, default in self.parameters.items() if default is None]


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make a method available to configs and to :func:`merge_tensor` under its name."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def known_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(METHODS)


def merge_tensor(
    method: str,
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    *,
    name: str = "tensor",
) -> torch.Tensor:
    """Merge one output tensor from its inputs: the single entry point of the engine.

    ``tensors[base_index]`` is the base model's tensor; ``name`` is used in error messages.
    Raises :class:`~pearl_edu.errors.ModelError` naming the tensor when shapes differ.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(known_methods())}")
    if not 0 <= base_index < len(tensors):
        raise ValueError(f"{name}: base_index {base_index} is out of range for {len(tensors)}")
    for other in tensors:
        _check_same_shape(tensors[base_index], other, name=name)
    return METHODS[method].merge(tensors, base_index, params)


def _slerp_method(
    tensors: Sequence[torch.Tensor], base_index: int, params: Mapping[str, float]
) -> torch.Tensor:
    """SLERP from the base tensor (``t = 0``) towards the other one (``t = 1``)."""
    v0 = tensors[base_index]
    v1 = tensors[1 - base_index]
    return slerp(v0, v1, float(params["t"]))


register(
    MergeMethod(
        name="slerp",
        merge=_slerp_method,
        parameters={"t": None},
        min_models=2,
        max_models=2,
        needs_base=True,
    )
)
