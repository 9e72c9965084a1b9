"""Reading mergekit YAML: every form it takes, and every mistake reported as one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pearl_edu.config import MergeConfig, load_config, parse_config
from pearl_edu.errors import ConfigError, PearlEduError, UnknownKeyWarning
from pearl_edu.methods import METHODS
from pearl_edu.parameters import FilterRule
from pearl_edu.recipes import recipe_path

TWO_MODELS = """
merge_method: slerp
base_model: org/a
models:
  - model: org/a
  - model: org/b
parameters:
  t: 0.25
"""


def _config_error(text: str, tmp_path: Path | None = None) -> str:
    """Load ``text`` (from a file when tmp_path is given) and return the one-line error."""
    source: str | Path = text
    if tmp_path is not None:
        source = tmp_path / "merge.yml"
        source.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(source)
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, PearlEduError)
    return message


def _slerp(parameters: str = "  t: 0.5", slices: str | None = None, extra: str = "") -> str:
    slices = slices or (
        "  - sources:\n"
        "      - {model: org/a, layer_range: [0, 4]}\n"
        "      - {model: org/b, layer_range: [0, 4]}\n"
    )
    return (
        f"merge_method: slerp\nbase_model: org/a\nslices:\n{slices}"
        f"parameters:\n{parameters}\n{extra}"
    )


# --- the forms ---------------------------------------------------------------------------


def test_pearl_recipe_by_name_path_and_text():
    by_name = load_config("pearl-7b-slerp")
    by_path = load_config(recipe_path("pearl-7b-slerp"))
    by_text = load_config(recipe_path("pearl-7b-slerp").read_text())
    assert by_name.config_hash() == by_path.config_hash() == by_text.config_hash()
    assert by_text.source == "<string>"
    assert by_name.source.endswith("pearl-7b-slerp.yml")

    config = by_name
    assert config.merge_method == "slerp"
    assert config.dtype == "bfloat16" and config.out_dtype is None
    assert config.base_model == "mlabonne/OmniBeagle-7B"
    assert config.models() == ["mlabonne/OmniBeagle-7B", "WizardLM/WizardMath-7B-V1.1"]
    (only_slice,) = config.slices
    assert [(s.model, s.layer_range) for s in only_slice.sources] == [
        ("mlabonne/OmniBeagle-7B", (0, 32)),
        ("WizardLM/WizardMath-7B-V1.1", (0, 32)),
    ]
    t = config.parameters["t"]
    assert t.form == "filters"
    assert t.rules == (
        FilterRule("self_attn", (0.0, 0.5, 0.3, 0.7, 1.0)),
        FilterRule("mlp", (1.0, 0.5, 0.7, 0.3, 0.0)),
        FilterRule(None, 0.5),
    )
    assert t.rule_for("model.layers.3.self_attn.q_proj.weight").filter == "self_attn"
    assert t.rule_for("model.layers.3.mlp.up_proj.weight").filter == "mlp"
    assert t.rule_for("model.layers.3.input_layernorm.weight").filter is None
    # Filters are case-sensitive substrings.
    assert t.rule_for("model.layers.3.SELF_ATTN.weight").filter is None


def test_config_is_frozen():
    config = load_config("pearl-7b-slerp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.merge_method = "linear"  # type: ignore[misc]


def test_models_form_is_one_slice_over_all_layers():
    config = load_config(TWO_MODELS)
    (only_slice,) = config.slices
    assert [s.layer_range for s in only_slice.sources] == [None, None]
    assert only_slice.sources[0].num_layers is None
    assert config.parameters["t"].form == "scalar"
    assert config.parameters["t"].rules == (FilterRule(None, 0.25),)


def test_gradient_and_single_filter_entry_forms():
    gradient = load_config(_slerp("  t: [0, 0.5, 1]")).parameters["t"]
    assert gradient.form == "gradient"
    assert gradient.rules == (FilterRule(None, (0.0, 0.5, 1.0)),)
    single = load_config(_slerp("  t: {filter: mlp, value: 0.2}")).parameters["t"]
    assert single.rules == (FilterRule("mlp", 0.2),)
    star = load_config(_slerp("  t:\n    - filter: '*'\n      value: 0.7")).parameters["t"]
    assert star.rules == (FilterRule(None, 0.7),)


def test_slice_and_source_parameters_and_slice_base_model():
    text = """
merge_method: slerp
base_model: org/a
slices:
  - sources:
      - model: org/a
        layer_range: [0, 2]
        parameters: {weight: 0.3, t: 0.9}
      - model: org/b
        layer_range: [2, 4]
  - sources:
      - {model: org/b, layer_range: [4, 6]}
      - {model: org/c, layer_range: [0, 2]}
    base_model: org/c
    parameters:
      t: [{filter: mlp, value: [0, 1]}]
parameters:
  t: 0.5
dtype: torch.float16
out_dtype: float32
"""
    config = load_config(text)
    first, second = config.slices
    assert first.sources[0].parameters["weight"].rules == (FilterRule(None, 0.3),)
    assert first.sources[1].layer_range == (2, 4)
    assert config.slice_base(0) == "org/a"
    assert config.slice_base(1) == "org/c"
    assert second.parameters["t"].rules == (FilterRule("mlp", (0.0, 1.0)),)
    assert (config.dtype, config.out_dtype) == ("float16", "float32")
    assert config.models() == ["org/a", "org/b", "org/c"]


def test_yaml_numbers_in_scientific_notation_and_flags():
    # PyYAML reads 1e-3 as a string; mergekit treats it as a number.
    config = load_config(_slerp("  t: 1e-1\n  normalize: true"))
    assert config.parameters["t"].rules[0].value == pytest.approx(0.1)
    assert config.parameters["normalize"].rules[0].value == 1.0


def test_config_hash_ignores_formatting_but_not_values():
    base = load_config(_slerp("  t: 0.5"))
    reformatted = load_config(
        "# a comment\n" + _slerp("  t:   0.5").replace("org/a\n", "org/a\n\n")
    )
    changed = load_config(_slerp("  t: 0.6"))
    assert base.config_hash() == reformatted.config_hash()
    assert base.config_hash() != changed.config_hash()
    assert len(base.config_hash()) == 64


def test_parse_config_takes_a_mapping():
    config = parse_config(
        {
            "merge_method": "slerp",
            "base_model": "x",
            "models": ["x", "y"],
            "parameters": {"t": 0.5},
        },
        "inline",
    )
    assert isinstance(config, MergeConfig)
    assert config.source == "inline"
    assert config.models() == ["x", "y"]


# --- the mistakes ------------------------------------------------------------------------


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    text = _slerp() + "slices: [unclosed\n  - x: 1\n"
    message = _config_error(text, tmp_path)
    assert str(tmp_path / "merge.yml") in message
    assert "malformed YAML at line" in message
    line = int(message.split("at line ")[1].split(",")[0])
    assert line >= text.count("\n") - 1


def test_missing_file_and_unknown_recipe():
    assert "no such file" in _config_error_for_source("does/not/exist.yml")
    message = _config_error_for_source("no-such-recipe")
    assert "no shipped recipe named 'no-such-recipe'" in message
    assert "pearl-7b-slerp" in message


def _config_error_for_source(source: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(source)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_top_level_must_be_a_mapping():
    assert "expected a mapping" in _config_error("- a\n- b\n")


def test_unknown_merge_method_lists_known_ones(tmp_path):
    message = _config_error(
        _slerp().replace("merge_method: slerp", "merge_method: slurp"), tmp_path
    )
    assert "merge.yml: merge_method: unknown method 'slurp'" in message
    known = message.split("known: ")[1].split(", ")
    assert known == sorted(METHODS) and {"slerp", "ties", "passthrough"} <= set(known)
    assert "merge_method: missing" in _config_error(_slerp().replace("merge_method: slerp\n", ""))


def test_slerp_needs_exactly_two_models():
    three = (
        "  - sources:\n"
        "      - {model: org/a, layer_range: [0, 4]}\n"
        "      - {model: org/b, layer_range: [0, 4]}\n"
        "      - {model: org/c, layer_range: [0, 4]}\n"
    )
    message = _config_error(_slerp(slices=three))
    assert "slices[0]: slerp needs exactly 2 models; got 3" in message
    one = TWO_MODELS.replace("  - model: org/b\n", "")
    assert "models: slerp needs exactly 2 models; got 1" in _config_error(one)


def test_layer_ranges_of_a_slice_must_have_equal_lengths():
    uneven = (
        "  - sources:\n"
        "      - {model: org/a, layer_range: [0, 4]}\n"
        "      - {model: org/b, layer_range: [0, 6]}\n"
    )
    message = _config_error(_slerp(slices=uneven))
    assert "slices[0].sources" in message
    assert "same number of layers" in message
    assert "[4, 6]" in message


@pytest.mark.parametrize(
    ("layer_range", "expected"),
    [
        ("[4, 0]", "expected start < end"),
        ("[2, 2]", "expected start < end"),
        ("[-1, 3]", "must not be negative"),
        ("[0, 1, 2]", "expected two integers"),
        ("[0, 1.5]", "expected two integers"),
        ("zero", "expected two integers"),
    ],
)
def test_bad_layer_ranges(layer_range, expected):
    slices = (
        "  - sources:\n"
        f"      - {{model: org/a, layer_range: {layer_range}}}\n"
        f"      - {{model: org/b, layer_range: {layer_range}}}\n"
    )
    message = _config_error(_slerp(slices=slices))
    assert "slices[0].sources[0].layer_range" in message
    assert expected in message


def test_missing_layer_range_in_slices_form():
    slices = "  - sources:\n      - {model: org/a}\n      - {model: org/b, layer_range: [0, 4]}\n"
    assert "slices[0].sources[0].layer_range: missing" in _config_error(_slerp(slices=slices))


def test_slerp_needs_t(tmp_path):
    text = _slerp("  weight: 0.5")
    message = _config_error(text, tmp_path)
    assert "merge.yml: parameters.t: missing" in message
    no_parameters = TWO_MODELS.replace("parameters:\n  t: 0.25\n", "")
    assert "parameters.t: missing" in _config_error(no_parameters)


def test_t_under_a_model_entry_does_not_count():
    text = TWO_MODELS.replace("  - model: org/b\n", "  - model: org/b\n    parameters: {t: 0.5}\n")
    assert "parameters.t: missing" in _config_error(text.replace("parameters:\n  t: 0.25\n", ""))


@pytest.mark.parametrize(
    ("t", "key"),
    [
        ("high", "parameters.t: expected a number, got 'high'"),
        ("true", "parameters.t: expected a number, got True"),
        ("[0, oops, 1]", "parameters.t[1]: expected a number"),
        ("[]", "parameters.t: expected a number or a non-empty list"),
        ("[{filter: mlp, value: x}]", "parameters.t[0].value: expected a number"),
        ("[{filter: mlp}]", "parameters.t[0]: missing 'value'"),
        ("[{filter: mlp, valeu: 1}]", "parameters.t[0].valeu: unknown key"),
        ("[{filter: 3, value: 1}]", "parameters.t[0].filter: expected a non-empty string"),
        (".nan", "parameters.t: expected a finite number"),
    ],
)
def test_non_numeric_t(t, key):
    assert key in _config_error(_slerp(f"  t: {t}"))


def test_slice_level_t_is_checked_with_its_key():
    slices = (
        "  - sources:\n"
        "      - {model: org/a, layer_range: [0, 4]}\n"
        "      - {model: org/b, layer_range: [0, 4]}\n"
        "    parameters: {t: [0, nope]}\n"
    )
    assert "slices[0].parameters.t[1]: expected a number" in _config_error(_slerp(slices=slices))


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_bad_dtype_names(key):
    message = _config_error(_slerp(extra=f"{key}: bf16\n"))
    assert f"{key}: unknown dtype 'bf16'" in message
    assert "bfloat16" in message


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "float64"])
def test_dtype_names_are_mergekits(key, name):
    import torch
    from mergekit.common import dtype_from_name

    from pearl_edu.config import DTYPES, torch_dtype

    for spelled in (name, f"torch.{name}"):
        config = load_config(_slerp(extra=f"{key}: {spelled}\n"))
        assert getattr(config, key) == name
        assert torch_dtype(spelled, where="x", key=key) == DTYPES[name] == getattr(torch, name)
        assert dtype_from_name(spelled) == DTYPES[name]


def test_the_dtype_table_is_mergekits_floating_dtypes():
    import torch
    from mergekit.common import dtype_from_name

    from pearl_edu.config import DTYPE_NAMES, DTYPES

    assert set(DTYPES.values()) == {torch.bfloat16, torch.float16, torch.float32, torch.float64}
    assert all(dtype_from_name(name) == dtype for name, dtype in DTYPES.items())
    assert all(DTYPES[name] == dtype for dtype, name in DTYPE_NAMES.items())
    with pytest.raises(RuntimeError):  # mergekit refuses what is refused here
        dtype_from_name("bf16")


def test_base_model_must_be_among_the_slice_sources():
    message = _config_error(_slerp().replace("base_model: org/a", "base_model: org/z"))
    assert "base_model: 'org/z' is not among the models of slices[0]" in message
    assert "org/a, org/b" in message
    missing = _config_error(_slerp().replace("base_model: org/a\n", ""))
    assert "base_model: missing; slerp needs one of" in missing
    models_form = _config_error(TWO_MODELS.replace("base_model: org/a", "base_model: org/c"))
    # mergekit adds a base_model missing from `models:`, which gives slerp three models.
    assert "models: slerp needs exactly 2 models; got 3, counting base_model org/c" in models_form


def test_slices_or_models_but_not_both_nor_neither():
    both = _slerp() + "models:\n  - model: org/a\n"
    assert "exactly one of 'slices' or 'models'" in _config_error(both)
    neither = "merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\n"
    assert "exactly one of 'slices' or 'models'" in _config_error(neither)
    assert "slices: expected a non-empty list" in _config_error(_slerp(slices="  []\n"))


def test_unknown_keys_are_typos():
    # mergekit ignores a top-level key it does not know (pydantic's extra="ignore"), so
    # pearl_edu warns and goes on; --strict (strict=True) refuses it.
    text = _slerp() + "parameter: {t: 1}\n"
    with pytest.warns(UnknownKeyWarning, match=r"^<string>: parameter: unknown key, ignored"):
        assert load_config(text).parameters["t"].rules[0].value == 0.5
    with pytest.raises(ConfigError, match="parameter: unknown key.*--strict"):
        load_config(text, strict=True)
    # A misspelling that leaves a required key missing is refused, by mergekit too.
    slices = (
        "  - sources:\n"
        "      - {model: org/a, layer_rnage: [0, 4]}\n"
        "      - {model: org/b, layer_range: [0, 4]}\n"
    )
    assert "slices[0].sources[0].layer_rnage: unknown key" in _config_error(_slerp(slices=slices))


def test_model_references_must_be_strings():
    slices = (
        "  - sources:\n"
        "      - {model: 7, layer_range: [0, 4]}\n"
        "      - {model: org/b, layer_range: [0, 4]}\n"
    )
    assert "slices[0].sources[0].model: expected a model" in _config_error(_slerp(slices=slices))
