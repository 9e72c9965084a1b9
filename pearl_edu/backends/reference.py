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
from pearl_edu.core import model_stock, pruning, sphere


def into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, or ``out`` holding it when ``out`` is given (the engine's reused buffer)."""
    return result if out is None else out.copy_(result)


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
    """The core as a backend: plain torch, slow, and the bits every backend is tested against."""

    name = "reference"

    slerp = _core(core.slerp)
    lerp = _core(core.lerp)
    linear = _core(core.linear)
    task_arithmetic = _core(core.task_arithmetic)
    ties = _core(core.ties)
    dare = _core(core.dare)
    breadcrumbs = _core(pruning.breadcrumbs)
    della = _core(pruning.della)
    nuslerp = _core(sphere.nuslerp)
    multislerp = _core(sphere.multislerp)
    karcher_mean = _core(sphere.karcher_mean)
    model_stock = _core(model_stock.model_stock)

    def generators(self, seed: int, count: int, device: torch.device) -> list[torch.Generator]:
        """The random streams of a tensor's inputs: CPU generators, whatever the device.

        A seed then keeps the same entries on any device (`pearl_edu.core.drop_mask` draws
        on the generator's device).
        """
        return input_generators(seed, count)

    def __repr__(self) -> str:
        return f"<pearl_edu backend {self.name!r}>"


BACKEND = Reference()
