r"""The device backend: SLERP where its tensors are, with no host synchronisation.

Written for CUDA, where `pearl_edu.backends.backend_for` hands it out by default, but
device-agnostic: the same code runs on CPU tensors, which is how its logic is tested
without a GPU (``tests/test_device_backend.py``, ``tests/test_contract.py``). It has not
yet run on a GPU: its contract is derived and tested on the CPU, not yet measured on a GPU.

What keeps a GPU busy is what this backend avoids: a host synchronisation per tensor
(``.item()``, an ``if`` on a value computed on the device, boolean-mask indexing). The core
has none wherever mergekit's code has none (SLERP's weights and the task-vector methods'
divisors and rescale are chosen with `torch.where`), so this backend keeps only what truly
differs from the core:

- **SLERP's sums** are whole-tensor reductions on the device (`cosine`), not the core's
  2^20-element chunks, and the weighted sum is one pass (`weighted_sum`); the weights are
  the core's (`pearl_edu.core.interpolation.slerp_weights`).
- **TIES' trim** breaks ties at its cut by position (the core's ``stable=True``,
  ``--fast-trim`` on the CPU): a device's sort is not torch's CPU sort.
- **DARE's draws** come from generators on the tensors' device, seeded as the CPU's (seed +
  input index), so a GPU merge is reproducible, but its draws are not the CPU's.

Every other operation is the core's (`pearl_edu.backends.reference.Reference`), run on the
device. A device adds up long sums in another order than the core, so SLERP's results are
not the core's bits: what they should be is the contract (`pearl_edu.contract`), derived in
the book's appendix "The GPU contract" and checked by ``pearl-edu verify --config CONFIG
--input-scale-ulp N``. ``--backend cpu`` gives mergekit 0.1.5's bits on any device instead.
"""

from __future__ import annotations

import torch

from pearl_edu.backends.reference import Interpolating, check_out
from pearl_edu.core.interpolation import NORM_EPS, work_dtype


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
    check_out(out, like)
    total = torch.mul(x, w0)
    total.add_(torch.mul(y, w1))
    if out is None:
        return total.to(like.dtype).reshape(like.shape)
    out.view(-1).copy_(total)
    return out


def device_generators(seed: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per model on ``device``, seeded ``seed``, ``seed + 1``, ... as on the CPU.

    On the CPU these are the reference's own generators (the core's draws); a GPU's
    generator is another algorithm, so its draws are its own.
    """
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(count)]


class Device(Interpolating):
    """Everything on the tensors' device, with no host synchronisation (see the module)."""

    name = "device"

    def cosine(self, v0, v1, eps):
        work = work_dtype(v0)
        return cosine(v0.reshape(-1).to(work), v1.reshape(-1).to(work), eps)

    def weighted_sum(self, v0, v1, w0, w1, *, out=None):
        work = work_dtype(v0)
        flat0, flat1 = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
        return weighted_sum(flat0, flat1, w0, w1, like=v0, out=out)

    def weights_device(self, v0):
        return v0.device  # a fill there: no copy from the host

    def ties(self, base, others, weights, densities, *, stable=True, out=None, **options):
        # Ties at the cut by position: a device's sort is not torch's CPU sort.
        return super().ties(base, others, weights, densities, stable=True, out=out, **options)

    def generators(self, seed: int, count: int, device: torch.device) -> list[torch.Generator]:
        return device_generators(seed, count, device)


BACKEND = Device()
# SLERP and lerp of one tensor on this backend, to the contract (`pearl_edu.contract`).
slerp, lerp = BACKEND.slerp, BACKEND.lerp
