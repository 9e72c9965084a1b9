"""Choosing where the merge math runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import re

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
