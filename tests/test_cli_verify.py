"""Tests of `pearl-edu verify`: its exit status and what it prints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from pearl_edu.cli import main
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A model, a copy sharded differently, and a copy with one tensor nudged by 1e-3."""
    root = tmp_path_factory.mktemp("cli_verify")
    model = make_tiny_model(root / "model", seed=1)
    same = make_tiny_model(root / "same", seed=1, shard_count=2)
    nudged = root / "nudged"
    nudged.mkdir()
    shutil.copy(model / "config.json", nudged / "config.json")
    weights = load_state_dict(model)
    weights[Q_PROJ] = weights[Q_PROJ] + 1e-3
    save_file(weights, nudged / "model.safetensors")
    return model, same, nudged


def test_identical_models_exit_0(models, capsys):
    model, same, _ = models
    assert main(["verify", str(model), str(same), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "result: identical" in out
    assert "differing: 0" in out


def test_differing_models_exit_1_and_print_the_table(models, capsys):
    model, _, nudged = models
    assert main(["verify", str(model), str(nudged), "--quiet"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tensor"))
    assert lines[header + 1].split()[0] == Q_PROJ
    assert "tensors compared: 21, differing: 1" in out
    assert "result: DIFFERENT" in out


def test_atol_accepts_small_differences(models, capsys):
    model, _, nudged = models
    assert main(["verify", str(model), str(nudged), "--atol", "0.01", "--quiet"]) == 0
    assert "result: equal within atol=0.01" in capsys.readouterr().out
    assert main(["verify", str(model), str(nudged), "--atol", "1e-6", "--quiet"]) == 1


def test_max_ulp_accepts_differences_counted_in_units_in_the_last_place(models, capsys):
    model, _, nudged = models
    assert main(["verify", str(model), str(nudged), "--max-ulp", "0", "--quiet"]) == 1
    out = capsys.readouterr().out
    ulps = int(out.split("largest absolute difference:")[1].split("(")[1].split()[0])
    assert ulps > 1
    assert main(["verify", str(model), str(nudged), "--max-ulp", str(ulps), "--quiet"]) == 0
    assert f"result: equal within atol=0 or {ulps} ULP" in capsys.readouterr().out
    assert main(["verify", str(model), str(nudged), "--max-ulp", str(ulps - 1), "--quiet"]) == 1
    capsys.readouterr()
    assert main(["verify", str(model), str(model), "--max-ulp", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_ulp" in err


def test_bad_input_exits_2_with_one_line(models, tmp_path, capsys):
    model, _, _ = models
    assert main(["verify", str(model), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("pearl-edu: error:") and "missing" in err

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("not a model\n")
    assert main(["verify", str(not_a_model), str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "notes" in err


def test_the_installed_command_runs_with_a_progress_bar(models):
    model, same, _ = models
    result = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "verify", str(model), str(same)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "result: identical" in result.stdout
    assert "verify" in result.stderr  # the progress bar goes to stderr, not into the report


def test_scale_ulp_and_max_fraction_options(models, capsys):
    from pearl_edu.verification import verify

    model, _, nudged = models
    # The nudge moves every element of one tensor by a few steps at the tensor's scale.
    steps = verify(model, nudged).max_scale_ulp_diff
    assert steps is not None and 1 < steps < 100
    args = ["verify", str(model), str(nudged), "--quiet"]
    assert main([*args, "--scale-ulp", str(steps)]) == 0
    out = capsys.readouterr().out
    assert f"result: equal within atol=0 or {steps:g} ULP at the tensor's scale" in out
    assert "largest share of a tensor differing" in out
    assert main([*args, "--scale-ulp", str(steps / 2)]) == 1
    # Every element of the nudged tensor differs: a share of 1% refuses it whatever the size.
    assert main([*args, "--scale-ulp", str(steps), "--max-fraction", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "result: DIFFERENT" in out and "largest share of a tensor differing 100.000%" in out
    assert main([*args, "--atol", "1", "--max-fraction", "1"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(("option", "value"), [("--scale-ulp", "-1"), ("--max-fraction", "2")])
def test_bad_tolerance_options_exit_2_with_one_line(models, capsys, option, value):
    model, same, _ = models
    assert main(["verify", str(model), str(same), option, value, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and option.lstrip("-").replace("-", "_") in err


def test_quiet_and_debug_before_or_after_the_subcommand(models, tmp_path):
    from pearl_edu.errors import PearlEduError

    model, same, _ = models
    for quiet in (["--quiet", "verify", str(model), str(same)], ["verify", str(model), str(same)]):
        result = subprocess.run(
            [sys.executable, "-m", "pearl_edu", *quiet], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert ("verify" in result.stderr) is ("--quiet" not in quiet)
    missing = str(tmp_path / "missing")
    for argv in (
        ["--debug", "verify", str(model), missing],
        ["verify", str(model), missing, "--debug"],
    ):
        with pytest.raises(PearlEduError, match="missing"):
            main(argv)
