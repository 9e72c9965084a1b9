"""Tiny but real Hugging Face models, made locally, for the chapters and the tests.

`make_tiny_model` writes a folder that looks exactly like a model downloaded from the Hub:
a ``config.json`` that transformers can load, weights under the real tensor names of the
architecture (``model.layers.0.self_attn.q_proj.weight`` ...), optionally sharded with an
index, in safetensors or in PyTorch's pickle format, plus a generation config and, when
asked, a tiny tokenizer. Everything is deterministic from the seed and needs no network.

A "fine-tuned sibling" of a model is made with ``base=``: the base model's weights plus
Gaussian noise scaled to each tensor's own spread,

$$ w' = w + \\text{noise} \\cdot \\sigma(w) \\cdot \\varepsilon, \\quad \\varepsilon \\sim N(0, 1), $$

which is what two models fine-tuned from one parent look like to a merge: close, not equal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

Arch = Literal["mistral", "llama", "qwen2"]
Format = Literal["safetensors", "bin"]

ARCHITECTURES = {
    "mistral": "MistralForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# Scale of the random weights: the usual `initializer_range` of these architectures.
INIT_STD = 0.02
# Norm weights start at 1 in a fresh model; a spread around 1 makes them differ between
# models, so that merging them is not trivially the identity.
NORM_SPREAD = 0.1


def make_tiny_model(
    path: str | Path,
    *,
    arch: Arch = "mistral",
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tie_embeddings: bool = False,
    base: str | Path | None = None,
    noise: float = 0.02,
    shard_count: int = 1,
    fmt: Format = "safetensors",
    with_tokenizer: bool = False,
) -> Path:
    """Write a tiny Hugging Face causal-LM folder at ``path`` and return its path.

    With ``base`` the architecture and shapes are taken from that model's ``config.json``
    (the shape arguments are ignored) and every tensor is the base tensor plus
    ``noise * std(tensor) * N(0, 1)``; ``dtype`` may still differ from the base's.
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES.values())}, got {dtype}")
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, got {shard_count}")
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    generator = torch.Generator().manual_seed(seed)

    if base is None:
        config = hf_config(
            arch=arch,
            num_layers=num_layers,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            vocab_size=vocab_size,
            tie_embeddings=tie_embeddings,
        )
        weights = random_weights(config, generator)
    else:
        config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
        weights = {
            name: add_relative_noise(tensor, noise, generator)
            for name, tensor in load_state_dict(base).items()
        }

    set_config_dtype(config, dtype)
    weights = {name: tensor.to(dtype).contiguous() for name, tensor in weights.items()}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", config)
    write_json(path / "generation_config.json", generation_config(config))
    write_weights(path, weights, shard_count=shard_count, fmt=fmt)
    if with_tokenizer:
        write_tokenizer(path, config["vocab_size"])
    return path


def hf_config(
    *,
    arch: Arch,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    tie_embeddings: bool,
) -> dict:
    """The ``config.json`` contents of a tiny model, made by transformers' own config class."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    config_class = {
        "mistral": transformers.MistralConfig,
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
    }[arch]
    config = config_class(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_embeddings,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    ).to_dict()
    config["architectures"] = [ARCHITECTURES[arch]]
    return config


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """Record ``dtype`` under both keys loaders read: ``torch_dtype`` (older) and ``dtype``."""
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    config["dtype"] = DTYPE_NAMES[dtype]


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a Mistral/Llama/Qwen2 model with its shape, in the order HF lists them."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    has_qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        if has_qkv_bias:
            shapes[f"{layer}.self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[f"{layer}.self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[f"{layer}.self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_weights(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh float32 weights: N(0, 0.02) matrices and biases, norm weights spread around 1."""
    weights = {}
    for name, shape in tensor_shapes(config).items():
        sample = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + NORM_SPREAD * sample
        else:
            weights[name] = INIT_STD * sample
    return weights


def add_relative_noise(
    tensor: torch.Tensor, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """Return ``tensor + noise * std(tensor) * N(0, 1)`` in float32."""
    base = tensor.float()
    epsilon = torch.randn(base.shape, generator=generator, dtype=torch.float32)
    return base + noise * base.std() * epsilon


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load every weight of a (tiny) model folder into memory, safetensors or ``.bin``.

    Only for small models: the merge engine reads real models one tensor at a time
    through `pearl_edu.reading` instead.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    weights: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors or *.bin weight files")
    for file in files:
        if file.suffix == ".safetensors":
            weights.update(load_file(file))
        else:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
    return weights


def shard_file_names(shard_count: int, fmt: Format) -> list[str]:
    """File names HF uses: ``model.safetensors`` alone, or ``model-00001-of-00002.safetensors``."""
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if shard_count == 1:
        return [f"{stem}.{suffix}"]
    return [f"{stem}-{i:05d}-of-{shard_count:05d}.{suffix}" for i in range(1, shard_count + 1)]


def split_into_shards(names: list[str], shard_count: int) -> list[list[str]]:
    """Split tensor names into ``shard_count`` consecutive, non-empty groups of similar length."""
    shard_count = min(shard_count, len(names))
    bounds = [round(i * len(names) / shard_count) for i in range(shard_count + 1)]
    return [names[bounds[i] : bounds[i + 1]] for i in range(shard_count)]


def write_weights(
    model_dir: Path, weights: dict[str, torch.Tensor], *, shard_count: int, fmt: Format
) -> None:
    """Write ``weights`` as one file or as shards plus the index json that HF loaders read."""
    from safetensors.torch import save_file

    groups = split_into_shards(list(weights), shard_count)
    file_names = shard_file_names(len(groups), fmt)
    weight_map = {}
    for file_name, group in zip(file_names, groups, strict=True):
        shard = {name: weights[name] for name in group}
        if fmt == "safetensors":
            save_file(shard, model_dir / file_name, metadata={"format": "pt"})
        else:
            torch.save(shard, model_dir / file_name)
        weight_map.update(dict.fromkeys(group, file_name))

    if len(groups) > 1:
        total_size = sum(t.numel() * t.element_size() for t in weights.values())
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else None
        index_name = index_name or "pytorch_model.bin.index.json"
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_json(model_dir / index_name, index)


def generation_config(config: dict) -> dict:
    """A minimal ``generation_config.json`` consistent with the model's special tokens."""
    import transformers

    return {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "transformers_version": transformers.__version__,
    }


def write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """Write a word-level ``tokenizer.json`` of ``vocab_size`` entries, built offline.

    The vocabulary is the special tokens, then single characters, then filler tokens, so
    any id the tiny model can produce decodes to something.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    characters = [chr(c) for c in range(33, 127)]
    tokens = (specials + characters)[:vocab_size]
    tokens += [f"tok{i}" for i in range(len(tokens), vocab_size)]
    vocab = {token: index for index, token in enumerate(tokens)}

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": 512,
        },
    )
    write_json(
        model_dir / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON with a trailing newline, like HF does."""
    path.write_text(
        json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8", newline="\n"
    )


def edited_copy(
    model_dir: str | Path, dest: str | Path, edit: Callable[[dict[str, torch.Tensor]], None]
) -> Path:
    """Save a (tiny) model again as one safetensors file in ``dest`` after ``edit(weights)``.

    ``edit`` changes the dict of weights in place (scale a tensor, drop one, ...): the way
    tests and chapters make a "slightly different" model to compare with.
    """
    from safetensors.torch import save_file

    weights = load_state_dict(model_dir)
    edit(weights)
    dest = Path(dest)
    dest.mkdir()
    shutil.copy(Path(model_dir) / "config.json", dest / "config.json")
    save_file({k: v.contiguous() for k, v in weights.items()}, dest / "model.safetensors")
    return dest
