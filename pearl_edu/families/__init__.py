"""mergekit's methods by family, each family a module that registers its methods on import.

The package `pearl_edu` imports this one first, so every method is known to configs, `plan`
and the engine as soon as `pearl_edu` (or any module of it) is imported. The families
import `pearl_edu.methods` (the registry); `pearl_edu.methods` imports no family.
"""

from pearl_edu.families import (  # noqa: F401
    interpolation,
    passthrough,
    pruning,
    sphere,
    task_vectors,
)
