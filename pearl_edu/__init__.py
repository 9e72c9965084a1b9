"""pearl_edu: the vetted merge implementation that the pearl-edu book takes apart.

It reads mergekit's YAML with mergekit's meaning, plans every output tensor from the
models' headers, streams weights one tensor at a time, and merges on the CPU, or on a GPU
where one is asked for (`pearl_edu.devices.choose_device`; the device path has not yet run
on a GPU, so ``auto`` merges on the CPU).

Importing the package never touches the network, and loads only the engine: the book's
teaching helpers live in `pearl_edu.teaching`, and the names of theirs listed in
``_TEACHING`` (``pearl_edu.setup()``, ``pearl_edu.make_tiny_model``, ...) load their module,
and with it matplotlib or transformers, on first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

try:
    # Each family of methods registers its methods in `pearl_edu.methods.METHODS` on import.
    from pearl_edu import families  # noqa: F401
    from pearl_edu._version import __version__
    from pearl_edu.config import MergeConfig, load_config
    from pearl_edu.devices import resolve_device
    from pearl_edu.engine import MergeResult, merge
    from pearl_edu.errors import ConfigError, HubError, ModelError, OutputError, PearlEduError
    from pearl_edu.functions import (
        dare,
        lerp,
        linear,
        magnitude_prune,
        random_drop,
        slerp,
        task_arithmetic,
        ties,
    )
    from pearl_edu.hub import resolve_model
    from pearl_edu.layer_schedule import schedule
    from pearl_edu.methods import merge_tensor
    from pearl_edu.reading import ModelReader, read_header
    from pearl_edu.recipes import recipe_path, recipe_text
    from pearl_edu.tensor_plan import MergePlan, TensorPlan, plan
    from pearl_edu.verification import VerifyReport, verify
except KeyboardInterrupt:
    # Ctrl-C while the `pearl-edu` command starts (importing torch takes a while): one
    # line, as during a merge, rather than a traceback. In any other program, as usual.
    command = (sys.argv or [""])[0]
    if command == "-m" or command.endswith(("pearl-edu", "pearl_edu/__main__.py")):
        print("pearl-edu: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise

__all__ = [
    "MergeConfig",
    "MergePlan",
    "TensorPlan",
    "lerp",
    "load_config",
    "merge_tensor",
    "plan",
    "schedule",
    "slerp",
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "magnitude_prune",
    "random_drop",
    "__version__",
    "ConfigError",
    "HubError",
    "ModelError",
    "OutputError",
    "PearlEduError",
    "merge",
    "MergeResult",
    "ModelReader",
    "read_header",
    "resolve_device",
    "resolve_model",
    "recipe_path",
    "recipe_text",
    "verify",
    "VerifyReport",
]

# name in pearl_edu -> (module of pearl_edu.teaching, its attribute; None: the module itself).
# The module names themselves keep ``from pearl_edu import minipearl`` working, as it did
# before the teaching helpers had a subpackage of their own.
_TEACHING: dict[str, tuple[str, str | None]] = {
    "setup": ("notebook", "setup"),
    "leaderboard": ("seed", "leaderboard"),
    "make_tiny_model": ("toy", "make_tiny_model"),
    "MiniPearl": ("minipearl", "MiniPearl"),
    "MiniPearlSettings": ("minipearl", "MiniPearlSettings"),
    "build_mini_pearl": ("minipearl", "build_mini_pearl"),
    "PreflightError": ("preflight", "PreflightError"),
    "Requirements": ("preflight", "Requirements"),
    "Resources": ("preflight", "Resources"),
    "measure_resources": ("preflight", "measure_resources"),
    **{
        module: (module, None)
        for module in (
            "connectivity",
            "fullrun",
            "minipearl",
            "notebook",
            "preflight",
            "seed",
            "toy",
        )
    },
}


def __getattr__(name: str) -> Any:
    """A teaching helper's name, loaded from `pearl_edu.teaching` on first use (PEP 562)."""
    if name not in _TEACHING:
        raise AttributeError(f"module 'pearl_edu' has no attribute {name!r}")
    module_name, attribute = _TEACHING[name]
    module = importlib.import_module(f"pearl_edu.teaching.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later uses find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TEACHING))
