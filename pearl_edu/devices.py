"""Choosing where the merge math runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

`resolve_device` names a device; `choose_device` is what a merge uses: for ``auto`` it
picks the device by the merge method, with the reason, which ``pearl-edu merge`` prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


# Where ``--device auto`` merges each method when torch sees a CUDA GPU, and why. The rule
# follows what runs where: the GPU where it is faster for the method, the CPU otherwise,
# as `bench/gpu_check.sh` measures it (its figures: bench/gpu_results.json); a method not
# listed stays on the CPU, where its bits are mergekit's.
AUTO_DEVICE_RULES: dict[str, tuple[str, str]] = {
    "slerp": (
        "cpu",
        "SLERP is a few operations per element, which the CPU's cores keep up with; on an "
        "H100 host the GPU path was the slower (bench/gpu_results.md)",
    ),
    "ties": (
        "cuda",
        "TIES ranks every entry of each task vector, which the GPU does as one sort of "
        "16-bit keys; ties at the cut are kept by position, as with --fast-trim",
    ),
    "dare_linear": (
        "cpu",
        "a GPU draws other random numbers than the CPU for the same seed: auto keeps a "
        "seed's model the same on every machine (--device cuda draws on the GPU)",
    ),
}
AUTO_DEVICE_RULES["dare_ties"] = AUTO_DEVICE_RULES["dare_linear"]


@dataclass(frozen=True)
class DeviceChoice:
    """Where a merge runs, and why (printed by ``pearl-edu merge``)."""

    device: torch.device
    reason: str


def choose_device(spec: str | torch.device = "auto", method: str | None = None) -> DeviceChoice:
    """The device a merge by ``method`` runs on for ``spec``, with the reason.

    ``cpu``, ``cuda`` and ``cuda:N`` are taken as given (`resolve_device`). ``auto`` is the
    CPU when torch sees no CUDA GPU; with one, the device `AUTO_DEVICE_RULES` gives the
    method (the CPU for a method it does not list).
    """
    device = resolve_device(spec)
    if str(spec).strip().lower() != "auto":
        return DeviceChoice(device, f"--device {str(spec).strip().lower()}")
    if device.type == "cpu":
        return DeviceChoice(device, "auto: torch sees no CUDA GPU")
    kind, why = AUTO_DEVICE_RULES.get(
        method or "",
        ("cpu", f"{method}: not measured on a GPU; on the CPU its bits are mergekit's"),
    )
    return DeviceChoice(device if kind == "cuda" else torch.device("cpu"), f"auto: {why}")
