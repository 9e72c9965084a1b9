"""Device selection: auto picks the GPU only when there is one; CUDA is never faked."""

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
