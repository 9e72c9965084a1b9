"""The output tensors of a MoE: what each one is made of, and making it from its inputs.

A layout (`pearl_edu.moe.mixtral.mixtral_layout`, `pearl_edu.moe.qwen.qwen_layout`) lists
every output tensor as a `MoETensor`, in the order mergekit writes them; `make_tensor` makes
one from the few input tensors it needs (at most one layer's MLPs of every expert), so the
build holds one output tensor at a time. Every tensor is converted to the output dtype
last, after any noise or scale, as mergekit converts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pearl_edu.methods import tensor_seed
from pearl_edu.moe.config import Expert
from pearl_edu.reading import ModelHeader, ModelReader


@dataclass(frozen=True)
class MoETensor:
    """One output tensor: name, shape, dtype, and how it is made (``kind``).

    - ``copy``: the base's tensor ``source``;
    - ``zeros``: zeros (an attention bias the base lacks, for Qwen2-MoE);
    - ``expert``: tensor ``source`` of expert ``expert`` (the shared expert comes after the
      routed ones), with its noise and scale;
    - ``gate_up``, ``down``: layer ``layer``'s MLPs of every expert, fused (Mixtral);
    - ``router``, ``shared_gate``: layer ``layer``'s rows of the gate vectors for the
      routed experts, or for the shared expert.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    layer: int = -1
    source: str = ""
    expert: int = -1

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


def expert_source(layer: int, projection: str) -> str:
    """The name of a dense model's MLP projection: ``model.layers.L.mlp.up_proj.weight``."""
    return f"model.layers.{layer}.mlp.{projection}.weight"


def mlp_shape(header: ModelHeader, projection: str) -> tuple[int, int]:
    """The shape the base's config gives an MLP projection: (I, d), or (d, I) for down_proj."""
    hidden = int(header.config["hidden_size"])
    inter = int(header.config["intermediate_size"])
    return (hidden, inter) if projection == "down_proj" else (inter, hidden)


def check_expert_tensor(
    header: ModelHeader, name: str, expected: tuple[int, ...], num_layers: int
) -> torch.dtype:
    """The dtype of an expert's MLP tensor ``name``, after checking it is there, of its shape.

    The output's config.json is the base's, so an expert's MLPs must have the base's
    hidden and intermediate sizes; anything else is a one-line `ModelError`.
    """
    from pearl_edu.errors import ModelError

    meta = header.tensors.get(name)
    if meta is None:
        raise ModelError(
            f"{header.path}: expert model has no tensor {name} (the base has {num_layers} "
            "layers, each needing gate_proj, up_proj and down_proj)"
        )
    if tuple(meta.shape) != expected:
        raise ModelError(
            f"{header.path}: tensor {name} is {tuple(meta.shape)}, expected {expected} (the "
            "base's hidden_size and intermediate_size)"
        )
    return meta.dtype


def noise_and_scale(
    tensor: torch.Tensor, expert: Expert, *, residual: bool, seed: int, name: str
) -> torch.Tensor:
    """An expert's tensor with its ``noise_scale`` noise added and, for ``down_proj``, scaled.

    mergekit's ``noise_and_scale``: ``w + noise_scale * N(0, 1)`` in the tensor's own dtype,
    then ``w * residual_scale`` for the residual projection (``down_proj``). The noise comes
    from a generator seeded with the run's seed and ``name`` (mergekit draws from torch's
    global generator), so a rerun with the same seed draws the same noise, resumed or not.
    """
    if expert.noise_scale is not None:
        generator = torch.Generator().manual_seed(tensor_seed(seed, name))
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        tensor = tensor + noise * expert.noise_scale
    if residual and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def make_tensor(
    job: MoETensor,
    base: ModelReader,
    experts: Sequence[tuple[Expert, ModelReader]],
    num_routed: int,
    gates: torch.Tensor,
    *,
    seed: int,
) -> torch.Tensor:
    """Output tensor ``job``, made from its inputs and converted to its dtype.

    ``experts`` are the routed experts then the shared ones, each with its reader;
    ``gates`` are the gate vectors (layers, routed + shared, d) of `pearl_edu.moe.router`.
    """
    if job.kind == "copy":
        tensor = base.read(job.source)
    elif job.kind == "zeros":
        tensor = torch.zeros(job.shape, dtype=job.dtype)
    elif job.kind == "router":
        tensor = gates[job.layer, :num_routed]
    elif job.kind == "shared_gate":
        tensor = gates[job.layer, num_routed:]
    elif job.kind == "expert":
        expert, reader = experts[job.expert]
        tensor = noise_and_scale(
            reader.read(job.source),
            expert,
            residual="down_proj" in job.source,
            seed=seed,
            name=job.name,
        )
    else:  # Mixtral's fused gate_up and down: every routed expert's, stacked
        projections = ("gate_proj", "up_proj") if job.kind == "gate_up" else ("down_proj",)
        stacked = []
        for projection in projections:
            source = expert_source(job.layer, projection)
            stacked.append(
                torch.stack(
                    [
                        noise_and_scale(
                            reader.read(source),
                            expert,
                            residual=projection == "down_proj",
                            seed=seed,
                            name=f"experts.{index}.{source}",
                        )
                        for index, (expert, reader) in enumerate(experts[:num_routed])
                    ]
                )
            )
        tensor = torch.cat(stacked, dim=1) if len(stacked) > 1 else stacked[0]
    return tensor.to(dtype=job.dtype).contiguous()
