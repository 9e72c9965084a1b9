"""pearl_edu: the vetted merge implementation that the pearl-edu book takes apart.

It reads mergekit's YAML with mergekit's meaning, plans every output tensor from the
models' headers, streams weights one tensor at a time, and merges on a GPU when there is
one and on the CPU otherwise.

Importing the package never touches the network.
"""

from pearl_edu._version import __version__
from pearl_edu.errors import ConfigError, HubError, ModelError, OutputError, PearlEduError
from pearl_edu.notebook import setup
from pearl_edu.recipes import recipe_path, recipe_text
from pearl_edu.seed import leaderboard

__all__ = [
    "__version__",
    "ConfigError",
    "HubError",
    "ModelError",
    "OutputError",
    "PearlEduError",
    "leaderboard",
    "recipe_path",
    "recipe_text",
    "setup",
]
