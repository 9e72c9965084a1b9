"""Device selection: cuda only where torch sees one (never faked); auto by the GPU record."""

from __future__ import annotations

import pytest
import torch

from pearl_edu.devices import resolve_device
from pearl_edu.errors import ConfigError, PearlEduError


def test_cpu_is_always_available():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_auto_follows_what_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_first_gpu_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        resolve_device(spec)
    message = str(err.value)
    assert spec in message and "--device cpu" in message and "\n" not in message


def test_cuda_index_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="no GPU 2; torch sees 2"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cpu:0", "auto:1", "cuda:x", ""])
def test_unknown_names_are_refused(spec):
    with pytest.raises(PearlEduError, match="not understood"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_is_used_when_present():
    assert resolve_device("cuda").type == "cuda"


# --------------------------------------------------------------------------------------
# --device auto: the GPU only for a method that a recorded run on a GPU met its targets in.

EVERY_METHOD = ("slerp", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")


def with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def a_run(date="2027-01-05", **methods):
    return {"date": date, "device": "NVIDIA H100 80GB, 79 GiB", "methods": methods}


def test_every_method_is_registered_here():
    from pearl_edu.methods import METHODS

    assert set(EVERY_METHOD) <= set(METHODS)


def test_the_shipped_record_holds_no_run_and_auto_says_so(monkeypatch):
    from pearl_edu.devices import NOT_YET_ON_A_GPU, choose_device, gpu_record

    assert gpu_record()["runs"] == []
    with_a_gpu(monkeypatch)
    for method in (*EVERY_METHOD, "passthrough", None):
        choice = choose_device("auto", method)  # the package's own record
        assert choice.device == torch.device("cpu"), method
        assert NOT_YET_ON_A_GPU in choice.reason and choice.reason.startswith("auto: ")


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_auto_is_the_cpu_for_every_method_with_an_empty_record(monkeypatch, method):
    from pearl_edu.devices import choose_device

    with_a_gpu(monkeypatch)
    choice = choose_device("auto", method, record={"runs": []})
    assert choice.device == torch.device("cpu")
    assert "has not yet run on a GPU" in choice.reason


def test_auto_is_the_gpu_only_for_the_method_that_met_its_targets(monkeypatch):
    from pearl_edu.devices import choose_device

    with_a_gpu(monkeypatch)
    record = {
        "runs": [
            a_run(
                ties={"targets_met": True, "cpu_s": 60.0, "cuda_s": 12.0},
                slerp={"targets_met": False, "cpu_s": 12.6, "cuda_s": 15.0},
            )
        ]
    }
    ties = choose_device("auto", "ties", record=record)
    assert ties.device == torch.device("cuda", 0)
    assert "ties met its targets on a GPU" in ties.reason and "2027-01-05" in ties.reason
    for method in (m for m in EVERY_METHOD if m != "ties"):
        choice = choose_device("auto", method, record=record)
        assert choice.device == torch.device("cpu"), method
        assert f"no recorded run on a GPU met {method}'s targets" in choice.reason


def test_auto_takes_the_latest_run_that_met_a_methods_targets():
    from pearl_edu.devices import run_that_met_targets

    runs = [
        a_run("2027-02-01", ties={"targets_met": True}),
        a_run("2027-03-01", ties={"targets_met": False}),
        a_run("2027-01-01", ties={"targets_met": True}),
    ]
    assert run_that_met_targets("ties", {"runs": runs})["date"] == "2027-02-01"
    assert run_that_met_targets("slerp", {"runs": runs}) is None
    assert run_that_met_targets(None, {"runs": runs}) is None


def test_without_a_gpu_auto_is_the_cpu_whatever_the_record(monkeypatch):
    from pearl_edu.devices import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = {"runs": [a_run(ties={"targets_met": True})]}
    choice = choose_device("auto", "ties", record=record)
    assert choice.device == torch.device("cpu") and "no CUDA GPU" in choice.reason


def test_an_explicit_device_is_taken_as_given(monkeypatch):
    from pearl_edu.devices import choose_device

    with_a_gpu(monkeypatch)
    given = choose_device("cuda:0", "slerp", record={"runs": []})
    assert given.device == torch.device("cuda", 0) and given.reason == "--device cuda:0"
    assert choose_device("cpu", "ties").device == torch.device("cpu")


def test_a_malformed_record_is_a_clear_error(tmp_path):
    from pearl_edu.devices import gpu_record

    path = tmp_path / "record.json"
    path.write_text('{"runs": {}}')
    with pytest.raises(ConfigError, match="a list 'runs'"):
        gpu_record(path)
    path.write_text('{"about": "x", "runs": []}')
    assert gpu_record(path)["runs"] == []


def test_merge_help_says_the_device_path_has_not_yet_run_on_a_gpu(capsys):
    from pearl_edu.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the device path has not yet run on a GPU" in text
    assert "auto is the CPU for every method" in text
    assert "not yet measured on a GPU" in text and "speeds" not in text
