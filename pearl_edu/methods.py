r"""The registry of merge methods, and the one call that merges a tensor: `merge_tensor`.

This module knows nothing of files, configs or layers, and no method's math. Each method
is a function declared once, in its family (`pearl_edu.families`), with `merge_method`:

    @merge_method("slerp", models=(2, 2), base=REQUIRED)
    def slerp(inputs: MergeInputs, run: MergeContext, *, t: float) -> torch.Tensor:
        return run.backend.slerp(inputs.base, inputs.others[0], t, out=run.out)

Its keyword-only parameters are the method's parameters, read off the signature as
mergekit 0.1.5's ``@merge_method`` reads them: a plain ``float``, ``int`` or ``bool`` is one
value per output tensor (SLERP's ``t``), ``PerNonBase[float]`` one value per model but the
base (TIES' ``weight``), ``PerInput[float]`` one per input, the base too (linear's
``weight``); a default makes a parameter optional, and ``lambda_`` is the config's
``lambda``. `merge_tensor` validates the values,
fills in the defaults and gives each its type (a flag as a ``bool``) in one place, then
calls the function with the tensor's inputs, a `MergeContext` (the backend to run on,
the tensor's seed and name, the output buffer) and the parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pearl_edu.backends import Backend, backend_for
from pearl_edu.errors import ModelError
from pearl_edu.method_parameters import PER_INPUT, PER_NON_BASE, argument_name, read_parameters

# Tensor seeds stay below 2**62, so that seed + input index fits a generator's 64 bits.
SEED_RANGE = 1 << 62
# Where a method's base model stands: it needs one, may do without, or has none.
REQUIRED, OPTIONAL, NONE = "required", "optional", "none"


@dataclass(frozen=True)
class MergeInputs:
    """One output tensor's input tensors, and which of them is the base model's.

    ``others`` are the inputs but the base, in order (all of them when there is no base);
    a `PerNonBase` parameter has one value for each of them, a `PerInput` one for each of
    ``tensors``.
    """

    tensors: Sequence[torch.Tensor]
    base_index: int
    has_base: bool

    @property
    def base(self) -> torch.Tensor:
        if not self.has_base:
            raise ValueError("this merge has no base model")
        return self.tensors[self.base_index]

    @property
    def others(self) -> list[torch.Tensor]:
        return [x for i, x in enumerate(self.tensors) if not self.is_base(i)]

    def is_base(self, index: int) -> bool:
        return self.has_base and index == self.base_index


@dataclass(frozen=True)
class MergeContext:
    """What a method's function knows of the tensor it merges besides inputs and parameters.

    ``backend`` runs the math (`pearl_edu.backends`); ``seed`` is the tensor's seed, for
    random methods (`tensor_seed`); ``name`` the tensor's, for one-line errors; ``out``, when
    given, a buffer of the base tensor's shape, dtype and device that may receive the result
    (the engine's reused output buffer); ``fast_trim`` breaks TIES' ties at its cut by
    position (``pearl-edu merge --fast-trim``).
    """

    backend: Backend
    seed: int = 0
    name: str = "tensor"
    out: torch.Tensor | None = None
    fast_trim: bool = False

    def generators(self, count: int, device: torch.device) -> list[torch.Generator]:
        """The tensor's random streams, one per input, from its seed (the backend's)."""
        return self.backend.generators(self.seed, count, device)


# What a method's function is called with: (inputs, context, **typed parameters).
MergeFunction = Callable[..., torch.Tensor]
# A per-tensor check: (shape, shared parameters, per-input rows, labels) -> problem or None.
Check = Callable[..., str | None]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the config, the plan and the engine see it (see `merge_method`).

    ``parameters`` map each shared parameter to its default (``None``: required);
    ``input_parameters`` the per-input ones, which apply to every input
    (``base_has_input_parameters``) or to every input but the base; ``optional_inputs``
    name per-input parameters whose ``None`` default means "not given" (passthrough's
    ``scale``). Defaults are numbers, a flag 1.0 or 0.0, as the plan stores every value;
    ``types`` says what each parameter is given to the function as.
    """

    name: str
    function: MergeFunction
    parameters: Mapping[str, float | None]
    input_parameters: Mapping[str, float | None]
    types: Mapping[str, type]
    optional_inputs: frozenset[str]
    base: str = NONE
    min_models: int = 2
    max_models: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    # What is wrong with one tensor's parameters, in one line, or None: called with the
    # tensor's shape, the shared parameters, the per-input rows and a label per input (the
    # plan's model names), before anything is merged (Breadcrumbs' gamma, DELLA's epsilon).
    check: Check | None = None
    # For the model card: the method's name in words, and the paper or post it comes from.
    title: str = ""
    reference: str = ""
    # Each per-input parameter's scope: PER_INPUT (the base too) or PER_NON_BASE.
    input_scopes: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_has_input_parameters(self) -> bool:
        """Whether the base takes per-input parameters too (a `PerInput` parameter)."""
        return PER_INPUT in self.input_scopes.values()

    @property
    def needs_base(self) -> bool:
        return self.base == REQUIRED

    @property
    def optional_base(self) -> bool:
        return self.base == OPTIONAL

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


def merge_method(
    name: str,
    *,
    models: tuple[int, int | None] = (2, None),
    base: str = NONE,
    non_base: tuple[int, int | None] = (0, None),
    random: bool = False,
    check: Check | None = None,
    title: str = "",
    reference: str = "",
) -> Callable[[MergeFunction], MergeFunction]:
    """Register the decorated function as merge method ``name``, its parameters read off it.

    ``models``: how many input models (at least, at most); ``base``: `REQUIRED`,
    `OPTIONAL` or `NONE` (the base, if the config names one, is an input like the others);
    ``non_base``: how many models besides the base; ``random``: the method draws from the
    tensor's seed; ``check``: see `MergeMethod`.
    """

    def register_function(function: MergeFunction) -> MergeFunction:
        shared, per_input, types, optional, scopes = read_parameters(function)
        register(
            MergeMethod(
                name=name,
                function=function,
                parameters=shared,
                input_parameters=per_input,
                types=types,
                optional_inputs=optional,
                base=base,
                min_models=models[0],
                max_models=models[1],
                min_non_base=non_base[0],
                max_non_base=non_base[1],
                random=random,
                check=check,
                title=title,
                reference=reference,
                input_scopes=scopes,
            )
        )
        return function

    return register_function


def register(method: MergeMethod) -> MergeMethod:
    """Make a method available to configs and to :func:`merge_tensor` under its name."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def known_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(METHODS)


def boolean_parameters() -> frozenset[str]:
    """The names of the parameters that some method takes as a flag (true or false)."""
    return frozenset(
        name for m in METHODS.values() for name, kind in m.types.items() if kind is bool
    )


def tensor_seed(seed: int, tensor_name: str) -> int:
    """The seed of one output tensor: a hash of the merge's seed and the tensor's name.

    Each tensor's random drops then depend neither on the order in which tensors are
    merged nor on whether the merge was interrupted and resumed.
    """
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_RANGE


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
    ``name``, see :func:`tensor_seed`); ``name`` is also used in error messages. ``out`` (a
    contiguous tensor of the base tensor's shape, dtype and device) may receive the result,
    which saves the engine a fresh output tensor: use the returned tensor. ``backend``
    (`pearl_edu.backends.backend_for`) runs the math: ``"auto"``, ``"reference"`` (the
    core as the book prints it), ``"cpu"`` or ``"device"``. Raises
    :class:`~pearl_edu.errors.ModelError` naming the tensor when shapes differ.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(known_methods())}")
    if not 0 <= base_index < len(tensors):
        raise ValueError(f"{name}: base_index {base_index} is out of range for {len(tensors)}")
    for other in tensors:
        check_same_shape(tensors[base_index], other, name=name)
    spec = METHODS[method]
    params = _with_defaults(spec, params, name)
    rows = _with_input_defaults(spec, len(tensors), base_index, input_params, name)
    labels = [f"input {i}" for i in range(len(tensors))]
    problem = check_parameters(method, tuple(tensors[base_index].shape), params, rows, labels)
    if problem:
        raise ValueError(f"{name}: {problem}")
    # An optional base given parameters is no base: an input like the others.
    has_base = spec.needs_base or (spec.optional_base and not rows[base_index])
    inputs = MergeInputs(tensors, base_index, has_base)
    context = MergeContext(
        backend=backend_for(tensors[base_index].device, backend),
        seed=tensor_seed(0, name) if seed is None else seed,
        name=name,
        out=out,
        fast_trim=fast_trim,
    )
    return spec.function(inputs, context, **_typed_parameters(spec, inputs, params, rows))


def _typed_parameters(
    spec: MergeMethod,
    inputs: MergeInputs,
    params: Mapping[str, float],
    rows: Sequence[Mapping[str, float]],
) -> dict[str, Any]:
    """The function's keyword arguments: each shared value, and each per-input list, typed."""
    values: dict[str, Any] = {
        argument_name(parameter): _typed(params[parameter], spec.types[parameter])
        for parameter in spec.parameters
    }
    for parameter, scope in spec.input_scopes.items():
        indices = range(len(inputs.tensors))
        if scope == PER_NON_BASE:
            indices = [i for i in indices if not inputs.is_base(i)]
        values[argument_name(parameter)] = [
            _typed(rows[i].get(parameter), spec.types[parameter]) for i in indices
        ]
    return values


def _typed(value: float | None, kind: type) -> Any:
    """A plan's number as the type a method's function declares (None stays None)."""
    return None if value is None else kind(value)


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
    for name, value in params.items():  # a count is a whole number (mergekit refuses 2.5 too)
        if spec.types.get(name) is int and not float(value).is_integer():
            return f"parameters.{name}: expected a whole number, got {value:g}"
    return spec.check(shape, params, input_params, labels) if spec.check else None


def check_same_shape(v0: torch.Tensor, v1: torch.Tensor, *, name: str) -> None:
    """Refuse to merge tensors of different shapes (mergekit 0.1.5 refuses too)."""
    if v0.shape != v1.shape:
        raise ModelError(
            f"{name}: shapes differ: base {tuple(v0.shape)} vs {tuple(v1.shape)}; merge only "
            "models of the same architecture and size (for different vocabularies, give "
            "the config a tokenizer_source)"
        )


def _with_defaults(spec: MergeMethod, given: Mapping[str, float], name: str) -> dict[str, float]:
    """The shared parameters completed with the method's defaults; a missing required one fails."""
    missing = [parameter for parameter in spec.required_parameters() if parameter not in given]
    if missing:
        raise ValueError(f"{name}: no {missing[0]!r} ({spec.name})")
    return {**{p: d for p, d in spec.parameters.items() if d is not None}, **given}


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
