r"""Task arithmetic, TIES and DARE: the task-vector family, as mergekit 0.1.5 has it.

With the base model's tensor $\theta_\text{base}$, each other model's tensor gives a task
vector $\delta_i = \theta_i - \theta_\text{base}$, what fine-tuning changed. Task
arithmetic adds them back with weights; TIES first trims each to its largest entries and
lets the models vote on a sign per entry; DARE drops entries at random instead of
trimming (``dare_ties`` then votes as TIES does).

Every model but the base takes ``weight`` (required) and ``density`` (default 1); the
shared parameters are ``normalize``, ``lambda`` (the scale, default 1), ``rescale`` and
``int8_mask`` (mergekit's memory saving, which changes nothing here), with mergekit's
defaults: ``normalize`` true for TIES only, ``rescale`` true for DARE only. The math is the
core's (`pearl_edu.core.task_vectors`), run on the merge's backend. DARE's model ``i``
draws from the stream ``i`` of the tensor's seed (`pearl_edu.methods.MergeContext.generators`).
"""

from __future__ import annotations

import torch

from pearl_edu.method_parameters import PerNonBase
from pearl_edu.methods import REQUIRED, MergeContext, MergeInputs, merge_method

# Every task-vector method takes any number of models besides the base.
TASK_VECTORS = {"models": (1, None), "base": REQUIRED}


def _task_vector_method(operation: str, *, defaults: tuple[bool, bool], election: bool = False):
    """The method function of ``operation`` (a backend's): its flags' defaults differ."""
    normalize_default, rescale_default = defaults

    def merge(
        inputs: MergeInputs,
        run: MergeContext,
        *,
        weight: PerNonBase[float],
        density: PerNonBase[float] = 1.0,
        normalize: bool = normalize_default,
        lambda_: float = 1.0,
        rescale: bool = rescale_default,
        int8_mask: bool = False,
    ) -> torch.Tensor:
        base, others = inputs.base, inputs.others
        options = {"normalize": normalize, "scale": lambda_, "out": run.out}
        if operation == "task_arithmetic":  # nothing trimmed: density and rescale unused
            return run.backend.task_arithmetic(base, others, weight, **options)
        options["rescale"] = rescale
        if operation == "ties":  # trim, elect signs, average the agreeing entries
            return run.backend.ties(base, others, weight, density, stable=run.fast_trim, **options)
        # DARE: drop at random, rescale, add (electing signs first for dare_ties)
        generators = run.generators(len(others), base.device)
        return run.backend.dare(
            base, others, weight, density, generators, sign_election=election, **options
        )

    return merge


merge_method("task_arithmetic", **TASK_VECTORS)(
    _task_vector_method("task_arithmetic", defaults=(False, False))
)
merge_method("ties", **TASK_VECTORS)(_task_vector_method("ties", defaults=(True, False)))
merge_method("dare_linear", **TASK_VECTORS, random=True)(
    _task_vector_method("dare", defaults=(False, True))
)
merge_method("dare_ties", **TASK_VECTORS, random=True)(
    _task_vector_method("dare", defaults=(False, True), election=True)
)
