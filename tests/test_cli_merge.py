"""`pearl-edu merge`: the CLI is a thin shell; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pearl_edu.cli import EXIT_BAD_INPUT, main
from pearl_edu.toy import load_state_dict, make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a = make_tiny_model(root / "a", num_layers=2, with_tokenizer=True)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    path = root / "merge.yml"
    path.write_text(
        "models:\n"
        f"  - model: {a}\n"
        f"  - model: {b}\n"
        "merge_method: slerp\n"
        f"base_model: {a}\n"
        "parameters:\n  t: 0.3\n"
        "dtype: bfloat16\n"
    )
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pearl-edu: error: ")
    return lines[0]


def test_merge_writes_a_loadable_model(config_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "merged" in out and str(output) in out and "on cpu" in out
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.dtype == torch.bfloat16


def test_shard_size_option(config_file, tmp_path):
    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet", "--shard-size", "40KB"]) == 0
    shards = sorted(output.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert (output / "model.safetensors.index.json").is_file()


def test_python_dash_m_works_the_same(config_file, tmp_path):
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "merge", str(config_file), str(output), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    in_process = tmp_path / "in-process"
    assert main(["merge", str(config_file), str(in_process), "--quiet"]) == 0
    assert (output / "model.safetensors").read_bytes() == (
        in_process / "model.safetensors"
    ).read_bytes()
    assert len(load_state_dict(output)) == 2 + 2 * 9 + 1


def test_bad_input_exits_2_with_one_line(config_file, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "x").write_text("x")
    assert main(["merge", str(config_file), str(output), "--quiet"]) == EXIT_BAD_INPUT
    assert "not empty; pass --force" in one_line_error(capsys)

    assert main(["merge", str(config_file), str(tmp_path / "o2"), "--shard-size", "big"]) == 2
    assert "shard size 'big'" in one_line_error(capsys)
    assert not (tmp_path / "o2").exists()

    missing = tmp_path / "missing.yml"
    assert main(["merge", str(missing), str(tmp_path / "o3")]) == EXIT_BAD_INPUT
    assert "missing.yml" in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when there is no GPU")
def test_cuda_without_gpu_exits_2(config_file, tmp_path, capsys):
    assert main(["merge", str(config_file), str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "--device cpu" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_force_replaces_the_output(config_file, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    assert main(["merge", str(config_file), str(output), "--quiet", "--force"]) == 0
    assert not (output / "old.txt").exists()
    assert (output / "model.safetensors").is_file()


def test_shipped_recipe_offline_names_the_repo_and_writes_nothing(tmp_path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    output = tmp_path / "pearl"
    done = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "merge", "pearl-7b-slerp", str(output), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == EXIT_BAD_INPUT
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlabonne/OmniBeagle-7B" in lines[0], done.stderr
    assert not output.exists() and not (tmp_path / ".pearl.partial").exists()
