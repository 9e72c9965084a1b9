"""Tests of `pearl_edu.teaching.fullrun`: the recipe over local folders, fetching offline,
verifying the stand-in merge against mergekit, explaining differences, generating, pushing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu import load_config, merge, recipe_text, verify
from pearl_edu.errors import HubError, ModelError
from pearl_edu.reading import read_header
from pearl_edu.teaching import fullrun
from pearl_edu.teaching.toy import edited_copy, make_tiny_model

NORM = "model.layers.3.input_layernorm.weight"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> fullrun.StandIns:
    # The recipe's layer_range [0, 32] needs Mistral-7B's 32 layers; tiny sizes keep it quick.
    return fullrun.make_stand_ins(tmp_path_factory.mktemp("stand-ins"), hidden_size=32)


@pytest.fixture(scope="module")
def merged(stand_ins, tmp_path_factory) -> Path:
    config = fullrun.pearl_config(stand_ins.omnibeagle, stand_ins.wizardmath)
    out = tmp_path_factory.mktemp("merged") / "Pearl-stand-in"
    return merge(config, out, device="cpu", progress=False).output_dir


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_the_recipe_keeps_everything_but_the_model_references(tmp_path):
    a, b = tmp_path / "omni beagle", tmp_path / "wizard: math"  # characters YAML must quote
    config = fullrun.pearl_config(a, b)
    shipped = load_config(recipe_text("pearl-7b-slerp"))
    assert config.models() == [str(a), str(b)]
    assert config.base_model == str(a)
    assert config.merge_method == shipped.merge_method == "slerp"
    assert config.dtype == shipped.dtype == "bfloat16"
    assert config.raw["parameters"] == shipped.raw["parameters"]
    assert config.raw["slices"][0]["sources"][1]["layer_range"] == [0, 32]


def test_stand_ins_have_the_real_parents_layout(stand_ins):
    omnibeagle, wizardmath = read_header(stand_ins.omnibeagle), read_header(stand_ins.wizardmath)
    assert omnibeagle.format == "safetensors" and wizardmath.format == "bin"
    assert {m.dtype for m in omnibeagle.tensors.values()} == {torch.float16}
    assert {m.dtype for m in wizardmath.tensors.values()} == {torch.bfloat16}
    assert len(omnibeagle.files) == len(wizardmath.files) == 2
    assert omnibeagle.config["architectures"] == ["MistralForCausalLM"]
    assert omnibeagle.config["num_hidden_layers"] == 32
    for folder in (stand_ins.omnibeagle, stand_ins.wizardmath):
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert "[INST]" in tokenizer_config["chat_template"]


def test_fetch_returns_a_local_folder_as_it_is(stand_ins):
    assert fullrun.fetch(stand_ins.omnibeagle) == stand_ins.omnibeagle.resolve()


def test_fetch_offline_with_an_empty_cache_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    with pytest.raises(HubError) as error:
        fullrun.fetch(fullrun.WIZARDMATH)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("WizardLM/WizardMath-7B-V1.1: not in the Hugging Face cache")
    assert str(home / "hub") in message and "HF_HUB_OFFLINE" in message
    assert not (home / "hub").exists() or not any((home / "hub").rglob("*.bin"))


def test_our_merge_and_mergekits_agree_on_the_stand_ins(stand_ins, merged, tmp_path):
    recipe = fullrun.pearl_recipe_yaml(stand_ins.omnibeagle, stand_ins.wizardmath)
    reference = fullrun.mergekit_merge(recipe, tmp_path / "mergekit")
    report = verify(merged, reference)
    assert report.only_in_a == report.only_in_b == ()
    assert len(report.tensors) == len(read_header(merged).tensors)
    # Two implementations of the same float32 math: at most one bfloat16 ULP apart.
    assert report.max_ulp_diff is not None and report.max_ulp_diff <= 1
    assert report.num_differing <= 0.001 * report.num_elements
    assert fullrun.explain(report).startswith(("Identical", "The same math"))


def one_ulp_up(weights: dict[str, torch.Tensor]) -> None:
    """Move the first element of one tensor to the next bfloat16 number."""
    bits = weights[NORM].view(torch.int16)
    bits[0] += 1 if bits[0] >= 0 else -1


def test_explain_identical_models(merged, tmp_path):
    copy = edited_copy(merged, tmp_path / "copy", lambda weights: None)
    report = verify(merged, copy)
    assert report.identical
    assert fullrun.explain(report) == (
        f"Identical: all {len(report.tensors)} tensors, {report.num_elements:,} numbers, "
        "are bit for bit the same."
    )


def test_explain_one_ulp_as_rounding(merged, tmp_path):
    report = verify(merged, edited_copy(merged, tmp_path / "ulp", one_ulp_up))
    assert report.num_differing == 1 and report.max_ulp_diff == 1
    explanation = fullrun.explain(report)
    assert explanation.startswith("The same math, rounded differently: 1 of ")
    assert "1 ULP" in explanation


def test_explain_with_the_published_models_tolerance(merged, tmp_path):
    from pearl_edu.verification import NUMPY_ERA_TOLERANCE

    report = fullrun.compare(
        merged, edited_copy(merged, tmp_path / "ulp", one_ulp_up), **NUMPY_ERA_TOLERANCE
    )
    assert report.ok and not report.identical
    explanation = fullrun.explain(report)
    assert explanation.startswith("The same math, rounded differently: 1 of ")
    assert "at its tensor's scale" in explanation


def test_the_tolerance_refuses_a_tensor_rounded_everywhere(merged, tmp_path):
    from pearl_edu.verification import NUMPY_ERA_TOLERANCE

    def every_element_one_ulp_up(weights):
        bits = weights[NORM].view(torch.int16)
        bits += torch.where(bits >= 0, 1, -1).to(torch.int16)

    moved = edited_copy(merged, tmp_path / "all", every_element_one_ulp_up)
    report = fullrun.compare(merged, moved, progress=False, **NUMPY_ERA_TOLERANCE)
    assert report.max_fraction_differing > NUMPY_ERA_TOLERANCE["max_fraction"]
    assert not report.ok
    assert fullrun.explain(report).startswith("Different: ")


def test_explain_a_real_difference(merged, tmp_path):
    def scale(weights):
        weights[NORM] *= 1.5

    report = verify(merged, edited_copy(merged, tmp_path / "scaled", scale))
    assert report.max_ulp_diff > 1
    assert fullrun.explain(report).startswith("Different: ")


def test_explain_differently_shaped_models(merged, tmp_path):
    wider = make_tiny_model(
        tmp_path / "wider", num_layers=32, hidden_size=96, intermediate_size=128, vocab_size=128
    )
    report = verify(merged, wider)
    assert not report.ok
    assert any(not t.same_layout for t in report.tensors)
    assert fullrun.explain(report).startswith("Not the same model: some tensors differ in shape")


def test_explain_missing_tensors(merged, tmp_path):
    def drop_head(weights):
        del weights["lm_head.weight"]

    report = verify(merged, edited_copy(merged, tmp_path / "headless", drop_head))
    assert report.only_in_a == ("lm_head.weight",)
    assert fullrun.explain(report).startswith("Not the same model: 1 tensors only in the merge")


def test_generate_answers_each_prompt_and_repeats_with_the_seed(merged):
    prompts = ["What is 2 + 3 ?", "Solve x + 1 = 4 ."]
    first = fullrun.generate(merged, prompts, max_new_tokens=4, device="cpu")
    assert len(first) == 2 and all(isinstance(answer, str) and answer for answer in first)
    # The seed is set before each prompt: the first answer comes again on its own.
    assert fullrun.generate(merged, prompts[:1], max_new_tokens=4, device="cpu") == first[:1]
    for answer, prompt in zip(first, prompts, strict=True):
        assert prompt not in answer  # only the new text comes back


def test_generate_needs_a_chat_template(merged, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(merged, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no chat_template"):
        fullrun.generate(plain, ["hi"], max_new_tokens=2, device="cpu")


def test_merge_pearl_merges_once_and_then_leaves_the_folder_alone(stand_ins, tmp_path):
    out = tmp_path / "Pearl"
    result = fullrun.merge_pearl(
        stand_ins.omnibeagle, stand_ins.wizardmath, out, device="cpu", progress=False
    )
    assert result is not None and result.output_dir == out
    assert result.resumed_tensors == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = fullrun.merge_pearl(stand_ins.omnibeagle, stand_ins.wizardmath, out, device="cpu")
    assert again is None
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_name_models_in_card_puts_the_repo_ids_back(stand_ins, merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    names = {stand_ins.omnibeagle: fullrun.OMNIBEAGLE, stand_ins.wizardmath: fullrun.WIZARDMATH}
    fullrun.name_models_in_card(copy, names)
    card = (copy / "README.md").read_text()
    recorded = yaml.safe_load((copy / "mergekit_config.yml").read_text())
    assert str(stand_ins.omnibeagle) not in card and fullrun.OMNIBEAGLE in card
    assert recorded["base_model"] == fullrun.OMNIBEAGLE
    assert [s["model"] for s in recorded["slices"][0]["sources"]] == [
        fullrun.OMNIBEAGLE,
        fullrun.WIZARDMATH,
    ]


def test_compare_is_verify_with_a_progress_bar(merged, tmp_path, capsys):
    report = fullrun.compare(merged, merged, progress=True)
    assert report.identical and len(report.tensors) == len(read_header(merged).tensors)
    assert f"{len(report.tensors)}/{len(report.tensors)}" in capsys.readouterr().err


def test_the_merged_folder_carries_the_model_card_to_push(merged):
    card = (merged / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert "mergekit" in front_matter["tags"]


def test_push_refuses_offline_before_any_upload(merged):
    with pytest.raises(HubError, match="me/Pearl-copy: the Hugging Face Hub cannot be reached"):
        fullrun.push_to_hub(merged, "me/Pearl-copy")


def test_push_refuses_a_folder_without_a_model_card(tmp_path):
    with pytest.raises(ModelError, match="no README.md model card"):
        fullrun.push_to_hub(tmp_path, "me/Pearl-copy")
