r"""The GPU contract, and the inputs' scale it is stated at.

A GPU merge cannot give the reference's bits (it adds long sums in another order). Its
contract with the reference (`pearl_edu.backends.device`, the book's appendix "The GPU
contract": `COSINE_TOLERANCE`, `CONTRACT_STEPS`, `CONTRACT_MIN_COSINE`) is stated in steps of the output dtype at each element's **input scale**, the
size of the terms its method adds: for SLERP, $|w_0 x_i| + |w_1 y_i|$, the reference's
weights applied to the element's inputs (`input_scale`). A correct element where the two
weighted inputs nearly cancel is then small next to its scale, whatever its own ULP.

`MergeInputs` reads each output tensor's inputs from the models of a merge's config, so
that `pearl_edu.verify` can measure two outputs of that merge at their inputs' scale
(``input_scale_ulp``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pearl_edu.backends.cpu import cosine, on_cpu
from pearl_edu.core.interpolation import DOT_THRESHOLD, NORM_EPS, slerp_weights, work_dtype
from pearl_edu.errors import ModelError

if TYPE_CHECKING:
    from pearl_edu.config import MergeConfig


# SLERP's cosine differs from the reference's by at most this much. The reference's is
# mergekit's: torch's CPU norm of each 2^20-element chunk comes out about 3e-5 high, which
# leaves the cosine about 7e-5 below the exact value on tensors of 2^20 elements and more
# (measured in the book's appendix); the device's whole-tensor sums land within 1e-7 of
# it. The tolerance is the reference's error, with room to spare.
COSINE_TOLERANCE = 2e-4
# Every SLERP output element lies within this many steps of the output dtype of the
# reference's, the step taken at the element's input scale |w0 x| + |w1 y|
# (`slerp_input_scale`), for 0 <= t <= 1, norms not within a millionth of NORM_EPS, and a
# reference cosine of at least CONTRACT_MIN_COSINE (for more obtuse pairs the weights
# swing too fast with the angle). The book's appendix "The GPU contract" derives each.
CONTRACT_STEPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 2200}
CONTRACT_MIN_COSINE = {torch.bfloat16: -0.9, torch.float16: 0.0, torch.float32: 0.0}


def reference_weights(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float]:
    """SLERP's weights ``(w0, w1)`` as the reference core computes them (Python floats).

    The CPU backend's cosine (the core's bits, faster) and the core's weights.
    """
    work = work_dtype(v0)
    if v0.numel() == 0:
        cos = torch.ones((), dtype=work)  # no direction: the fallback's weights
    else:
        flat0, flat1 = (on_cpu(v).reshape(-1) for v in (v0, v1))
        cos = cosine(flat0, flat1, eps=NORM_EPS, work=work)
    w0, w1 = slerp_weights(cos, t)
    return float(w0), float(w1)


def slerp_input_scale(
    v0: torch.Tensor, v1: torch.Tensor, t: float, weights: tuple[float, float] | None = None
) -> torch.Tensor:
    r"""Each output element's input scale, $|w_0 x_i| + |w_1 y_i|$, in float64.

    The reference's weights (`reference_weights`) unless ``weights`` are given.
    """
    w0, w1 = weights if weights is not None else reference_weights(v0, v1, t)
    x, y = v0.to(torch.float64), v1.to(torch.float64)
    return x.abs().mul_(abs(w0)).add_(y.abs().mul_(abs(w1)))


def weight_sensitivity(cos: float, t: float) -> float:
    r"""How fast SLERP's weights move, relative to themselves, per unit of cosine.

    $\max_k |\partial \ln w_k / \partial \cos\theta|$ with $w_0 = \sin((1-t)\theta)/\sin\theta$
    and $w_1 = \sin(t\theta)/\sin\theta$:
    $|\tau \cot(\tau\theta) - \cot\theta| / \sin\theta$ for $\tau = 1 - t$ and $\tau = t$
    (a weight that is exactly 0, at $\tau = 0$, does not move). 0 in the linear fallback.
    """
    if abs(cos) > DOT_THRESHOLD:
        return 0.0
    theta = math.acos(cos)
    sensitivities = [
        abs(tau / math.tan(tau * theta) - 1 / math.tan(theta)) / math.sin(theta)
        for tau in (1 - t, t)
        if tau != 0
    ]
    return max(sensitivities, default=0.0)


class InputScale:
    """The input scale of a tensor's elements, computed only for those asked for.

    ``formula`` maps the inputs' values at some elements (float64, one tensor per input,
    in the inputs' order) to those elements' scales.
    """

    def __init__(
        self,
        formula: Callable[[list[torch.Tensor]], torch.Tensor],
        inputs: Sequence[torch.Tensor],
    ) -> None:
        self.formula = formula
        self.shape = tuple(inputs[0].shape)
        self.flat = [x.reshape(-1) for x in inputs]

    def at(self, part: slice, selected: torch.Tensor | None = None) -> torch.Tensor:
        """The scales of the flat elements ``part`` (those of them ``selected``, when given)."""
        values = [x[part] for x in self.flat]
        if selected is not None:
            values = [v[selected] for v in values]
        return self.formula([v.to(torch.float64) for v in values])

    def full(self) -> torch.Tensor:
        """Every element's scale, in the tensor's shape."""
        return self.at(slice(None)).reshape(self.shape)


def input_scale(
    method: str,
    inputs: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    *,
    name: str = "tensor",
) -> InputScale:
    r"""Each output element's input scale: the size of the terms its method adds.

    - ``slerp``: $|w_0 x_i| + |w_1 y_i|$, with the reference's weights
      (`slerp_input_scale`);
    - ``linear``: $\sum_k |w_k x_{k,i}|$, over $|\sum_k w_k|$ when ``normalize``;
    - ``task_arithmetic`` and ``ties``: $|b_i| + |\lambda| \max_k |\delta_{k,i}|$ when
      ``normalize`` (an average of the task vectors), else
      $|b_i| + |\lambda| \sum_k |w_k \delta_{k,i}|$.

    Other methods (DARE's random drops among them) have no element-by-element agreement
    to measure: `ModelError`.
    """
    if method == "slerp":
        other = 1 - base_index
        w0, w1 = reference_weights(inputs[base_index], inputs[other], float(params["t"]))

        def slerp_scale(x: list[torch.Tensor]) -> torch.Tensor:
            return x[base_index].abs().mul_(abs(w0)).add_(x[other].abs().mul_(abs(w1)))

        return InputScale(slerp_scale, inputs)
    if method == "linear":
        weights = [values["weight"] for values in input_params]
        divisor = (abs(sum(weights)) if params.get("normalize") else 1.0) or 1.0

        def linear_scale(x: list[torch.Tensor]) -> torch.Tensor:
            total = sum(v.abs() * abs(w) for v, w in zip(x, weights, strict=True))
            return total / divisor  # type: ignore[operator]

        return InputScale(linear_scale, inputs)
    if method in ("task_arithmetic", "ties"):
        others = [k for k in range(len(inputs)) if k != base_index]
        weights = [abs(input_params[k]["weight"]) for k in others]
        scale = abs(float(params.get("lambda", 1.0)))
        normalize = bool(params.get("normalize"))

        def task_vector_scale(x: list[torch.Tensor]) -> torch.Tensor:
            base = x[base_index]
            deltas = [(x[k] - base).abs() for k in others]
            if not deltas:
                return base.abs()
            if normalize:  # an average of the agreeing task vectors: at most the largest
                mixed = torch.stack(deltas).amax(dim=0)
            else:
                mixed = sum(d * w for d, w in zip(deltas, weights, strict=True))
            return base.abs() + scale * mixed  # type: ignore[operator]

        return InputScale(task_vector_scale, inputs)
    raise ModelError(
        f"{name}: --input-scale-ulp: merge method {method!r} has no input scale (slerp, "
        "linear, task_arithmetic and ties have one); compare with --scale-ulp instead"
    )


class MergeInputs:
    """The inputs of each output tensor of a merge, read from its models to give `input_scale`."""

    def __init__(self, config: MergeConfig | str | Path) -> None:
        from pearl_edu.config import MergeConfig, load_config, torch_dtype
        from pearl_edu.hub import resolve_model
        from pearl_edu.reading import ModelReader, read_header
        from pearl_edu.tensor_plan import plan

        if not isinstance(config, MergeConfig):
            config = load_config(config)
        self.dtype = (
            torch_dtype(config.dtype, where=config.source, key="dtype") if config.dtype else None
        )
        headers = {ref: read_header(resolve_model(ref)) for ref in config.models()}
        self.jobs = {job.name: job for job in plan(config, headers).tensors}
        self.readers = {ref: ModelReader(header) for ref, header in headers.items()}

    def scale(self, name: str) -> InputScale:
        """The input scale of output tensor ``name`` (`input_scale`), its inputs read."""
        job = self.jobs.get(name)
        if job is None:
            raise ModelError(f"{name}: not a tensor of the merge's config; verify its output")
        tensors = []
        for source in job.inputs:
            tensor = self.readers[source.model].read(source.tensor)
            tensors.append(tensor.to(self.dtype or tensor.dtype))
        input_params = job.input_params or [{}] * len(tensors)
        return input_scale(job.method, tensors, job.base_index, job.params, input_params, name=name)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
