r"""The pruning family: Model Breadcrumbs and DELLA, with mergekit 0.1.5's names and defaults.

Four task-vector methods that differ from TIES and DARE only in how they prune each task
vector $\delta_i = \theta_i - \theta_\text{base}$ before the usual last step
(`pearl_edu.core.combine`), each with mergekit's defaults:

- ``breadcrumbs``: drop the ``gamma`` fraction largest in magnitude and the smallest, keep
  ``density``; no sign election; ``normalize`` and ``rescale`` false.
- ``breadcrumbs_ties``: the same trim, then TIES' sign election; the same defaults.
- ``della``: drop at random, larger entries kept more often (probabilities from
  ``density - epsilon`` to ``density + epsilon`` by magnitude rank in each row); sign
  election; ``normalize`` and ``rescale`` true.
- ``della_linear``: the same drop, no sign election; ``normalize`` false, ``rescale`` true.

Every model but the base takes ``weight`` (required), ``density`` (default 1), and
``gamma`` (Breadcrumbs, default 0.01) or ``epsilon`` (DELLA, default 0.15); the shared
parameters are ``normalize``, ``lambda`` (default 1), ``rescale`` and ``int8_mask`` (which
changes nothing). The math is `pearl_edu.core.pruning`, run on whole tensors. Breadcrumbs
gives mergekit's bits. DELLA draws its masks as DARE does here: model ``i`` of a tensor from
a CPU generator seeded from the merge's seed, the tensor's name and ``i``
(`pearl_edu.methods.input_generators`), so a merge is reproducible and its draws are its
own, not mergekit's (which draws from torch's global generator in tensor order). Off the
CPU, Breadcrumbs runs on the tensors' device, as mergekit does, and DELLA on the CPU, so
that a seed keeps the same entries everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from pearl_edu.backends.reference import input_generators
from pearl_edu.core import pruning
from pearl_edu.method_parameters import PerNonBase
from pearl_edu.methods import REQUIRED, MergeContext, MergeInputs, merge_method


def _gamma_problem(values: Mapping[str, float], label: str) -> str | None:
    gamma = values["gamma"]
    if not 0 <= gamma <= 1:
        return (
            f"parameters.gamma: {gamma:g} for {label}: expected a fraction of entries to drop "
            "as outliers, from 0 to 1"
        )
    return None


def _epsilon_problem(values: Mapping[str, float], shape: tuple[int, ...], label: str) -> str | None:
    try:
        pruning.check_epsilon(values["density"], values["epsilon"])
    except ValueError as err:
        return f"parameters.epsilon: for {label}: {err}"
    if 0 < values["density"] < 1 and pruning.row_length(shape) < 2:
        return (
            f"della ranks each row's entries and shape {shape} has rows of one entry; give "
            f"{label} density 1 there or merge that tensor with another method"
        )
    return None


def _check(kind: str) -> Callable[..., str | None]:
    """The per-tensor check of one kind of pruning (see `MergeMethod.check`)."""

    def check(
        shape: tuple[int, ...],
        params: Mapping[str, float],
        input_params: Sequence[Mapping[str, float]],
        labels: Sequence[str],
    ) -> str | None:
        for values, label in zip(input_params, labels, strict=True):
            if not values:
                continue  # the base
            if kind == "outliers":
                problem = _gamma_problem(values, label)
            else:
                problem = _epsilon_problem(values, shape, label)
            if problem:
                return problem
        return None

    return check


def _breadcrumbs(*, sign_election: bool):
    def breadcrumbs(
        inputs: MergeInputs,
        run: MergeContext,
        *,
        weight: PerNonBase[float],
        density: PerNonBase[float] = 1.0,
        gamma: PerNonBase[float] = pruning.DEFAULT_GAMMA,
        normalize: bool = False,
        lambda_: float = 1.0,
        rescale: bool = False,
        int8_mask: bool = False,
    ) -> torch.Tensor:
        """Trim each task vector to a band of magnitudes (no outliers), then add them."""
        options = {
            "sign_election": sign_election,
            "normalize": normalize,
            "scale": lambda_,
            "rescale": rescale,
        }
        base, others = inputs.base, inputs.others
        return run.backend.breadcrumbs(base, others, weight, density, gamma, **options)

    return breadcrumbs


def _della(*, sign_election: bool, normalize: bool):
    def della(
        inputs: MergeInputs,
        run: MergeContext,
        *,
        weight: PerNonBase[float],
        density: PerNonBase[float] = 1.0,
        epsilon: PerNonBase[float] = pruning.DEFAULT_EPSILON,
        normalize: bool = normalize,
        lambda_: float = 1.0,
        rescale: bool = True,
        int8_mask: bool = False,
    ) -> torch.Tensor:
        """Drop entries at random, larger ones kept more often, then add (with or without TIES)."""
        options = {
            "sign_election": sign_election,
            "normalize": normalize,
            "scale": lambda_,
            "rescale": rescale,
        }
        # Drawn on the CPU, so that a seed keeps the same entries on any device.
        device = inputs.base.device
        base, others = inputs.base.cpu(), [other.cpu() for other in inputs.others]
        generators = input_generators(run.seed, len(others))
        merged = run.backend.della(base, others, weight, density, epsilon, generators, **options)
        return merged.to(device)

    return della


# The papers, for the model card (mergekit's names and links for the methods).
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"
TASK_VECTORS = {"models": (1, None), "base": REQUIRED}

merge_method(
    "breadcrumbs",
    **TASK_VECTORS,
    check=_check("outliers"),
    title="Model Breadcrumbs",
    reference=BREADCRUMBS_PAPER,
)(_breadcrumbs(sign_election=False))
merge_method(
    "breadcrumbs_ties",
    **TASK_VECTORS,
    check=_check("outliers"),
    title="Model Breadcrumbs with TIES",
    reference=BREADCRUMBS_PAPER,
)(_breadcrumbs(sign_election=True))
merge_method(
    "della",
    **TASK_VECTORS,
    random=True,
    check=_check("della"),
    title="DELLA",
    reference=DELLA_PAPER,
)(_della(sign_election=True, normalize=True))
merge_method(
    "della_linear",
    **TASK_VECTORS,
    random=True,
    check=_check("della"),
    title="Linear DELLA",
    reference=DELLA_PAPER,
)(_della(sign_election=False, normalize=False))
