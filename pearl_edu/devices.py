"""Choosing where the merge math runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

`resolve_device` names a device; `choose_device` is what a merge uses: for ``auto`` it
picks the device by the merge method, with the reason, which ``pearl-edu merge`` prints.
``auto`` picks a GPU for a method only once a run on a GPU, recorded in
``pearl_edu/data/gpu_record.json``, met that method's targets; the device path has not yet
run on a GPU, so today ``auto`` merges every method on the CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from pearl_edu.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device named by ``spec``; ``auto`` is the first GPU when there is one.

    Raises `ConfigError` when the name is not understood or names a GPU that torch
    cannot see, so that asking for CUDA never silently falls back to the CPU.
    """
    text = str(spec).strip().lower()
    match = DEVICE_PATTERN.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ConfigError(f"device {spec!r} is not understood: expected auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)

    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(
            f"device {spec!r}: torch {torch.__version__} ({build}) sees no CUDA GPU; "
            "use --device cpu (or auto)"
        )
    number = int(index or 0)
    count = torch.cuda.device_count()
    if number >= count:
        raise ConfigError(
            f"device {spec!r}: there is no GPU {number}; torch sees {count} "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", number)


# Where ``--device auto`` merges each method when torch sees a CUDA GPU: on the GPU only
# for a method that a recorded run on a GPU showed to meet its targets there (faster than
# the CPU by the method's margin, the contract held, no more host memory), as
# `bench/gpu_check.sh` judges them; every other method on the CPU, where its bits are
# mergekit's. The record ships with the package, kept in step with
# bench/gpu_results.json by bench/gpu_check.py. It holds no run yet: the device path
# (`pearl_edu.backends.device`) is tested on the CPU against its contract, and has not yet
# run on a GPU.
GPU_RECORD_FILE = "gpu_record.json"
NOT_YET_ON_A_GPU = "the device path has not yet run on a GPU"


def gpu_record(path: str | Path | None = None) -> dict:
    """The record of runs on a GPU that met a method's targets (``pearl_edu/data``'s, by default).

    ``{"runs": [{"date", "device", "methods": {method: {"targets_met": true, ...}}}, ...]}``.
    """
    if path is None:
        text = resources.files("pearl_edu.data").joinpath(GPU_RECORD_FILE).read_text()
    else:
        text = Path(path).read_text()
    record = json.loads(text)
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        raise ConfigError(f"{path or GPU_RECORD_FILE}: expected an object with a list 'runs'")
    return record


def run_that_met_targets(method: str | None, record: dict | None = None) -> dict | None:
    """The latest recorded GPU run in which ``method`` met its targets, or None."""
    runs = (record if record is not None else gpu_record())["runs"]
    met = [
        run
        for run in runs
        if (run.get("methods", {}).get(method or "") or {}).get("targets_met") is True
    ]
    return max(met, key=lambda run: str(run.get("date", "")), default=None)


@dataclass(frozen=True)
class DeviceChoice:
    """Where a merge runs, and why (printed by ``pearl-edu merge``)."""

    device: torch.device
    reason: str


def choose_device(
    spec: str | torch.device = "auto", method: str | None = None, record: dict | None = None
) -> DeviceChoice:
    """The device a merge by ``method`` runs on for ``spec``, with the reason.

    ``cpu``, ``cuda`` and ``cuda:N`` are taken as given (`resolve_device`). ``auto`` is the
    CPU when torch sees no CUDA GPU; with one, it is the GPU only for a method that a run
    in the GPU record (``record``, by default the package's: `gpu_record`) met its
    targets in, and the CPU for every other.
    """
    device = resolve_device(spec)
    if str(spec).strip().lower() != "auto":
        return DeviceChoice(device, f"--device {str(spec).strip().lower()}")
    if device.type == "cpu":
        return DeviceChoice(device, "auto: torch sees no CUDA GPU")
    record = record if record is not None else gpu_record()
    run = run_that_met_targets(method, record)
    if run is not None:
        return DeviceChoice(
            device,
            f"auto: {method} met its targets on a GPU ({run.get('device', 'a GPU')}, "
            f"{run.get('date', 'undated')}; bench/gpu_results.json)",
        )
    if not record["runs"]:
        why = NOT_YET_ON_A_GPU
    else:
        why = f"no recorded run on a GPU met {method}'s targets"
    return DeviceChoice(torch.device("cpu"), f"auto: the CPU, as {why} (--device cuda tries it)")
