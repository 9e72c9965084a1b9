"""The Mixtral model mergekit-moe writes: which output it picks, and every output tensor.

mergekit 0.1.5 knows four output architectures, tried in this order: Mixtral, DeepSeek
MoE, Qwen MoE (Qwen2-MoE) and Qwen3 MoE. ``architecture:`` keeps those whose name starts
with it (case-insensitive); of the ones that support the config, Mixtral is taken when
it is among them. Mixtral supports a config without ``shared_experts`` whose models
(base and experts) are all ``llama`` or all ``mistral``. pearl_edu writes Mixtral only,
and refuses in one line a config for which mergekit would write another architecture
(`select_output`).

The Mixtral model (`mixtral_layout`), in the order mergekit writes it:

- every tensor of the base but its MLPs, as mergekit's Mistral definition lists them:
  the embeddings, each layer's norms and attention, the final norm, and the output head
  when the base has one;
- for each layer, the experts' MLPs in transformers 5's fused layout:
  ``model.layers.L.mlp.experts.gate_up_proj``, shape (E, 2I, d), expert :math:`e`'s
  ``gate_proj`` (I, d) on top of its ``up_proj`` (I, d), and
  ``model.layers.L.mlp.experts.down_proj``, shape (E, d, I), each expert's ``down_proj``;
- each layer's router ``model.layers.L.mlp.gate.weight``, shape (E, d) (`pearl_edu.moe.router`).

Every tensor is converted to the output dtype last, after any noise or scale, as mergekit
converts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.methods import tensor_seed
from pearl_edu.moe.config import Expert, MoEConfig
from pearl_edu.reading import ModelHeader, ModelReader

OUTPUT_ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
MIXTRAL_MODEL_TYPES = ("llama", "mistral")
# Each expert tensor of a layer: the source projection and where it goes.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def select_output(config: MoEConfig, model_types: Mapping[str, str]) -> str:
    """``"Mixtral"`` when mergekit 0.1.5 would write Mixtral for ``config``; else a `ConfigError`.

    ``model_types`` maps each model of the config to its ``config.json`` ``model_type``.
    """
    where = config.source
    wanted = config.architecture
    candidates = [
        name
        for name in OUTPUT_ARCHITECTURES
        if not wanted or name.lower().startswith(wanted.lower())
    ]
    if not candidates:
        raise ConfigError(
            f"{where}: architecture: {wanted!r} names no MoE architecture; mergekit 0.1.5 "
            f"knows {', '.join(OUTPUT_ARCHITECTURES)}"
        )
    if "Mixtral" not in candidates:
        raise ConfigError(
            f"{where}: architecture: {wanted!r} ({', '.join(candidates)}) is not written by "
            "pearl-edu moe, which writes Mixtral only"
        )
    if config.shared_experts:
        raise ConfigError(
            f"{where}: shared_experts: Mixtral has no shared experts, and pearl-edu moe writes "
            "Mixtral only (mergekit would write Qwen2-MoE or DeepSeek MoE)"
        )
    base_type = model_types[config.base_model]
    for index, expert in enumerate(config.experts):
        if model_types[expert.source_model] != base_type:
            raise ConfigError(
                f"{where}: experts[{index}].source_model: {expert.source_model} is a "
                f"{model_types[expert.source_model]!r} model and the base a {base_type!r} one; "
                "Mixtral needs every model of one architecture"
            )
    if base_type not in MIXTRAL_MODEL_TYPES:
        raise ConfigError(
            f"{where}: base_model: {config.base_model} is a {base_type!r} model; pearl-edu moe "
            f"writes Mixtral from {' or '.join(MIXTRAL_MODEL_TYPES)} models only"
        )
    return "Mixtral"


@dataclass(frozen=True)
class MoETensor:
    """One output tensor: name, shape, dtype, and how it is made.

    ``kind`` is ``copy`` (the base's tensor ``source``), ``gate_up`` or ``down`` (the
    experts' MLPs of ``layer``), or ``router`` (row ``layer`` of the gate vectors).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    layer: int = -1
    source: str = ""


def base_tensor_names(num_layers: int) -> list[tuple[str, bool]]:
    """The base's tensors a Mixtral keeps, as (name, optional): mergekit's Mistral list less MLPs."""
    names = [("model.embed_tokens.weight", False)]
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}"
        names += [
            (f"{prefix}.input_layernorm.weight", False),
            (f"{prefix}.self_attn.q_proj.weight", False),
            (f"{prefix}.self_attn.k_proj.weight", False),
            (f"{prefix}.self_attn.v_proj.weight", False),
            (f"{prefix}.self_attn.o_proj.weight", False),
            (f"{prefix}.post_attention_layernorm.weight", False),
        ]
    return [*names, ("model.norm.weight", False), ("lm_head.weight", True)]


def expert_source(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def mixtral_layout(
    config: MoEConfig,
    base: ModelHeader,
    experts: Sequence[ModelHeader],
    out_dtype: torch.dtype | None,
    router_dtype: torch.dtype,
) -> list[MoETensor]:
    """Every output tensor, in mergekit's order, after checking the inputs have them.

    The experts' MLPs must have the base's shapes, (intermediate_size, hidden_size) for
    ``gate_proj`` and ``up_proj`` and the transpose for ``down_proj``: the output's
    config.json is the base's. A missing tensor or a wrong shape is a one-line
    `ModelError` naming the model folder and the tensor.
    """
    hidden = int(base.config["hidden_size"])
    inter = int(base.config["intermediate_size"])
    num_layers = int(base.config["num_hidden_layers"])
    num_experts = len(experts)
    layout = []
    for name, optional in base_tensor_names(num_layers):
        meta = base.tensors.get(name)
        if meta is None:
            if optional:
                continue
            raise ModelError(f"{base.path}: base model has no tensor {name}")
        layout.append(
            MoETensor(name, tuple(meta.shape), out_dtype or meta.dtype, "copy", source=name)
        )
    fused: list[MoETensor] = []
    for layer in range(num_layers):
        dtypes = {}
        for projection in PROJECTIONS:
            expected = (hidden, inter) if projection == "down_proj" else (inter, hidden)
            source = expert_source(layer, projection)
            for header in experts:
                meta = header.tensors.get(source)
                if meta is None:
                    raise ModelError(
                        f"{header.path}: expert model has no tensor {source} (the base has "
                        f"{num_layers} layers, each needing gate_proj, up_proj and down_proj)"
                    )
                if tuple(meta.shape) != expected:
                    raise ModelError(
                        f"{header.path}: tensor {source} is {tuple(meta.shape)}, expected "
                        f"{expected} (the base's hidden_size {hidden}, intermediate_size {inter})"
                    )
                dtypes.setdefault(projection, meta.dtype)
                dtypes[projection] = torch.promote_types(dtypes[projection], meta.dtype)
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.promote_types(dtypes["gate_proj"], dtypes["up_proj"])
        fused.append(
            MoETensor(
                f"{prefix}.gate_up_proj",
                (num_experts, 2 * inter, hidden),
                out_dtype or gate_up,
                "gate_up",
                layer,
            )
        )
        fused.append(
            MoETensor(
                f"{prefix}.down_proj",
                (num_experts, hidden, inter),
                out_dtype or dtypes["down_proj"],
                "down",
                layer,
            )
        )
    routers = [
        MoETensor(
            f"model.layers.{layer}.mlp.gate.weight",
            (num_experts, hidden),
            out_dtype or router_dtype,
            "router",
            layer,
        )
        for layer in range(num_layers)
    ]
    return layout + fused + routers


def noise_and_scale(
    tensor: torch.Tensor, expert: Expert, *, residual: bool, seed: int, name: str
) -> torch.Tensor:
    """An expert's tensor with its ``noise_scale`` noise added and, for ``down_proj``, scaled.

    mergekit's ``noise_and_scale``: ``w + noise_scale * N(0, 1)`` in the tensor's own dtype,
    then ``w * residual_scale`` for the residual projection. The noise comes from a
    generator seeded with the run's seed and the tensor's name (mergekit draws from
    torch's global generator), so a rerun with the same seed draws the same noise.
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
    gates: torch.Tensor,
    *,
    seed: int,
) -> torch.Tensor:
    """Output tensor ``job``, read from its inputs (one layer's worth at most) and converted."""
    if job.kind == "copy":
        tensor = base.read(job.source)
    elif job.kind == "router":
        tensor = gates[job.layer]
    else:
        projections = ("gate_proj", "up_proj") if job.kind == "gate_up" else ("down_proj",)
        per_projection = []
        for projection in projections:
            source = expert_source(job.layer, projection)
            per_projection.append(
                torch.stack(
                    [
                        noise_and_scale(
                            reader.read(source),
                            expert,
                            residual=projection == "down_proj",
                            seed=seed,
                            name=f"experts.{index}.{source}",
                        )
                        for index, (expert, reader) in enumerate(experts)
                    ]
                )
            )
        tensor = torch.cat(per_projection, dim=1) if len(per_projection) > 1 else per_projection[0]
    return tensor.to(dtype=job.dtype).contiguous()
