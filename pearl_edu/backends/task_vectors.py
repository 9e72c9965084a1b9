r"""The CPU backend of the task-vector methods: `pearl_edu.core.task_vectors`, lean and fast.

Task arithmetic, TIES and DARE as the core computes them, with the core's bits
(``tests/test_backends.py`` compares them), but without a whole-tensor copy per step. The
core stacks the task vectors, multiplies, takes signs, compares, sums: each step a fresh
tensor as large as all the task vectors together. Every step after the trim (or the drop) is
elementwise, so this backend runs them on slices of a million entries, in the cache, and
writes each slice into the engine's output buffer. What needs the whole tensor is kept
small:

- **the trim** (TIES) keeps, for each model, one mask of booleans. mergekit's way to find
  the largest entries is to sort them all, which ``torch.sort`` does in place here, in one
  float32 buffer, to the same bits. With ``position=True`` (``pearl-edu merge
  --fast-trim``) nothing is sorted: two counting passes over the entries' bit patterns find
  the magnitude at the cut (`kth_largest_key`), and the entries tied at the cut are kept
  first in the tensor first; that is the core's ``stable=True``, bit for bit.
- **the drop** (DARE) draws its mask on the whole tensor, as the core does (the random
  stream is laid out over all the entries), one thread per model, and keeps it as booleans.
- **the rescale** (the L1 norms before and after a trim or a drop) sums whole tensors, as
  the core does: a sum's rounding depends on how it is split, so it is not split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from pearl_edu.core.task_vectors import combine, drop_mask, l1_ratio
from pearl_edu.core.weighted_average import common_dtype

# Entries per slice of the elementwise steps: small enough for the cache, large enough that
# the Python around each slice costs nothing.
SLICE_ELEMENTS = 1 << 18
# The magnitude bits of an entry, by dtype: the sign bit cleared (see `magnitude_keys`).
KEY_DTYPES = {
    torch.bfloat16: (torch.int16, 15),
    torch.float16: (torch.int16, 15),
    torch.float32: (torch.int32, 31),
}


def slices(numel: int) -> Iterator[slice]:
    """Consecutive slices of at most SLICE_ELEMENTS covering ``range(numel)``."""
    for start in range(0, numel, SLICE_ELEMENTS):
        yield slice(start, min(start + SLICE_ELEMENTS, numel))


class Pruned:
    """One model's task vector after its trim or drop, as a mask and a rescale factor.

    ``values(delta)`` gives the pruned task vector's entries for a slice of the task vector,
    as the core's `magnitude_prune` or `random_drop` computes them.
    """

    def __init__(
        self,
        mask: torch.Tensor | None = None,
        factor: torch.Tensor | None = None,
        work: torch.dtype | None = None,
        *,
        nothing: bool = False,
    ) -> None:
        self.mask, self.factor, self.work, self.nothing = mask, factor, work, nothing

    def values(self, delta: torch.Tensor, part: slice) -> torch.Tensor:
        if self.nothing:  # density 0: the core's zeros_like (+0, where a mask would give -0)
            return torch.zeros_like(delta)
        if self.mask is None:  # nothing pruned (density 1, or task arithmetic)
            return delta
        work = self.work or delta.dtype
        kept = delta.to(work) * as_numbers(self.mask[part], work)
        if self.factor is not None:
            kept = kept * self.factor
        return kept.to(delta.dtype)


def merge(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    pruning: str | None,
    sign_election: bool,
    normalize: bool,
    scale: float,
    rescale: bool,
    generators: Sequence[torch.Generator] | None = None,
    position: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Task arithmetic (``pruning=None``), TIES (``"magnitude"``) or DARE (``"random"``).

    The core's `task_arithmetic`, `ties` or `dare` with the same arguments (``position``:
    the core's ``stable``), for CPU tensors, written into ``out`` when it is given.
    """
    common = common_dtype([base, *others])
    flat_base = base.reshape(-1)
    flat_others = [other.reshape(-1) for other in others]

    def delta(index: int, part: slice = slice(None)) -> torch.Tensor:
        return flat_others[index][part].to(common) - flat_base[part].to(common)

    pruned = []
    if pruning == "random":
        work = torch.bfloat16 if common == torch.bfloat16 else torch.float32
        masks = drop_masks(base.numel(), densities, generators, work)
    for index, density in enumerate(densities):
        of_model = lambda part, i=index: delta(i, part)  # noqa: E731
        if pruning == "magnitude":
            pruned.append(trim(of_model, base.numel(), density, rescale, position))
        elif pruning == "random":
            pruned.append(drop(of_model, base.numel(), masks[index], work, rescale))
        else:
            pruned.append(Pruned())

    result = out if out is not None else torch.empty(base.shape, dtype=common)
    flat_result = result.reshape(-1)
    options = {"sign_election": sign_election, "normalize": normalize, "scale": scale}
    for part in slices(base.numel()):
        parts = [p.values(delta(i, part), part) for i, p in enumerate(pruned)]
        flat_result[part] = combine(flat_base[part].to(common), parts, weights, **options)
    return result


def trim(
    delta: Callable[[slice], torch.Tensor],
    numel: int,
    density: float,
    rescale: bool,
    position: bool,
) -> Pruned:
    """TIES' trim of one task vector (`pearl_edu.core.magnitude_prune`), as a mask.

    ``delta(part)`` gives a slice of the task vector; it is called slice by slice.
    """
    if density >= 1:
        return Pruned()
    if density <= 0 or numel == 0:
        return Pruned(nothing=True)
    keep = max(1, int(density * numel))
    sample = delta(slice(0, 0))
    if position and sample.dtype in KEY_DTYPES:
        mask = first_largest_mask(delta, numel, keep)
    else:
        mask = torch.zeros(numel, dtype=torch.bool)
        # The core's ranking: float32 magnitudes, sorted (in place, here) as torch.argsort does.
        magnitudes = torch.empty(numel, dtype=torch.float32)
        for part in slices(numel):
            magnitudes[part] = delta(part).abs()
        order = torch.empty(numel, dtype=torch.int64)
        torch.sort(magnitudes, descending=True, stable=position, out=(magnitudes, order))
        del magnitudes
        mask[order[:keep]] = True
        del order
    if not rescale:
        return Pruned(mask=mask)
    return Pruned(mask=mask, factor=l1_factor(delta(slice(0, numel)), mask))


def drop_masks(
    numel: int,
    densities: Sequence[float],
    generators: Sequence[torch.Generator] | None,
    work: torch.dtype,
) -> list[torch.Tensor | None]:
    """DARE's masks (`pearl_edu.core.random_drop`), one per model; None where nothing drops.

    Each mask is drawn over all ``numel`` entries at once, as the core draws it, in the
    core's dtype ``work``. With a generator per model, the models draw side by side, one
    thread each: a draw's bits depend only on its generator, and drawing is most of DARE's
    time.
    """

    def draw(index: int) -> torch.Tensor | None:
        if densities[index] >= 1:
            return None
        generator = generators[index] if generators is not None else None
        return drop_mask((numel,), densities[index], generator, work).to(torch.bool)

    indices = range(len(densities))
    if generators is None or len(densities) < 2:  # torch's global generator: one at a time
        return [draw(index) for index in indices]
    with ThreadPoolExecutor(max_workers=min(len(densities), os.cpu_count() or 1)) as pool:
        return list(pool.map(draw, indices))


def drop(
    delta: Callable[[slice], torch.Tensor],
    numel: int,
    mask: torch.Tensor | None,
    work: torch.dtype,
    rescale: bool,
) -> Pruned:
    """DARE's drop of one task vector with its ``mask`` (from `drop_masks`)."""
    if mask is None:
        return Pruned()
    factor = l1_factor(delta(slice(0, numel)).to(work), mask) if rescale else None
    return Pruned(mask=mask, factor=factor, work=work)


def l1_factor(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rescale of `pearl_edu.core.rescaled` (`pearl_edu.core.task_vectors.l1_ratio`).

    ``|delta|_1 / |mask * delta|_1``, or 1: whole-tensor sums, as the core takes them, in
    ``delta``'s dtype; ``delta`` (a task vector of this call's own) is overwritten.
    """
    before = delta.abs().sum()
    return l1_ratio(before, delta.mul_(as_numbers(mask, delta.dtype)).abs_().sum())


def as_numbers(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``mask`` as 1 and 0 in ``dtype``: read as bytes first, which torch converts
    several times faster than booleans (same values)."""
    return mask.view(torch.uint8).to(dtype)


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """Integers that order ``values`` by magnitude, as float32 magnitudes sort (NaN largest).

    An IEEE float without its sign bit, read as an integer, grows with the magnitude;
    every NaN gets the largest key, so that NaNs tie, as they do in a sort. The keys keep
    the floats' width (16 or 32 bits), which halves or quarters the passes' memory traffic.
    """
    int_dtype, bits = KEY_DTYPES[values.dtype]
    keys = values.view(int_dtype) & ((1 << bits) - 1)
    return keys.masked_fill_(values.isnan(), (1 << bits) - 1)


def first_largest_mask(
    delta: Callable[[slice], torch.Tensor], numel: int, keep: int
) -> torch.Tensor:
    """The ``keep`` entries largest in magnitude, ties at the cut taken first in the tensor.

    What ``torch.argsort(magnitudes, descending=True, stable=True)[:keep]`` selects, found
    by counting instead of sorting (`kth_largest_key`), slice by slice.
    """
    bits = KEY_DTYPES[delta(slice(0, 0)).dtype][1]
    cut, above = kth_largest_key(lambda part: magnitude_keys(delta(part)), numel, keep, bits)
    ties_to_keep = keep - above
    mask = torch.empty(numel, dtype=torch.bool)
    for part in slices(numel):
        keys = magnitude_keys(delta(part))
        torch.gt(keys, cut, out=mask[part])
        if ties_to_keep > 0:
            tied = keys == cut
            taken = tied & (tied.cumsum(0) <= ties_to_keep)
            mask[part] |= taken
            ties_to_keep -= int(taken.sum())
    return mask


def kth_largest_key(
    keys: Callable[[slice], torch.Tensor], numel: int, k: int, bits: int
) -> tuple[int, int]:
    """The ``k``-th largest of ``numel`` keys below ``2**bits``, and how many are larger.

    Radix counting, 16 bits at a time from the top: count the keys per bucket of their
    highest bits, find the bucket that holds the ``k``-th largest, and count again inside it
    by the next bits. One pass over the keys per 16 bits (one for 16-bit floats, two for
    float32), no sort.
    """
    cut, above, known_bits = 0, 0, 0  # the cut's highest ``known_bits`` bits are ``cut``
    while known_bits < bits:
        step = min(16, bits - known_bits)
        shift = bits - known_bits - step
        counts = torch.zeros(1 << step, dtype=torch.int64)
        for part in slices(numel):
            chunk = keys(part)
            if known_bits:
                chunk = chunk[(chunk >> (shift + step)) == cut]
            counts += torch.bincount((chunk >> shift) & ((1 << step) - 1), minlength=1 << step)
        # at_or_above[b]: how many keys fall in bucket b or above; it never increases.
        at_or_above = counts.flip(0).cumsum(0).flip(0)
        bucket = int((at_or_above >= k - above).nonzero().max())
        above += int(at_or_above[bucket] - counts[bucket])
        cut, known_bits = (cut << step) | bucket, known_bits + step
    return cut, above
