"""The published facts about Pearl-7B-slerp, read from its model card (shipped as data)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

CARD_FILE = "Pearl-7B-slerp-model-card.txt"
LEADERBOARD_COLUMNS = (
    "Average",
    "ARC",
    "HellaSwag",
    "MMLU",
    "TruthfulQA",
    "Winogrande",
    "GSM8K",
    "Params (B)",
)


@dataclass(frozen=True)
class LeaderboardRow:
    """One model's row of the Open LLM Leaderboard table on Pearl-7B-slerp's card."""

    model: str
    scores: dict[str, float]


def model_card_text() -> str:
    """The text of Pearl-7B-slerp's model card, as published."""
    return resources.files("pearl_edu.data").joinpath(CARD_FILE).read_text(encoding="utf-8")


def leaderboard() -> list[LeaderboardRow]:
    """Parse the evaluation table of the model card, row by row, in the card's order.

    The card prints a header line ``Model Average ARC ... Params (B)`` followed by one line
    per model: a repo id, then eight numbers.
    """
    lines = model_card_text().splitlines()
    header = "Model " + " ".join(LEADERBOARD_COLUMNS)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        raise ValueError(f"{CARD_FILE}: no line reading {header!r}") from None
    rows = []
    for line in lines[start + 1 :]:
        fields = line.split()
        if len(fields) != 1 + len(LEADERBOARD_COLUMNS) or "/" not in fields[0]:
            break
        scores = dict(zip(LEADERBOARD_COLUMNS, map(float, fields[1:]), strict=True))
        rows.append(LeaderboardRow(model=fields[0], scores=scores))
    if not rows:
        raise ValueError(f"{CARD_FILE}: the leaderboard table has no rows")
    return rows
