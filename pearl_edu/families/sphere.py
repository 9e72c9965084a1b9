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

from collections.abc import Mapping, Sequence

import torch

from pearl_edu.core import model_stock as stock
from pearl_edu.core import sphere
from pearl_edu.core.weighted_average import common_dtype
from pearl_edu.errors import ModelError
from pearl_edu.methods import MergeMethod, register


def _promoted(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs in their common dtype (bfloat16 and float16 meet in float32), as mergekit."""
    common = common_dtype(tensors)
    return [tensor.to(common) for tensor in tensors]


def _split(
    tensors: Sequence[torch.Tensor], base_index: int, input_params: Sequence[Mapping[str, float]]
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[float]]:
    """The base (None when there is none), the other tensors and their weights, in order.

    A method whose base is optional sees an empty row of per-input parameters for its base;
    without a base, every input, the one at ``base_index`` too, has its weight.
    """
    has_base = not input_params[base_index]
    others = [i for i in range(len(tensors)) if not (has_base and i == base_index)]
    base = tensors[base_index] if has_base else None
    return base, [tensors[i] for i in others], [input_params[i]["weight"] for i in others]


def _nuslerp_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
) -> torch.Tensor:
    """nuslerp of the two models (or of their task vectors, with a base)."""
    base, others, weights = _split(_promoted(tensors), base_index, input_params)
    return sphere.nuslerp(
        others,
        weights,
        base=base,
        row_wise=bool(params["nuslerp_row_wise"]),
        flatten=bool(params["nuslerp_flatten"]),
    )


def _multislerp_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
    *,
    name: str = "tensor",
) -> torch.Tensor:
    """multislerp of the models (or of their task vectors, with a base)."""
    base, others, weights = _split(_promoted(tensors), base_index, input_params)
    try:
        return sphere.multislerp(
            others,
            weights,
            base=base,
            normalize_weights=bool(params["normalize_weights"]),
            eps=float(params["eps"]),
        )
    except sphere.AntipodalError as err:
        raise ModelError(f"{name}: multislerp: {err}") from None


def _karcher_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
) -> torch.Tensor:
    """The Karcher mean of every input, the base too, with equal weights."""
    promoted = _promoted(tensors)
    return sphere.karcher_mean(
        promoted,
        [1.0 / len(promoted)] * len(promoted),
        max_iter=int(params["max_iter"]),
        tol=float(params["tol"]),
    )


def _karcher_check(
    shape: tuple[int, ...],
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    labels: Sequence[str],
) -> str | None:
    """``max_iter`` counts steps: a whole number (mergekit refuses 2.5 too)."""
    max_iter = params["max_iter"]
    if max_iter != int(max_iter):
        return f"parameters.max_iter: expected a whole number of steps, got {max_iter:g}"
    return None


def _model_stock_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
) -> torch.Tensor:
    """Model Stock: from the base towards the others' average, by their mutual angle."""
    promoted = _promoted(tensors)
    others = [tensor for i, tensor in enumerate(promoted) if i != base_index]
    return stock.model_stock(promoted[base_index], others, filter_wise=bool(params["filter_wise"]))


register(
    MergeMethod(
        name="nuslerp",
        merge=_nuslerp_method,
        parameters={"nuslerp_flatten": 1.0, "nuslerp_row_wise": 0.0},
        min_models=1,  # the count that matters is the one besides the base
        input_parameters={"weight": None},
        optional_base=True,
        min_non_base=2,
        max_non_base=2,
        title="NuSLERP",
    )
)
register(
    MergeMethod(
        name="multislerp",
        merge=_multislerp_method,
        parameters={"normalize_weights": 1.0, "eps": sphere.MULTISLERP_EPS},
        min_models=1,
        input_parameters={"weight": None},
        optional_base=True,
        min_non_base=1,
        named=True,
        title="Multi-SLERP",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
register(
    MergeMethod(
        name="karcher",
        merge=_karcher_method,
        parameters={"max_iter": float(sphere.KARCHER_MAX_ITER), "tol": sphere.KARCHER_TOL},
        min_models=1,
        check=_karcher_check,
        title="Karcher Mean",
        reference="https://arxiv.org/abs/2603.04972",
    )
)
register(
    MergeMethod(
        name="model_stock",
        merge=_model_stock_method,
        parameters={"filter_wise": 0.0},
        min_models=3,
        needs_base=True,
        title="Model Stock",
        reference="https://arxiv.org/abs/2403.19522",
    )
)
