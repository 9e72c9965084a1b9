"""The Qwen2-MoE model mergekit-moe writes ("Qwen MoE"): its tensors and its config.json.

mergekit writes it for a config with exactly one shared expert (a dense MLP every token
goes through, weighted by a gate of its own) from Qwen2, Llama or Mistral models. In the
order of mergekit's Qwen2 definition (`qwen_layout`):

- each tensor of the base but its MLPs; an attention bias (``q_proj.bias``, ``k_proj.bias``,
  ``v_proj.bias``) the base lacks (Llama, Mistral) is written as zeros, since Qwen2-MoE's
  attention has biases;
- in place of each MLP tensor, that tensor of every expert, as
  ``model.layers.L.mlp.experts.e.gate_proj.weight`` and so on (unfused, as mergekit writes
  them), then the shared expert's, as ``model.layers.L.mlp.shared_expert.gate_proj.weight``;
- then, for each layer, the router ``mlp.gate.weight`` (E, d) and the shared expert's gate
  ``mlp.shared_expert_gate.weight`` (1, d): the last row of the gate vectors, computed for
  the shared expert's prompts with the routed experts' (`pearl_edu.moe.router`).

config.json is the base's config as a ``Qwen2MoeConfig`` (`qwen_config_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pearl_edu.errors import ModelError
from pearl_edu.moe.mixtral import load_hf_config
from pearl_edu.moe.tensors import MoETensor, check_expert_tensor, mlp_shape
from pearl_edu.reading import ModelHeader

# mergekit's Qwen2 definition: each layer's tensors, in its order.
LAYER_TENSORS = (
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.v_proj.weight",
)


def qwen_tensor_names(num_layers: int) -> list[tuple[str, bool]]:
    """Every tensor of mergekit's Qwen2 definition, as (name, optional)."""
    names = [("model.embed_tokens.weight", False)]
    for layer in range(num_layers):
        names += [(f"model.layers.{layer}.{suffix}", False) for suffix in LAYER_TENSORS]
    return [*names, ("model.norm.weight", False), ("lm_head.weight", True)]


def zero_bias_shape(base: ModelHeader, name: str) -> tuple[int]:
    """A missing attention bias's shape: heads times hidden_size // attention heads."""
    heads = int(base.config["num_attention_heads"])
    head_dim = int(base.config["hidden_size"]) // heads
    if name.endswith(("k_proj.bias", "v_proj.bias")):
        heads = int(base.config.get("num_key_value_heads") or heads)
    return (heads * head_dim,)


def qwen_layout(
    base: ModelHeader,
    experts: Sequence[ModelHeader],
    out_dtype: torch.dtype | None,
    router_dtype: torch.dtype,
) -> list[MoETensor]:
    """Every output tensor, in mergekit's order; ``experts`` ends with the shared expert.

    A missing tensor, or an expert MLP of another shape than the base's, is a one-line
    `ModelError` naming the model folder and the tensor.
    """
    hidden = int(base.config["hidden_size"])
    num_layers = int(base.config["num_hidden_layers"])
    num_routed = len(experts) - 1
    layout = []
    for name, optional in qwen_tensor_names(num_layers):
        if ".mlp." in name:
            projection = name.rsplit(".", 2)[-2]
            for index, header in enumerate(experts):
                dtype = check_expert_tensor(header, name, mlp_shape(base, projection), num_layers)
                place = f".mlp.experts.{index}." if index < num_routed else ".mlp.shared_expert."
                layout.append(
                    MoETensor(
                        name.replace(".mlp.", place),
                        mlp_shape(base, projection),
                        out_dtype or dtype,
                        "expert",
                        source=name,
                        expert=index,
                    )
                )
            continue
        meta = base.tensors.get(name)
        if meta is not None:
            layout.append(
                MoETensor(name, tuple(meta.shape), out_dtype or meta.dtype, "copy", source=name)
            )
        elif name.endswith("_proj.bias"):
            shape = zero_bias_shape(base, name)
            layout.append(MoETensor(name, shape, out_dtype or torch.float32, "zeros"))
        elif not optional:
            raise ModelError(f"{base.path}: base model has no tensor {name}")
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.mlp"
        dtype = out_dtype or router_dtype
        layout += [
            MoETensor(f"{prefix}.gate.weight", (num_routed, hidden), dtype, "router", layer),
            MoETensor(
                f"{prefix}.shared_expert_gate.weight", (1, hidden), dtype, "shared_gate", layer
            ),
        ]
    return layout


def qwen_config_text(
    base_dir: Path, num_experts: int, experts_per_token: int, out_dtype: torch.dtype | None
) -> str:
    """The output's ``config.json``: the base's config as a ``Qwen2MoeConfig``, as mergekit's.

    Every layer sparse (``decoder_sparse_step: 1``), the chosen experts' weights
    normalised (``norm_topk_prob``), no sliding window, the experts and the shared expert
    of the base's intermediate size; the dtype set only when there is an output dtype.
    """
    from transformers.models.qwen2_moe import Qwen2MoeConfig

    moe = Qwen2MoeConfig(**load_hf_config(base_dir).to_dict())
    moe.architectures = ["Qwen2MoeForCausalLM"]
    moe.num_experts = num_experts
    moe.num_experts_per_tok = experts_per_token or 2
    moe.decoder_sparse_step = 1
    moe.norm_topk_prob = True
    moe.sliding_window = None
    moe.use_sliding_window = False
    moe.shared_expert_intermediate_size = moe.intermediate_size
    moe.moe_intermediate_size = moe.intermediate_size
    if out_dtype is not None:
        moe.dtype = out_dtype
    return moe.to_json_string(use_diff=True)
