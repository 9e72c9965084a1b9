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

from pearl_edu.core import pruning
from pearl_edu.methods import (
    MergeMethod,
    input_generators,
    register,
    task_vector_inputs,
    task_vector_parameters,
)


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


def _pruning_method(*, kind: str, sign_election: bool):
    """The engine's entry for Breadcrumbs (``"outliers"``) or DELLA (``"della"``)."""

    def merge(
        tensors: Sequence[torch.Tensor],
        base_index: int,
        params: Mapping[str, float],
        input_params: Sequence[Mapping[str, float]],
        seed: int,
    ) -> torch.Tensor:
        base, others, weights, densities = task_vector_inputs(tensors, base_index, input_params)
        rows = [values for index, values in enumerate(input_params) if index != base_index]
        options = {
            "sign_election": sign_election,
            "normalize": bool(params["normalize"]),
            "scale": float(params["lambda"]),
            "rescale": bool(params["rescale"]),
        }
        if kind == "outliers":
            gammas = [values["gamma"] for values in rows]
            return pruning.breadcrumbs(base, others, weights, densities, gammas, **options)
        epsilons = [values["epsilon"] for values in rows]
        generators = input_generators(seed, len(others))
        if base.device.type == "cpu":
            return pruning.della(base, others, weights, densities, epsilons, generators, **options)
        # The draw is made on the CPU, so a seed keeps the same entries on any device.
        cpu = [tensor.cpu() for tensor in tensors]
        merged = merge(cpu, base_index, params, input_params, seed)
        return merged.to(base.device)

    return merge


# The papers, for the model card (mergekit's names and links for the methods).
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

for _name, _kind, _election, _normalize, _rescale, _title, _paper in (
    ("breadcrumbs", "outliers", False, False, False, "Model Breadcrumbs", BREADCRUMBS_PAPER),
    (
        "breadcrumbs_ties",
        "outliers",
        True,
        False,
        False,
        "Model Breadcrumbs with TIES",
        BREADCRUMBS_PAPER,
    ),
    ("della", "della", True, True, True, "DELLA", DELLA_PAPER),
    ("della_linear", "della", False, False, True, "Linear DELLA", DELLA_PAPER),
):
    _extra = (
        {"gamma": pruning.DEFAULT_GAMMA}
        if _kind == "outliers"
        else {"epsilon": pruning.DEFAULT_EPSILON}
    )
    register(
        MergeMethod(
            name=_name,
            merge=_pruning_method(kind=_kind, sign_election=_election),
            parameters=task_vector_parameters(normalize=_normalize, rescale=_rescale),
            min_models=1,
            needs_base=True,
            input_parameters={"weight": None, "density": 1.0, **_extra},
            random=_kind == "della",
            check=_check(_kind),
            title=_title,
            reference=_paper,
        )
    )
