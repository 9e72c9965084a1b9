"""More of mergekit's methods, each family in a module that registers its methods on import.

The package `pearl_edu` imports this one first, so every method here is known to configs,
`plan` and the engine as soon as `pearl_edu` (or any module of it) is imported. The families
import `pearl_edu.methods` (its registry and helpers); `pearl_edu.methods` imports no family.
"""

from pearl_edu.families import passthrough, pruning, sphere  # noqa: F401
