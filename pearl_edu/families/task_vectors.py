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

from pearl_edu.methods import REQUIRED, MergeContext, MergeInputs, PerNonBase, merge_method

# Every task-vector method takes any number of models besides the base.
TASK_VECTORS = {"models": (1, None), "base": REQUIRED}


@merge_method("task_arithmetic", **TASK_VECTORS)
def task_arithmetic(
    inputs: MergeInputs,
    run: MergeContext,
    *,
    weight: PerNonBase[float],
    density: PerNonBase[float] = 1.0,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """The base plus the weighted task vectors (nothing trimmed: ``density`` is unused)."""
    options = {"normalize": normalize, "scale": lambda_, "out": run.out}
    return run.backend.task_arithmetic(inputs.base, inputs.others, weight, **options)


@merge_method("ties", **TASK_VECTORS)
def ties(
    inputs: MergeInputs,
    run: MergeContext,
    *,
    weight: PerNonBase[float],
    density: PerNonBase[float] = 1.0,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Trim each task vector to its ``density`` largest entries, elect signs, average."""
    options = {"normalize": normalize, "scale": lambda_, "rescale": rescale}
    options |= {"stable": run.fast_trim, "out": run.out}
    return run.backend.ties(inputs.base, inputs.others, weight, density, **options)


def _dare(*, sign_election: bool):
    def dare(
        inputs: MergeInputs,
        run: MergeContext,
        *,
        weight: PerNonBase[float],
        density: PerNonBase[float] = 1.0,
        normalize: bool = False,
        lambda_: float = 1.0,
        rescale: bool = True,
        int8_mask: bool = False,
    ) -> torch.Tensor:
        """Drop task-vector entries at random (keeping ``density``), rescale, add."""
        generators = run.generators(len(inputs.others), inputs.base.device)
        options = {"sign_election": sign_election, "normalize": normalize, "scale": lambda_}
        options |= {"rescale": rescale, "out": run.out}
        base, others = inputs.base, inputs.others
        return run.backend.dare(base, others, weight, density, generators, **options)

    return dare


merge_method("dare_linear", **TASK_VECTORS, random=True)(_dare(sign_election=False))
merge_method("dare_ties", **TASK_VECTORS, random=True)(_dare(sign_election=True))
