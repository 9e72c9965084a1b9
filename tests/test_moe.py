"""`pearl-edu moe` against mergekit 0.1.5's mergekit-moe, on tiny local models.

A tiny Mistral-shaped base (with a tokenizer) and two fine-tuned siblings are built once;
each case runs mergekit-moe's Python entry (`mergekit.scripts.moe.build`) in-process and
`pearl_edu.moe.build_moe` (or the command) on the same YAML. For ``cheap_embed`` and the
``hidden`` modes every tensor, and config.json, must be identical bit for bit: both run
the same transformers forward pass of the base in bfloat16 on the CPU, in one process. For
``random`` the routers are draws (mergekit's from torch's global generator), so the test
checks what does not depend on the draw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.cli import main
from pearl_edu.errors import ConfigError, ModelError, UnknownKeyWarning
from pearl_edu.moe import build_moe, load_moe_config
from pearl_edu.teaching.toy import edited_copy, load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

SHAPE = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 48, "vocab_size": 128}


@dataclass(frozen=True)
class Family:
    base: Path
    math: Path
    chat: Path


def make_family(root: Path, arch: str) -> Family:
    base = make_tiny_model(root / "base", arch=arch, seed=1, with_tokenizer=True, **SHAPE)
    return Family(
        base=base,
        math=make_tiny_model(root / "math", base=base, noise=0.5, seed=2),
        chat=make_tiny_model(root / "chat", base=base, noise=0.5, seed=3),
    )


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp("mistral"), "mistral")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Model references are local folders; make sure nothing tries the Hub instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def moe_yaml(family: Family, gate_mode: str, extra: str = "", math_extra: str = "") -> str:
    return f"""
base_model: {family.base}
gate_mode: {gate_mode}
{extra}
experts:
  - source_model: {family.math}
    positive_prompts: ["1 + 2 = 3", "4 * 5"]
    negative_prompts: ["a b c"]
{math_extra}
  - source_model: {family.chat}
    positive_prompts: ["h e l l o", "w o r l d !"]
"""


def run_mergekit(config_text: str, out: Path) -> dict:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    config = MoEMergeConfig.model_validate(yaml.safe_load(config_text))
    build(config, str(out), MergeOptions(quiet=True, device="cpu"), device="cpu")
    return load_state_dict(out)


def assert_identical(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"


# --- deterministic gate modes: mergekit's bits ------------------------------------------


@pytest.mark.parametrize(
    ("gate_mode", "extra", "math_extra"),
    [
        ("cheap_embed", "dtype: bfloat16", "    residual_scale: 0.5"),
        ("cheap_embed", "dtype: float32\nexperts_per_token: 1", ""),
        ("hidden", "", ""),
        ("hidden_avg", "dtype: float16", ""),
    ],
)
def test_deterministic_gates_give_mergekits_tensors_and_config(
    mistral, tmp_path, gate_mode, extra, math_extra
):
    text = moe_yaml(mistral, gate_mode, extra, math_extra)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    result = build_moe(text, tmp_path / "pearl", progress=False)
    ours = load_state_dict(tmp_path / "pearl")
    assert_identical(ours, theirs)
    assert result.num_tensors == len(ours)
    ours_config = (tmp_path / "pearl" / "config.json").read_text()
    assert ours_config == (tmp_path / "mergekit" / "config.json").read_text()
    assert (tmp_path / "pearl" / "mergekit_moe_config.yml").read_text() == text
    assert (tmp_path / "pearl" / "tokenizer.json").read_bytes() == (
        mistral.base / "tokenizer.json"
    ).read_bytes()
    # The routers are the prompts' directions: unit rows before the dtype conversion.
    norms = ours["model.layers.1.mlp.gate.weight"].float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-2)


def test_llama_experts_give_mergekits_mixtral(tmp_path):
    llama = make_family(tmp_path / "models", "llama")
    text = moe_yaml(llama, "cheap_embed")
    theirs = run_mergekit(text, tmp_path / "mergekit")
    build_moe(text, tmp_path / "pearl", progress=False)
    assert_identical(load_state_dict(tmp_path / "pearl"), theirs)
    ours = (tmp_path / "pearl" / "config.json").read_text()
    assert ours == (tmp_path / "mergekit" / "config.json").read_text()


# --- random gates: what does not depend on the draw --------------------------------------


def test_random_gates_copy_the_experts_exactly(mistral, tmp_path):
    text = moe_yaml(mistral, "random", "experts_per_token: 1")
    theirs = run_mergekit(text, tmp_path / "mergekit")
    build_moe(text, tmp_path / "pearl", progress=False)
    ours = load_state_dict(tmp_path / "pearl")
    assert sorted(ours) == sorted(theirs)
    routers = [name for name in ours if name.endswith("mlp.gate.weight")]
    assert len(routers) == SHAPE["num_layers"]
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.dtype == theirs[name].dtype, name
        if name not in routers:
            assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"
    # Each expert's MLP is its source's, fused as transformers 5 lays Mixtral out.
    math = load_state_dict(mistral.math)
    gate_up = ours["model.layers.1.mlp.experts.gate_up_proj"]
    assert same_bits(gate_up[0, :48], math["model.layers.1.mlp.gate_proj.weight"])
    assert same_bits(gate_up[0, 48:], math["model.layers.1.mlp.up_proj.weight"])
    down = ours["model.layers.1.mlp.experts.down_proj"]
    assert same_bits(down[0], math["model.layers.1.mlp.down_proj.weight"])
    # N(0, 1) draws, not unit rows; reproducible from the seed, another seed another draw.
    router = ours["model.layers.0.mlp.gate.weight"].float()
    assert not torch.allclose(router.norm(dim=-1), torch.ones(2), atol=0.1)
    build_moe(text, tmp_path / "again", progress=False)
    again = load_state_dict(tmp_path / "again")
    assert all(same_bits(again[name], ours[name]) for name in routers)
    build_moe(text, tmp_path / "other", progress=False, random_seed=1)
    other = load_state_dict(tmp_path / "other")
    assert not same_bits(other[routers[0]], ours[routers[0]])


def test_noise_scale_adds_noise_of_that_scale_to_its_expert_only(mistral, tmp_path):
    text = moe_yaml(mistral, "random", "dtype: float32", "    noise_scale: 0.01")
    build_moe(text, tmp_path / "pearl", progress=False)
    ours = load_state_dict(tmp_path / "pearl")
    math = load_state_dict(mistral.math)
    chat = load_state_dict(mistral.chat)
    gate_up = ours["model.layers.0.mlp.experts.gate_up_proj"]
    noise = gate_up[0, :48] - math["model.layers.0.mlp.gate_proj.weight"].float()
    # bfloat16 noise of std 0.01 added in bfloat16: its spread is 0.01 to a few percent.
    assert 0.008 < noise.std().item() < 0.012
    assert same_bits(gate_up[1, :48], chat["model.layers.0.mlp.gate_proj.weight"].float())


# --- the model runs ------------------------------------------------------------------------


def test_quiet_hidden_mode_prints_no_loading_bar_and_restores_it(mistral, tmp_path, capfd):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    config = _write(tmp_path, moe_yaml(mistral, "hidden"))
    assert main(["--quiet", "moe", config, str(tmp_path / "moe")]) == 0
    assert capfd.readouterr().err == ""  # transformers' "Loading weights" bar hidden
    assert transformers_logging.is_progress_bar_enabled()  # and shown again after


def test_output_loads_as_mixtral_and_runs(mistral, tmp_path):
    from transformers import MixtralForCausalLM

    code = main(
        [
            "--quiet",
            "moe",
            _write(tmp_path, moe_yaml(mistral, "cheap_embed")),
            str(tmp_path / "moe"),
        ]
    )
    assert code == 0
    model = MixtralForCausalLM.from_pretrained(tmp_path / "moe")
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    with torch.no_grad():
        logits = model(torch.tensor([[1, 40, 41, 42]])).logits
    assert logits.shape == (1, 4, SHAPE["vocab_size"])
    assert torch.isfinite(logits).all()
    loaded = model.state_dict()
    written = load_state_dict(tmp_path / "moe")
    assert same_bits(
        loaded["model.layers.0.mlp.gate.weight"], written["model.layers.0.mlp.gate.weight"]
    )
    assert "mergekit_moe_config.yml" in {p.name for p in (tmp_path / "moe").iterdir()}
    # A finished MoE folder is replaced only with --force.
    again = [_write(tmp_path, moe_yaml(mistral, "cheap_embed")), str(tmp_path / "moe")]
    assert main(["--quiet", "moe", *again]) == 2
    assert main(["--quiet", "moe", *again, "--force"]) == 0


# --- one-line errors, nothing written -------------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "moe.yml"
    path.write_text(text)
    return str(path)


def assert_refused(tmp_path: Path, capsys, text: str, *expected: str) -> str:
    out = tmp_path / "out"
    code = main(["--quiet", "moe", _write(tmp_path, text), str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pearl-edu: error: "), err
    assert "Traceback" not in err
    for part in expected:
        assert part in lines[0]
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    return lines[0]


def test_missing_expert_is_one_line(mistral, tmp_path, capsys):
    text = moe_yaml(mistral, "cheap_embed").replace(str(mistral.chat), str(tmp_path / "nope"))
    assert_refused(tmp_path, capsys, text, str(tmp_path / "nope"), "does not exist")


def test_empty_prompts_are_refused_as_mergekit_refuses_them(mistral, tmp_path, capsys):
    from mergekit.moe.config import MoEMergeConfig, is_bad_config

    text = moe_yaml(mistral, "hidden").replace('["h e l l o", "w o r l d !"]', "[]")
    assert is_bad_config(MoEMergeConfig.model_validate(yaml.safe_load(text)))
    assert_refused(tmp_path, capsys, text, "experts[1].positive_prompts", "at least one prompt")
    # gate_mode random needs no prompts, in mergekit and here.
    random = moe_yaml(mistral, "random").replace('["h e l l o", "w o r l d !"]', "[]")
    assert not is_bad_config(MoEMergeConfig.model_validate(yaml.safe_load(random)))
    build_moe(random, tmp_path / "random", progress=False)


def test_identical_prompts_and_identical_experts_are_refused(mistral, tmp_path):
    same_prompts = moe_yaml(mistral, "cheap_embed").replace(
        '["h e l l o", "w o r l d !"]', '["1 + 2 = 3", "4 * 5"]'
    )
    same_prompts = same_prompts.replace('    negative_prompts: ["a b c"]\n', "")
    with pytest.raises(ConfigError, match="same positive_prompts"):
        build_moe(same_prompts, tmp_path / "a")
    same_models = moe_yaml(mistral, "cheap_embed").replace(str(mistral.chat), str(mistral.math))
    with pytest.raises(ConfigError, match="i-understand-this-is-not-useful-without-training"):
        build_moe(same_models, tmp_path / "b")
    build_moe(same_models, tmp_path / "c", allow_all_same=True, progress=False)


def test_architectures_mergekit_chooses_but_pearl_edu_does_not_write_are_one_line(
    mistral, tmp_path, capsys
):
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import select_output_arch

    def mergekit_choice(text: str) -> str:
        config = MoEMergeConfig.model_validate(yaml.safe_load(text))
        return select_output_arch(config, MergeOptions()).name()

    shared = f"shared_experts:\n  - source_model: {mistral.math}"
    deepseek = moe_yaml(mistral, "random", shared)  # a shared expert without prompts
    assert mergekit_choice(deepseek) == "DeepSeek MoE"
    assert_refused(tmp_path, capsys, deepseek, "would write this config as DeepSeek MoE")
    named = moe_yaml(mistral, "random", "architecture: deepseek")
    assert mergekit_choice(named) == "DeepSeek MoE"
    assert_refused(tmp_path, capsys, named, "DeepSeek MoE")


def test_models_no_architecture_fits_are_one_line(mistral, tmp_path, capsys):
    qwen = make_family(tmp_path / "qwen", "qwen2")
    refused = assert_refused(tmp_path, capsys, moe_yaml(qwen, "random"), "'qwen2'")
    assert "Mixtral: it is made from llama, mistral models only" in refused
    assert "Qwen MoE: it needs exactly one shared expert" in refused
    mixed = moe_yaml(mistral, "random").replace(str(mistral.chat), str(qwen.chat))
    assert_refused(tmp_path, capsys, mixed, "every model of one model_type")
    text = moe_yaml(mistral, "random", "architecture: qwen3")
    assert_refused(tmp_path, capsys, text, "Qwen3 MoE: it is made from qwen3 models only")
    text = moe_yaml(mistral, "random", "architecture: switch")
    assert_refused(tmp_path, capsys, text, "architecture: 'switch' names no MoE architecture")


# --- Qwen2-MoE: one shared expert ------------------------------------------------------------


@pytest.mark.parametrize(("arch", "gate_mode"), [("qwen2", "cheap_embed"), ("mistral", "hidden")])
def test_a_shared_expert_gives_mergekits_qwen2_moe(mistral, tmp_path, arch, gate_mode):
    from transformers import Qwen2MoeForCausalLM

    family = mistral if arch == "mistral" else make_family(tmp_path / "models", arch)
    shared = f"""shared_experts:
  - source_model: {family.base}
    positive_prompts: ["x y z"]
    noise_scale: null
    residual_scale: 0.25"""
    text = moe_yaml(family, gate_mode, shared)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    result = build_moe(text, tmp_path / "pearl", progress=False)
    assert result.architecture == "Qwen MoE"
    ours = load_state_dict(tmp_path / "pearl")
    assert_identical(ours, theirs)
    ours_config = (tmp_path / "pearl" / "config.json").read_text()
    assert ours_config == (tmp_path / "mergekit" / "config.json").read_text()
    assert ours["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, SHAPE["hidden_size"])
    if arch == "mistral":  # Qwen2-MoE's attention has biases: zeros where Mistral has none
        assert not ours["model.layers.0.self_attn.k_proj.bias"].any()
    model = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "pearl")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 40, 41, 42]])).logits
    assert logits.shape == (1, 4, SHAPE["vocab_size"]) and torch.isfinite(logits).all()


def test_random_gates_for_qwen2_moe_copy_every_expert(mistral, tmp_path):
    qwen = make_family(tmp_path / "models", "qwen2")
    text = moe_yaml(qwen, "random", f"shared_experts:\n  - source_model: {qwen.base}")
    text = text.replace("gate_mode: random", "gate_mode: random\narchitecture: qwen")
    theirs = run_mergekit(text, tmp_path / "mergekit")
    build_moe(text, tmp_path / "pearl", progress=False)
    ours = load_state_dict(tmp_path / "pearl")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.dtype == theirs[name].dtype, name
        if not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"
    base = load_state_dict(qwen.base)
    shared = ours["model.layers.1.mlp.shared_expert.up_proj.weight"]
    assert same_bits(shared, base["model.layers.1.mlp.up_proj.weight"])


def test_expert_without_an_mlp_tensor_names_it(mistral, tmp_path, capsys):
    def drop(weights):
        del weights["model.layers.1.mlp.up_proj.weight"]

    broken = edited_copy(mistral.chat, tmp_path / "broken", drop)
    text = moe_yaml(mistral, "cheap_embed").replace(str(mistral.chat), str(broken))
    assert_refused(tmp_path, capsys, text, str(broken), "model.layers.1.mlp.up_proj.weight")


def test_config_errors_name_the_key(mistral):
    typo = {"base_model": "x", "experts": [{"source_model": "y", "positive_prompt": ["a"]}]}
    with pytest.warns(UnknownKeyWarning, match=r"experts\[0\]\.positive_prompt: unknown key"):
        assert load_moe_config(typo).experts[0].positive_prompts is None  # ignored, as mergekit
    with pytest.raises(ConfigError, match=r"experts\[0\]\.positive_prompt: unknown key"):
        load_moe_config(typo, strict=True)
    with pytest.raises(ConfigError, match=r"experts\[0\]\.source: unknown key.*source_model"):
        load_moe_config({"base_model": "x", "experts": [{"source": "y"}]})
    with pytest.raises(ConfigError, match="gate_mode: 'hiden' is not a gate mode"):
        load_moe_config({"base_model": "x", "experts": [], "gate_mode": "hiden"})
    with pytest.raises(ConfigError, match="dtype: unknown dtype 'fp8'"):
        load_moe_config({"base_model": "x", "experts": [], "dtype": "fp8"})
    with pytest.raises(ConfigError, match="fewer than experts_per_token"):
        build_moe(
            {"base_model": str(mistral.base), "experts": [{"source_model": str(mistral.math)}]},
            "/nonexistent/out",
        )
    with pytest.raises(ModelError, match="does not exist"):
        build_moe(
            {
                "base_model": str(mistral.base) + "-missing",
                "gate_mode": "random",
                "experts_per_token": 1,
                "experts": [{"source_model": str(mistral.math)}],
            },
            "/nonexistent/out",
        )


def test_an_interrupted_build_leaves_no_half_written_file_and_resumes(
    mistral, tmp_path, monkeypatch
):
    import pearl_edu.moe.build as build_module

    text = moe_yaml(mistral, "cheap_embed")
    build_moe(text, tmp_path / "whole", progress=False, shard_size=20_000)
    made = []
    real = build_module.make_tensor

    def failing(job, *args, **kwargs):
        if len(made) == 12:
            raise KeyboardInterrupt
        made.append(job.name)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(build_module, "make_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        build_moe(text, tmp_path / "out", progress=False, shard_size=20_000)
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists()
    kept = sorted(p.name for p in partial.glob("*.safetensors"))
    assert kept and not list(partial.glob("*.tmp"))  # finished shards only
    monkeypatch.setattr(build_module, "make_tensor", real)
    result = build_moe(text, tmp_path / "out", progress=False, shard_size=20_000)
    assert 0 < result.resumed_tensors < result.num_tensors
    assert len(result.weight_files) > len(kept) > 0
    assert_identical(load_state_dict(tmp_path / "out"), load_state_dict(tmp_path / "whole"))
    assert not partial.exists()


def test_a_partial_folder_that_is_not_a_build_of_ours_is_refused_and_kept(mistral, tmp_path):
    """A ``.out.partial`` folder holding the user's files is neither used nor deleted."""
    from pearl_edu.errors import OutputError

    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not made by pearl-edu"):
        build_moe(moe_yaml(mistral, "cheap_embed"), tmp_path / "out", progress=False)
    assert (partial / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_a_config_made_in_python_is_built_and_recorded_as_yaml(mistral, tmp_path):
    from pearl_edu.moe import Expert, MoEConfig

    config = MoEConfig(
        base_model=str(mistral.base),
        gate_mode="cheap_embed",
        experts=(
            Expert(str(mistral.math), positive_prompts=("1 + 2 = 3",)),
            Expert(str(mistral.chat), positive_prompts=("h e l l o",), residual_scale=2.0),
        ),
    )
    build_moe(config, tmp_path / "python", progress=False)
    recorded = (tmp_path / "python" / "mergekit_moe_config.yml").read_text()
    assert load_moe_config(recorded) == dataclasses.replace(
        config, source="<string>", text=recorded
    )
    theirs = run_mergekit(recorded, tmp_path / "mergekit")
    assert_identical(load_state_dict(tmp_path / "python"), theirs)


def test_prompts_too_alike_give_a_one_line_warning(mistral, tmp_path):
    from pearl_edu.moe.router import DegenerateRouterWarning

    shared = " ".join("abcdefghijklmnopqrst")
    text = moe_yaml(mistral, "cheap_embed")
    text = text.replace('["1 + 2 = 3", "4 * 5"]', f'["{shared} u"]')
    text = text.replace('["h e l l o", "w o r l d !"]', f'["{shared} v"]')
    text = text.replace('    negative_prompts: ["a b c"]\n', "")
    with pytest.warns(DegenerateRouterWarning, match="all layers: the router rows are nearly"):
        build_moe(text, tmp_path / "alike", progress=False)
