"""The seam between the merge's math and its speed: one protocol, three backends.

`pearl_edu.core` is the reference: plain torch that reads like the book's equations. The
merge methods (`pearl_edu.families`) run every operation through a `Backend`, chosen by
`backend_for` from the tensors' device and the ``backend`` asked for:

- ``"reference"`` (`pearl_edu.backends.reference`): the core itself, run as it is; slow,
  and the bits the others are tested against (``pearl-edu merge --backend reference``).
- ``"cpu"`` (`pearl_edu.backends.cpu`): the core's bits, fast: SLERP with compiled loops, a
  helper thread and reused buffers, task arithmetic, TIES and DARE in slices with one
  mask per model (``tests/test_backends.py`` compares them bit for bit). For a tensor on a
  GPU it takes SLERP's sums on the CPU, from the host copy the engine read it into, and
  runs linear and the task-vector methods on the CPU: the CPU's bits, at the price of the
  copies (``pearl-edu merge --backend cpu``, or ``--exact``).
- ``"device"`` (`pearl_edu.backends.device`): everything on the tensors' device, with no
  host synchronisation, to a derived contract with the core instead of its bits
  (``tests/test_contract.py``, on the CPU; the book's appendix "The GPU contract"). It has
  not yet run on a GPU.

``"auto"``, the default, is the device backend on a CUDA GPU and the CPU backend for every
other device. The device backend runs on CPU tensors only when asked (``"device"``), which
is how its logic and its contract are tested on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from pearl_edu.backends import cpu, device, reference
from pearl_edu.errors import ConfigError

Tensor = torch.Tensor
Tensors = Sequence[torch.Tensor]
# What `backend_for` (and ``pearl-edu merge --backend``) accept: see the module's docstring.
BACKENDS = ("auto", "reference", "cpu", "device")


class Backend(Protocol):
    """What the merge methods ask of a backend: the core's operations, each with ``out``.

    Each operation means what the core's function of the same name means, with the same
    arguments; ``out``, a contiguous tensor of the result's shape, dtype and device, may
    receive the result (use the returned tensor). `generators` gives a tensor's random
    streams, one per input.
    """

    name: str

    def slerp(self, v0: Tensor, v1: Tensor, t: float, *, out: Tensor | None = ...) -> Tensor: ...
    def lerp(self, v0: Tensor, v1: Tensor, t: float, *, out: Tensor | None = ...) -> Tensor: ...
    def linear(self, tensors: Tensors, weights: Sequence[float], **options) -> Tensor: ...
    def task_arithmetic(self, base: Tensor, others: Tensors, weights, **options) -> Tensor: ...
    def ties(self, base: Tensor, others: Tensors, weights, densities, **options) -> Tensor: ...
    def dare(
        self, base: Tensor, others: Tensors, weights, densities, *args, **options
    ) -> Tensor: ...
    def breadcrumbs(self, base: Tensor, others: Tensors, *args, **options) -> Tensor: ...
    def della(self, base: Tensor, others: Tensors, *args, **options) -> Tensor: ...
    def nuslerp(self, tensors: Tensors, weights: Sequence[float], **options) -> Tensor: ...
    def multislerp(self, tensors: Tensors, weights: Sequence[float], **options) -> Tensor: ...
    def karcher_mean(self, tensors: Tensors, weights: Sequence[float], **options) -> Tensor: ...
    def model_stock(self, base: Tensor, others: Tensors, **options) -> Tensor: ...
    def sce(self, base: Tensor, others: Tensors, **options) -> Tensor: ...
    def ram(self, base: Tensor, others: Tensors, **options) -> Tensor: ...
    def ramplus_tl(self, base: Tensor, others: Tensors, **options) -> Tensor: ...
    def nearswap(self, base: Tensor, other: Tensor, t: float, **options) -> Tensor: ...
    def arcee_fusion(self, base: Tensor, other: Tensor, **options) -> Tensor: ...
    def generators(self, seed: int, count: int, device: torch.device) -> list[torch.Generator]: ...


BY_NAME: dict[str, Backend] = {
    "reference": reference.BACKEND,
    "cpu": cpu.BACKEND,
    "device": device.BACKEND,
}


def backend_for(device: torch.device | str, backend: str = "auto") -> Backend:
    """The backend for tensors on ``device``: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"device"``.

    ``"auto"`` is the device backend on a CUDA GPU and the CPU backend elsewhere (on the
    CPU: fast, and the core's bits); any other name is that backend, on any device.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not understood: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "device" if torch.device(device).type == "cuda" else "cpu"
    return BY_NAME[backend]
