"""The merge functions by name: ``pearl_edu.slerp``, ``pearl_edu.ties``, ...

Each is the core's function (`pearl_edu.core`): the same arguments and the same meaning
(``ties(base, others, ...)`` takes the models, not their task vectors), run on a backend
chosen by one more keyword, ``backend`` (`pearl_edu.backends.backend_for`): ``"auto"`` (the
default: on the CPU, the fast backend, with the core's bits), ``"reference"`` (the core
itself, as the book prints it), ``"cpu"`` or ``"device"``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from pearl_edu import core
from pearl_edu.backends import backend_for

BACKEND_KEYWORD = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")


def _on_a_backend(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The core's ``function``, run by the backend that ``backend=`` names."""
    operation = function.__name__

    @functools.wraps(function)
    def run(first, *args, backend: str = "auto", **options) -> torch.Tensor:
        device = (first if isinstance(first, torch.Tensor) else first[0]).device
        return getattr(backend_for(device, backend), operation)(first, *args, **options)

    signature = inspect.signature(function)
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), BACKEND_KEYWORD]
    )
    run.__doc__ = (
        f"{function.__doc__}\n\n    ``backend``: the backend to run on (`pearl_edu.functions`)."
    )
    return run


slerp = _on_a_backend(core.slerp)
lerp = _on_a_backend(core.lerp)
linear = _on_a_backend(core.linear)
task_arithmetic = _on_a_backend(core.task_arithmetic)
ties = _on_a_backend(core.ties)
dare = _on_a_backend(core.dare)
# mergekit's later methods: SCE and RAM (`pearl_edu.core.consensus`), NearSwap and Arcee
# Fusion (`pearl_edu.core.selective`).
sce = _on_a_backend(core.sce)
ram = _on_a_backend(core.ram)
ramplus_tl = _on_a_backend(core.ramplus_tl)
nearswap = _on_a_backend(core.nearswap)
arcee_fusion = _on_a_backend(core.arcee_fusion)
# The steps of TIES and DARE, for the chapters: the core's, which no backend replaces.
magnitude_prune = core.magnitude_prune
random_drop = core.random_drop
elect_signs = core.elect_signs
