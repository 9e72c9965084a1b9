"""Configs as mergekit writes them: the ``modules:`` form, and the keys mergekit ignores.

mergekit 0.1.5 normalises ``slices:``/``models:`` into ``modules: {default: ...}`` and
publishes that form; pearl_edu reads it with mergekit's meaning. Keys that mergekit's
pydantic schema drops are a one-line warning in pearl_edu (a refusal with ``strict``); the
misspellings mergekit refuses (a required key goes missing) stay refused. Each case is
measured against mergekit's own ``MergeConfiguration.model_validate`` on the same YAML.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.cli import main
from pearl_edu.config import load_config
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, UnknownKeyWarning
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

SLICES = (
    "  - sources:\n"
    "      - {model: org/a, layer_range: [0, 4]}\n"
    "      - {model: org/b, layer_range: [0, 4]}\n"
)
SLERP = f"merge_method: slerp\nbase_model: org/a\nslices:\n{SLICES}parameters:\n  t: 0.5\n"


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line for line in text.splitlines(keepends=True))


def _modules(body: str, extra: str = "parameters:\n  t: 0.5\n") -> str:
    return f"merge_method: slerp\nbase_model: org/a\nmodules:\n  default:\n{body}{extra}"


MODULE_SLICES = _modules("    slices:\n" + _indent(SLICES, 4))


def _mergekit_accepts(text: str) -> bool:
    from mergekit.config import MergeConfiguration

    try:
        MergeConfiguration.model_validate(yaml.safe_load(text))
    except Exception:  # pydantic's ValidationError, or mergekit's RuntimeError
        return False
    return True


def _ours(text: str, *, strict: bool = False) -> tuple[str, list[str]]:
    """("ok" or the error's line, the UnknownKeyWarning lines) of loading ``text``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_config(text, strict=strict)
            outcome = "ok"
        except ConfigError as err:
            outcome = str(err)
    return outcome, [str(w.message) for w in caught if w.category is UnknownKeyWarning]


# --- keys mergekit ignores, and the misspellings it refuses ------------------------------

IGNORED = [
    ("parameter", SLERP + "parameter: {t: 1}\n"),
    ("dtpye", SLERP + "dtpye: bfloat16\n"),
    (
        "slices[0].residual_weight",
        SLERP.replace("  - sources:", "  - residual_weight: 1\n    sources:"),
    ),
    (
        "slices[0].sources[1].paramters",
        SLERP.replace("org/b, layer", "org/b, paramters: {}, layer"),
    ),
    (
        "modules.default.paramters",
        _modules("    slices:\n" + _indent(SLICES, 4) + "    paramters: {t: 1}\n"),
    ),
]
REFUSED = [
    ("merge_metod", SLERP.replace("merge_method", "merge_metod"), "merge_method is missing"),
    ("slice", SLERP.replace("slices:", "slice:"), "models or modules or slices is missing"),
    ("slices[0].source", SLERP.replace("- sources:", "- source:"), "sources is missing"),
    ("slices[0].sources[0].modle", SLERP.replace("{model: org/a", "{modle: org/a"), "model is"),
    ("parameters.t[0].valeu", SLERP.replace("t: 0.5", "t: [{filter: mlp, valeu: 1}]"), "value"),
]


@pytest.mark.parametrize(("key", "text"), IGNORED, ids=[k for k, _ in IGNORED])
def test_keys_mergekit_ignores_are_a_warning_or_refused_strictly(key, text):
    assert _mergekit_accepts(text)  # measured: mergekit drops the key and merges
    outcome, warned = _ours(text)
    assert outcome == "ok"
    assert len(warned) == 1 and warned[0].startswith(f"<string>: {key}: unknown key, ignored")
    strict, _ = _ours(text, strict=True)
    assert strict.startswith(f"<string>: {key}: unknown key;") and "--strict" in strict


@pytest.mark.parametrize(("key", "text", "missing"), REFUSED, ids=[k for k, _, _ in REFUSED])
def test_misspellings_mergekit_refuses_stay_refused(key, text, missing):
    assert not _mergekit_accepts(text)
    for strict in (False, True):
        outcome, _ = _ours(text, strict=strict)
        assert outcome.startswith(f"<string>: {key}: unknown key;") and missing in outcome
        assert "\n" not in outcome


def test_cli_strict_refuses_what_the_default_warns_about(tmp_path, capsys):
    path = tmp_path / "merge.yml"
    path.write_text(SLERP + "parameter: {t: 1}\n")
    assert main(["plan", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"pearl-edu: warning: {path}: parameter: unknown key, ignored" in err
    for command in (["plan", str(path)], ["merge", str(path), str(tmp_path / "out")]):
        assert main([*command, "--strict"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"pearl-edu: error: {path}: parameter: unknown key;")
        assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --- the modules: form -------------------------------------------------------------------


def test_modules_form_is_the_slices_or_models_form():
    assert _mergekit_accepts(MODULE_SLICES)
    assert load_config(MODULE_SLICES).canonical() == load_config(SLERP).canonical()
    models = "merge_method: linear\nbase_model: org/c\n{}parameters: {{weight: 1}}\n"
    listed = "models:\n  - model: org/a\n  - model: org/b\n"
    flat = load_config(models.format(listed))
    nested = load_config(models.format("modules:\n  default:\n" + _indent(listed, 4)))
    assert nested.canonical() == flat.canonical()
    assert nested.slices[0].models() == ["org/a", "org/b", "org/c"]  # the base added last


def test_module_parameters_come_between_the_slice_and_the_top_level():
    text = _modules(
        "    slices:\n"
        + _indent(SLICES, 4)
        + "    parameters:\n      t: [{filter: mlp, value: 0.9}]\n",
        "parameters:\n  t: [{filter: self_attn, value: 0.2}, {value: 0.5}]\n",
    )
    t = load_config(text).parameters["t"]
    values = {name: t.rule_for(name).value for name in ("mlp.up", "self_attn.q", "norm")}
    assert values == {"mlp.up": 0.9, "self_attn.q": 0.2, "norm": 0.5}


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ("modules: {}", "modules: pearl_edu merges single-module models; expected one module"),
        (
            "modules:\n  default: {models: [a]}\n  vision: {models: [a]}",
            "modules: pearl_edu merges single-module models; expected one module (default), "
            "got 2 (default, vision)",
        ),
        ("modules:\n  decoder: {models: [a]}", "modules.decoder: unknown module"),
        ("modules:\n  default: {parameters: {t: 1}}", "modules.default: expected exactly one of"),
        (
            "modules:\n  default: {models: [a], slices: [{sources: [{model: a, layer_range: [0, 1]}]}]}",
            "modules.default: expected exactly one of 'slices' or 'models' (as mergekit), got "
            "slices, models",
        ),
        ("modules:\n  default: {models: [{modle: a}]}", "modules.default.models[0].modle: unknown"),
        ("modules:\n  default: {models: [a]}\nmodels: [a]", "expected exactly one of 'slices'"),
        ("modules:\n  default: {slices: []}", "modules.default: expected exactly one of"),
    ],
)
def test_modules_pearl_edu_cannot_merge_are_refused_in_one_line(modules, expected):
    outcome, _ = _ours(f"merge_method: linear\n{modules}\n")
    assert outcome.startswith(f"<string>: {expected}"), outcome


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_model(root / "base", num_layers=4, seed=1, dtype=torch.bfloat16)
    tuned = make_tiny_model(root / "tuned", base=base, noise=0.5, seed=2, dtype=torch.bfloat16)
    return base, tuned


def test_modules_form_merges_to_mergekits_bits(family, tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, tuned = family
    text = (
        f"merge_method: slerp\nbase_model: {base}\nmodules:\n  default:\n    slices:\n"
        f"      - sources:\n          - {{model: {base}, layer_range: [0, 4]}}\n"
        f"          - {{model: {tuned}, layer_range: [0, 4]}}\n"
        "    parameters:\n      t: [{filter: mlp, value: [0.1, 0.9]}]\n"
        "parameters:\n  t: 0.3\n"
    )
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False)
    run_merge(config, str(tmp_path / "mergekit"), options=options)
    merge(text, tmp_path / "pearl", device="cpu", progress=False)
    ours, theirs = load_state_dict(tmp_path / "pearl"), load_state_dict(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert same_bits(tensor, theirs[name]), name
    written = yaml.safe_load((tmp_path / "pearl" / "mergekit_config.yml").read_text())
    assert "modules" in written and "slices" not in written  # kept as written
