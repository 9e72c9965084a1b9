r"""mergekit's latest methods: SCE, RAM, RAM+, NearSwap and Arcee Fusion, as 0.1.5 has them.

Each keeps the base model's tensor and chooses, entry by entry, which changes of the other
models to take: by their variance and sign (SCE), by how many models made them (RAM, RAM+),
by how close the two models already are (NearSwap), or by how much they change the row's
softmax (Arcee Fusion).

================  ========  =====================  ==============================================
method            base      models besides base    parameters (default)
================  ========  =====================  ==============================================
``sce``           required  any number             ``select_topk`` (1), ``int8_mask`` (false)
``ram``           required  any number             ``epsilon`` (1e-5)
``ramplus_tl``    required  any number             ``r`` (0.1), ``alpha`` (0.2), ``epsilon``
                                                   (1e-5)
``nearswap``      required  exactly 1              ``t`` (required)
``arcee_fusion``  required  exactly 1              none
================  ========  =====================  ==============================================

Every parameter is one value per tensor (a gradient over the layers works as for SLERP's
``t``); none is per model. With the base alone, sce, ram and ramplus_tl give the base.
mergekit checks no range here, and neither does pearl_edu: ``select_topk`` of 0 or less
selects nothing (the base), 1 or more everything; a negative ``t`` keeps the base.
``int8_mask`` changes nothing (it stores SCE's masks in less memory). The math is the
reference core's (`pearl_edu.core.consensus`, `pearl_edu.core.selective`), run on whole
tensors after the inputs are promoted to their common dtype, as mergekit does, so the bits
are mergekit's. ramplus_tl and arcee_fusion return float32 from 16-bit inputs, and the plan
writes those tensors in float32 unless ``out_dtype`` says otherwise, as mergekit writes them
(`pearl_edu.tensor_checks.result_dtype`).

Arcee Fusion on a tensor of more than a million entries estimates its quartiles from a
million entries drawn at random. It draws them as DARE and DELLA draw here: from a CPU
generator seeded from the merge's seed and the tensor's name
(`pearl_edu.backends.reference.input_generators`), so a merge is reproducible and its draw
is its own, not mergekit's (which draws from torch's global generator in tensor order).

mergekit lets NearSwap copy the base's tensor, and Arcee Fusion the one model's, when an
optional tensor is missing from the other model; pearl_edu's plan needs every tensor in
every model (the tied ``lm_head`` read from the embeddings aside) and refuses, in one line,
a model that lacks one, whatever the method.
"""

from __future__ import annotations

import torch

from pearl_edu.backends.reference import input_generators
from pearl_edu.core import consensus
from pearl_edu.core.weighted_average import common_dtype
from pearl_edu.methods import REQUIRED, MergeContext, MergeInputs, merge_method

# For the model card: each method's name in words, and the paper or post it comes from
# (mergekit's names and links).
SCE_PAPER = "https://arxiv.org/abs/2408.07990"
RAM_PAPER = "https://arxiv.org/abs/2601.13572"
NEARSWAP_CARD = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
ARCEE = "https://arcee.ai"
# The task-vector methods take the base and any number of models besides it (none too);
# the two-model ones the base and exactly one more.
TASK_VECTORS = {"models": (1, None), "base": REQUIRED}
TWO_MODELS = {"models": (2, 2), "base": REQUIRED, "non_base": (1, 1)}


def _promoted(inputs: MergeInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and the other inputs in their common dtype, as mergekit promotes them."""
    common = common_dtype(inputs.tensors)
    return inputs.base.to(common), [other.to(common) for other in inputs.others]


@merge_method("sce", **TASK_VECTORS, title="SCE", reference=SCE_PAPER)
def sce(
    inputs: MergeInputs, run: MergeContext, *, int8_mask: bool = False, select_topk: float = 1.0
) -> torch.Tensor:
    """SCE: select the entries that vary most, weigh the models, erase the disagreeing signs."""
    base, others = _promoted(inputs)
    return run.backend.sce(base, others, select_topk=select_topk)


@merge_method("ram", **TASK_VECTORS, title="Reinforced Agent Merging", reference=RAM_PAPER)
def ram(
    inputs: MergeInputs, run: MergeContext, *, epsilon: float = consensus.RAM_EPSILON
) -> torch.Tensor:
    """RAM: a change made by one model kept whole, one made by several averaged."""
    base, others = _promoted(inputs)
    return run.backend.ram(base, others, epsilon=epsilon)


@merge_method(
    "ramplus_tl",
    **TASK_VECTORS,
    title="Reinforced Agent Merging Plus (Tensor-Local)",
    reference=RAM_PAPER,
)
def ramplus_tl(
    inputs: MergeInputs,
    run: MergeContext,
    *,
    r: float = consensus.RAMPLUS_R,
    alpha: float = consensus.RAMPLUS_ALPHA,
    epsilon: float = consensus.RAM_EPSILON,
) -> torch.Tensor:
    """RAM+: RAM with each model's unique changes scaled by how much it shares."""
    base, others = _promoted(inputs)
    return run.backend.ramplus_tl(base, others, r=r, alpha=alpha, epsilon=epsilon)


@merge_method("nearswap", **TWO_MODELS, title="NearSwap", reference=NEARSWAP_CARD)
def nearswap(inputs: MergeInputs, run: MergeContext, *, t: float) -> torch.Tensor:
    """NearSwap: the other model's value where the two are within about ``t``."""
    base, (other,) = _promoted(inputs)
    return run.backend.nearswap(base, other, t)


@merge_method("arcee_fusion", **TWO_MODELS, random=True, title="Arcee Fusion", reference=ARCEE)
def arcee_fusion(inputs: MergeInputs, run: MergeContext) -> torch.Tensor:
    """Arcee Fusion: the other model's value where its importance is an outlier."""
    base, (other,) = _promoted(inputs)
    # A CPU generator, so that a seed draws the same entries on any device.
    (generator,) = input_generators(run.seed, 1)
    return run.backend.arcee_fusion(base, other, generator=generator)
