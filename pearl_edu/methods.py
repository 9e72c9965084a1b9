r"""The math of a merge: one output tensor from its input tensors.

This module knows nothing of files, configs or layers. The engine calls
:func:`merge_tensor` once per output tensor; the methods it dispatches to are registered in
:data:`METHODS`: SLERP, linear, task arithmetic, TIES, DARE (``dare_linear``) and DARE with
TIES' sign election (``dare_ties``).

Each method means what mergekit 0.1.5 means by it, bit for bit: the arithmetic is the
reference core's (`pearl_edu.core`, plain torch that reads like the book's equations).
The engine runs them on backends (`pearl_edu.backends`) that give the core's bits faster
and write into the engine's reused output buffer: SLERP on `pearl_edu.backends.cpu`, task
arithmetic, TIES and DARE on `pearl_edu.backends.task_vectors` (slice by slice, with one
mask per model instead of copies of the task vectors); linear is the core's function.
On a GPU, SLERP, linear and the task-vector methods run on `pearl_edu.backends.cuda`
instead, to its derived contract with the core, tested on the CPU and not yet run on a GPU
(``backend="exact"``: the CPU's bits).

Task vectors: with the base model's tensor $\theta_\text{base}$, each other model's tensor
gives $\delta_i = \theta_i - \theta_\text{base}$, what fine-tuning changed. Task arithmetic
adds them back with weights; TIES first trims each to its largest entries and lets the
models vote on a sign per entry; DARE drops entries at random instead of trimming.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pearl_edu import core
from pearl_edu.backends import backend_for, on_device
from pearl_edu.backends import cuda as device_backend
from pearl_edu.backends import task_vectors as task_vector_backend
from pearl_edu.backends.cpu import (  # noqa: F401  (the engine's helpers, importable here)
    on_cpu,
    set_threads_for_new_threads,
    threads_for_new_threads,
)
from pearl_edu.core.interpolation import CHUNK_ELEMENTS, DOT_THRESHOLD, NORM_EPS  # noqa: F401
from pearl_edu.core.task_vectors import (  # noqa: F401  (L1_EPS, WEIGHT_SUM_EPS: importable here)
    L1_EPS,
    WEIGHT_SUM_EPS,
    rescaled,
    task_vectors,
)
from pearl_edu.errors import ModelError

# Tensor seeds stay below 2**62, so that seed + input index fits a generator's 64 bits.
SEED_RANGE = 1 << 62


def lerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Linear interpolation of two tensors, in float32, returned in ``v0``'s dtype.

    $$ \operatorname{lerp}(v_0, v_1; t) = (1 - t)\, v_0 + t\, v_1 $$

    ``t = 0`` gives ``v0``, ``t = 1`` gives ``v1``; ``t`` is not clamped. This is exactly
    SLERP's fallback branch, bit for bit. ``out``, a contiguous tensor of ``v0``'s shape,
    dtype and device, receives the result (and is returned) instead of a new tensor.
    ``backend`` is `pearl_edu.backends.backend_for`'s (on a GPU, ``"exact"`` for the CPU's bits).
    """
    _check_same_shape(v0, v1, name="tensor")
    return backend_for(v0.device, backend).lerp(v0, v1, t, out=out)


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = NORM_EPS,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Spherical linear interpolation of two tensors, each taken as one flat vector.

    The math, equation and edge cases are `pearl_edu.core.slerp`'s (eq:slerp): the
    fallback to linear interpolation above ``dot_threshold``, norms at most ``eps`` left
    undivided, ``t`` not clamped, no renormalization. This is the engine's fast version
    (`pearl_edu.backends`): the core's bits on the CPU; on a GPU, by default, everything on
    the device to the backend's contract, or with ``backend="exact"`` the core's bits (the
    cosine summed on the CPU). ``out``, a contiguous tensor of ``v0``'s shape, dtype and
    device, receives the result (and is returned) instead of a new tensor, as the engine
    does with buffers it reuses.
    """
    _check_same_shape(v0, v1, name="tensor")
    fast = backend_for(v0.device, backend)
    return fast.slerp(v0, v1, t, dot_threshold=dot_threshold, eps=eps, out=out)


def _check_same_shape(v0: torch.Tensor, v1: torch.Tensor, *, name: str) -> None:
    """Refuse to merge tensors of different shapes (mergekit 0.1.5 refuses too)."""
    if v0.shape != v1.shape:
        raise ModelError(
            f"{name}: shapes differ: base {tuple(v0.shape)} vs {tuple(v1.shape)}; merge only "
            "models of the same architecture and size (for different vocabularies, align "
            "the tokenizers and resize the embeddings first)"
        )


# The core's linear, and TIES' trim: nothing about them depends on the device.
linear = core.linear
magnitude_prune = core.magnitude_prune


def random_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    r"""DARE's drop (`pearl_edu.core.random_drop`), with the mask drawn on the CPU.

    ``generator`` is a CPU generator, so the same seed drops the same entries on any
    device: for a tensor elsewhere, the mask is drawn on the CPU and the rest runs there.
    """
    if delta.device.type == "cpu" or density >= 1:
        return core.random_drop(delta, density, generator, rescale=rescale)
    ones = torch.ones(delta.shape, dtype=delta.dtype)
    mask = core.random_drop(ones, density, generator, rescale=False)  # 0 or 1: the mask
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    mask = mask.to(device=delta.device, dtype=work)
    return rescaled(delta.to(work), mask, rescale).to(delta.dtype)


def elect_signs(weighted_deltas: torch.Tensor, *, int8_mask: bool = False) -> torch.Tensor:
    """TIES' sign election (`pearl_edu.core.elect_signs`); ``int8_mask`` changes nothing."""
    return core.elect_signs(weighted_deltas)


def task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    r"""Add weighted task vectors to the base: the last step of task arithmetic, TIES and DARE.

    $$ \theta = \theta_\text{base} + \lambda\, \frac{\sum_i w_i\, \delta_i}{D} $$

    where $\delta_i$ are the (already pruned or dropped) task vectors (see
    `pearl_edu.core.combine`). ``int8_mask`` (mergekit's memory saving) changes nothing.
    """
    options = {"sign_election": sign_election, "normalize": normalize, "scale": scale}
    return core.combine(base, deltas, weights, **options)


def ties(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    scale: float = 1.0,
    rescale: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    """TIES merging (`pearl_edu.core.ties`); ``int8_mask`` changes nothing."""
    return core.ties(
        base, others, weights, densities, normalize=normalize, scale=scale, rescale=rescale
    )


def dare(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    *,
    sign_election: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    rescale: bool = True,
    int8_mask: bool = False,
) -> torch.Tensor:
    """DARE (`pearl_edu.core.dare`), model ``i`` drawing from CPU generator ``generators[i]``.

    With ``sign_election`` it is ``dare_ties``. ``int8_mask`` changes nothing.
    """
    base, deltas = task_vectors(base, others)
    dropped = [
        random_drop(delta, density, generator, rescale=rescale)
        for delta, density, generator in zip(deltas, densities, generators, strict=True)
    ]
    return core.combine(
        base, dropped, weights, sign_election=sign_election, normalize=normalize, scale=scale
    )


def tensor_seed(seed: int, tensor_name: str) -> int:
    """The seed of one output tensor: a hash of the merge's seed and the tensor's name.

    Each tensor's random drops then depend neither on the order in which tensors are
    merged nor on whether the merge was interrupted and resumed.
    """
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_RANGE


def input_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per input of a tensor, seeded ``seed``, ``seed + 1``, ...

    One stream per input keeps an input's drops independent of the other inputs' densities.
    """
    return [torch.Generator().manual_seed(seed + index) for index in range(count)]


# ---------------------------------------------------------------------------------------
# The registry: what the config and the engine know about each method.


# What the engine calls: (tensors, base index, shared parameters, per-input parameters, seed).
MergeFunction = Callable[
    [Sequence[torch.Tensor], int, Mapping[str, float], Sequence[Mapping[str, float]], int],
    torch.Tensor,
]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the config, the plan and the engine see it.

    ``parameters`` are the method's shared parameters (one value per output tensor, such
    as SLERP's ``t``), each mapped to its default, or to ``None`` when it is required.
    ``input_parameters`` are per-input parameters (one value per input model, such as
    ``weight`` and ``density``); they apply to every input, or to every input but the base
    when ``base_has_input_parameters`` is false. ``random`` methods draw from a seed.
    ``merge`` takes the input tensors, the index of the base model's tensor among them,
    the shared parameters, the per-input parameters (one mapping per input) and the
    tensor's seed, and returns the merged tensor; a method with ``writes_into_out`` also
    takes a keyword ``out``, a tensor to write the result into, and a method that ``trims``
    by magnitude a keyword ``fast_trim`` (see `merge_tensor`). ``optional_inputs`` name
    per-input parameters whose ``None`` default means "not given" rather than "required"
    (passthrough's ``scale``): an input without one has no entry for it.
    """

    name: str
    merge: MergeFunction
    parameters: Mapping[str, float | None] = field(default_factory=dict)
    min_models: int = 2
    max_models: int | None = None
    needs_base: bool = False
    input_parameters: Mapping[str, float | None] = field(default_factory=dict)
    base_has_input_parameters: bool = False
    random: bool = False
    writes_into_out: bool = False
    trims: bool = False
    # A method with math on more than one backend takes a keyword ``backend`` (`merge_tensor`).
    takes_backend: bool = False
    # What is wrong with one tensor's parameters, in one line, or None: called with the
    # tensor's shape, the shared parameters, the per-input ones and a label per input (the
    # plan's model names), before anything is merged (Breadcrumbs' gamma, DELLA's epsilon).
    check: Callable[..., str | None] | None = None
    optional_inputs: frozenset[str] = frozenset()
    # A base the method can do without (nuslerp, multislerp). With one, the base's row of
    # per-input parameters is empty; without one, every input has its own row, the input
    # at ``base_index`` too (the plan's rows say which: see `_with_input_defaults`).
    optional_base: bool = False
    # How many inputs besides the base the method takes (mergekit's non-base counts).
    min_non_base: int = 0
    max_non_base: int | None = None
    # A method whose math can fail on what a tensor holds takes a keyword ``name`` (the
    # tensor's, for its one-line error).
    named: bool = False
    # For the model card: the method's name in words, and the paper or post it comes from.
    title: str = ""
    reference: str = ""

    def required_parameters(self) -> list[str]:
        """Names of the parameters a config must give (those with no default)."""
        return [name for name, default in self.parameters.items() if default is None]

    def required_input_parameters(self) -> list[str]:
        """Names of the per-input parameters every input (but the base) must be given."""
        return [
            name
            for name, default in self.input_parameters.items()
            if default is None and name not in self.optional_inputs
        ]

    def takes_input_parameters(self, index: int, base_index: int) -> bool:
        """Whether input ``index`` has per-input parameters (the base may not)."""
        return self.base_has_input_parameters or index != base_index


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make a method available to configs and to :func:`merge_tensor` under its name."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def known_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(METHODS)


def merge_tensor(
    method: str,
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    *,
    input_params: Sequence[Mapping[str, float]] | None = None,
    seed: int | None = None,
    name: str = "tensor",
    out: torch.Tensor | None = None,
    fast_trim: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Merge one output tensor from its inputs: the single entry point of the engine.

    ``tensors[base_index]`` is the base model's tensor; ``input_params[i]`` holds the
    per-input parameters of ``tensors[i]`` (missing ones take the method's defaults);
    ``seed`` is this tensor's seed for random methods (by default derived from seed 0 and
    ``name``, see :func:`tensor_seed`); ``name`` is also used in error messages.
    ``out`` (a contiguous tensor of the base tensor's shape, dtype and device) receives the
    result when the method can write into it (``writes_into_out``), which saves the engine
    a fresh output tensor; otherwise a new tensor is returned. Use the returned tensor.
    ``backend`` (`pearl_edu.backends.backend_for`) chooses, for the methods that have both,
    between the device's own math (``"auto"``) and mergekit 0.1.5's bits (``"exact"``).
    Raises :class:`~pearl_edu.errors.ModelError` naming the tensor when shapes differ.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(known_methods())}")
    if not 0 <= base_index < len(tensors):
        raise ValueError(f"{name}: base_index {base_index} is out of range for {len(tensors)}")
    for other in tensors:
        _check_same_shape(tensors[base_index], other, name=name)
    spec = METHODS[method]
    per_input = _with_input_defaults(spec, len(tensors), base_index, input_params, name)
    problem = check_parameters(
        method,
        tuple(tensors[base_index].shape),
        params,
        per_input,
        [f"input {i}" for i in range(len(tensors))],
    )
    if problem:
        raise ValueError(f"{name}: {problem}")
    tensor_seed_ = tensor_seed(0, name) if seed is None else seed
    keywords: dict[str, object] = {}
    if spec.takes_backend:
        keywords["backend"] = backend
    if out is not None and spec.writes_into_out:
        keywords["out"] = out
    if spec.trims:
        keywords["fast_trim"] = fast_trim
    if spec.named:
        keywords["name"] = name
    return spec.merge(tensors, base_index, params, per_input, tensor_seed_, **keywords)


def check_parameters(
    method: str,
    shape: tuple[int, ...],
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    labels: Sequence[str],
) -> str | None:
    """What is wrong with one tensor's parameters for ``method``, in one line, or None.

    ``input_params`` are complete (defaults filled in), ``{}`` for an input without any;
    ``labels`` name the inputs in the message (the plan gives model names).
    """
    spec = METHODS[method]
    return spec.check(shape, params, input_params, labels) if spec.check else None


def _with_input_defaults(
    spec: MergeMethod,
    count: int,
    base_index: int,
    given: Sequence[Mapping[str, float]] | None,
    name: str,
) -> list[dict[str, float]]:
    """Per-input parameters completed with the method's defaults; a missing required one fails."""
    given = given if given is not None else [{}] * count
    if len(given) != count:
        raise ValueError(f"{name}: {count} tensors but {len(given)} sets of input parameters")
    completed = []
    for index, values in enumerate(given):
        # An optional base given parameters is no base: an input like the others.
        if not spec.takes_input_parameters(index, base_index) and not (
            spec.optional_base and values
        ):
            completed.append({})
            continue
        row = {}
        for parameter, default in spec.input_parameters.items():
            if parameter not in values and parameter in spec.optional_inputs:
                continue
            if parameter not in values and default is None:
                raise ValueError(f"{name}: input {index} has no {parameter!r} ({spec.name})")
            row[parameter] = float(values.get(parameter, default))  # type: ignore[arg-type]
        completed.append(row)
    return completed


def _slerp_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SLERP from the base tensor (``t = 0``) towards the other one (``t = 1``)."""
    v0 = tensors[base_index]
    v1 = tensors[1 - base_index]
    return slerp(v0, v1, float(params["t"]), out=out, backend=backend)


def _linear_method(
    tensors: Sequence[torch.Tensor],
    base_index: int,
    params: Mapping[str, float],
    input_params: Sequence[Mapping[str, float]],
    seed: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear: every input (the base too, when there is one) with its own weight."""
    weights = [values["weight"] for values in input_params]
    normalize = bool(params["normalize"])
    device = tensors[0].device
    if on_device(device, backend):
        return device_backend.linear(tensors, weights, normalize=normalize)
    if device.type != "cpu":  # exact: the CPU's bits, from the inputs' host copies
        return linear([on_cpu(x) for x in tensors], weights, normalize=normalize).to(device)
    return linear(tensors, weights, normalize=normalize)


def task_vector_inputs(
    tensors: Sequence[torch.Tensor], base_index: int, input_params: Sequence[Mapping[str, float]]
) -> tuple[torch.Tensor, list[torch.Tensor], list[float], list[float]]:
    """The base tensor, the others, and the others' weights and densities, in order."""
    others = [tensor for index, tensor in enumerate(tensors) if index != base_index]
    rows = [values for index, values in enumerate(input_params) if index != base_index]
    weights = [values["weight"] for values in rows]
    densities = [values["density"] for values in rows]
    return tensors[base_index], others, weights, densities


def _task_vector_method(*, pruning: str | None, sign_election: bool) -> MergeFunction:
    """The engine's entry for task arithmetic (no pruning), TIES (magnitude) or DARE (random)."""

    def merge(
        tensors: Sequence[torch.Tensor],
        base_index: int,
        params: Mapping[str, float],
        input_params: Sequence[Mapping[str, float]],
        seed: int,
        *,
        out: torch.Tensor | None = None,
        fast_trim: bool = False,
        backend: str = "auto",
    ) -> torch.Tensor:
        base, others, weights, densities = task_vector_inputs(tensors, base_index, input_params)
        options = {
            "normalize": bool(params["normalize"]),
            "scale": float(params["lambda"]),
            "rescale": bool(params["rescale"]) and pruning is not None,
        }
        if on_device(base.device, backend):
            # On the tensors' device: TIES keeps the ties at its cut by position (as
            # fast_trim does), DARE draws from generators on the device.
            return device_backend.merge_task_vectors(
                base,
                others,
                weights,
                densities,
                pruning=pruning,
                sign_election=sign_election,
                seed=seed,
                out=out,
                **options,
            )
        device = base.device
        if device.type != "cpu":  # exact: the CPU's bits, from the inputs' host copies
            base, others, out = on_cpu(base), [on_cpu(other) for other in others], None
        generators = input_generators(seed, len(others)) if pruning == "random" else None
        merged = task_vector_backend.merge(
            base,
            others,
            weights,
            densities,
            pruning=pruning,
            sign_election=sign_election,
            generators=generators,
            position=fast_trim,
            out=out,
            **options,
        )
        return merged.to(device)

    return merge


def task_vector_parameters(*, normalize: bool, rescale: bool) -> dict[str, float | None]:
    """Shared parameters of the task-vector methods, with mergekit's defaults."""
    return {
        "normalize": float(normalize),
        "lambda": 1.0,
        "rescale": float(rescale),
        "int8_mask": 0.0,
    }


# A task-vector method needs a weight for every model but the base; density defaults to 1.
TASK_VECTOR_INPUTS: dict[str, float | None] = {"weight": None, "density": 1.0}

register(
    MergeMethod(
        name="slerp",
        merge=_slerp_method,
        parameters={"t": None},
        min_models=2,
        max_models=2,
        needs_base=True,
        writes_into_out=True,
        takes_backend=True,
    )
)
register(
    MergeMethod(
        name="linear",
        merge=_linear_method,
        parameters={"normalize": 1.0},
        min_models=1,
        input_parameters={"weight": None},
        base_has_input_parameters=True,
        takes_backend=True,
    )
)
for _name, _pruning, _election, _normalize, _rescale in (
    ("task_arithmetic", None, False, False, False),
    ("ties", "magnitude", True, True, False),
    ("dare_linear", "random", False, False, True),
    ("dare_ties", "random", True, False, True),
):
    register(
        MergeMethod(
            name=_name,
            merge=_task_vector_method(pruning=_pruning, sign_election=_election),
            parameters=task_vector_parameters(normalize=_normalize, rescale=_rescale),
            min_models=1,
            needs_base=True,
            input_parameters=TASK_VECTOR_INPUTS,
            random=_pruning == "random",
            writes_into_out=True,
            trims=_pruning == "magnitude",
            takes_backend=True,
        )
    )
