r"""The CPU backend: SLERP of one tensor as `pearl_edu.core.slerp` computes it, fast.

The arithmetic is the core's, operation for operation and in the same order (so the bits
are the same, and ``tests/test_backends.py`` checks that they are); what differs is how
the passes over memory are made:

- **compiled loops** (`pearl_edu.kernels`): the cast to float32 before each chunk's norm,
  the normalized products behind the dot product and the weighted sum each run in one
  pass instead of torch's five or six, each operation rounded as torch rounds it;
- **a helper thread**: the two tensors' chunk norms are taken side by side, on a thread
  that lives as long as the merge (`helper_thread`);
- **reused buffers**: one scratch row per operand instead of a fresh float32 chunk per
  step, and ``out=``, the engine's kept output buffer, instead of a new result tensor;
- **host copies**: for a tensor on a GPU, the sums behind the angle are taken on the CPU,
  from the copy the engine read it into (`host_copies`), so a GPU gives the CPU's bits;
  only the elementwise weighted sum runs on the device.

The chunk size is the core's (`pearl_edu.core.interpolation.CHUNK_ELEMENTS`, read at each call):
it fixes the order of the float32 sums, and so mergekit's bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar

import torch

from pearl_edu import kernels
from pearl_edu.backends import task_vectors
from pearl_edu.backends.reference import Interpolating, check_out, into
from pearl_edu.backends.threads import helper_thread
from pearl_edu.core import interpolation as reference
from pearl_edu.core import linear as core_linear
from pearl_edu.core.interpolation import work_dtype


def cosine(a: torch.Tensor, b: torch.Tensor, *, eps: float, work: torch.dtype) -> torch.Tensor:
    """`pearl_edu.core.interpolation.cosine` of two flat CPU vectors: the same sums, in its order.

    Measured on a full-size 7B pair, a GPU's own sums moved the bfloat16 rounding of 0.3%
    of the output's elements, hence CPU tensors only (see `on_cpu`). The result is a
    0-dimensional CPU tensor.
    """
    a, b = on_cpu(a), on_cpu(b)
    rows_a, rows_b = a.reshape(1, -1), b.reshape(1, -1)
    # Reused scratch rows: a fresh 4 MiB tensor per chunk would cost page faults, not math.
    size = min(reference.CHUNK_ELEMENTS, a.numel())
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
            for part in chunks(a.numel())
        ]

    # The norm of a row runs on one thread (its additions are in one fixed order whatever
    # the thread count), so the two tensors' norms are taken side by side: b's by a helper
    # thread, a's here. Same operations, same bits, about half the time. (Not when torch
    # is given one thread: then the math keeps to one core.)
    if a.numel() > reference.CHUNK_ELEMENTS and torch.get_num_threads() > 1:
        with helper_thread() as helper:
            norms_b = helper.submit(chunk_norms, rows_b, scratch_b)
            try:
                norm_parts_a = chunk_norms(rows_a, scratch_a)
            finally:
                norm_parts_b = norms_b.result()
    else:
        norm_parts_a, norm_parts_b = chunk_norms(rows_a, scratch_a), chunk_norms(rows_b, scratch_b)
    norm_a = reference.norm_of_norms(norm_parts_a, eps)
    norm_b = reference.norm_of_norms(norm_parts_b, eps)
    dot_parts = []
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    scale_a, scale_b = norm_a.item(), norm_b.item()
    for part in chunks(a.numel()):
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


def weighted_sum(
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
    device (``w0`` and ``w1`` are scalar tensors, moved to ``v0``'s device). ``out``, a
    contiguous tensor of ``v0``'s shape, dtype and device, receives the result (and is
    returned) instead of a new tensor.
    """
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    check_out(out, v0)
    if out is None:
        out = torch.empty(v0.shape, dtype=v0.dtype, device=v0.device)
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
    size = min(reference.CHUNK_ELEMENTS, flat0.numel())
    buf0 = torch.empty(size, dtype=w0.dtype, device=v0.device)
    buf1 = torch.empty(size, dtype=w0.dtype, device=v0.device)
    for part in chunks(flat0.numel()):
        n = part.stop - part.start
        x, y = buf0[:n], buf1[:n]
        x.copy_(flat0[part])
        y.copy_(flat1[part])
        x.mul_(w0)
        y.mul_(w1)
        x.add_(y)
        out[part] = x
    return result


def chunks(numel: int) -> Iterator[slice]:
    """Consecutive slices of at most the core's CHUNK_ELEMENTS covering ``range(numel)``."""
    size = reference.CHUNK_ELEMENTS
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


# ---------------------------------------------------------------------------------------
# Host copies: a GPU tensor's angle is summed on the CPU, from the copy it was read into.

# The host copies `on_cpu` may use, by the id of the tensor they stand in for (with the
# tensor itself, so that only that tensor matches): set by `host_copies`, for its block.
_HOST_COPIES: ContextVar[Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar(
    "pearl_edu_host_copies", default=None
)


@contextlib.contextmanager
def host_copies(
    tensors: Sequence[torch.Tensor], hosts: Sequence[torch.Tensor | None]
) -> Iterator[None]:
    """Within the block, `on_cpu` takes each of ``tensors`` from its copy in ``hosts``.

    The engine reads each input into host memory before it moves it to the GPU
    (`pearl_edu.read_ahead.load_input` returns both); SLERP then sums its cosine from that
    copy instead of copying the tensor back (see `cosine`). ``hosts[i]``, a CPU tensor,
    must hold the same values as ``tensors[i]`` for the whole block (the engine's input
    buffers are reused only after a tensor's merge); None, or a copy of another shape or
    dtype, is ignored. On leaving the block, the copies are forgotten.
    """
    known = dict(_HOST_COPIES.get() or {})
    for tensor, host in zip(tensors, hosts, strict=True):
        if (
            host is not None
            and host.device.type == "cpu"
            and host.shape == tensor.shape
            and host.dtype == tensor.dtype
        ):
            known[id(tensor)] = (tensor, host)
    token = _HOST_COPIES.set(known)
    try:
        yield
    finally:
        _HOST_COPIES.reset(token)


def on_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself on the CPU; else its host copy (`host_copies`), or a copy to the CPU.

    A copy from CUDA goes through pinned memory, for a fast transfer.
    """
    if x.device.type == "cpu":
        return x
    tensor, host = (_HOST_COPIES.get() or {}).get(id(x), (None, None))
    if tensor is x and host is not None:
        return host
    copy = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
    return copy.copy_(x)


# ---------------------------------------------------------------------------------------
# The backend


class CPU(Interpolating):
    """The core's bits, fast: SLERP here, task arithmetic, TIES and DARE in slices.

    SLERP and lerp are the core's with this module's `cosine` and `weighted_sum`; task
    arithmetic, TIES and DARE are `pearl_edu.backends.task_vectors`' (slice by slice, a mask
    per model); every other method is the core's (`Reference`). For tensors on a GPU it
    gives the CPU's bits: SLERP's sums are taken from the host copies (`host_copies`) and
    only the weighted sum runs on the device; linear and the task-vector methods run on
    the CPU and send their result back.
    """

    name = "cpu"

    def cosine(self, v0, v1, eps):
        flat0, flat1 = on_cpu(v0).reshape(-1), on_cpu(v1).reshape(-1)
        return cosine(flat0, flat1, eps=eps, work=work_dtype(v0))

    def weighted_sum(self, v0, v1, w0, w1, *, out=None):
        return weighted_sum(v0, v1, w0, w1, out=out)

    def weights_device(self, v0):
        return torch.device("cpu")  # weighted_sum moves the two weights where v0 is

    def linear(self, tensors, weights, *, normalize=True, out=None):
        merged = core_linear([on_cpu(x) for x in tensors], weights, normalize=normalize)
        return into(merged.to(tensors[0].device), out)

    def task_arithmetic(self, base, others, weights, *, normalize=False, scale=1.0, out=None):
        options = {"normalize": normalize, "scale": scale, "rescale": False, "sign_election": False}
        return _on_cpu(base, others, weights, [1.0] * len(others), out, pruning=None, **options)

    def ties(self, base, others, weights, densities, *, stable=False, out=None, **options):
        options = {"normalize": True, "scale": 1.0, "rescale": False, **options}
        options |= {"sign_election": True, "position": stable}
        return _on_cpu(base, others, weights, densities, out, pruning="magnitude", **options)

    def dare(self, base, others, weights, densities, generators=None, *, out=None, **options):
        options = {
            "sign_election": False,
            "normalize": False,
            "scale": 1.0,
            "rescale": True,
            **options,
        }
        options |= {"generators": generators}
        return _on_cpu(base, others, weights, densities, out, pruning="random", **options)


def _on_cpu(base, others, weights, densities, out, **options):
    """`pearl_edu.backends.task_vectors.merge` on the CPU, the result where ``base`` is."""
    device = base.device
    if device.type == "cpu":
        return task_vectors.merge(base, others, weights, densities, out=out, **options)
    merged = task_vectors.merge(
        on_cpu(base), [on_cpu(x) for x in others], weights, densities, **options
    )
    return into(merged.to(device), out)


BACKEND = CPU()
# SLERP and lerp of one tensor on this backend: the core's bits (``tests/test_backends.py``).
slerp, lerp = BACKEND.slerp, BACKEND.lerp
