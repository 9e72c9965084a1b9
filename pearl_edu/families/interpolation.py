r"""SLERP and linear: the interpolation family, as mergekit 0.1.5 has it.

=============  ==========  ============  ==============================================
method         base        models        parameters (default)
=============  ==========  ============  ==============================================
``slerp``      required    exactly 2     ``t`` (required): 0 is the base, 1 the other
``linear``     an input    at least 1    ``weight`` per model, the base too (required),
               like the                  ``normalize`` (true)
               others
=============  ==========  ============  ==============================================

The math is the core's (`pearl_edu.core.interpolation`, `pearl_edu.core.weighted_average`),
run on the merge's backend (`pearl_edu.backends`).
"""

from __future__ import annotations

import torch

from pearl_edu.method_parameters import PerInput
from pearl_edu.methods import REQUIRED, MergeContext, MergeInputs, merge_method


@merge_method("slerp", models=(2, 2), base=REQUIRED)
def slerp(inputs: MergeInputs, run: MergeContext, *, t: float) -> torch.Tensor:
    """SLERP from the base tensor (``t = 0``) towards the other one (``t = 1``)."""
    (other,) = inputs.others
    return run.backend.slerp(inputs.base, other, t, out=run.out)


@merge_method("linear", models=(1, None))
def linear(
    inputs: MergeInputs, run: MergeContext, *, weight: PerInput[float], normalize: bool = True
) -> torch.Tensor:
    """Linear: every input (the base too, when there is one) with its own weight."""
    return run.backend.linear(inputs.tensors, weight, normalize=normalize)
