"""The seam between the merge's math and its speed.

`pearl_edu.core` is the reference: plain torch that reads like the book's equations. A
backend computes the same thing fast, and the merge's methods (`pearl_edu.methods`) call
it through this small interface: SLERP and its linear fallback of one tensor, written into
a buffer the engine reuses.

Two backends, chosen by `backend_for` from the tensors' device and the ``backend`` asked for:

- `pearl_edu.backends.cpu` (``"exact"``): compiled loops, a helper thread, reused buffers,
  and the core's bits, which are mergekit 0.1.5's (``tests/test_backends.py`` compares
  them bit for bit). For a tensor on a GPU it takes the sums behind the angle on the CPU,
  from the host copy the engine read the tensor into, and runs only the weighted sum on
  the device: the CPU's bits, at the price of the copies (``pearl-edu merge --exact``).
- `pearl_edu.backends.cuda` (``"device"``): everything on the tensors' device, with no host
  synchronisation per tensor, to a derived contract with the core instead of its bits
  (``tests/test_contract.py``, on the CPU; the book's appendix "The GPU contract"). It has
  not yet run on a GPU.

``"auto"``, the default, is the device backend on a CUDA GPU and the CPU backend for
every other device. The device backend runs on CPU tensors only when asked (``backend="device"``), which
is how its logic and its contract are tested on a machine without a GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pearl_edu import core
from pearl_edu.backends import cpu, cuda
from pearl_edu.errors import ConfigError

# What `backend_for` (and ``pearl-edu merge``) accept: see the module's docstring.
BACKENDS = ("auto", "exact", "device")


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


def backend_for(device: torch.device | str, backend: str = "auto") -> Backend:
    """The backend for tensors on ``device``: ``"auto"``, ``"exact"`` or ``"device"``.

    ``"auto"`` is `pearl_edu.backends.cuda` on a CUDA GPU and `pearl_edu.backends.cpu`
    elsewhere (on the CPU: fast and exact); ``"exact"`` is the CPU backend on any device
    (mergekit 0.1.5's bits); ``"device"`` is the device backend on any device, the CPU
    included (its contract, checked without a GPU).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not understood: expected one of {BACKENDS}")
    if backend == "device" or (backend == "auto" and torch.device(device).type == "cuda"):
        return cuda  # type: ignore[return-value]  # a module with the Protocol's functions
    return cpu  # type: ignore[return-value]


def on_device(device: torch.device | str, backend: str = "auto") -> bool:
    """Whether ``backend`` on ``device`` is the device backend (`backend_for`)."""
    return backend_for(device, backend) is cuda  # type: ignore[comparison-overlap]
