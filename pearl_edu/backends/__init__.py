"""The seam between the merge's math and its speed.

`pearl_edu.core` is the reference: plain torch that reads like the book's equations. A
backend computes the same thing fast, and the merge's methods (`pearl_edu.methods`) call
it through this small interface: SLERP and its linear fallback of one tensor, written into
a buffer the engine reuses. ``tests/test_backends.py`` checks each backend against the
core, bit for bit.

Today one backend serves every device: `pearl_edu.backends.cpu` (compiled loops, a helper
thread, reused buffers). For a tensor on a GPU it still takes the sums behind the angle on
the CPU, from the host copy the engine read the tensor into, and runs only the weighted
sum on the device, so a GPU gives the CPU's bits. A backend that keeps everything on the
device would be returned by `backend_for` for its devices, tested to a documented bound.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pearl_edu import core
from pearl_edu.backends import cpu


class Backend(Protocol):
    """What the merge's methods need from a backend (the core's meaning, plus ``out``)."""

    def slerp(
        self,
        v0: torch.Tensor,
        v1: torch.Tensor,
        t: float,
        *,
        dot_threshold: float = ...,
        eps: float = ...,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def lerp(
        self, v0: torch.Tensor, v1: torch.Tensor, t: float, *, out: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class Reference:
    """The core as a backend: slow and plain, the bits every backend must give."""

    def slerp(
        self,
        v0: torch.Tensor,
        v1: torch.Tensor,
        t: float,
        *,
        dot_threshold: float = cpu.DOT_THRESHOLD,
        eps: float = cpu.NORM_EPS,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        result = core.slerp(v0, v1, t, dot_threshold=dot_threshold, eps=eps)
        return result if out is None else out.copy_(result)

    def lerp(
        self, v0: torch.Tensor, v1: torch.Tensor, t: float, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        result = core.lerp(v0, v1, t)
        return result if out is None else out.copy_(result)


REFERENCE = Reference()


def backend_for(device: torch.device | str) -> Backend:
    """The backend for tensors on ``device``: the CPU backend, on every device today."""
    return cpu  # type: ignore[return-value]  # a module with the Protocol's functions
