"""`pearl-edu plan`: the schedule from the YAML alone, the full plan from local models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pearl_edu.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(text: str) -> dict[int, list[str]]:
    """The rows of the per-layer table, by layer number."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["layer", "slice", "x"])
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[int(cells[0])] = cells
    return rows


def test_pearl_schedule_offline_as_a_table(capsys):
    code, out, err = run_plan(capsys, "pearl-7b-slerp")
    assert code == 0 and err == ""
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", "slice", "x", "t[self_attn]", "t[mlp]", "t[other]"]
    rows = table_rows(out)
    assert sorted(rows) == list(range(32))
    assert rows[0][3:] == ["0.0000", "1.0000", "0.5000"]
    assert rows[31][3:] == ["1.0000", "0.0000", "0.5000"]
    expected = np.interp(np.arange(32) / 31, np.linspace(0, 1, 5), [0, 0.5, 0.3, 0.7, 1])
    assert [float(rows[i][3]) for i in range(32)] == pytest.approx(expected, abs=5e-5)
    assert "models not read: mlabonne/OmniBeagle-7B, WizardLM/WizardMath-7B-V1.1" in out
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert f"{name}  t = 0.5000" in out


def test_pearl_schedule_as_json(capsys):
    code, out, _ = run_plan(capsys, "pearl-7b-slerp", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["merge_method"] == "slerp"
    assert data["models_read"] is False
    assert data["slices"][0]["base_model"] == "mlabonne/OmniBeagle-7B"
    layers = data["schedule"]["layers"]
    assert len(layers) == 32
    assert layers[0]["t"] == {"self_attn": 0.0, "mlp": 1.0, "other": 0.5}
    assert layers[31]["t"] == {"self_attn": 1.0, "mlp": 0.0, "other": 0.5}
    assert "plan" not in data


def write_local_merge(tmp_path: Path) -> Path:
    from pearl_edu.teaching.toy import make_tiny_model

    a = make_tiny_model(tmp_path / "model-a", arch="llama", num_layers=3)
    b = make_tiny_model(tmp_path / "model-b", base=a, seed=1)
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: slerp\n"
        f"base_model: {b}\n"
        "slices:\n"
        "  - sources:\n"
        f"      - {{model: {a}, layer_range: [0, 3]}}\n"
        f"      - {{model: {b}, layer_range: [0, 3]}}\n"
        "parameters:\n"
        "  t:\n"
        "    - {filter: self_attn, value: [0, 1]}\n"
        "    - {value: 0.25}\n"
        "dtype: float32\n"
    )
    return config


def test_local_models_give_the_full_plan(tmp_path, capsys):
    config = write_local_merge(tmp_path)
    code, out, _ = run_plan(capsys, str(config))
    assert code == 0
    assert "3 output layers, " in out and " tensors, " in out
    rows = table_rows(out)
    assert [rows[i][3:] for i in range(3)] == [
        ["0.0000", "0.2500"],
        ["0.5000", "0.2500"],
        ["1.0000", "0.2500"],
    ]
    assert "model.embed_tokens.weight  t = 0.2500 (other)" in out
    assert "lm_head.weight  t = 0.2500 (other)" in out

    code, out, _ = run_plan(capsys, str(config), "--json")
    data = json.loads(out)
    assert data["models_read"] is True and data["unread_models"] == []
    tensors = data["plan"]["tensors"]
    assert data["plan"]["num_layers"] == 3
    q1 = next(t for t in tensors if t["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert q1["params"] == {"t": 0.5}
    assert q1["matched_filter"] == {"t": "self_attn"}
    assert q1["base_index"] == 1
    assert q1["dtype"] == "float32"
    assert q1["inputs"][1]["model"].endswith("model-b")
    assert tensors[0]["name"] == "model.embed_tokens.weight"
    assert tensors[-1]["name"] == "lm_head.weight"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: slerp\nslices: [oops\n", "malformed YAML at line"),
        ("merge_method: nope\nbase_model: a\nmodels: [a, b]\n", "unknown method 'nope'"),
        (
            "merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters: {t: 0.5}\n",
            "models: no layer_range to count layers from",
        ),
    ],
)
def test_bad_configs_exit_2_with_one_line(tmp_path, capsys, text, expected):
    config = tmp_path / "bad.yml"
    config.write_text(text)
    code, out, err = run_plan(capsys, str(config))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"pearl-edu: error: {config}: ")
    assert expected in err


def test_layer_range_beyond_a_local_model(tmp_path, capsys):
    config = write_local_merge(tmp_path)
    config.write_text(config.read_text().replace("[0, 3]", "[1, 4]"))
    code, _, err = run_plan(capsys, str(config))
    assert code == 2
    assert "goes beyond" in err and "which has 3 layers" in err


def python_m_pearl_edu(*args: str) -> subprocess.CompletedProcess:
    # No network: the Hub libraries are told to stay offline, and plan must not need it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pearl_edu", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_python_m_pearl_edu_plan(tmp_path):
    done = python_m_pearl_edu("plan", "pearl-7b-slerp", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schedule"]["layers"][31]["t"]["mlp"] == 0.0

    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: slerp\nbase_model: a\nmodels: [a, b, c]\nparameters: {t: 1}\n")
    done = python_m_pearl_edu("plan", str(bad))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"pearl-edu: error: {bad}: models: slerp needs exactly 2 models; got 3"
    ]


def test_quiet_and_debug_before_or_after_the_subcommand(tmp_path, capsys):
    from pearl_edu.errors import ConfigError

    expected = run_plan(capsys, "pearl-7b-slerp")
    assert run_plan(capsys, "pearl-7b-slerp", "--quiet") == expected
    assert main(["--quiet", "plan", "pearl-7b-slerp"]) == 0
    assert capsys.readouterr().out == expected[1]
    missing = str(tmp_path / "missing.yml")
    for argv in (["--debug", "plan", missing], ["plan", missing, "--debug"]):
        with pytest.raises(ConfigError, match="missing.yml"):
            main(argv)
    assert main(["plan", missing]) == 2
    assert capsys.readouterr().err.count("\n") == 1
