"""The reference core: each merge method's math for one tensor, in plain torch.

These modules read like the book's equations: no threads, no compiled loops, no reused
buffers, no files, and no host synchronisation wherever mergekit's code has none. They give
mergekit 0.1.5's results bit for bit; run as they are, they are the reference backend
(``pearl-edu merge --backend reference``), and the fast CPU backend is tested to give
their bits for every method (``tests/test_core.py``, ``tests/test_backend_parity.py``).
The book prints them.
"""

from pearl_edu.core.consensus import ram, ramplus_tl, sce
from pearl_edu.core.interpolation import lerp, slerp
from pearl_edu.core.selective import arcee_fusion, nearswap
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
    "arcee_fusion",
    "combine",
    "dare",
    "elect_signs",
    "lerp",
    "linear",
    "magnitude_prune",
    "nearswap",
    "ram",
    "ramplus_tl",
    "random_drop",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]
