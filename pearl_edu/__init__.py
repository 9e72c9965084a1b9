"""pearl_edu: the vetted merge implementation that the pearl-edu book takes apart.

It reads mergekit's YAML with mergekit's meaning, plans every output tensor from the
models' headers, streams weights one tensor at a time, and merges on a GPU when there is
one and on the CPU otherwise.

Importing the package never touches the network.
"""

from pearl_edu import fullrun, preflight
from pearl_edu._version import __version__
from pearl_edu.config import MergeConfig, load_config
from pearl_edu.devices import resolve_device
from pearl_edu.errors import ConfigError, HubError, ModelError, OutputError, PearlEduError
from pearl_edu.hub import resolve_model
from pearl_edu.io import ModelReader, read_header
from pearl_edu.merge import MergeResult, merge
from pearl_edu.methods import (
    dare,
    lerp,
    linear,
    magnitude_prune,
    merge_tensor,
    random_drop,
    slerp,
    task_arithmetic,
    ties,
)
from pearl_edu.minipearl import MiniPearl, MiniPearlSettings, build_mini_pearl
from pearl_edu.notebook import setup
from pearl_edu.plan import MergePlan, TensorPlan, plan, schedule
from pearl_edu.preflight import PreflightError, Requirements, Resources, measure_resources
from pearl_edu.recipes import recipe_path, recipe_text
from pearl_edu.seed import leaderboard
from pearl_edu.toy import make_tiny_model
from pearl_edu.verify import VerifyReport, verify

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
    "leaderboard",
    "merge",
    "MergeResult",
    "ModelReader",
    "read_header",
    "resolve_device",
    "resolve_model",
    "make_tiny_model",
    "MiniPearl",
    "MiniPearlSettings",
    "build_mini_pearl",
    "recipe_path",
    "recipe_text",
    "setup",
    "verify",
    "VerifyReport",
    "PreflightError",
    "Requirements",
    "Resources",
    "measure_resources",
    "fullrun",
    "preflight",
]
