"""The reference backend: the core itself, the code the book prints, run as it is.

Every backend is a `Reference` that replaces some of its operations with faster ones to the
same meaning (`pearl_edu.backends.cpu`, `pearl_edu.backends.device`); an operation it
does not replace is the core's. ``pearl-edu merge --backend reference`` merges with this
one alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pearl_edu import core
from pearl_edu.core import consensus, model_stock, pruning, selective, sphere
from pearl_edu.core.interpolation import DOT_THRESHOLD, NORM_EPS, slerp_weights, work_dtype


def into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, or ``out`` holding it when ``out`` is given (the engine's reused buffer)."""
    return result if out is None else out.copy_(result)


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> None:
    """Refuse an ``out`` that is not a contiguous tensor of ``like``'s shape, dtype and device."""
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


def _core(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The core's ``function`` as a backend operation: the same arguments, and ``out``."""

    def operation(self: Reference, *args, out: torch.Tensor | None = None, **options):
        return into(function(*args, **options), out)

    operation.__name__ = function.__name__
    operation.__doc__ = f"`{function.__module__}.{function.__name__}`, into ``out`` if given."
    return operation


def input_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per input of a tensor, seeded ``seed``, ``seed + 1``, ...

    One stream per input keeps an input's drops independent of the other inputs' densities.
    """
    return [torch.Generator().manual_seed(seed + index) for index in range(count)]


class Reference:
    """The core as a backend: plain torch, slow, and the bits every backend is tested against.

    Its operations are the core's functions (`CORE_OPERATIONS` and the families'), each
    with ``out``; a faster backend replaces some of them.
    """

    name = "reference"

    def generators(self, seed: int, count: int, device: torch.device) -> list[torch.Generator]:
        """The random streams of a tensor's inputs: CPU generators, whatever the device.

        A seed then keeps the same entries on any device (`pearl_edu.core.drop_mask` draws
        on the generator's device).
        """
        return input_generators(seed, count)

    def __repr__(self) -> str:
        return f"<pearl_edu backend {self.name!r}>"


# The core's functions, each an operation of every backend under its own name.
CORE_OPERATIONS = (core.slerp, core.lerp, core.linear, core.task_arithmetic, core.ties, core.dare)
FAMILY_OPERATIONS = (pruning.breadcrumbs, pruning.della, sphere.nuslerp, sphere.multislerp)
# mergekit's later methods, which no backend replaces: SCE, RAM, RAM+, NearSwap, Arcee Fusion.
LATEST_OPERATIONS = (
    consensus.sce,
    consensus.ram,
    consensus.ramplus_tl,
    selective.nearswap,
    selective.arcee_fusion,
)
for _function in (
    *CORE_OPERATIONS,
    *FAMILY_OPERATIONS,
    sphere.karcher_mean,
    model_stock.model_stock,
    *LATEST_OPERATIONS,
):
    setattr(Reference, _function.__name__, _core(_function))

BACKEND = Reference()


class Interpolating(Reference):
    """A backend whose SLERP is the core's, with two steps of its own: ``cosine`` and
    ``weighted_sum``.

    The weights are the core's (`pearl_edu.core.interpolation.slerp_weights`, chosen by
    `torch.where`); a subclass gives the cosine of two tensors (a 0-dimensional tensor),
    the weighted sum ``w0 * v0 + w1 * v1`` in ``v0``'s dtype (into ``out`` when given), and
    the device that lerp's weights are made on (`weights_device`).
    """

    def slerp(self, v0, v1, t, *, dot_threshold=DOT_THRESHOLD, eps=NORM_EPS, out=None):
        """`pearl_edu.core.slerp`, with this backend's cosine and weighted sum."""
        if v0.shape != v1.shape:
            raise ValueError(f"slerp: shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
        if v0.numel() == 0:  # no direction: nothing to measure an angle from
            return self.lerp(v0, v1, t, out=out)
        w0, w1 = slerp_weights(self.cosine(v0, v1, eps), t, dot_threshold)
        return self.weighted_sum(v0, v1, w0, w1, out=out)

    def lerp(self, v0, v1, t, *, out=None):
        """`pearl_edu.core.lerp`, with this backend's weighted sum."""
        if v0.shape != v1.shape:
            raise ValueError(f"lerp: shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
        t_ = torch.full((), t, dtype=torch.float64, device=self.weights_device(v0))
        t_ = t_.to(work_dtype(v0))  # rounded as torch.tensor(t, dtype=...) rounds it
        return self.weighted_sum(v0, v1, 1 - t_, t_, out=out)

    def cosine(self, v0: torch.Tensor, v1: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def weighted_sum(self, v0, v1, w0, w1, *, out=None) -> torch.Tensor:
        raise NotImplementedError

    def weights_device(self, v0: torch.Tensor) -> torch.device:
        raise NotImplementedError
