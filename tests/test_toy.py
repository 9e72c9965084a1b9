"""Tiny models must be real Hugging Face folders, deterministic, and shaped like the real thing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pearl_edu.teaching.toy import load_state_dict, make_tiny_model, tensor_shapes


def load_with_transformers(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model, info


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_loads_with_transformers_and_keeps_every_weight(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, with_tokenizer=True)
    model, info = load_with_transformers(path)

    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    written = load_state_dict(path)
    loaded = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), name
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, 128)


def test_tokenizer_loads_and_encodes_offline(tmp_path):
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path / "m", with_tokenizer=True, vocab_size=100)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("a b").input_ids
    assert all(0 <= i < 100 for i in ids)
    assert tokenizer.eos_token == "</s>"
    assert (path / "generation_config.json").is_file()


def test_real_tensor_names_and_shapes(tmp_path):
    path = make_tiny_model(
        tmp_path / "m", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=1
    )
    weights = load_file(path / "model.safetensors")
    assert weights["model.layers.2.self_attn.k_proj.weight"].shape == (8, 32)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (32, 128)
    assert weights["lm_head.weight"].shape == (128, 32)
    assert len(weights) == 1 + 3 * 9 + 2


def test_qwen2_has_qkv_biases_and_tied_embeddings_drop_lm_head(tmp_path):
    path = make_tiny_model(tmp_path / "q", arch="qwen2", tie_embeddings=True)
    weights = load_state_dict(path)
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    assert "model.layers.1.self_attn.v_proj.bias" in weights
    assert "model.layers.0.self_attn.o_proj.bias" not in weights
    assert "lm_head.weight" not in weights
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    model, info = load_with_transformers(path)
    assert not info["missing_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_config_records_dtype_and_architecture(tmp_path):
    path = make_tiny_model(tmp_path / "m", dtype=torch.float16, num_layers=3)
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    assert config["dtype"] == "float16"
    assert config["num_hidden_layers"] == 3
    assert config["architectures"] == ["MistralForCausalLM"]
    assert set(load_state_dict(path)) == set(tensor_shapes(config))
    assert all(t.dtype == torch.float16 for t in load_state_dict(path).values())


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wc = load_state_dict(a), load_state_dict(c)
    assert not torch.equal(wa["model.norm.weight"], wc["model.norm.weight"])


def test_sibling_is_base_plus_relative_noise(tmp_path):
    base = make_tiny_model(tmp_path / "base", dtype=torch.float32)
    sibling = make_tiny_model(tmp_path / "sib", base=base, noise=0.05, seed=1, dtype=torch.float32)
    wb, ws = load_state_dict(base), load_state_dict(sibling)
    assert set(wb) == set(ws)
    for name in wb:
        relative = (ws[name] - wb[name]).std() / wb[name].std()
        assert 0.03 < relative < 0.07, name
    cosine = torch.nn.functional.cosine_similarity(
        wb["lm_head.weight"].flatten(), ws["lm_head.weight"].flatten(), dim=0
    )
    assert cosine > 0.99


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_output_has_index_covering_every_tensor(tmp_path, fmt):
    path = make_tiny_model(tmp_path / fmt, fmt=fmt, shard_count=3)
    index_name = (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )
    index = json.loads((path / index_name).read_text())
    files = sorted(set(index["weight_map"].values()))
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    assert files == [f"{stem}-0000{i}-of-00003.{fmt}" for i in (1, 2, 3)]
    weights = load_state_dict(path)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights.values())
    model, info = load_with_transformers(path)
    assert not info["missing_keys"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError, match="num_heads"):
        make_tiny_model(tmp_path / "y", hidden_size=30, num_heads=4)
