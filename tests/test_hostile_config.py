"""Hostile merge configs: each ends at once in a one-line ConfigError, never a traceback,
a hang or an exhausted memory; aliases used as real configs use them keep working."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pearl_edu.config import load_config, parse_config
from pearl_edu.errors import ConfigError, UnknownKeyWarning

ROOT = Path(__file__).resolve().parents[1]

VALID = """\
merge_method: slerp
base_model: org/a
models:
  - model: org/a
  - model: org/b
parameters:
  t: 0.5
"""


def _error(source: str | Path) -> str:
    """The one-line ConfigError that loading ``source`` raises."""
    with pytest.raises(ConfigError) as err:
        load_config(source)
    message = str(err.value)
    assert "\n" not in message
    return message


def _alias_bomb(key: str) -> str:
    """``key:`` a list of anchors a..i, each nine aliases of the one before: 9**9 strings.

    The anchors sit inside the value of ``key``, which older readers accepted unchecked.
    """
    lines = [f"{key}:", '  - &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for before, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  - &{name} [" + ", ".join([f"*{before}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# --- 1. text that is not UTF-8 -----------------------------------------------------------


def test_a_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path):
    path = tmp_path / "latin.yml"
    path.write_bytes(b"merge_method: slerp\n\xff\xfe")
    message = _error(path)
    assert message.startswith(f"{path}: not UTF-8 text")
    assert "byte 0xff at byte offset 20" in message


# --- 2. keys that are not strings -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "kind"),
    [
        (VALID.replace("  t: 0.5", "  t: 0.5\n  1: 0.5"), "parameters: the key 1", "an integer"),
        (
            "merge_method: linear\nmodels:\n  - {model: x, parameters: {2: 1}}\n"
            "  - {model: y, parameters: {weight: 1}}\n",
            "models[0].parameters: the key 2",
            "an integer",
        ),
        (VALID + "tokenizer: {tokens: {1.5: {}}}\n", "tokenizer.tokens: the key 1.5", "a number"),
        (VALID + "tokenizer: {tokens: {null: {}}}\n", "tokenizer.tokens: the key None", "null"),
    ],
)
def test_every_mapping_key_must_be_a_string(text, where, kind):
    message = _error(text)
    assert message.startswith(f"<string>: {where} is {kind}, not a string")
    assert "put it in quotes" in message


# --- 3. a file that cannot be read ------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), "Is a directory"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ],
)
def test_an_unreadable_file_is_named_with_the_reason(tmp_path, monkeypatch, error, reason):
    """Unreadable is simulated: the tests run as root, for whom chmod 000 changes nothing.

    Opening the config raises the OS error, as it would for a file without read permission,
    a folder that passed the file check, or a failing disk.
    """
    path = tmp_path / "merge.yml"
    path.write_text(VALID)
    real_open = pathlib.Path.open

    def failing_open(self, *args, **kwargs):
        if self == path:
            raise error
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", failing_open)
    assert _error(path) == f"{path}: cannot read the config: {reason}"


# --- 4. nesting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "a: " + "{b: " * 5000 + "1" + "}" * 5000 + "\n",
        "".join(f"{'  ' * i}- \n" for i in range(200)),
    ],
    ids=["lists", "mappings", "block"],
)
def test_deep_nesting_ends_at_once(text):
    start = time.perf_counter()
    message = _error(text)
    assert time.perf_counter() - start < 1.0
    assert message.startswith("<string>: nested deeper than 64 levels at line ")


# --- 5. a name no file system takes -----------------------------------------------------


@pytest.mark.parametrize("name", ["x" * 5000 + ".yml", "x" * 5000])
def test_a_file_name_too_long_is_one_line(name):
    message = _error(name)
    assert message.endswith("cannot read the config: File name too long")
    assert "(a name of " in message and len(message) < 400


# --- 6. alias bombs and other oversized input --------------------------------------------


@pytest.mark.parametrize("key", ["name", "tokenizer", "chat_template", "tokenizer_source"])
def test_an_alias_bomb_ends_at_once(key):
    text = VALID + _alias_bomb(key)
    start = time.perf_counter()
    message = _error(text)
    assert time.perf_counter() - start < 1.0
    assert "more than 100000 values once its aliases (*name) are expanded" in message


def test_plan_json_on_an_alias_bomb_ends_at_once(tmp_path):
    """`pearl-edu plan --json` hashes the config; with 1 GiB of address space it must
    refuse the bomb in one line, not fill memory expanding it."""
    path = tmp_path / "bomb.yml"
    # Layer ranges, so that the schedule (and the config's hash) needs no model headers.
    slices = (
        "merge_method: slerp\nbase_model: org/a\nslices:\n  - sources:\n"
        "      - {model: org/a, layer_range: [0, 2]}\n"
        "      - {model: org/b, layer_range: [0, 2]}\n"
        "parameters: {t: 0.5}\n"
    )
    path.write_text(slices + _alias_bomb("tokenizer"))

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "plan", str(path), "--json"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_memory,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"pearl-edu: error: {path}: the value at line ")
    assert "once its aliases (*name) are expanded" in line


def test_a_recursive_alias_is_refused():
    message = _error(VALID + "name: &loop [*loop]\n")
    assert message == (
        "<string>: an alias at line 8 refers to a value that contains it (a recursive "
        "alias), which has no end when expanded"
    )


def test_aliases_expanded_beyond_the_depth_limit_are_refused():
    # Each anchor is 40 levels deep, well within the limit; expanded, 80.
    deep = "[" * 40 + "1" + "]" * 40
    text = VALID + f"name:\n  - &a {deep}\n  - {deep.replace('1', '*a')}\n"
    assert "nested deeper than 64 levels at line 10 once its aliases" in _error(text)


def test_text_larger_than_a_mebibyte_is_refused(tmp_path):
    padding = "#" + "x" * (1 << 20) + "\n"
    assert _error(VALID + padding) == (
        "<string>: larger than 1 MiB; a merge config is a few kilobytes of YAML"
    )
    path = tmp_path / "big.yml"
    path.write_text(VALID + padding)
    assert _error(path) == f"{path}: larger than 1 MiB; a merge config is a few kilobytes of YAML"


def test_a_number_thousands_of_digits_long_is_one_line():
    message = _error(VALID.replace("t: 0.5", "t: " + "1" * 5000))
    assert message == (
        "<string>: malformed YAML at line 7, column 6: a number of 5000 characters (at most 100)"
    )


def test_aliases_as_real_configs_use_them_keep_working():
    """A model anchored once and reused, as mergekit configs often do."""
    with_aliases = load_config(
        "merge_method: ties\n"
        "base_model: &base org/base\n"
        "models:\n"
        "  - model: *base\n"
        "  - model: &a org/a\n"
        "    parameters: &p {weight: 0.5, density: 0.5}\n"
        "  - model: org/b\n"
        "    parameters: *p\n"
        "name: *a\n"
    )
    spelled_out = load_config(
        "merge_method: ties\n"
        "base_model: org/base\n"
        "models:\n"
        "  - model: org/base\n"
        "  - model: org/a\n"
        "    parameters: {weight: 0.5, density: 0.5}\n"
        "  - model: org/b\n"
        "    parameters: {weight: 0.5, density: 0.5}\n"
    )
    assert with_aliases.models() == ["org/base", "org/a", "org/b"]
    assert with_aliases.name == "org/a"
    assert with_aliases.raw["models"][2]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert with_aliases.canonical() == spelled_out.canonical()


# --- 7. every top-level key validated ----------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("tokenizer_source: 3", "tokenizer_source: expected union or base or a model"),
        ("tokenizer_source: ''", "tokenizer_source: expected union or base or a model"),
        (
            "tokenizer_source: base\ntokenizer: {source: union}",
            "tokenizer_source: give either tokenizer_source or tokenizer, not both",
        ),
        ("tokenizer: union", "tokenizer: expected a mapping, got str"),
        ("tokenizer: {source: [a]}", "tokenizer.source: expected union or base or a model"),
        ("tokenizer: {tokens: [a]}", "tokenizer.tokens: expected a mapping, got list"),
        (
            "tokenizer: {pad_to_multiple_of: 8.5}",
            "tokenizer.pad_to_multiple_of: expected a positive",
        ),
        (
            "tokenizer: {pad_to_multiple_of: true}",
            "tokenizer.pad_to_multiple_of: expected a positive",
        ),
        ("tokenizer: {pad_to_multiple_of: 0}", "tokenizer.pad_to_multiple_of: expected a positive"),
        ("tokenizer: {tokens: {x: null}}", "tokenizer.tokens.x: expected a mapping, got NoneType"),
        ("tokenizer: {tokens: {x: {force: 'yes'}}}", "tokenizer.tokens.x.force: expected true or"),
        (
            "tokenizer: {tokens: {x: {source: {kind: model_token, model: m}}}}",
            "tokenizer.tokens.x.source: give either token_id or token (one of them)",
        ),
        (
            "tokenizer: {tokens: {x: {source: {kind: model_token, model: m, token_id: -1}}}}",
            "tokenizer.tokens.x.source.token_id: expected a token number (0 or more), got -1",
        ),
        (
            "tokenizer: {tokens: {x: {source: {model: m}}}}",
            "tokenizer.tokens.x.source: expected a model, or a mapping with kind model_token or "
            "zero, got None",
        ),
        ("chat_template: 5", "chat_template: expected auto, a template name (alpaca, chatml,"),
        ("chat_template: chatlm", "chat_template: 'chatlm' is neither auto, a template name"),
        ("name: 7", "name: expected a string, got 7; put it in quotes"),
        ("name: [a, b]", "name: expected a string, got ['a', 'b']"),
    ],
)
def test_tokenizer_template_and_name_are_validated(extra, expected):
    assert _error(VALID + extra + "\n").startswith(f"<string>: {expected}")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("tokenizer: {pad: 8}", "tokenizer.pad: unknown key, ignored as mergekit ignores it"),
        ("tokenizer: {tokens: {x: {sauce: a}}}", "tokenizer.tokens.x.sauce: unknown key, ignored"),
        (
            "tokenizer: {tokens: {x: {source: {kind: zero, model: m}}}}",
            "tokenizer.tokens.x.source.model: unknown key, ignored",
        ),
    ],
)
def test_tokenizer_keys_mergekit_ignores_warn_or_are_refused_strictly(extra, key):
    # mergekit 0.1.5's TokenizerConfig ignores these keys (pydantic's extra="ignore"):
    # a one-line warning, and a refusal with strict=True.
    with pytest.warns(UnknownKeyWarning, match=f"^<string>: {re.escape(key)}"):
        load_config(VALID + extra + "\n")
    with pytest.raises(ConfigError, match="unknown key.*refused by --strict"):
        load_config(VALID + extra + "\n", strict=True)


def test_valid_tokenizer_options_are_kept():
    config = load_config(
        VALID + "tokenizer:\n"
        "  source: base\n"
        "  pad_to_multiple_of: 64\n"
        "  tokens:\n"
        "    '<|im_end|>': {source: {kind: model_token, model: org/b, token: '</s>'}}\n"
        "    '<|im_start|>': {source: org/b, force: true}\n"
        "    '<pad>': {source: {kind: zero}}\n"
        "chat_template: chatml\n"
        "name: pearl\n"
    )
    tokenizer = config.tokenizer
    assert (tokenizer.source, tokenizer.pad_to_multiple_of) == ("base", 64)
    im_end = tokenizer.tokens["<|im_end|>"].source
    assert (im_end.kind, im_end.model, im_end.token, im_end.token_id) == (
        "model_token",
        "org/b",
        "</s>",
        None,
    )
    assert tokenizer.tokens["<|im_start|>"].force is True
    assert tokenizer.tokens["<|im_start|>"].source.kind == "model"
    assert tokenizer.tokens["<pad>"].source.kind == "zero"
    assert (config.chat_template, config.name, config.tokenizer_source) == ("chatml", "pearl", None)
    assert load_config(VALID + "tokenizer_source: union\n").tokenizer_source == "union"
    jinja = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert load_config(VALID + f'chat_template: "{jinja}"\n').chat_template == jinja


# --- 8. the identity of a merge comes from the validated config ---------------------------


def test_canonical_is_the_validated_config_not_the_raw_yaml():
    config = load_config(VALID + "tokenizer_source: base\nname: first\n")
    data = json.loads(config.canonical())
    assert config.canonical() == json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert "name" not in data
    assert data["tokenizer_source"] == "base"
    assert data["parameters"] == {"t": [[None, 0.5]]}
    assert [s["model"] for s in data["slices"][0]["sources"]] == ["org/a", "org/b"]


def test_config_hash_follows_the_validated_values():
    base = load_config(VALID)
    # The same merge spelled otherwise (5e-1 is a string to PyYAML), or under another name.
    assert load_config(VALID.replace("0.5", "5e-1")).config_hash() == base.config_hash()
    assert load_config(VALID + "name: other\n").config_hash() == base.config_hash()
    assert load_config(VALID + "chat_template: ''\n").config_hash() == base.config_hash()
    # What the merge writes does change it.
    assert load_config(VALID + "tokenizer_source: base\n").config_hash() != base.config_hash()
    assert load_config(VALID + "chat_template: chatml\n").config_hash() != base.config_hash()


def test_parse_config_checks_keys_of_mappings_given_directly():
    raw = {
        "merge_method": "slerp",
        "base_model": "org/a",
        "models": [{"model": "org/a"}, {"model": "org/b"}],
        "parameters": {"t": 0.5, ("t",): 0.5},
    }
    with pytest.raises(ConfigError, match=r"^<config>: parameters: the key \('t',\) is a tuple"):
        parse_config(raw)


# --- values that would make the plan hang or the messages run over lines ------------------


def test_layer_ranges_beyond_any_model_are_refused():
    """`pearl-edu plan` tabulates every output layer: a range of 10**8 layers would hang it."""
    text = VALID.replace("models:\n  - model: org/a\n  - model: org/b\n", "").replace(
        "parameters:",
        "slices:\n  - sources:\n"
        "      - {model: org/a, layer_range: [0, 100000000]}\n"
        "      - {model: org/b, layer_range: [0, 100000000]}\nparameters:",
    )
    assert _error(text) == (
        "<string>: slices[0].sources[0].layer_range: layer 100000000 is beyond 10000; "
        "no model has so many layers"
    )


def test_a_model_reference_must_be_on_one_line():
    message = _error(VALID.replace("- model: org/b", '- model: "org/\\nb"'))
    assert message == (
        "<string>: models[1].model: expected a model (repo id or folder) on one line, of at "
        "most 4096 characters, got 'org/\\nb'"
    )
