"""mergekit's methods by family, each family a module that registers its methods on import.

The package `pearl_edu` imports this one first, so every method is known to configs, `plan`
and the engine as soon as `pearl_edu` (or any module of it) is imported. The families
import `pearl_edu.methods` (the registry); `pearl_edu.methods` imports no family. They are
imported in the order the book lists the methods (SLERP, linear, the task-vector methods,
then mergekit's later ones, and last its latest: SCE, RAM, RAM+, NearSwap and
Arcee Fusion), which is the registry's order.
"""

# isort: off
from pearl_edu.families import interpolation, task_vectors  # noqa: F401
from pearl_edu.families import passthrough, pruning, sphere  # noqa: F401
from pearl_edu.families import selection  # noqa: F401
# isort: on
