r"""NearSwap and Arcee Fusion in plain torch: two-model merges that take only some entries.

Both keep the base model's tensor and let a second model change only some of its entries:

- **NearSwap** (``nearswap``, from alchemonaut's QuartetAnemoi model card) moves an entry
  to the other model's value where the two are already close: by
  $w = \min(t / |\theta_\text{base} - \theta|, 1)$, so entries within $t$ of each other
  are swapped outright and entries far apart are barely moved.
- **Arcee Fusion** (``arcee_fusion``, Arcee AI) scores each entry by how much it changed
  times how much the row's softmax distribution changed (a KL divergence), and takes the
  other model's value only where the score is an outlier: above the median plus 1.5 times
  the interquartile range (Tukey's fence).

Every step is mergekit 0.1.5's (``mergekit/merge_methods/nearswap.py`` and
``arcee_fusion.py``): the same operations, order and dtypes, so the results are mergekit's
bit for bit, but one: for a tensor of more than a million entries, Arcee Fusion estimates
its quartiles from a million entries drawn at random, and the draw is the ``generator``'s
(mergekit draws from torch's global generator). ``arcee_fusion`` returns float32 from
bfloat16 or float16 inputs: its mask is float32, and mergekit does not cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# NearSwap: a distance below this is taken as this (mergekit's floor; no division by 0).
NEARSWAP_DISTANCE_FLOOR = 1e-6
# Arcee Fusion: added to the softmax probabilities before the logarithm (mergekit's).
FUSION_PROBABILITY_EPS = 1e-8
# Arcee Fusion: above this many entries, the quartiles come from this many drawn at random.
QUANTILE_SAMPLE_SIZE = 1_000_000
# Arcee Fusion: the threshold is the median plus this many interquartile ranges.
TUKEY_FENCE = 1.5


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    r"""NearSwap of one tensor: towards ``other`` where the two are within about ``t``.

    $$ w = \operatorname{clamp}\Bigl(\frac{t}{\max(|\theta_\text{base} - \theta|,
       10^{-6})},\ 0,\ 1\Bigr), \qquad \theta_\text{merged} = w\,\theta + (1 - w)\,
       \theta_\text{base} $$ (eq:nearswap)

    Entries closer than ``t`` (equal ones too) take ``other``'s value; farther ones move
    by $t$ over their distance. A negative ``t`` keeps the base (mergekit accepts it).
    """
    distance = torch.abs(base - other)
    weight = (t / distance.clamp(min=NEARSWAP_DISTANCE_FLOOR)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def arcee_fusion(
    base: torch.Tensor, other: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Arcee Fusion of one tensor: ``other``'s value where its change is an outlier.

    $$ \theta_\text{merged} = \theta_\text{base} + (\theta - \theta_\text{base})\,
       [\, s \ge \tau \,], \qquad \tau = Q_2(s) + 1.5\,\bigl(Q_3(s) - Q_1(s)\bigr) $$
       (eq:arcee-fusion)

    with the importance $s$ of `fusion_importance` and its quartiles from
    `approximate_quantiles` (drawn from ``generator`` above a million entries; None:
    torch's global generator, as mergekit). The mask is float32, and so is the result of
    bfloat16 or float16 inputs.
    """
    importance = fusion_importance(other, base)
    q1, median, q3 = approximate_quantiles(
        importance, torch.tensor([0.25, 0.5, 0.75]), generator=generator
    )
    threshold = median + TUKEY_FENCE * (q3 - q1)
    mask = (importance >= threshold).float()
    return base + (other - base) * mask


def fusion_importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    r"""Arcee Fusion's importance of each entry: its change times its row's KL divergence.

    With $p = \operatorname{softmax}(\theta) + 10^{-8}$ and $q =
    \operatorname{softmax}(\theta_\text{base}) + 10^{-8}$ along the last axis:

    $$ s = |\theta - \theta_\text{base}| \cdot \sum_k p_k \log \frac{p_k}{q_k} $$

    One divergence per row (per vector, for a 1-dimensional tensor), in the inputs' dtype.
    """
    change = (params - base).abs()
    p = F.softmax(params, dim=-1) + FUSION_PROBABILITY_EPS
    q = F.softmax(base, dim=-1) + FUSION_PROBABILITY_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return change * divergence


def approximate_quantiles(
    values: torch.Tensor, q: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""The ``q`` quantiles of ``values``, as the sorted entries at $\lfloor q (N - 1) \rfloor$.

    No interpolation between neighbours (mergekit's rounding down). Above
    `QUANTILE_SAMPLE_SIZE` entries, that many are drawn at random, with replacement, by
    ``torch.randint`` from ``generator`` (on the generator's device; the indices are then
    moved to the values'), and the quantiles are the sample's.
    """
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        device = generator.device if generator is not None else flat.device
        drawn = torch.randint(
            flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator, device=device
        )
        flat = flat[drawn.to(flat.device)]
    ordered, _ = torch.sort(flat)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]
