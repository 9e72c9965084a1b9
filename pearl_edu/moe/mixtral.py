"""The Mixtral model mergekit-moe writes: its tensors and its config.json.

In the order mergekit writes them (`mixtral_layout`):

- every tensor of the base but its MLPs, as mergekit's Mistral definition lists them:
  the embeddings, each layer's norms and attention, the final norm, and the output head
  when the base has one;
- for each layer, the experts' MLPs in transformers 5's fused layout:
  ``model.layers.L.mlp.experts.gate_up_proj``, shape (E, 2I, d), expert :math:`e`'s
  ``gate_proj`` (I, d) on top of its ``up_proj`` (I, d), and
  ``model.layers.L.mlp.experts.down_proj``, shape (E, d, I), each expert's ``down_proj``;
- each layer's router ``model.layers.L.mlp.gate.weight``, shape (E, d) (`pearl_edu.moe.router`).

config.json is the base's config as a ``MixtralConfig`` (`mixtral_config_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pearl_edu.errors import ModelError
from pearl_edu.moe.tensors import MoETensor, check_expert_tensor, expert_source, mlp_shape
from pearl_edu.reading import ModelHeader

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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


def mixtral_layout(
    base: ModelHeader,
    experts: Sequence[ModelHeader],
    out_dtype: torch.dtype | None,
    router_dtype: torch.dtype,
) -> list[MoETensor]:
    """Every output tensor, in mergekit's order, after checking the inputs have them.

    A missing tensor or an expert MLP of another shape than the base's is a one-line
    `ModelError` naming the model folder and the tensor. Without an output dtype each
    tensor keeps its own (the fused ones, their experts' dtypes promoted together).
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
        dtype = out_dtype or meta.dtype
        layout.append(MoETensor(name, tuple(meta.shape), dtype, "copy", source=name))
    fused = []
    for layer in range(num_layers):
        dtypes = {}
        for projection in PROJECTIONS:
            for header in experts:
                dtype = check_expert_tensor(
                    header,
                    expert_source(layer, projection),
                    mlp_shape(base, projection),
                    num_layers,
                )
                dtypes[projection] = torch.promote_types(dtypes.get(projection, dtype), dtype)
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.promote_types(dtypes["gate_proj"], dtypes["up_proj"])
        fused += [
            MoETensor(
                f"{prefix}.gate_up_proj",
                (num_experts, 2 * inter, hidden),
                out_dtype or gate_up,
                "gate_up",
                layer,
            ),
            MoETensor(
                f"{prefix}.down_proj",
                (num_experts, hidden, inter),
                out_dtype or dtypes["down_proj"],
                "down",
                layer,
            ),
        ]
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


def load_hf_config(base_dir: Path):
    """The base's config, read by transformers (a one-line `ModelError` when it cannot be)."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(base_dir))
    except Exception as err:  # transformers raises many kinds for a bad config
        reason = " ".join(str(err).split())[:300]
        raise ModelError(
            f"{base_dir}/config.json: transformers cannot read it ({reason})"
        ) from None


def mixtral_config_text(
    base_dir: Path, num_experts: int, experts_per_token: int, out_dtype: torch.dtype | None
) -> str:
    """The output's ``config.json``: the base's config as a ``MixtralConfig``, as mergekit's.

    A Llama config goes through ``MistralConfig`` first, with no sliding window and the
    base's context length. Then the MoE's own settings: the architecture,
    ``num_local_experts``, ``num_experts_per_tok``, no sliding window, the output dtype.
    Written as ``save_pretrained`` writes it (the values that differ from the defaults).
    """
    import transformers

    base = load_hf_config(base_dir)
    if not isinstance(base, transformers.MistralConfig):
        as_mistral = transformers.MistralConfig(**base.to_dict())
        as_mistral.sliding_window = None
        as_mistral.max_position_embeddings = base.max_position_embeddings
        base = as_mistral
    moe = transformers.MixtralConfig(**base.to_dict())
    moe.architectures = ["MixtralForCausalLM"]
    moe.num_local_experts = num_experts
    moe.num_experts_per_tok = experts_per_token or 2
    moe.sliding_window = None
    moe.dtype = out_dtype
    return moe.to_json_string(use_diff=True)
