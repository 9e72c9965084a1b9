"""The reference core: each merge method's math for one tensor, in plain torch.

These modules read like the book's equations: no threads, no compiled loops, no reused
buffers, no files. They give mergekit 0.1.5's results bit for bit, and the fast engine
(`pearl_edu.backends.cpu`, behind `pearl_edu.methods`) is tested to give theirs
(``tests/test_core.py``, ``tests/test_backends.py``). The book prints
them.
"""

from pearl_edu.core.interpolation import lerp, slerp
from pearl_edu.core.task_vectors import (
    combine,
    dare,
    elect_signs,
    magnitude_prune,
    random_drop,
    task_arithmetic,
    ties,
)
from pearl_edu.core.weighted_average import linear

__all__ = [
    "combine",
    "dare",
    "elect_signs",
    "lerp",
    "linear",
    "magnitude_prune",
    "random_drop",
    "slerp",
    "task_arithmetic",
    "ties",
]
