r"""The math of a merge: one output tensor from its input tensors.

This module knows nothing of files, configs or layers. The engine calls
:func:`merge_tensor` once per output tensor; the methods it dispatches to are registered in
:data:`METHODS`: SLERP, linear, task arithmetic, TIES, DARE (``dare_linear``) and DARE with
TIES' sign election (``dare_ties``).

SLERP follows mergekit's meaning exactly (see the book's equation ``eq:slerp``): the whole
tensor is one vector, the angle comes from normalized copies, the weights are applied to the
original tensors, and nearly parallel (or opposite) tensors fall back to linear
interpolation. Arithmetic is float32 as in mergekit, and the sums behind the angle are
taken in mergekit's order, chunk by chunk, so that the results agree with mergekit's bit for
bit (see ``_cosine`` for why the order matters).

Large tensors are processed in chunks of about a million elements, so that no full-size
float32 copy of a 58M-element bfloat16 weight is ever made: memory stays at the output
tensor plus a few small buffers. SLERP's elementwise steps (casts, divisions, products, the
weighted sum) run in compiled loops, one pass each, when `pearl_edu.kernels` is built, and in
torch otherwise; each operation is rounded alike either way, so the bits are the same.

The other methods follow mergekit 0.1.5's arithmetic step by step (same operations, same
order, same dtypes), so that they too agree with mergekit bit for bit on the CPU. They work
on whole tensors: TIES must rank all of a task vector's entries to trim it, and the task
vectors of all models are stacked to elect signs, so a merge of n models holds about n + 2
copies of the largest tensor.

Task vectors: with the base model's tensor $\theta_\text{base}$, each other model's tensor
gives $\delta_i = \theta_i - \theta_\text{base}$, what fine-tuning changed. Task arithmetic
adds them back with weights; TIES first trims each to its largest entries and lets the
models vote on a sign per entry; DARE drops entries at random instead of trimming.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pearl_edu import kernels
from pearl_edu.errors import ModelError

# Below this angle, |cos theta| > 0.9995 (about 1.8 degrees), sin(theta) is too small to
# divide by safely, so SLERP falls back to linear interpolation, as mergekit does.
DOT_THRESHOLD = 0.9995
# A tensor whose L2 norm is at most this is treated as "no direction" and left undivided.
NORM_EPS = 1e-8
# Elements per chunk: 4 MiB of float32 per buffer, small enough to stay in cache-friendly
# sizes and large enough that the Python loop costs nothing measurable.
CHUNK_ELEMENTS = 1 << 20
# Below these, an L1 norm counts as zero (no rescaling) and a sum of weights as zero
# (no division): mergekit's thresholds.
L1_EPS = 1e-7
WEIGHT_SUM_EPS = 1e-8
# Tensor seeds stay below 2**62, so that seed + input index fits a generator's 64 bits.
SEED_RANGE = 1 << 62


def lerp(
    v0: torch.Tensor, v1: torch.Tensor, t: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Linear interpolation of two tensors, in float32, returned in ``v0``'s dtype.

    $$ \operatorname{lerp}(v_0, v_1; t) = (1 - t)\, v_0 + t\, v_1 $$

    ``t = 0`` gives ``v0``, ``t = 1`` gives ``v1``; ``t`` is not clamped. This is exactly
    SLERP's fallback branch, bit for bit. ``out``, a contiguous tensor of ``v0``'s shape,
    dtype and device, receives the result (and is returned) instead of a new tensor.
    """
    _check_same_shape(v0, v1, name="tensor")
    t_ = torch.tensor(t, dtype=_work_dtype(v0))
    return _weighted_sum(v0, v1, 1 - t_, t_, out=out)


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = NORM_EPS,
    out: torch.Tensor | None = None,
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
    dtype and device (on a GPU, the cosine is still summed on the CPU, so that the result
    is the same, bit for bit); ``out``, a contiguous tensor of ``v0``'s shape, dtype and device,
    receives it (and is returned) instead of a new tensor, as the engine does with
    buffers it reuses.
    """
    _check_same_shape(v0, v1, name="tensor")
    work = _work_dtype(v0)
    # The scalars (cosine, angle, weights) are computed on the CPU whatever the tensors'
    # device, so that a GPU gives the CPU's bits (see `_cosine`). Only the weighted sum,
    # elementwise and so rounded alike everywhere, runs on the device.
    t_ = torch.tensor(t, dtype=work)
    if v0.numel() == 0:  # an empty tensor has no direction: nothing to interpolate
        return _weighted_sum(v0, v1, 1 - t_, t_, out=out)
    cos_theta = _cosine(_on_cpu(v0).reshape(-1), _on_cpu(v1).reshape(-1), eps=eps, work=work)

    if abs(cos_theta.item()) > dot_threshold:
        # Nearly parallel or opposite: sin(theta) ~ 0, so interpolate linearly instead.
        return _weighted_sum(v0, v1, 1 - t_, t_, out=out)

    # eq:slerp, with every scalar in the working precision, as mergekit computes it.
    theta = torch.acos(cos_theta)
    sin_theta = torch.sin(theta)
    weight0 = torch.sin((1 - t_) * theta) / sin_theta
    weight1 = torch.sin(t_ * theta) / sin_theta
    return _weighted_sum(v0, v1, weight0, weight1, out=out)


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

    The sums are taken on the CPU even for tensors on a GPU, whose reductions add in
    another order: measured on a full-size 7B pair, a GPU's cosines moved the bfloat16
    rounding of 0.3% of the output's elements. The sums use the host copy the engine
    read the tensor into (`keep_host_copy`); without one, the tensor is copied to the CPU
    whole, in its own dtype, through pinned memory. The result is a CPU tensor.
    """
    a, b = _on_cpu(a), _on_cpu(b)
    rows_a, rows_b = a.reshape(1, -1), b.reshape(1, -1)
    # Reused scratch rows: a fresh 4 MiB tensor per chunk would cost page faults, not math.
    size = min(CHUNK_ELEMENTS, a.numel())
    scratch_a, scratch_b, products = (torch.empty((1, size), dtype=work) for _ in range(3))

    def load(scratch: torch.Tensor, rows: torch.Tensor, part: slice) -> torch.Tensor:
        chunk = scratch[:, : part.stop - part.start]
        # The same values as rows[:, part].to(work); compiled, the cast needs no OpenMP
        # team, which would contend with the other thread's.
        if not kernels.widen(rows[:, part], chunk):
            chunk.copy_(rows[:, part])
        return chunk

    def chunk_norms(rows: torch.Tensor, scratch: torch.Tensor) -> list[torch.Tensor]:
        return [
            torch.linalg.vector_norm(load(scratch, rows, part), dim=1, keepdim=True)
            for part in _chunks(a.numel())
        ]

    # The norm of a row runs on one thread (its additions are in one fixed order whatever
    # the thread count), so the two tensors' norms are taken side by side: b's by a helper
    # thread, a's here. Same operations, same bits, about half the time. (Not when torch
    # is given one thread: then the math keeps to one core.)
    if a.numel() > CHUNK_ELEMENTS and torch.get_num_threads() > 1:
        norms_b = _helper_thread().submit(chunk_norms, rows_b, scratch_b)
        try:
            norm_parts_a = chunk_norms(rows_a, scratch_a)
        finally:
            norm_parts_b = norms_b.result()
    else:
        norm_parts_a, norm_parts_b = chunk_norms(rows_a, scratch_a), chunk_norms(rows_b, scratch_b)
    norm_a = _norm_or_one(torch.linalg.vector_norm(torch.stack(norm_parts_a), dim=0), eps)
    norm_b = _norm_or_one(torch.linalg.vector_norm(torch.stack(norm_parts_b), dim=0), eps)
    dot_parts = []
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    scale_a, scale_b = norm_a.item(), norm_b.item()
    for part in _chunks(a.numel()):
        xy = products[:, : part.stop - part.start]
        # (a / |a|) * (b / |b|), one rounding per operation: in one compiled pass when the
        # kernels take these tensors, else in torch's five. On one thread: torch's threads
        # still spin after each sum, and more threads here would only fight them.
        if not kernels.normalized_products(flat_a[part], flat_b[part], xy, scale_a, scale_b):
            x = load(scratch_a, rows_a, part).div_(norm_a)
            y = load(scratch_b, rows_b, part).div_(norm_b)
            torch.mul(x, y, out=xy)
        dot_parts.append(xy.sum(dim=1, keepdim=True))
    # The clamp matters only beyond the fallback threshold, where the result is lerp anyway.
    return torch.stack(dot_parts).sum(dim=0).clamp(-1, 1).reshape(())


_HELPER: ThreadPoolExecutor | None = None
_HELPER_LOCK = threading.Lock()


def _helper_thread() -> ThreadPoolExecutor:
    """One background thread for arithmetic that runs beside the calling thread's.

    It runs torch with one intra-op thread: a second team of OpenMP threads would spin
    between operations and slow the calling thread's own operations about twofold.
    """
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is None:
            _HELPER = ThreadPoolExecutor(
                1, thread_name_prefix="pearl-edu-math", initializer=_use_one_math_thread
            )
        return _HELPER


def _use_one_math_thread() -> None:
    """Give the calling thread one torch thread, and leave every other thread's as it was.

    `torch.set_num_threads` sets the calling thread's OpenMP setting, and also the number
    that each thread started afterwards takes on its first torch operation: set here
    alone, it would give every later thread of the process one thread. So the number new
    threads take is read first, and put back afterwards from a short-lived thread of its
    own (which leaves this thread's setting at one).
    """
    for_new_threads = torch.get_num_threads()  # a new thread's first call: what they get
    torch.set_num_threads(1)
    set_threads_for_new_threads(for_new_threads)


def threads_for_new_threads() -> int:
    """The number of torch threads that a thread started now would have."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def set_threads_for_new_threads(count: int) -> None:
    """Make threads started from now on use ``count`` torch threads; this thread's stays.

    torch keeps one process-wide number that new threads take, and sets it on every
    `torch.set_num_threads`; calling that from a throwaway thread changes only this number.
    """
    thread = threading.Thread(target=torch.set_num_threads, args=(count,))
    thread.start()
    thread.join()


def keep_host_copy(tensor: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Note that ``host``, a CPU tensor, holds ``tensor``'s values; returns ``tensor``.

    The engine reads each input into host memory before it moves it to the GPU; SLERP then
    sums its cosine from that copy instead of copying the tensor back (see `_cosine`).
    ``host`` must hold the same values as long as ``tensor`` is used (the engine's input
    buffers are reused only after a tensor's merge), and a copy of another shape or dtype
    is ignored.
    """
    if host.device.type == "cpu" and host.shape == tensor.shape and host.dtype == tensor.dtype:
        tensor._pearl_edu_host_copy = host  # type: ignore[attr-defined]
    return tensor


def _on_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself on the CPU; else its host copy (`keep_host_copy`), or a copy to the CPU.

    A copy from CUDA goes through pinned memory, for a fast transfer.
    """
    if x.device.type == "cpu":
        return x
    host = getattr(x, "_pearl_edu_host_copy", None)
    if host is not None:
        return host
    copy = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
    return copy.copy_(x)


def _norm_or_one(norm: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm to divide by: mergekit leaves a (near-)zero vector undivided."""
    return torch.where(norm > eps, norm, 1)


def _weighted_sum(
    v0: torch.Tensor,
    v1: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w0 * v0 + w1 * v1`` in the working precision, chunk by chunk, in ``v0``'s dtype.

    Each product and the sum are rounded separately (no fused multiply-add), as mergekit
    evaluates ``coef_a * x + coef_b * y``: the same weights give the same bits, on any
    device (``w0`` and ``w1`` are scalar tensors, moved to ``v0``'s device). The result
    goes into ``out`` when given (see `slerp`).
    """
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    if out is None:
        out = torch.empty(v0.shape, dtype=v0.dtype, device=v0.device)
    elif (
        out.shape != v0.shape
        or out.dtype != v0.dtype
        or out.device != v0.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out: expected a contiguous {tuple(v0.shape)} {v0.dtype} tensor on {v0.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    result, out = out, out.view(-1)
    if flat0.numel() == 0:
        return result
    # One compiled pass when the kernels take these tensors (CPU, bfloat16 or float32),
    # with the same roundings as the torch loop below.
    if (
        v0.device.type == "cpu"
        and w0.dtype == torch.float32
        and v1.dtype == v0.dtype
        and kernels.weighted_sum(
            flat0, flat1, out, w0.item(), w1.item(), threads=torch.get_num_threads()
        )
    ):
        return result
    w0, w1 = w0.to(v0.device), w1.to(v0.device)
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
    return result


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
# Linear: a weighted average of whole models.


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    r"""Weighted sum of tensors, divided by the sum of the weights when ``normalize``.

    $$ \operatorname{linear}(x_1, \dots, x_n) = \frac{\sum_i w_i\, x_i}{\sum_i w_i}
       \quad\text{(or just } \textstyle\sum_i w_i\, x_i \text{ without normalize)} $$

    Arithmetic is float32 (float64 for float64 inputs); the result has the inputs' common
    dtype. The sum is accumulated input by input with ``addcmul_``, exactly as mergekit
    does, so the results agree bit for bit.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"linear: {len(tensors)} tensors but {len(weights)} weights")
    common = _common_dtype(tensors)
    work = _work_dtype(tensors[0].to(common))
    # Coefficients shaped to broadcast over the tensor, as mergekit's batched kernel has them.
    coefficients = torch.tensor(list(weights), dtype=work, device=tensors[0].device)
    scalar_shape = (1,) * tensors[0].dim()
    result = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    for tensor, coefficient in zip(tensors, coefficients.unbind(0), strict=True):
        result.addcmul_(tensor.to(common), coefficient.reshape(scalar_shape))
    if normalize:
        result.div_(coefficients.sum().reshape(scalar_shape))
    return result.to(common)


# ---------------------------------------------------------------------------------------
# Task vectors: what fine-tuning added to the base model, pruned, weighted and summed.


def magnitude_prune(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    r"""Keep the ``density`` fraction of ``delta``'s entries largest in magnitude (TIES' trim).

    $$ \operatorname{trim}(\delta)_j = \delta_j\, [\, |\delta_j| \text{ is among the }
       k = \max(1, \lfloor \rho N \rfloor) \text{ largest} \,] $$

    ``density >= 1`` keeps everything and ``density <= 0`` nothing. Among equal magnitudes,
    which ones survive is decided by ``torch.argsort``, as in mergekit (for bit-identical
    results), not by position. ``rescale`` scales the survivors back to the L1 norm of
    ``delta`` (see :func:`random_drop`).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()  # argsort of bfloat16 is slow on the CPU
    largest = torch.argsort(magnitudes, descending=True)[:keep]
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[largest] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def random_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    r"""DARE's drop: keep each entry with probability ``density``, then rescale the survivors.

    With $m_j \sim \operatorname{Bernoulli}(\rho)$ and, when ``rescale``, the scale that keeps
    the L1 norm (mergekit's choice; the DARE paper divides by $\rho$, which keeps it only
    on average):

    $$ \operatorname{drop}(\delta) = \frac{\lVert \delta \rVert_1}{\lVert m \odot \delta
       \rVert_1}\; m \odot \delta $$

    ``density >= 1`` returns ``delta`` unchanged. The mask is drawn on the CPU from
    ``generator`` (a CPU generator), so the same seed drops the same entries on any device.
    """
    if density >= 1:
        return delta
    # mergekit works in bfloat16 for bfloat16 tensors and in float32 otherwise.
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32)
    # mergekit fills a tensor of the working dtype with the density: in bfloat16, 0.3 is
    # stored as 0.30078125, and that is the probability its draws are compared with.
    threshold = torch.tensor(density, dtype=work).item()
    mask = (draws < threshold).to(device=delta.device, dtype=work)
    dropped = _rescaled(delta.to(work), mask, rescale)
    return dropped.to(delta.dtype)


def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``tensor * mask``, scaled back to the L1 norm of ``tensor`` when ``rescale``.

    Nothing is rescaled when either norm is below 1e-7 (nothing to keep, or nothing kept).
    """
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def elect_signs(weighted_deltas: torch.Tensor, *, int8_mask: bool = False) -> torch.Tensor:
    r"""TIES' sign election: where each weighted delta agrees with the sign of their sum.

    For stacked weighted deltas $w_i \delta_i$ (first axis: the models):

    $$ s = \operatorname{sgn}\Bigl(\sum_i w_i \delta_i\Bigr) \ (\text{zero counts as } +1),
       \qquad \operatorname{agree}_{ij} = [\operatorname{sgn}(w_i \delta_{ij}) = s_j] $$

    An entry that is exactly zero (pruned, or unchanged by fine-tuning) never agrees.
    ``int8_mask`` only saves memory: the result is the same.
    """
    mask_dtype = torch.int8 if int8_mask else weighted_deltas.dtype
    signs = weighted_deltas.sign().to(mask_dtype)
    elected = (weighted_deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return signs == elected


def task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    r"""Add weighted task vectors to the base: the last step of task arithmetic, TIES and DARE.

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\, \delta_i}{D} $$

    where $\delta_i$ are the (already pruned or dropped) task vectors, $\lambda$ is
    ``scale`` (the YAML's ``lambda``) and $D = \sum_i w_i$ with ``normalize`` (1 without).
    With ``sign_election`` (TIES), only entries agreeing with the elected sign are summed
    and $D$ is the sum of the weights of the agreeing entries, element by element.
    A divisor of 0 is replaced by 1. Arithmetic is in the inputs' common dtype, as in
    mergekit (so bfloat16 inputs are merged in bfloat16).
    """
    if len(deltas) != len(weights):
        raise ValueError(f"task arithmetic: {len(deltas)} task vectors but {len(weights)} weights")
    if not deltas:
        return base
    stacked = torch.stack([delta.to(base.dtype) for delta in deltas])
    # The weights take the tensors' dtype (bfloat16 rounds 0.3 to 0.30078125), as in mergekit.
    weights_ = torch.tensor(list(weights), dtype=base.dtype, device=base.device)
    weights_ = weights_.reshape((len(deltas),) + (1,) * base.dim())
    stacked.mul_(weights_)
    if sign_election:
        agree = elect_signs(stacked, int8_mask=int8_mask)
        mixed = (stacked * agree).sum(dim=0)
        divisor = (weights_ * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = weights_.sum(dim=0)
        divisor[divisor.abs() < WEIGHT_SUM_EPS] = 1
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return (base + mixed).to(base.dtype)


def ties(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    scale: float = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    r"""TIES merging: trim each task vector, elect signs, average the agreeing entries.

    $$ \theta = \theta_\text{base} + \lambda\,
       \frac{\sum_i w_i\, \operatorname{trim}_{\rho_i}(\delta_i)\, [\text{agrees}]}
            {\sum_i w_i\, [\text{agrees}]} $$

    with $\delta_i = \theta_i - \theta_\text{base}$ and $\operatorname{trim}$ from
    :func:`magnitude_prune`. ``rescale`` scales each trimmed delta back to its L1 norm.
    """
    base, others = _aligned(base, others)
    deltas = [
        magnitude_prune(other - base, density, rescale=rescale)
        for other, density in zip(others, densities, strict=True)
    ]
    return task_arithmetic(
        base,
        deltas,
        weights,
        sign_election=True,
        normalize=normalize,
        scale=scale,
        int8_mask=int8_mask,
    )


def dare(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    rescale: bool = True,
    int8_mask: bool = False,
) -> torch.Tensor:
    r"""DARE: drop task-vector entries at random, rescale, then add (``dare_linear``).

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\,
       \operatorname{drop}_{\rho_i}(\delta_i)}{D} $$

    with :func:`random_drop` using ``generators[i]`` for model ``i``. With
    ``sign_election`` it is ``dare_ties``: the dropped deltas go through TIES' election.
    """
    base, others = _aligned(base, others)
    deltas = [
        random_drop(other - base, density, generator, rescale=rescale)
        for other, density, generator in zip(others, densities, generators, strict=True)
    ]
    return task_arithmetic(
        base,
        deltas,
        weights,
        sign_election=sign_election,
        normalize=normalize,
        scale=scale,
        int8_mask=int8_mask,
    )


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype every input is promoted to before the math (bfloat16 + float16 -> float32)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _aligned(
    base: torch.Tensor, others: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and the other tensors, all in their common dtype (mergekit promotes too)."""
    common = _common_dtype([base, *others])
    return base.to(common), [other.to(common) for other in others]


def tensor_seed(seed: int, tensor_name: str) -> int:
    """The seed of one output tensor: a hash of the merge's seed and the tensor's name.

    Each tensor's random drops then depend neither on the order in which tensors are
    merged nor on whether the merge was interrupted and resumed.
    """
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_RANGE


def input_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per input of a tensor, seeded ``seed``, ``seed + 1``, ...

    One stream per input keeps an input's drops independent of the other inputs' densities.
    """
    return [torch.Generator().manual_seed(seed + index) for index in range(count)]


# ---------------------------------------------------------------------------------------
# The registry: what the config and the engine know about each method.


# What the engine calls: (tensors, base index, shared parameters, per-input parameters, seed).
MergeFunction = Callable[
    [Sequence[torch.Tensor], int, Mapping[str, float], Sequence[Mapping[str, float]], int],
    torch.Tensor,
]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the config, the plan and the engine see it.

    ``parameters`` are the method's shared parameters (one value per output tensor, such
    as SLERP's ``t``), each mapped to its default, or to ``None`` when it is required.
    ``input_parameters`` are per-input parameters (one value per input model, such as
    ``weight`` and ``density``); they apply to every input, or to every input but the base
    when ``base_has_input_parameters`` is false. ``random`` methods draw from a seed.
    ``merge`` takes the input tensors, the index of the base model's tensor among them,
    the shared parameters, the per-input parameters (one mapping per input) and the
    tensor's seed, and returns the merged tensor; a method with ``writes_into_out`` also
    takes a keyword ``out``, a tensor to write the result into.
    """

    name: str
    merge: MergeFunction
    parameters: Mapping[str, float | None] = field(default_factory=dict)
    min_models: int = 2
    max_models: int | None = None
    needs_base: bool = False
    input_parameters: Mapping[str, float | None] = field(default_factory=dict)
    base_has_input_parameters: bool = False
    random: bool = False
    writes_into_out: bool = False

    def required_parameters(self) -> list[str]:
        """Names of the parameters a config must give (those with no default)."""
        return [name for name, default in self.parameters.items() if default is None]

    def required_input_parameters(self) -> list[str]:
        """Names of the per-input parameters every input (but the base) must be given."""
        return [name for name, default in self.input_parameters.items() if default is None]

    def takes_input_parameters(self, index: int, base_index: int) -> bool:
        """Whether input ``index`` has per-input parameters (the base may not)."""
        return self.base_has_input_parameters or index != base_index


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
    input_params: Sequence[Mapping[str, float]] | None = None,
    seed: int | None = None,
    name: str = "tensor",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one output tensor from its inputs: the single entry point of the engine.

    ``tensors[base_index]`` is the base model's tensor; ``input_params[i]`` holds the
    per-input parameters of ``tensors[i]`` (missing ones take the method's defaults);
    ``seed`` is this tensor's seed for random methods (by default derived from seed 0 and
    ``name``, see :func:`tensor_seed`); ``name`` is also used in error messages.
    ``out`` (a contiguous tensor of the base tensor's shape, dtype and device) receives the
    result when the method can write into it (``writes_into_out``), which saves the engine
    a fresh output tensor; otherwise a new tensor is returned. Use the returned tensor.
    Raises :class:`~pearl_edu.errors.ModelError` naming the tensor when shapes differ.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(known_methods())}")
    if not 0 <= base_index < len(tensors):
        raise ValueError(f"{name}: base_index {base_index} is out of range for {len(tensors)}")
    for other in tensors:
        _check_same_shape(tensors[base_index], other, name=name)
    spec = METHODS[method]
    per_input = _with_input_defaults(spec, len(tensors), base_index, input_params, name)
    tensor_seed_ = tensor_seed(0, name) if seed is None else seed
    if out is not None and spec.writes_into_out:
        return spec.merge(tensors, base_index, params, per_input, tensor_seed_, out=out)
    return spec.merge(tensors, base_index, params, per_input, tensor_seed_)


def _with_input_defaults(
    spec: MergeMethod,
    count: int,
    base_index: int,
    given: Sequence[Mapping[str, float]] | None,
    name: str,
) -> list[dict[str, float]]:
    """Per-input parameters completed with the method's defaults; a missing required one fails."""
    given = given if given is not None else [{}] * count
    if len(given) != count:
        raise ValueError(f"{name}: {count} tensors but {len(given)} sets of input parameters")
    completed = []
    for index, values in enumerate(given):
        if not spec.takes_input_parameters(index, base_index):
            completed.append({})
            continue
        row = {}
        for parameter, default in spec.input_parameters.items():
            if parameter not in values and default is None:
                raise ValueError(f"{name}: input {index} has no {parameter!r} ({spec.name})")
            row[parameter] = float(values.get(parameter, default))  # type: ignore[arg-type]
        completed.append(row)
    return completed


def _slerp_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLERP from the base tensor (``t = 0``) towards the other one (``t = 1``)."""
    v0 = tensors[base_index]
    v1 = tensors[1 - base_index]
    return slerp(v0, v1, float(params["t"]), out=out)


def _linear_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
) -> torch.Tensor:
    """Linear: every input (the base too, when there is one) with its own weight."""
    weights = [values["weight"] for values in input_params]
    return linear(tensors, weights, normalize=bool(params["normalize"]))


def _task_vector_method(*, pruning: str | None, sign_election: bool) -> MergeFunction:
    """The engine's entry for task arithmetic (no pruning), TIES (magnitude) or DARE (random)."""

    def merge(
        tensors: Sequence[torch.Tensor],
        base_index: int,
        params: Mapping[str, float],
        input_params: Sequence[Mapping[str, float]],
        seed: int,
    ) -> torch.Tensor:
        base = tensors[base_index]
        others = [tensor for index, tensor in enumerate(tensors) if index != base_index]
        rows = [values for index, values in enumerate(input_params) if index != base_index]
        weights = [values["weight"] for values in rows]
        densities = [values["density"] for values in rows]
        options = {
            "normalize": bool(params["normalize"]),
            "scale": float(params["lambda"]),
            "rescale": bool(params["rescale"]),
            "int8_mask": bool(params["int8_mask"]),
        }
        if pruning == "magnitude":
            return ties(base, others, weights, densities, **options)
        if pruning == "random":
            generators = input_generators(seed, len(others))
            return dare(
                base, others, weights, densities, generators, sign_election=sign_election, **options
            )
        options.pop("rescale")  # nothing is pruned, so there is nothing to rescale
        base, others = _aligned(base, others)
        deltas = [other - base for other in others]
        return task_arithmetic(base, deltas, weights, sign_election=sign_election, **options)

    return merge


def _task_vector_parameters(*, normalize: bool, rescale: bool) -> dict[str, float | None]:
    """Shared parameters of the task-vector methods, with mergekit's defaults."""
    return {
        "normalize": float(normalize),
        "lambda": 1.0,
        "rescale": float(rescale),
        "int8_mask": 0.0,
    }


# A task-vector method needs a weight for every model but the base; density defaults to 1.
TASK_VECTOR_INPUTS: dict[str, float | None] = {"weight": None, "density": 1.0}

register(
    MergeMethod(
        name="slerp",
        merge=_slerp_method,
        parameters={"t": None},
        min_models=2,
        max_models=2,
        needs_base=True,
        writes_into_out=True,
    )
)
register(
    MergeMethod(
        name="linear",
        merge=_linear_method,
        parameters={"normalize": 1.0},
        min_models=1,
        input_parameters={"weight": None},
        base_has_input_parameters=True,
    )
)
for _name, _pruning, _election, _normalize, _rescale in (
    ("task_arithmetic", None, False, False, False),
    ("ties", "magnitude", True, True, False),
    ("dare_linear", "random", False, False, True),
    ("dare_ties", "random", True, False, True),
):
    register(
        MergeMethod(
            name=_name,
            merge=_task_vector_method(pruning=_pruning, sign_election=_election),
            parameters=_task_vector_parameters(normalize=_normalize, rescale=_rescale),
            min_models=1,
            needs_base=True,
            input_parameters=TASK_VECTOR_INPUTS,
            random=_pruning == "random",
        )
    )
