"""One call that sets the stage for every chapter: plot style, seeds and warning filters.

It never touches the network (no fonts, styles or data are downloaded).
"""

from __future__ import annotations

import random
import warnings

import numpy as np


def setup(seed: int = 0) -> None:
    """Make a chapter reproducible and its figures consistent.

    Seeds Python, NumPy and torch; sets a readable matplotlib style sized for the book's
    column; silences warnings that would only add noise to the rendered page.
    """
    import matplotlib as mpl
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": "medium",
            "legend.frameon": False,
        }
    )
    # Library chatter (deprecations inside third-party code) is not part of the lesson.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # tqdm's notebook bars need ipywidgets; without them tqdm falls back to text bars and
    # says so on every page that shows progress.
    warnings.filterwarnings("ignore", message="IProgress not found")
