"""Mixtures of experts from dense models, as mergekit-moe builds them (mergekit 0.1.5).

``pearl-edu moe CONFIG OUTPUT_DIR`` (or `build_moe`) reads mergekit-moe's YAML and writes
the same model mergekit-moe writes: the base model's attention, embeddings and norms, each
expert's MLPs as the experts of every layer, and a router per layer made from the experts'
prompts; a Mixtral, or a Qwen2-MoE when the config has a shared expert. The parts:

- `pearl_edu.moe.config`: the YAML, validated, and mergekit's checks of it;
- `pearl_edu.moe.router`: the routers, from the prompts' hidden states or embeddings;
- `pearl_edu.moe.arch`: which architecture mergekit would write;
- `pearl_edu.moe.mixtral`, `pearl_edu.moe.qwen`: every tensor, and config.json;
- `pearl_edu.moe.tensors`: making one output tensor from its inputs;
- `pearl_edu.moe.files`: tokenizer, YAML and model card, the output folder check;
- `pearl_edu.moe.build`: the streaming build into a folder published whole.
"""

from pearl_edu.moe.build import MoEResult, build_moe
from pearl_edu.moe.config import Expert, MoEConfig, check_moe_config, load_moe_config

__all__ = ["Expert", "MoEConfig", "MoEResult", "build_moe", "check_moe_config", "load_moe_config"]
