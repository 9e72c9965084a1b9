r"""Weight matching: permuting one Mistral's units to line them up with another's.

Two networks trained from different random initial weights can compute much the same
function with their hidden units in different orders. Reordering units changes the weights
but not the function, so before interpolating two such models one may first reorder the
units of one of them to look as much as possible like the other's. *Weight matching*
(Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023) picks the reordering that
maximises the inner product of the two models' weights,

$$ \max_{\pi} \sum_{W} \langle W_A,\ \pi(W_B) \rangle , $$

one permutation at a time: with all the others fixed, the best choice of one permutation is
a linear assignment problem, solved exactly by `scipy.optimize.linear_sum_assignment`;
sweeping over the permutations in a random order until none changes is coordinate descent.

A `MistralForCausalLM` has three kinds of unit that can be reordered without changing what
it computes (`permutation_groups` names them):

- the **residual stream** (``hidden_size`` units): one permutation shared by every layer,
  since every layer adds its output to the same stream. It reorders the columns of the
  token embeddings, of ``lm_head`` and of every projection that reads the stream
  (``q/k/v_proj``, ``gate/up_proj``), the rows of every projection that writes to it
  (``o_proj``, ``down_proj``), and every RMSNorm weight (RMSNorm divides by the root mean
  square over all units, which a reordering leaves as it was);
- the **MLP units** of each layer (``intermediate_size``): the rows of ``gate_proj`` and
  ``up_proj`` and the columns of ``down_proj``;
- the **attention heads** of each layer, as whole heads: the dimensions within a head are
  rotated in pairs by RoPE, so they stay in place. Under grouped-query attention, query
  head $h$ reads key/value head $\lfloor h / g \rfloor$ ($g$ query heads per key/value
  head), so a reordering may move the key/value heads, each with its group of query heads,
  and reorder the query heads within a group.

A permutation is an index array ``order``: unit ``i`` of the permuted model is unit
``order[i]`` of the original.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pearl_edu.teaching import connectivity

Permutations = dict[str, np.ndarray]


@dataclass(frozen=True)
class Shape:
    """The sizes of a Mistral that its permutations depend on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, config) -> Shape:
        """The shape of a `transformers` Mistral config (or anything with its fields)."""
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
        )


def permutation_groups(shape: Shape) -> dict[str, int]:
    """Every permutation of the model and its size: ``residual``, ``mlp.L`` and ``heads.L``."""
    groups = {"residual": shape.hidden_size}
    for layer in range(shape.num_layers):
        groups[f"mlp.{layer}"] = shape.intermediate_size
        groups[f"heads.{layer}"] = shape.num_heads
    return groups


def identity(shape: Shape) -> Permutations:
    """The permutations that change nothing."""
    return {name: np.arange(size) for name, size in permutation_groups(shape).items()}


def is_valid_head_order(order: np.ndarray, shape: Shape) -> bool:
    """Whether a reordering of query heads keeps every group of query heads together.

    Positions ``k*g .. k*g+g-1`` must all hold query heads of one group, so that they read
    one key/value head, and each group must appear once.
    """
    groups = np.asarray(order).reshape(shape.num_kv_heads, shape.group) // shape.group
    return bool((groups == groups[:, :1]).all()) and sorted(groups[:, 0]) == list(
        range(shape.num_kv_heads)
    )


def kv_order(head_order: np.ndarray, shape: Shape) -> np.ndarray:
    """The reordering of key/value heads that a (valid) reordering of query heads implies."""
    return np.asarray(head_order)[:: shape.group] // shape.group


def _rows(order: np.ndarray, size: int) -> np.ndarray:
    """The row order of a projection whose rows come in blocks of ``size`` per head."""
    return (np.asarray(order)[:, None] * size + np.arange(size)).reshape(-1)


def axes(shape: Shape) -> dict[str, tuple[str | None, ...]]:
    """For every weight, which permutation acts on each of its axes (``None``: none).

    ``heads.L`` on a projection's rows or columns means whole heads of ``head_dim`` rows;
    ``kv.L`` is the key/value order that ``heads.L`` implies (`kv_order`).
    """
    table: dict[str, tuple[str | None, ...]] = {
        "model.embed_tokens.weight": (None, "residual"),
        "model.norm.weight": ("residual",),
        "lm_head.weight": (None, "residual"),
    }
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        table |= {
            p + "input_layernorm.weight": ("residual",),
            p + "post_attention_layernorm.weight": ("residual",),
            p + "self_attn.q_proj.weight": (f"heads.{layer}", "residual"),
            p + "self_attn.k_proj.weight": (f"kv.{layer}", "residual"),
            p + "self_attn.v_proj.weight": (f"kv.{layer}", "residual"),
            p + "self_attn.o_proj.weight": ("residual", f"heads.{layer}"),
            p + "mlp.gate_proj.weight": (f"mlp.{layer}", "residual"),
            p + "mlp.up_proj.weight": (f"mlp.{layer}", "residual"),
            p + "mlp.down_proj.weight": ("residual", f"mlp.{layer}"),
        }
    return table


def _index(name: str, permutations: Mapping[str, np.ndarray], shape: Shape) -> np.ndarray:
    """The index array that permutes one axis labelled ``name`` (see `axes`)."""
    kind, _, layer = name.partition(".")
    if kind == "heads":
        return _rows(permutations[name], shape.head_dim)
    if kind == "kv":
        return _rows(kv_order(permutations[f"heads.{layer}"], shape), shape.head_dim)
    return np.asarray(permutations[name])


def permute_tensor(
    name: str,
    tensor: torch.Tensor,
    permutations: Mapping[str, np.ndarray],
    shape: Shape,
    *,
    skip: str | None = None,
) -> torch.Tensor:
    """One weight with every permutation that acts on it applied (but ``skip``'s)."""
    skipped = {skip}
    if skip is not None and skip.startswith("heads."):
        skipped.add("kv." + skip.partition(".")[2])  # the key/value order follows the heads'
    for axis, label in enumerate(axes(shape)[name]):
        if label is None or label in skipped:
            continue
        index = torch.as_tensor(_index(label, permutations, shape))
        tensor = tensor.index_select(axis, index)
    return tensor


def permute(
    weights: Mapping[str, torch.Tensor], permutations: Mapping[str, np.ndarray], shape: Shape
) -> dict[str, torch.Tensor]:
    """The weights of the same function with its units reordered by ``permutations``.

    Weights that no permutation touches (there are none in a Mistral without biases) are
    kept as they are; the dtype is kept, so a bfloat16 model stays exactly bfloat16.
    """
    for layer in range(shape.num_layers):
        if not is_valid_head_order(permutations[f"heads.{layer}"], shape):
            raise ValueError(
                f"heads.{layer}: {list(permutations[f'heads.{layer}'])} splits a group of "
                f"{shape.group} query heads that share one key/value head"
            )
    table = axes(shape)
    return {
        name: permute_tensor(name, tensor, permutations, shape) if name in table else tensor
        for name, tensor in weights.items()
    }


def random_permutations(shape: Shape, generator: torch.Generator) -> Permutations:
    """A random permutation of every kind (heads moved with their key/value head's group)."""
    out: Permutations = {}
    for name, size in permutation_groups(shape).items():
        if name.startswith("heads."):
            groups = torch.randperm(shape.num_kv_heads, generator=generator).numpy()
            order = [
                group * shape.group + torch.randperm(shape.group, generator=generator).numpy()
                for group in groups
            ]
            out[name] = np.concatenate(order)
        else:
            out[name] = torch.randperm(size, generator=generator).numpy()
    return out


def _unit_rows(tensor: torch.Tensor, axis: int, units: int) -> np.ndarray:
    """The tensor as one row per unit of ``axis`` (``units`` of them), in float64."""
    moved = tensor.double().movedim(axis, 0)
    return moved.reshape(units, -1).numpy()


def similarity(
    name: str,
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    permutations: Mapping[str, np.ndarray],
    shape: Shape,
) -> np.ndarray:
    r"""The matrix $S$ of one permutation's linear assignment problem.

    $S_{ij}$ is the inner product, summed over every weight that the permutation ``name``
    acts on, of unit $i$ of ``first`` with unit $j$ of ``second``, the other permutations
    already applied to ``second``. For ``heads.L`` the units are whole query heads, their
    rows of ``q_proj`` and columns of ``o_proj``; for ``kv.L``, which `_match_heads` reads
    with them, whole key/value heads, their rows of ``k_proj`` and ``v_proj``.
    """
    label_kind = name.partition(".")[0]
    size = shape.num_kv_heads if label_kind == "kv" else permutation_groups(shape)[name]
    total = np.zeros((size, size))
    for weight, labels in axes(shape).items():
        for axis, label in enumerate(labels):
            if label != name:
                continue
            a = first[weight]
            b = permute_tensor(weight, second[weight], permutations, shape, skip=name)
            if label_kind in ("heads", "kv"):  # one unit is head_dim rows (or columns)
                a = a.movedim(axis, 0).reshape(size, -1)
                b = b.movedim(axis, 0).reshape(size, -1)
                axis = 0
            total += _unit_rows(a, axis, size) @ _unit_rows(b, axis, size).T
    return total


def _match_heads(
    query: np.ndarray, value: np.ndarray, current: np.ndarray, shape: Shape
) -> tuple[np.ndarray, float, float]:
    """The best reordering of one layer's heads, groups kept together (an exact solution).

    ``query`` and ``value`` are the layer's `similarity` matrices of ``heads.L`` and
    ``kv.L``, ``current`` the heads' current order. For each pair of key/value heads (one
    of each model), the best matching of their query heads is one small assignment
    problem; the best matching of key/value heads, each worth its own similarity plus its
    query heads', is another. Returns the order, its score and the score of the current
    order.
    """
    g = shape.group
    old = (
        query[np.arange(len(current)), current].sum()
        + value[np.arange(shape.num_kv_heads), kv_order(current, shape)].sum()
    )
    grouped = value.copy()
    inner: dict[tuple[int, int], np.ndarray] = {}
    for a in range(shape.num_kv_heads):
        for b in range(shape.num_kv_heads):
            block = query[a * g : (a + 1) * g, b * g : (b + 1) * g]
            _, columns = linear_sum_assignment(block, maximize=True)
            inner[a, b] = columns
            grouped[a, b] += block[np.arange(g), columns].sum()
    _, groups = linear_sum_assignment(grouped, maximize=True)
    order = np.concatenate([b * g + inner[a, b] for a, b in enumerate(groups)])
    new = (
        query[np.arange(len(order)), order].sum()
        + value[np.arange(shape.num_kv_heads), groups].sum()
    )
    return order, float(new), float(old)


def _best_order(
    name: str, scores: Callable[[str], np.ndarray], current: np.ndarray, shape: Shape
) -> tuple[np.ndarray, float, float]:
    """The best order of the permutation ``name``, the others fixed, its score and the score
    of its current order ``current``: the solution of its linear assignment problem, whose
    matrix is ``scores(name)`` (`similarity`), or for ``heads.L`` of `_match_heads`'s."""
    if name.startswith("heads."):
        kv = "kv." + name.partition(".")[2]
        return _match_heads(scores(name), scores(kv), current, shape)
    matrix = scores(name)
    _, order = linear_sum_assignment(matrix, maximize=True)
    old = matrix[np.arange(len(order)), current].sum()
    new = matrix[np.arange(len(order)), order].sum()
    return order, float(new), float(old)


def objective(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    permutations: Mapping[str, np.ndarray],
    shape: Shape,
) -> float:
    r"""$\sum_W \langle W_A, \pi(W_B) \rangle$ over every weight a permutation acts on."""
    moved = permute(second, permutations, shape)
    return float(sum((first[k].double() * moved[k].double()).sum() for k in axes(shape)))


@dataclass(frozen=True)
class Matching:
    """The permutations weight matching found, and the objective after each sweep."""

    permutations: Permutations
    objectives: tuple[float, ...]  # before any sweep, then after each
    sweeps: int


def weight_matching(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    shape: Shape,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
) -> Matching:
    """Permutations of ``second``'s units that line its weights up with ``first``'s.

    Coordinate descent, as in Git Re-Basin's weight matching: sweep over the permutations
    in a random order (drawn from ``seed`` for each sweep), replace each by the solution of
    its linear assignment problem with the others fixed, and stop after a sweep that
    changes none. Each step can only raise `objective`, so the descent ends, though not
    necessarily at the best of all permutations.
    """
    permutations = identity(shape)
    names = list(permutations)
    rng = np.random.default_rng(seed)
    objectives = [objective(first, second, permutations, shape)]
    sweeps = 0
    scores = partial(similarity, first=first, second=second, permutations=permutations, shape=shape)
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (reported after the loop)
        changed = False
        for index in rng.permutation(len(names)):
            name = names[index]
            order, new, old = _best_order(name, scores, permutations[name], shape)
            if new <= old + 1e-9 * abs(old):
                order = permutations[name]  # no gain: keep the old order (ties included)
            if not np.array_equal(order, permutations[name]):
                changed = True
                permutations[name] = np.asarray(order)
        objectives.append(objective(first, second, permutations, shape))
        if not changed:
            break
    return Matching(permutations=permutations, objectives=tuple(objectives), sweeps=sweeps)


def unit_cosines(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    layer: int,
) -> np.ndarray:
    r"""Cosines between the MLP units of one layer of two models.

    A unit is its row of ``gate_proj`` and of ``up_proj`` and its column of ``down_proj``,
    taken together as one vector; entry $(i, j)$ is the cosine between unit $i$ of
    ``first`` and unit $j$ of ``second``.
    """

    def units(weights: Mapping[str, torch.Tensor]) -> np.ndarray:
        p = f"model.layers.{layer}.mlp."
        parts = [
            weights[p + "gate_proj.weight"],
            weights[p + "up_proj.weight"],
            weights[p + "down_proj.weight"].T,
        ]
        rows = torch.cat([part.double() for part in parts], dim=1).numpy()
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return units(first) @ units(second).T


def write_permuted(
    source: str | Path, permutations: Mapping[str, np.ndarray], target: str | Path
) -> Path:
    """Save the model of ``source`` with its units reordered, as a model folder ``target``.

    The config, tokenizer and every other file are copied; the weights are reordered in
    their own dtype (a permutation only moves numbers, so bfloat16 stays exact). The folder
    is an ordinary model folder, for a merge recipe to name.
    """
    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    shape = Shape.of(_config(source))
    shutil.copytree(source, target)
    for file in sorted(target.glob("*.safetensors")):
        save_file(permute(load_file(file), permutations, shape), file, metadata={"format": "pt"})
    return target


def _config(folder: Path):
    """The `transformers` config of a model folder."""
    from pearl_edu.teaching import minipearl

    return minipearl._transformers().AutoConfig.from_pretrained(folder)


def fold_norms(weights: Mapping[str, torch.Tensor], shape: Shape) -> dict[str, torch.Tensor]:
    r"""The same function with every RMSNorm's weight moved into the projections that read it.

    A projection $W$ reading $\operatorname{diag}(w)\,x / \operatorname{rms}(x)$ reads
    $x / \operatorname{rms}(x)$ through $W \operatorname{diag}(w)$ just the same; the norm's
    weight becomes all ones. In float32.
    """
    out = {name: tensor.float().clone() for name, tensor in weights.items()}
    readers = {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    }
    norms = [("model.norm.weight", ["lm_head.weight"])]
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        for norm, projections in readers.items():
            norms.append((p + norm + ".weight", [p + q + ".weight" for q in projections]))
    for norm, projections in norms:
        for projection in projections:
            out[projection] = out[projection] * out[norm]
        out[norm] = torch.ones_like(out[norm])
    return out


def rotate_residual(
    weights: Mapping[str, torch.Tensor], rotation: torch.Tensor, shape: Shape
) -> dict[str, torch.Tensor]:
    r"""The residual stream turned by an orthogonal matrix $Q$: $h \mapsto Q h$ in every layer.

    Readers of the stream become $W Q^\top$, writers $Q W$, the embeddings $E Q^\top$.
    This is the same function only when every norm's weight is all ones (`fold_norms`):
    $\operatorname{rms}(Q h) = \operatorname{rms}(h)$, but $\operatorname{diag}(w)\,Q \ne
    Q \operatorname{diag}(w)$ unless $Q$ is a permutation or $w$ is constant.
    """
    q = rotation.to(torch.float64)
    out = {}
    for name, tensor in weights.items():
        labels = axes(shape).get(name, ())
        turned = tensor.double()
        if labels and labels[0] == "residual" and turned.ndim == 2:  # writes the stream
            turned = q @ turned
        if len(labels) == 2 and labels[1] == "residual":  # reads the stream
            turned = turned @ q.T
        out[name] = turned.to(tensor.dtype)
    return out


def barrier_difference(
    first: Sequence[connectivity.PathPoint],
    second: Sequence[connectivity.PathPoint],
    *,
    draws: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``first``'s barrier minus ``second``'s, with a 95% paired bootstrap interval.

    Both paths are measured on the same held-out items at the same ``t``; each draw
    resamples the sentences and the additions once, for both paths
    (`connectivity.path_barrier` resamples one path the same way).
    """
    ts = [p.t for p in first]
    if ts != [p.t for p in second]:
        raise ValueError("the two paths must be measured at the same t")
    texts = [np.stack([p.text_losses for p in path]) for path in (first, second)]
    additions = [np.stack([p.addition_losses for p in path]) for path in (first, second)]
    rng = np.random.default_rng(seed)
    gaps = np.empty(draws)
    for draw in range(draws):
        rows_text = rng.integers(0, texts[0].shape[1], texts[0].shape[1])
        rows_addition = rng.integers(0, additions[0].shape[1], additions[0].shape[1])
        heights = [
            connectivity.barrier(ts, 0.5 * (t[:, rows_text].mean(1) + a[:, rows_addition].mean(1)))
            for t, a in zip(texts, additions, strict=True)
        ]
        gaps[draw] = heights[0] - heights[1]
    estimate = connectivity.path_barrier(first, draws=1).height
    estimate -= connectivity.path_barrier(second, draws=1).height
    low, high = np.percentile(gaps, [2.5, 97.5])
    return float(estimate), float(low), float(high)


def best_rotation(
    first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], shape: Shape
) -> torch.Tensor:
    r"""The orthogonal $Q$ that turns ``second``'s residual stream closest to ``first``'s.

    It maximises $\sum_W \langle W_A, \rho_Q(W_B) \rangle$ over the weights that read or
    write the stream (`rotate_residual`'s $\rho_Q$), which is $\operatorname{tr}(Q^\top M)$
    with $M = \sum_{\text{readers}} W_A^\top W_B + \sum_{\text{writers}} W_A W_B^\top$;
    the maximum is $Q = U V^\top$ for $M = U \Sigma V^\top$ (orthogonal Procrustes).
    """
    m = torch.zeros(shape.hidden_size, shape.hidden_size, dtype=torch.float64)
    for name, labels in axes(shape).items():
        if len(labels) != 2:
            continue
        a, b = first[name].double(), second[name].double()
        if labels[1] == "residual":
            m += a.T @ b
        if labels[0] == "residual":
            m += a @ b.T
    u, _, vh = torch.linalg.svd(m)
    return (u @ vh).float()


@dataclass(frozen=True)
class RotationMatching:
    """Both models with their norms folded, the second turned and permuted to the first."""

    first: dict[str, torch.Tensor]
    second: dict[str, torch.Tensor]
    objectives: tuple[float, ...]  # folded, before any round, then after each


def rotation_matching(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    shape: Shape,
    *,
    rounds: int = 5,
) -> RotationMatching:
    """Weight matching with a rotation of the residual stream in place of its permutation.

    Folds both models' norms (`fold_norms`), so that any rotation of the stream keeps the
    function (`rotate_residual`), then alternates ``rounds`` times: the best rotation of
    the stream (`best_rotation`), then each layer's best MLP and head permutations with
    the stream fixed. The returned weights are float32, with norm weights all ones.
    """
    folded_first = fold_norms(first, shape)
    current = fold_norms(second, shape)
    fixed = identity(shape)
    objectives = [objective(folded_first, current, fixed, shape)]
    for _ in range(rounds):
        current = rotate_residual(current, best_rotation(folded_first, current, shape), shape)
        permutations = identity(shape)
        scores = partial(
            similarity, first=folded_first, second=current, permutations=permutations, shape=shape
        )
        for name in permutations:
            if name != "residual":
                order, _, _ = _best_order(name, scores, permutations[name], shape)
                permutations[name] = order
        current = permute(current, permutations, shape)
        objectives.append(objective(folded_first, current, fixed, shape))
    return RotationMatching(folded_first, current, tuple(objectives))
