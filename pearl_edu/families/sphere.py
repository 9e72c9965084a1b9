r"""The sphere family: nuslerp, multislerp, karcher and model_stock, as mergekit 0.1.5 has them.

====================  ==========  ======================  ================================
method                base        models besides base     parameters (default)
====================  ==========  ======================  ================================
``nuslerp``           optional    exactly 2               ``weight`` per model (required),
                                                          ``nuslerp_flatten`` (true),
                                                          ``nuslerp_row_wise`` (false)
``multislerp``        optional    at least 1              ``weight`` per model (required),
                                                          ``normalize_weights`` (true),
                                                          ``eps`` (1e-8)
``karcher``           ignored:    at least 1 in all       ``max_iter`` (10), ``tol`` (1e-5)
                      one more
                      model
``model_stock``       required    at least 2              ``filter_wise`` (false)
====================  ==========  ======================  ================================

With a base, nuslerp and multislerp work on task vectors $\theta_i - \theta_\text{base}$
and add the base back; without one, on the weights themselves. karcher gives every model
the same weight, the base (when the config names one) included. The math is the reference
core's (`pearl_edu.core.sphere`, `pearl_edu.core.model_stock`), run on whole tensors after
the inputs are promoted to their common dtype, as mergekit does, so the bits are mergekit's.
"""

from __future__ import annotations

import torch

from pearl_edu.core import sphere
from pearl_edu.core.weighted_average import common_dtype
from pearl_edu.errors import ModelError
from pearl_edu.method_parameters import PerNonBase
from pearl_edu.methods import OPTIONAL, REQUIRED, MergeContext, MergeInputs, merge_method

# For the model card: each method's name in words, and the paper or post it comes from.
ABOUT = {
    "multislerp": {
        "title": "Multi-SLERP",
        "reference": "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    },
    "karcher": {"title": "Karcher Mean", "reference": "https://arxiv.org/abs/2603.04972"},
    "model_stock": {"title": "Model Stock", "reference": "https://arxiv.org/abs/2403.19522"},
}


def _promoted(inputs: MergeInputs) -> MergeInputs:
    """The inputs in their common dtype (bfloat16 and float16 meet in float32), as mergekit."""
    common = common_dtype(inputs.tensors)
    tensors = [tensor.to(common) for tensor in inputs.tensors]
    return MergeInputs(tensors, inputs.base_index, inputs.has_base)


def _base(inputs: MergeInputs) -> torch.Tensor | None:
    """The base tensor, or None for a merge without one (the base is optional)."""
    return inputs.base if inputs.has_base else None


@merge_method("nuslerp", models=(1, None), base=OPTIONAL, non_base=(2, 2), title="NuSLERP")
def nuslerp(
    inputs: MergeInputs,
    run: MergeContext,
    *,
    weight: PerNonBase[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """nuslerp of the two models (or of their task vectors, with a base)."""
    inputs = _promoted(inputs)
    options = {"base": _base(inputs), "row_wise": nuslerp_row_wise, "flatten": nuslerp_flatten}
    return run.backend.nuslerp(inputs.others, weight, **options)


@merge_method(
    "multislerp", models=(1, None), base=OPTIONAL, non_base=(1, None), **ABOUT["multislerp"]
)
def multislerp(
    inputs: MergeInputs,
    run: MergeContext,
    *,
    weight: PerNonBase[float],
    normalize_weights: bool = True,
    eps: float = sphere.MULTISLERP_EPS,
) -> torch.Tensor:
    """multislerp of the models (or of their task vectors, with a base)."""
    inputs = _promoted(inputs)
    options = {"base": _base(inputs), "normalize_weights": normalize_weights, "eps": eps}
    try:
        return run.backend.multislerp(inputs.others, weight, **options)
    except sphere.AntipodalError as err:
        raise ModelError(f"{run.name}: multislerp: {err}") from None


@merge_method("karcher", models=(1, None), **ABOUT["karcher"])
def karcher(
    inputs: MergeInputs,
    run: MergeContext,
    *,
    max_iter: int = sphere.KARCHER_MAX_ITER,
    tol: float = sphere.KARCHER_TOL,
) -> torch.Tensor:
    """The Karcher mean of every input, the base too, with equal weights."""
    tensors = _promoted(inputs).tensors
    weights = [1.0 / len(tensors)] * len(tensors)
    return run.backend.karcher_mean(tensors, weights, max_iter=max_iter, tol=tol)


@merge_method("model_stock", models=(3, None), base=REQUIRED, **ABOUT["model_stock"])
def model_stock(
    inputs: MergeInputs, run: MergeContext, *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock: from the base towards the others' average, by their mutual angle."""
    inputs = _promoted(inputs)
    return run.backend.model_stock(inputs.base, inputs.others, filter_wise=filter_wise)
