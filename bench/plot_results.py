"""Draw the benchmark's figure for the book from ``bench/results.json``.

    python bench/plot_results.py [RESULTS_JSON] [OUTPUT_PNG]

Left: median wall time of each tool per layer count. Right: GNU time's max RSS, which
counts mapped file pages (``memory_results.json`` has anonymous memory beside it). Each bar
carries its value; one legend serves both panels. The figure is saved as
``book/_static/performance.png``, so the book build needs neither the benchmark nor a
network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results.json"
DEFAULT_FIGURE = BENCH_DIR.parent / "book" / "_static" / "performance.png"

# (key prefix in the summary, legend label, colour)
SERIES = (
    ("floor", "I/O floor", "#9e9e9e"),
    ("pearl_edu", "pearl-edu", "#1f77b4"),
    ("mergekit", "mergekit", "#d62728"),
)


def plot(results: dict, figure_path: Path) -> None:
    """Grouped bars of time and of peak RSS, one group per layer count."""
    summary = results["summary"]
    layers = [row["layers"] for row in summary]
    width = 0.8 / len(SERIES)
    fig, (ax_time, ax_rss) = plt.subplots(1, 2, figsize=(7.2, 3.6))
    for i, (key, label, colour) in enumerate(SERIES):
        positions = [x + (i - 1) * width for x in range(len(layers))]
        bars = ax_time.bar(
            positions, [r[f"{key}_s"] for r in summary], width, label=label, color=colour
        )
        ax_time.bar_label(bars, fmt="%.1f", fontsize="small", padding=2)
        bars = ax_rss.bar(
            positions, [r[f"{key}_rss_mb"] / 1000 for r in summary], width, color=colour
        )
        ax_rss.bar_label(bars, fmt="%.1f", fontsize="small", padding=2)
    for ax, ylabel in ((ax_time, "median wall time (s)"), (ax_rss, "max RSS, GNU time (GB)")):
        ax.set_xticks(range(len(layers)), [f"{n} layers" for n in layers])
        ax.set_ylabel(ylabel)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)  # room for the value labels above the tallest bar
    # One legend for both panels, in a row under the title, clear of the bars.
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=len(SERIES), frameon=False)
    machine = results["machine"]
    fig.suptitle(
        f"SLERP merge of two Mistral-7B-shaped bf16 models "
        f"({machine['cpu_count']} CPU cores, {machine['ram_gb']:g} GB of RAM, warm page cache)",
        fontsize="medium",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.89))
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure_path, dpi=130)
    plt.close(fig)


def main() -> None:
    results_path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_RESULTS
    figure_path = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_FIGURE
    plot(json.loads(results_path.read_text()), figure_path)
    print(figure_path)


if __name__ == "__main__":
    main()
