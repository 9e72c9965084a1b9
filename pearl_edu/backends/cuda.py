r"""The device backend: each merge's math where its tensors are, as whole-tensor torch ops.

Written for CUDA, where `pearl_edu.backends.backend_for` hands it out by default, but
device-agnostic: the same code runs on CPU tensors, which is how its logic is tested
without a GPU (``tests/test_cuda_backend.py``, ``tests/test_contract.py``). It has not yet
run on a GPU: its contract is derived and tested on the CPU, not yet measured on a GPU.

What keeps a GPU busy is what this module avoids: a host synchronisation per tensor.
There is no ``.item()``, no ``if`` on a value computed on the device, and no tensor made
from Python numbers by a blocking copy:

- **SLERP**: the norms and the dot product are whole-tensor reductions, in float32 (float64
  for float64 inputs); the weights come from the cosine by tensor ops, and the linear
  fallback is chosen by `torch.where`, not by a branch. The inputs are cast on the device.
- **task arithmetic, TIES, DARE**: the core's steps on whole tensors. TIES' trim finds the
  magnitude at its cut by sorting the magnitudes' bit patterns and keeps the entries tied
  there first in the tensor first (the core's ``stable=True``, ``--fast-trim`` on the CPU);
  DARE draws its masks from generators on the tensors' device, seeded as the CPU's (seed +
  input index), so a GPU merge is reproducible, but its random draws are not the CPU's.

A device adds up long sums in another order than the reference core, so the results are
not the core's bits. What they should be is stated by the contract below (`COSINE_TOLERANCE`,
`CONTRACT_STEPS`, `slerp_input_scale`), derived in the book's appendix "The GPU contract",
and checked by ``pearl-edu verify --config CONFIG --input-scale-ulp N``. ``--exact``
(``backend="exact"``) gives mergekit 0.1.5's bits on any device instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pearl_edu.backends import cpu
from pearl_edu.backends.cpu import on_cpu
from pearl_edu.core import interpolation as reference
from pearl_edu.core.task_vectors import L1_EPS, WEIGHT_SUM_EPS
from pearl_edu.core.weighted_average import common_dtype

DOT_THRESHOLD = reference.DOT_THRESHOLD
NORM_EPS = reference.NORM_EPS
work_dtype = reference.work_dtype

# ---------------------------------------------------------------------------------------
# The contract with the reference core (derived in the book's appendix "The GPU contract").

# SLERP's cosine differs from the reference's by at most this much. The reference's is
# mergekit's: torch's CPU norm of each 2^20-element chunk comes out about 3e-5 high, which
# leaves the cosine about 7e-5 below the exact value on tensors of 2^20 elements and more
# (measured in the book's appendix); the device's whole-tensor sums land within 1e-7 of
# it. The tolerance is the reference's error, with room to spare.
COSINE_TOLERANCE = 2e-4
# Every SLERP output element lies within this many steps of the output dtype of the
# reference's, the step taken at the element's input scale |w0 x| + |w1 y|
# (`slerp_input_scale`), for 0 <= t <= 1, norms not within a millionth of NORM_EPS, and a
# reference cosine of at least CONTRACT_MIN_COSINE (for more obtuse pairs the weights
# swing too fast with the angle). The book's appendix "The GPU contract" derives each.
CONTRACT_STEPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 2200}
CONTRACT_MIN_COSINE = {torch.bfloat16: -0.9, torch.float16: 0.0, torch.float32: 0.0}


def reference_weights(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float]:
    """SLERP's weights ``(w0, w1)`` as the reference core computes them (Python floats)."""
    work = work_dtype(v0)
    t_ = torch.tensor(t, dtype=work)
    if v0.numel() == 0:
        return float(1 - t_), float(t_)
    # The CPU backend's cosine: the core's bits (tests/test_backends.py), faster.
    flat0, flat1 = (on_cpu(v).reshape(-1) for v in (v0, v1))
    cos = cpu.cosine(flat0, flat1, eps=NORM_EPS, work=work)
    if cos.abs().item() > DOT_THRESHOLD:
        return float(1 - t_), float(t_)
    theta = torch.acos(cos)
    w0 = torch.sin((1 - t_) * theta) / torch.sin(theta)
    w1 = torch.sin(t_ * theta) / torch.sin(theta)
    return float(w0), float(w1)


def slerp_input_scale(
    v0: torch.Tensor, v1: torch.Tensor, t: float, weights: tuple[float, float] | None = None
) -> torch.Tensor:
    r"""Each output element's input scale, $|w_0 x_i| + |w_1 y_i|$, in float64.

    The reference's weights (`reference_weights`) unless ``weights`` are given.
    """
    w0, w1 = weights if weights is not None else reference_weights(v0, v1, t)
    x, y = v0.to(torch.float64), v1.to(torch.float64)
    return x.abs().mul_(abs(w0)).add_(y.abs().mul_(abs(w1)))


def weight_sensitivity(cos: float, t: float) -> float:
    r"""How fast SLERP's weights move, relative to themselves, per unit of cosine.

    $\max_k |\partial \ln w_k / \partial \cos\theta|$ with $w_0 = \sin((1-t)\theta)/\sin\theta$
    and $w_1 = \sin(t\theta)/\sin\theta$:
    $|\tau \cot(\tau\theta) - \cot\theta| / \sin\theta$ for $\tau = 1 - t$ and $\tau = t$
    (a weight that is exactly 0, at $\tau = 0$, does not move). 0 in the linear fallback.
    """
    if abs(cos) > DOT_THRESHOLD:
        return 0.0
    theta = math.acos(cos)
    sensitivities = [
        abs(tau / math.tan(tau * theta) - 1 / math.tan(theta)) / math.sin(theta)
        for tau in (1 - t, t)
        if tau != 0
    ]
    return max(sensitivities, default=0.0)


# ---------------------------------------------------------------------------------------
# SLERP


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = NORM_EPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`pearl_edu.core.slerp` on the tensors' device, without a host synchronisation.

    ``out``, a contiguous tensor of ``v0``'s shape, dtype and device, receives the result
    (and is returned) instead of a new tensor.
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    work = work_dtype(v0)
    x, y = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    if x.numel() == 0:  # no direction: the fallback (a shape, not a value: no sync)
        w0, w1 = lerp_weights(t, work, x.device)
    else:
        w0, w1 = slerp_weights(cosine(x, y, eps), t, dot_threshold)
    return weighted_sum(x, y, w0, w1, like=v0, out=out)


def lerp(
    v0: torch.Tensor, v1: torch.Tensor, t: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`pearl_edu.core.lerp` on the tensors' device (see `slerp` for ``out``)."""
    if v0.shape != v1.shape:
        raise ValueError(f"lerp: shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    work = work_dtype(v0)
    w0, w1 = lerp_weights(t, work, v0.device)
    return weighted_sum(v0.reshape(-1).to(work), v1.reshape(-1).to(work), w0, w1, like=v0, out=out)


def cosine(x: torch.Tensor, y: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    r"""$\langle x / \lVert x \rVert, y / \lVert y \rVert \rangle$ of two flat work-dtype vectors.

    Whole-tensor sums, in whatever order the device adds: the core takes torch's norm of
    chunks of 2^20 (mergekit's order), so the two differ (`COSINE_TOLERANCE`), this one
    being the nearer to the exact value. A norm at
    most ``eps`` is taken as 1, as in the core. A 0-dimensional tensor on the device.
    """
    # Sums of squares rather than torch.linalg.vector_norm, whose float32 result on the
    # CPU drifts by 3e-5 on 2^20 elements; torch's sums add pairwise (a tree on a GPU).
    norm_x = x.square().sum().sqrt()
    norm_y = y.square().sum().sqrt()
    norm_x = torch.where(norm_x > eps, norm_x, 1)
    norm_y = torch.where(norm_y > eps, norm_y, 1)
    # Normalized before multiplying, as in the core: no product overflows. A sum rather
    # than torch.dot: torch's sums add pairwise (a tree on a GPU, a cascade on the CPU),
    # where a CPU BLAS dot accumulates along the vector and drifts by 1e-6 in 10^5 terms.
    products = torch.mul(x / norm_x, y / norm_y)
    return products.sum().clamp(-1, 1)


def slerp_weights(
    cos: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""SLERP's weights from a 0-dimensional cosine, on its device: eq:slerp, or $(1-t, t)$.

    Both branches are computed and `torch.where` keeps one: where $\sin\theta = 0$ the
    unused branch holds inf or NaN, which `torch.where` does not let through.
    """
    work = cos.dtype
    t_ = torch.full((), t, dtype=work, device=cos.device)  # a fill: no copy from the host
    one_minus_t = 1 - t_
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    w0 = torch.sin(one_minus_t * theta) / sin_theta
    w1 = torch.sin(t_ * theta) / sin_theta
    linear = cos.abs() > dot_threshold
    return torch.where(linear, one_minus_t, w0), torch.where(linear, t_, w1)


def lerp_weights(t: float, work: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(1 - t, t)`` as 0-dimensional ``work`` tensors on ``device``, ``t`` rounded first."""
    t_ = torch.full((), t, dtype=work, device=device)
    return 1 - t_, t_


def weighted_sum(
    x: torch.Tensor,
    y: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    like: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w0 * x + w1 * y`` of flat work-dtype vectors, in ``like``'s dtype and shape.

    Each product and the sum are rounded on their own, as in the core; the cast to the
    output dtype runs on the device.
    """
    if out is not None and (
        out.shape != like.shape
        or out.dtype != like.dtype
        or out.device != like.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out: expected a contiguous {tuple(like.shape)} {like.dtype} tensor on "
            f"{like.device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    total = torch.mul(x, w0)
    total.add_(torch.mul(y, w1))
    if out is None:
        return total.to(like.dtype).reshape(like.shape)
    out.view(-1).copy_(total)
    return out


# ---------------------------------------------------------------------------------------
# Linear, task arithmetic, TIES and DARE


def small_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few numbers as a tensor on ``device``, without a blocking copy.

    On a GPU they go through pinned memory, asynchronously; each is rounded to ``dtype``
    on the host first, as ``torch.tensor(values, dtype=dtype)`` rounds them.
    """
    host = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """`pearl_edu.core.linear` on the tensors' device (the same operations, no sync)."""
    if len(tensors) != len(weights):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    common = common_dtype(tensors)
    work = work_dtype(tensors[0].to(common))
    device = tensors[0].device
    w = small_tensor(weights, work, device)
    result = torch.zeros(tensors[0].shape, dtype=work, device=device)
    for tensor, weight in zip(tensors, w.unbind(0), strict=True):
        result.addcmul_(tensor.to(common), weight)
    if normalize:
        result.div_(w.sum())
    return result.to(common)


def merge_task_vectors(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    pruning: str | None,
    sign_election: bool,
    normalize: bool,
    scale: float,
    rescale: bool,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Task arithmetic (``pruning=None``), TIES (``"magnitude"``) or DARE (``"random"``).

    The arguments of `pearl_edu.backends.task_vectors.merge`; DARE's model ``i`` draws from
    a generator on the tensors' device seeded ``seed + i`` (`device_generators`).
    """
    common = common_dtype([base, *others])
    base = base.to(common)
    deltas = [other.to(common) - base for other in others]
    if pruning == "magnitude":
        deltas = [
            trim(delta, density, rescale=rescale)
            for delta, density in zip(deltas, densities, strict=True)
        ]
    elif pruning == "random":
        generators = device_generators(seed, len(deltas), base.device)
        deltas = [
            drop(delta, density, generator, rescale=rescale)
            for delta, density, generator in zip(deltas, densities, generators, strict=True)
        ]
    result = combine(
        base, deltas, weights, sign_election=sign_election, normalize=normalize, scale=scale
    )
    if out is None:
        return result
    return out.copy_(result)


def device_generators(seed: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per model on ``device``, seeded ``seed``, ``seed + 1``, ... as on the CPU.

    On the CPU these are `pearl_edu.methods.input_generators`' own generators (the core's
    draws); a GPU's generator is another algorithm, so its draws are its own.
    """
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(count)]


def trim(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """TIES' trim (`pearl_edu.core.magnitude_prune` with ``stable=True``), on the device.

    The magnitude at the cut is the ``keep``-th largest of the magnitudes' bit patterns
    (`magnitude_keys`, ordered as the magnitudes sort, NaN largest), read off a sort of
    the keys alone: on a GPU a radix sort of 16-bit keys, a few milliseconds for 58M of
    them (`torch.kthvalue` would do the same with one thread block per row, and this is
    one row). The entries above the cut are kept, and of those equal to it, the first in
    the tensor.
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    if density <= 0 or numel == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * numel))
    keys = magnitude_keys(delta.reshape(-1))
    cut = torch.sort(keys).values[numel - keep]  # a 0-dimensional view: no sync
    above = keys > cut
    tied = keys == cut
    room = keep - above.sum()  # how many tied entries still fit: a device tensor
    mask = above | (tied & (tied.cumsum(0) <= room))
    return rescaled(delta, mask.reshape(delta.shape).to(delta.dtype), rescale)


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """Integers of ``values``' width ordered as their magnitudes sort, NaNs largest and tied.

    The sign bit cleared, an IEEE float read as an integer grows with its magnitude.
    """
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    largest = torch.iinfo(int_dtype).max
    keys = values.view(int_dtype) & largest
    return keys.masked_fill_(values.isnan(), largest)


def drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    """DARE's drop (`pearl_edu.core.random_drop`) with ``generator``, on its device."""
    if density >= 1:
        return delta
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    probability = torch.full_like(delta, density, dtype=work)
    mask = torch.bernoulli(probability, generator=generator)
    return rescaled(delta.to(work), mask, rescale).to(delta.dtype)


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`pearl_edu.core.rescaled`, its "nothing to rescale" test a `torch.where`."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    nothing = (before < L1_EPS) | (after < L1_EPS)
    return masked * torch.where(nothing, 1, before / after)  # x * 1 is x, bit for bit


def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """`pearl_edu.core.combine`, with `torch.where` where the core assigns through a mask."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} task vectors but {len(weights)} weights")
    if not deltas:
        return base
    stacked = torch.stack([delta.to(base.dtype) for delta in deltas])
    w = small_tensor(weights, base.dtype, base.device)
    w = w.reshape((len(deltas),) + (1,) * base.dim())
    stacked = stacked * w
    if sign_election:
        signs = stacked.sign()
        elected = (stacked.sum(dim=0) >= 0).to(signs.dtype) * 2 - 1
        agree = signs == elected
        mixed = (stacked * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, 1, divisor)
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < WEIGHT_SUM_EPS, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return (base + mixed).to(base.dtype)
