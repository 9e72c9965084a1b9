"""LoRA adapters in model references (``model: base+adapter``), against PEFT and mergekit.

A tiny base model and a tiny PEFT adapter are made locally. pearl_edu's reader of
``base+adapter`` must give, tensor by tensor, the bits of PEFT's ``merge_and_unload()``
on the same model (the same arithmetic: float32 factors, ``B @ A``, the scale, one
rounding to the weight's dtype); a merge of a ``base+adapter`` YAML must give the bits of
mergekit's merge of the same YAML (mergekit merges the adapter with PEFT first).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pearl_edu.adapters import (
    AdaptedReader,
    LoraChange,
    apply_change,
    read_adapter,
    split_reference,
)
from pearl_edu.cli import main
from pearl_edu.config import load_config
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, HubError, ModelError
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def make_adapter(base: Path, out: Path, *, dtype: torch.dtype, seed: int = 0, **options) -> Path:
    """A PEFT LoRA adapter of ``base`` with non-zero factors, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": False,  # random A and B, so the change is not zero
    }
    settings.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, LoraConfig(**settings)).save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload()`` of the adapter into the base, as a state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: t.detach().clone() for name, t in merged.state_dict().items()}


def ours(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    header = read_header(base)
    with AdaptedReader(ModelReader(header), read_adapter(adapter)) as reader:
        return {name: reader.read(name).clone() for name in header.tensors}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        dtype: make_tiny_model(root / str(dtype), num_layers=2, seed=1, dtype=dtype)
        for dtype in (torch.bfloat16, torch.float32)
    }


ADAPTERS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}},
    "embedding and modules_to_save": {
        "target_modules": ["q_proj", "embed_tokens"],
        "modules_to_save": ["lm_head"],
    },
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_each_tensor_is_peft_merge_and_unload_bit_for_bit(bases, tmp_path, dtype, kind):
    base = bases[dtype]
    adapter = make_adapter(base, tmp_path / "lora", dtype=dtype, **ADAPTERS[kind])
    theirs = peft_merged(base, adapter, dtype)
    mine = ours(base, adapter)
    plain = load_state_dict(base)
    changed = [name for name in mine if not torch.equal(mine[name], plain[name])]
    assert changed  # the adapter does change the model
    assert sorted(mine) == sorted(theirs)
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from PEFT's merge"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_lora_bias_is_peft_merge_and_unload_bit_for_bit(tmp_path, dtype):
    # Qwen2's q, k and v projections have biases; lora_bias trains a change to them.
    base = make_tiny_model(tmp_path / "base", arch="qwen2", num_layers=1, seed=1, dtype=dtype)
    adapter = make_adapter(
        base, tmp_path / "lora", dtype=dtype, target_modules=["q_proj", "v_proj"], lora_bias=True
    )
    with torch.no_grad():  # PEFT starts lora_B.bias at zero; give it a value to merge
        from safetensors.torch import load_file

        tensors = load_file(adapter / "adapter_model.safetensors")
        for name in tensors:
            if name.endswith("lora_B.bias"):
                tensors[name] = torch.randn_like(tensors[name])
        save_file(tensors, adapter / "adapter_model.safetensors")
    theirs, mine = peft_merged(base, adapter, dtype), ours(base, adapter)
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(mine[bias], load_state_dict(base)[bias])
    for name, tensor in mine.items():
        assert same_bits(tensor, theirs[name]), f"{name} differs from PEFT's merge"


def test_scale_follows_rslora_and_the_patterns(bases, tmp_path):
    base = bases[torch.float32]
    adapter = read_adapter(
        make_adapter(base, tmp_path / "a", dtype=torch.float32, **ADAPTERS["patterns"])
    )
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1))
    v0 = "model.layers.0.self_attn.v_proj.weight"
    assert adapter.changes[q0].scale == 8 / 4
    assert adapter.changes[q1].scale == 3 / 4  # alpha_pattern on a dotted suffix
    assert adapter.changes[v0].scale == 8 / 2  # rank_pattern
    rs = read_adapter(make_adapter(base, tmp_path / "b", dtype=torch.float32, use_rslora=True))
    assert rs.changes[q0].scale == 8 / math.sqrt(4)


def test_fan_in_fan_out_transposes_the_product():
    torch.manual_seed(0)
    weight = torch.randn(6, 5)  # stored (in, out) as GPT-2's Conv1D
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    change = LoraChange(target="w", a="A", b="B", scale=0.5, transpose=True)
    got = apply_change(weight, change, {"A": a, "B": b}.__getitem__)
    torch.testing.assert_close(got, weight + 0.5 * (a.T @ b.T), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_model(root / "base", num_layers=2, seed=1, dtype=torch.bfloat16)
    other = make_tiny_model(root / "other", base=base, noise=0.5, seed=2, dtype=torch.bfloat16)
    adapter = make_adapter(base, root / "lora", dtype=torch.bfloat16)
    return base, other, adapter


def test_a_merge_of_base_plus_adapter_is_mergekits(family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, other, adapter = family
    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapter}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {other}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n"
    )
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(
        copy_tokenizer=False,
        quiet=True,
        lazy_unpickle=False,
        lora_merge_cache=str(tmp_path / "lora-cache"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(config, str(tmp_path / "mergekit"), options=options)
    merge(text, tmp_path / "pearl", device="cpu", progress=False)
    mine, theirs = load_state_dict(tmp_path / "pearl"), load_state_dict(tmp_path / "mergekit")
    assert sorted(mine) == sorted(theirs)
    for name, tensor in mine.items():
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"
    # The merged model differs from the merge without the adapter where the adapter acts.
    merge(text.replace(f"+{adapter}", ""), tmp_path / "plain", device="cpu", progress=False)
    plain = load_state_dict(tmp_path / "plain")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(plain[q], mine[q])
    assert torch.equal(plain["model.norm.weight"], mine["model.norm.weight"])
    # The reference is kept as written, in the model card and mergekit_config.yml.
    written = yaml.safe_load((tmp_path / "pearl" / "mergekit_config.yml").read_text())
    assert written["models"][0]["model"] == f"{base}+{adapter}"
    card = (tmp_path / "pearl" / "README.md").read_text()
    assert f"* {base}+{adapter}" in card  # listed as written
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == [str(base), str(adapter), str(other)]  # each model named


def test_split_reference_is_mergekits():
    from mergekit.common import ModelReference

    for text in ("org/base+org/lora", "./base+./lora@v1", "org/base@abc+org/lora"):
        theirs = ModelReference.model_validate(text)
        model, adapter = split_reference(text)
        assert (model, adapter) == (str(theirs.model), str(theirs.lora))
    assert split_reference("org/base") == ("org/base", None)


@pytest.mark.parametrize("ref", ["a+b+c", "a+", "+b", "a+ "])
def test_references_with_more_or_less_than_an_adapter_are_refused(ref):
    with pytest.raises(ConfigError, match=r"models\[0\]\.model: expected a model, or a model and"):
        load_config(f"merge_method: linear\nmodels:\n  - model: '{ref}'\n")


def _refusal(base: Path, adapter: Path, out: Path) -> str:
    text = (
        f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\nparameters: {{weight: 1}}\n"
    )
    with pytest.raises((ModelError, HubError)) as err:
        merge(text, out, device="cpu", progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()
    return str(err.value)


def test_adapters_pearl_edu_cannot_apply_are_refused_in_one_line(family, tmp_path):
    base, _, adapter = family
    config = json.loads((adapter / "adapter_config.json").read_text())

    def variant(name: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        (folder / "adapter_model.safetensors").write_bytes(
            (adapter / "adapter_model.safetensors").read_bytes()
        )
        return folder

    dora = _refusal(base, variant("dora", use_dora=True), tmp_path / "o1")
    assert "adapter_config.json: use_dora is not supported" in dora
    ia3 = _refusal(base, variant("ia3", peft_type="IA3"), tmp_path / "o2")
    assert "peft_type 'IA3' is not supported; expected LORA" in ia3
    wrong_rank = _refusal(base, variant("rank", r=8), tmp_path / "o3")
    assert "expected factors of rank 8 (adapter_config.json), got A [4, " in wrong_rank
    pickled = variant("bin")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    message = _refusal(base, pickled, tmp_path / "o4")
    assert "only adapter_model.bin, a pickle, no adapter_model.safetensors" in message
    foreign = variant("foreign")
    tensors = {"base_model.model.model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)}
    save_file(tensors, foreign / "adapter_model.safetensors")
    assert "changes model.layers.9.mlp.up_proj.weight, which" in _refusal(
        base, foreign, tmp_path / "o5"
    )
    assert "adapter folder missing does not exist (nor is it a Hub repo id)" in _refusal(
        base, Path("./missing"), tmp_path / "o6"
    )


def test_a_hub_adapter_offline_is_one_line(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    base, _, _ = family
    message = _refusal(base, Path("pearl-edu/no-such-lora"), tmp_path / "out")
    assert message.startswith("pearl-edu/no-such-lora: not in the Hugging Face cache")
    path = tmp_path / "merge.yml"
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}+pearl-edu/no-such-lora\n"
        "parameters: {weight: 1}\n"
    )
    assert main(["merge", str(path), str(tmp_path / "cli")]) == 2


def test_plan_reads_the_base_header_of_base_plus_adapter(family, tmp_path, capsys):
    base, other, adapter = family
    path = tmp_path / "merge.yml"
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n  - model: {other}\n"
        "parameters: {weight: 0.5}\n"
    )
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # Planned from the base's header (a LoRA changes no shape), not left unread.
    assert plan["models_read"] is True and plan["unread_models"] == []
    assert len(plan["plan"]["tensors"]) == len(read_header(base).tensors)
