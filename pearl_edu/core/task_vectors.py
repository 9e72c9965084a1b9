r"""Task arithmetic, TIES and DARE in plain torch: the reference core of the task-vector methods.

A task vector $\delta_i = \theta_i - \theta_\text{base}$ is what fine-tuning changed in a
tensor. Task arithmetic adds the task vectors back with weights; TIES first trims each to
its largest entries and lets the models vote on a sign per entry; DARE drops entries at
random instead of trimming. Every step is mergekit 0.1.5's (same operations, order and
dtypes: bfloat16 inputs are summed in bfloat16, as mergekit sums them), so the results are
mergekit's, bit for bit.

The module reads top-down, as chapter 10 of the book prints it: the three methods first
(`ties`, `task_arithmetic`, `dare`), then their steps in the order TIES takes them:
`task_vectors`; the trim, `magnitude_prune` (eq:ties-trim), and DARE's drop in its place,
`random_drop` with `drop_mask`; the election, `elect_signs` (eq:ties-elect); `combine`,
the last step of all three, which elects (for TIES), takes the disjoint mean (eq:ties-mean)
or the weighted sum (eq:task-arithmetic) and adds it to the base; and last the L1 rescale
that the trim and the drop may apply, `rescaled` with `l1_ratio`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pearl_edu.core.weighted_average import common_dtype

# Below these, an L1 norm counts as zero (nothing to rescale) and a sum of weights as zero
# (nothing to divide by): mergekit's thresholds.
L1_EPS = 1e-7
WEIGHT_SUM_EPS = 1e-8


def ties(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    scale: float = 1.0,
    rescale: bool = False,
    stable: bool = False,
) -> torch.Tensor:
    r"""TIES: trim each task vector, elect signs, average the agreeing entries.

    $$ \theta = \theta_\text{base} + \lambda\,
       \frac{\sum_i w_i\, \operatorname{trim}_{\rho_i}(\delta_i)\, [\text{agrees}]}
            {\sum_i w_i\, [\text{agrees}]} $$
    """
    # The task vectors delta_i = theta_i - theta_base (eq:task-arithmetic).
    base, deltas = task_vectors(base, others)
    # Step 1, trim (eq:ties-trim): keep each task vector's largest entries, the rest 0.
    trimmed = [
        magnitude_prune(delta, density, rescale=rescale, stable=stable)
        for delta, density in zip(deltas, densities, strict=True)
    ]
    # Steps 2 and 3, elect (eq:ties-elect) and disjoint mean (eq:ties-mean), done by
    # `combine`, which then adds lambda times the result to the base.
    return combine(base, trimmed, weights, sign_election=True, normalize=normalize, scale=scale)


def task_arithmetic(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    r"""Task arithmetic: $\theta_\text{base} + \lambda \sum_i w_i \delta_i$ (see `combine`)."""
    # eq:task-arithmetic: the task vectors, weighted, summed, scaled and added to the base.
    base, deltas = task_vectors(base, others)
    return combine(base, deltas, weights, normalize=normalize, scale=scale)


def dare(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    rescale: bool = True,
) -> torch.Tensor:
    r"""DARE: drop task-vector entries at random, rescale, add (``dare_linear``).

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\,
       \operatorname{drop}_{\rho_i}(\delta_i)}{D} $$

    Model ``i`` draws from ``generators[i]``; with ``None`` (the default), every model
    draws in turn from torch's global generator, as mergekit does. With ``sign_election``
    it is ``dare_ties``: the dropped deltas go through TIES' election.
    """
    base, deltas = task_vectors(base, others)
    generators = generators if generators is not None else [None] * len(deltas)
    # TIES' trim replaced by a random drop, rescaled to each task vector's L1 norm.
    dropped = [
        random_drop(delta, density, generator, rescale=rescale)
        for delta, density, generator in zip(deltas, densities, generators, strict=True)
    ]
    # Then as task arithmetic (dare_linear), or as TIES' election and mean (dare_ties).
    return combine(
        base, dropped, weights, sign_election=sign_election, normalize=normalize, scale=scale
    )


def task_vectors(
    base: torch.Tensor, others: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""The base and the task vectors $\delta_i = \theta_i - \theta_\text{base}$.

    All in the inputs' common dtype: mergekit promotes before it subtracts."""
    common = common_dtype([base, *others])
    base = base.to(common)
    return base, [other.to(common) - base for other in others]


def magnitude_prune(
    delta: torch.Tensor, density: float, *, rescale: bool = False, stable: bool = False
) -> torch.Tensor:
    r"""TIES' trim: keep the ``density`` fraction of ``delta``'s entries largest in magnitude.

    In eq:ties-trim's notation, with $\rho$ = ``density`` and $N$ entries:

    $$ \operatorname{trim}_\rho(\delta)_j = \delta_j\, [\, |\delta_j| \text{ is among the }
       k = \max(1, \lfloor \rho N \rfloor) \text{ largest} \,] $$

    Among equal magnitudes at the cut, ``torch.argsort`` decides which survive, as in
    mergekit; with ``stable``, the first in the tensor survive (``pearl-edu merge --fast-trim``).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    # Ranked in float32 on the CPU: mergekit's choice (argsort of bfloat16 is slow there).
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(magnitudes, descending=True, stable=stable)[:keep]] = 1
    return rescaled(delta, mask.reshape_as(delta), rescale)


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None = None,
    *,
    rescale: bool = True,
) -> torch.Tensor:
    r"""DARE's drop: keep each entry with probability ``density``; rescale to the L1 norm.

    $$ \operatorname{drop}_\rho(\delta) = \frac{\lVert \delta \rVert_1}{\lVert m \odot \delta
       \rVert_1}\; m \odot \delta, \qquad m_j \sim \operatorname{Bernoulli}(\rho) $$

    (The DARE paper divides by $\rho$, which keeps the norm only on average.) The mask is
    mergekit's draw on the CPU: ``torch.bernoulli`` of ``density`` in bfloat16 for bfloat16
    deltas (0.3 becomes 0.30078125) and float32 otherwise, from ``generator`` (torch's
    global generator, as in mergekit, when ``None``).
    """
    if density >= 1:
        return delta
    mask = drop_mask(delta.shape, density, generator, delta.dtype).to(delta.device)
    return rescaled(delta.to(mask.dtype), mask, rescale).to(delta.dtype)


def drop_mask(
    shape: torch.Size | tuple[int, ...],
    density: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """DARE's mask of ``shape``: 1 with probability ``density``, else 0, as mergekit draws it.

    In bfloat16 for bfloat16 deltas (0.3 becomes 0.30078125), float32 for any other
    ``dtype``; drawn on ``generator``'s device (the global generator's, the CPU, for None),
    so a seed keeps the same entries whatever device the deltas are on. The probabilities
    are replaced by the draws in place: the same bits as a new tensor, in half the memory.
    """
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.full(shape, density, dtype=work, device=device)
    return torch.bernoulli(draws, generator=generator, out=draws)


def elect_signs(weighted_deltas: torch.Tensor) -> torch.Tensor:
    r"""TIES' sign election: 1 where a weighted delta agrees with the sign of their sum, else 0.

    For the stacked $w_i \delta_i$ (first axis: the models), eq:ties-elect:

    $$ s = \operatorname{sgn}\Bigl(\sum_i w_i \delta_i\Bigr) \ (\text{zero counts as } +1),
       \qquad a_{ij} = [\operatorname{sgn}(w_i \delta_{ij}) = s_j] $$

    An entry that is exactly zero (trimmed, dropped or unchanged) never agrees. The
    $a_{ij}$ come as numbers in the deltas' dtype, 1 and 0: multiplying by them gives the
    bits of mergekit's multiplication by its boolean mask, and costs a fraction of it on
    the CPU (so does ``out=``, which writes a comparison's result as numbers directly).
    mergekit's ``int8_mask`` only stores these signs in less memory: same result.
    """
    signs = weighted_deltas.sign()
    summed = weighted_deltas.sum(dim=0)
    elected = torch.ge(summed, 0, out=torch.empty_like(summed)) * 2 - 1  # s: +1 or -1
    return torch.eq(signs, elected, out=torch.empty_like(signs))  # a: 1 or 0


def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    r"""Add weighted task vectors to the base: the last step of every task-vector method.

    eq:task-arithmetic, or with ``sign_election`` TIES' disjoint mean (eq:ties-mean):

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\, \delta_i}{D} $$

    with $\lambda$ = ``scale`` (the YAML's ``lambda``) and $D = \sum_i w_i$ when
    ``normalize`` (else 1). With ``sign_election`` (TIES), only the entries that agree
    with the elected sign are summed, and $D$ sums the weights of the agreeing entries,
    entry by entry. A divisor of 0 is taken as 1.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} task vectors but {len(weights)} weights")
    if not deltas:
        return base
    stacked = torch.stack([delta.to(base.dtype) for delta in deltas])
    # The weights take the tensors' dtype (bfloat16 rounds 0.3 to 0.30078125), as in mergekit.
    w = torch.tensor(list(weights), dtype=base.dtype, device=base.device)
    w = w.reshape((len(deltas),) + (1,) * base.dim())
    stacked = stacked * w  # the w_i delta_i, one row per model
    if sign_election:
        # Step 2, elect (eq:ties-elect): which w_i delta_ij agree with the sign of their sum.
        agree = elect_signs(stacked)
        # Step 3, disjoint mean (eq:ties-mean): the agreeing entries' sum, over their weights'.
        mixed = (stacked * agree).sum(dim=0)
        if normalize:
            divisor = (w * agree).sum(dim=0)
            mixed = mixed / torch.where(divisor == 0, 1, divisor)
    else:
        # eq:task-arithmetic's sum (with normalize, divided by the sum of the weights).
        mixed = stacked.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            mixed = mixed / torch.where(divisor.abs() < WEIGHT_SUM_EPS, 1, divisor)
    if scale != 1:
        mixed = mixed * scale  # lambda
    return (base + mixed).to(base.dtype)


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    r"""``tensor * mask``, scaled back to the L1 norm of ``tensor`` when ``rescale``.

    $$ \frac{\lVert \delta \rVert_1}{\lVert m \odot \delta \rVert_1}\; m \odot \delta $$

    Nothing is rescaled when either norm is below 1e-7 (nothing there, or nothing kept).
    """
    masked = tensor * mask
    if not rescale:
        return masked
    return masked * l1_ratio(tensor.abs().sum(), masked.abs().sum())


def l1_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``before / after``, two L1 norms, or 1 when either is below 1e-7 (mergekit's test).

    Chosen by `torch.where`, so that nothing waits for the sums (on a GPU, no host
    synchronisation); multiplying by 1 changes no bit.
    """
    return torch.where((before < L1_EPS) | (after < L1_EPS), 1, before / after)
