"""More of mergekit's methods, each family in a module that registers its methods on import.

`pearl_edu.methods` imports this package at its end, so every method here is known to
configs, `plan` and the engine as soon as `pearl_edu` is imported.
"""

from pearl_edu.families import passthrough, pruning, sphere  # noqa: F401
