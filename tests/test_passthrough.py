"""passthrough and layer stacking against mergekit 0.1.5.

Every reference case merges tiny Mistral- or Llama-shaped models once with mergekit's
Python API and once with `pearl_edu.merge`, from the same YAML, and asks for every output
tensor bit for bit (names, dtypes, values) and for the same ``num_hidden_layers`` in
``config.json``. The stacking itself is checked against the input models too, so that a
shared mistake could not pass: output layer ``i`` is the source layer the slices name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.cli import main
from pearl_edu.config import load_config
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.methods import merge_tensor
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

LAYERS = 10  # the 40 layers of orca_mini_v3_13b and Platypus2-13B, scaled down by 4
ORCAMINI_PLATY_44 = """
slices:
  - sources:
    - model: {orca}
      layer_range: [0, 6]
  - sources:
    - model: {platy}
      layer_range: [5, 10]
merge_method: passthrough
dtype: float16
"""


def make_pair(
    root: Path, arch: str, dtype: torch.dtype, *, tied: bool = False
) -> tuple[Path, Path]:
    """Two fine-tunes of one tiny model, as orca_mini and Platypus2 are of Llama-2-13B."""
    base = make_tiny_model(
        root / "base", arch=arch, num_layers=LAYERS, seed=1, dtype=dtype, tie_embeddings=tied
    )
    first = make_tiny_model(root / "orca", base=base, noise=0.3, seed=2, dtype=dtype)
    second = make_tiny_model(root / "platy", base=base, noise=0.3, seed=3, dtype=dtype)
    return first, second


@pytest.fixture(scope="module")
def mistral_bf16(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair(tmp_path_factory.mktemp("mistral_bf16"), "mistral", torch.bfloat16)


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair(tmp_path_factory.mktemp("llama_fp32"), "llama", torch.float32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Model references are local folders (or names never fetched): no Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_both(config_text: str, out: Path) -> tuple[dict, dict]:
    """The state dicts that pearl_edu and mergekit make from one YAML (folders kept)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False)
    run_merge(config, str(out / "mergekit"), options=options)
    merge(config_text, out / "pearl", device="cpu", progress=False)
    return load_state_dict(out / "pearl"), load_state_dict(out / "mergekit")


def assert_identical(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"


def layer_count(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def assert_same_layer_count(out: Path, expected: int) -> None:
    assert layer_count(out / "pearl") == layer_count(out / "mergekit") == expected


def layer_names(state: dict, layer: int) -> dict[str, str]:
    """Tensor names of one layer, by the part after the layer index."""
    prefix = f"model.layers.{layer}."
    return {name.removeprefix(prefix): name for name in state if name.startswith(prefix)}


def assert_layer_from(merged: dict, out_layer: int, source: dict, in_layer: int, scale=None):
    """Output layer ``out_layer`` is ``source``'s layer ``in_layer`` (times ``scale``)."""
    outs, ins = layer_names(merged, out_layer), layer_names(source, in_layer)
    assert outs.keys() == ins.keys() and outs
    for rest, name in outs.items():
        expected = source[ins[rest]]
        expected = expected if scale is None else expected * scale
        assert torch.equal(merged[name], expected.to(merged[name].dtype)), name


# --- reference cases: identical to mergekit ---------------------------------------------


def test_orcamini_platy_44_layers_scaled_down(mistral_bf16, tmp_path):
    # mergekit's examples/orcamini-platy-44layer.yml with 10-layer models: 6 + 5 = 11 layers.
    orca, platy = mistral_bf16
    config = ORCAMINI_PLATY_44.format(orca=orca, platy=platy)
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path, 11)
    assert {t.dtype for t in ours.values()} == {torch.float16}
    first, second = load_state_dict(orca), load_state_dict(platy)
    for out_layer in range(11):
        source, in_layer = (first, out_layer) if out_layer < 6 else (second, out_layer - 1)
        assert_layer_from(ours, out_layer, source, in_layer)
    # Embeddings from the first slice's model, final norm and lm_head from the last's.
    assert torch.equal(ours["model.embed_tokens.weight"], first["model.embed_tokens.weight"].half())
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], second[name].half())


def test_single_model_slice_is_a_copy(llama_fp32, tmp_path):
    orca, _ = llama_fp32
    config = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {orca}, layer_range: [0, {LAYERS}]}}]
"""
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path, LAYERS)
    assert_identical(ours, load_state_dict(orca))


def test_models_form_and_a_shorter_copy(mistral_bf16, tmp_path):
    orca, _ = mistral_bf16
    whole = f"merge_method: passthrough\nmodels:\n  - model: {orca}\n"
    ours, theirs = run_both(whole, tmp_path / "whole")
    assert_identical(ours, theirs)
    assert_identical(ours, load_state_dict(orca))
    # The first four layers only: a shallower model, config.json says 4.
    shallow = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {orca}, layer_range: [0, 4]}}]
"""
    ours, theirs = run_both(shallow, tmp_path / "shallow")
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path / "shallow", 4)


def test_scale_as_a_number_bf16(mistral_bf16, tmp_path):
    # A top-level scale, and a model's own scale that takes precedence in slice 1.
    orca, platy = mistral_bf16
    config = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {orca}, layer_range: [0, 6]}}]
  - sources:
      - model: {platy}
        layer_range: [5, 10]
        parameters: {{scale: 1.37}}
parameters:
  scale: 0.83
"""
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path, 11)
    first, second = load_state_dict(orca), load_state_dict(platy)
    assert_layer_from(ours, 2, first, 2, scale=0.83)
    assert_layer_from(ours, 7, second, 6, scale=1.37)
    # The tensors outside the layers are scaled too, with their slice's scopes: the
    # embeddings as the first slice's model, lm_head as the last slice's (its own 1.37).
    embed = "model.embed_tokens.weight"
    assert torch.equal(ours[embed], first[embed] * 0.83)
    assert torch.equal(ours["lm_head.weight"], second["lm_head.weight"] * 1.37)


def test_scale_as_a_gradient_fp32(llama_fp32, tmp_path):
    orca, platy = llama_fp32
    config = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {orca}, layer_range: [0, 6]}}]
    parameters:
      scale: [0.5, 2.0, 1.0]
  - sources: [{{model: {platy}, layer_range: [5, 10]}}]
parameters:
  scale: [1.0, 0.1]
"""
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path, 11)
    first, second = load_state_dict(orca), load_state_dict(platy)
    # Slice 0, layer 0: x = 0, scale 0.5; slice 1's last layer: x = 1, scale 0.1.
    assert_layer_from(ours, 0, first, 0, scale=0.5)
    assert_layer_from(ours, 10, second, 9, scale=0.1)


def test_scale_by_filters_matches_input_names_bf16(mistral_bf16, tmp_path):
    # "layers.5." is a name in platy (its input layer 5) but output layer 6: mergekit
    # matches a per-model parameter against the input tensor's name, and so must we.
    orca, platy = mistral_bf16
    config = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {orca}, layer_range: [0, 6]}}]
  - sources: [{{model: {platy}, layer_range: [5, 10]}}]
parameters:
  scale:
    - filter: layers.5.
      value: 0.0
    - filter: o_proj
      value: [0.25, 1.75]
    - filter: down_proj
      value: 0.6
"""
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    second = load_state_dict(platy)
    assert all(not t.any() for n, t in ours.items() if n.startswith("model.layers.6."))
    assert torch.equal(ours["model.layers.5.mlp.up_proj.weight"], torch.zeros(128, 64).bfloat16())
    # Unmatched tensors are copied untouched (no scale, not scale 1).
    assert torch.equal(ours["model.norm.weight"], second["model.norm.weight"])


def test_depth_up_scaling_one_model_fp32_to_bf16(llama_fp32, tmp_path):
    # SOLAR's recipe on one model: layers [0, 8) and [2, 10) stacked, 16 layers from 10.
    orca, _ = llama_fp32
    config = f"""
merge_method: passthrough
base_model: {orca}
slices:
  - sources: [{{model: {orca}, layer_range: [0, 8]}}]
  - sources: [{{model: {orca}, layer_range: [2, 10]}}]
out_dtype: bfloat16
"""
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path, 16)
    source = load_state_dict(orca)
    assert_layer_from(ours, 8, source, 2)
    assert_layer_from(ours, 15, source, 9)


def test_tied_embeddings_llama(tmp_path):
    # Tied models have no lm_head tensor; mergekit writes none either.
    orca, platy = make_pair(tmp_path / "models", "llama", torch.bfloat16, tied=True)
    config = ORCAMINI_PLATY_44.format(orca=orca, platy=platy).replace("float16", "bfloat16")
    ours, theirs = run_both(config, tmp_path)
    assert_identical(ours, theirs)
    assert_same_layer_count(tmp_path, 11)


# --- the method on one tensor -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_tensor_copies_or_scales_in_the_tensor_dtype(dtype):
    tensor = torch.randn(33, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(merge_tensor("passthrough", [tensor], 0, {}), tensor)
    scaled = merge_tensor("passthrough", [tensor], 0, {}, input_params=[{"scale": 0.3}])
    assert scaled.dtype == dtype and torch.equal(scaled, tensor * 0.3)
    out = torch.empty_like(tensor)
    written = merge_tensor("passthrough", [tensor], 0, {}, input_params=[{"scale": 0.3}], out=out)
    assert written is out and torch.equal(out, tensor * 0.3)
    assert torch.equal(merge_tensor("passthrough", [tensor], 0, {}, out=out), tensor)


# --- the plan: which source layer each output layer comes from ---------------------------


def test_plan_shows_source_layers_from_local_models(mistral_bf16, tmp_path, capsys):
    orca, platy = mistral_bf16
    config = tmp_path / "stack.yml"
    config.write_text(ORCAMINI_PLATY_44.format(orca=orca, platy=platy))
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "11 output layers" in out and "config.json from orca" in out
    assert f"  slice 0: {orca} layers [0, 6]\n" in out and "base None" not in out
    rows = table(out)
    assert rows[0][:4] == ["0", "0", "0.000", "orca:0"]
    assert rows[5][3] == "orca:5"
    assert rows[6][:4] == ["6", "1", "0.000", "platy:5"]
    assert rows[10][3] == "platy:9"
    assert "model.embed_tokens.weight  from orca" in out
    assert "model.norm.weight  from platy" in out and "lm_head.weight  from platy" in out

    assert main(["plan", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layers = data["schedule"]["layers"]
    assert [row["sources"] for row in layers[5:7]] == [
        [{"model": str(orca), "layer": 5}],
        [{"model": str(platy), "layer": 5}],
    ]
    inputs = {t["name"]: t["inputs"] for t in data["plan"]["tensors"]}
    assert inputs["model.layers.6.mlp.up_proj.weight"] == [
        {"model": str(platy), "tensor": "model.layers.5.mlp.up_proj.weight"}
    ]
    assert data["plan"]["num_layers"] == 11


def test_plan_of_the_real_example_without_its_models(tmp_path, capsys):
    # The 13B models are not here: the schedule comes from layer_range alone.
    config = tmp_path / "orcamini-platy-44layer.yml"
    text = ORCAMINI_PLATY_44.replace("[0, 6]", "[0, 24]").replace("[5, 10]", "[20, 40]")
    config.write_text(
        text.format(orca="psmathur/orca_mini_v3_13b", platy="garage-bAInd/Platypus2-13B")
    )
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert sorted(rows) == list(range(44))
    assert rows[23][3] == "orca_mini_v3_13b:23"
    assert rows[24][3] == "Platypus2-13B:20"
    assert rows[43][3] == "Platypus2-13B:39"
    assert "lm_head.weight  from Platypus2-13B" in out


def test_plan_of_an_ordinary_merge_has_no_from_column(capsys):
    assert main(["plan", "pearl-7b-slerp"]) == 0
    out = capsys.readouterr().out
    assert "from" not in out.split("outside the layers")[0].split("\n\n")[1]


def table(text: str) -> dict[int, list[str]]:
    """The per-layer table's rows by layer number."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.split()[:4] == ["layer", "slice", "x", "from"]
    )
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows[int(line.split()[0])] = line.split()
    return rows


# --- bad input: one line, naming the key ------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_two_sources_in_a_slice_are_refused(mistral_bf16, tmp_path):
    orca, platy = mistral_bf16
    config = f"""
merge_method: passthrough
slices:
  - sources:
      - {{model: {orca}, layer_range: [0, 4]}}
      - {{model: {platy}, layer_range: [0, 4]}}
"""
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "slices[0]: passthrough needs exactly 1 model; got 2" in one_line(err)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with pytest.raises(ValueError, match="inputs"):  # mergekit refuses it too
        mk_config = MergeConfiguration.model_validate(yaml.safe_load(config))
        run_merge(mk_config, str(tmp_path / "mk"), options=MergeOptions(quiet=True))


def test_models_form_with_an_unlisted_base_is_two_models(mistral_bf16):
    orca, platy = mistral_bf16
    config = f"merge_method: passthrough\nbase_model: {platy}\nmodels:\n  - model: {orca}\n"
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = one_line(err)
    assert "models: passthrough needs exactly 1 model; got 2" in message
    assert "counting base_model" in message


def test_layer_range_out_of_bounds(mistral_bf16, tmp_path, capsys):
    orca, platy = mistral_bf16
    config = ORCAMINI_PLATY_44.format(orca=orca, platy=platy).replace("[5, 10]", "[5, 11]")
    with pytest.raises(ModelError) as err:
        merge(config, tmp_path / "out", device="cpu", progress=False)
    message = one_line(err)
    assert "slices[1].sources[0].layer_range: [5, 11] goes beyond" in message
    assert f"{platy}, which has 10 layers" in message
    assert not (tmp_path / "out").exists()
    path = tmp_path / "bad.yml"
    path.write_text(config)
    assert main(["plan", str(path)]) == 2
    assert "goes beyond" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ("{scale: lots}", "parameters.scale: expected a number, got 'lots'"),
        ("{scale: []}", "parameters.scale: expected a number or a non-empty list"),
        ("{scale: [{filter: mlp}]}", "parameters.scale[0]: missing 'value'"),
    ],
)
def test_bad_scale(parameters, expected):
    config = f"""
merge_method: passthrough
slices:
  - sources: [{{model: a, layer_range: [0, 2]}}]
parameters: {parameters}
"""
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert expected in one_line(err)


def test_reversed_layer_range(mistral_bf16):
    orca, _ = mistral_bf16
    config = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {orca}, layer_range: [6, 2]}}]
"""
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "slices[0].sources[0].layer_range: expected start < end" in one_line(err)
