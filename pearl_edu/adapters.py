"""LoRA adapters in model references: ``model: base+adapter``, applied tensor by tensor.

mergekit 0.1.5 reads a model reference ``path_or_repo+adapter_path_or_repo``
(``ModelReference``: the text split at its one ``+``) and, before merging, loads the base
with transformers, the adapter with PEFT, and saves ``merge_and_unload()``'s model to a
cache folder. pearl_edu does the same arithmetic without building the model: the reader
of ``base+adapter`` (`AdaptedReader`) reads each tensor of the base and, for the tensors
the adapter changes, applies the change on the way, so the merge still holds a few
tensors at a time.

The adapter is a PEFT LoRA folder: ``adapter_config.json`` and
``adapter_model.safetensors``, whose tensors are named ``base_model.model.<module>.…``:

- ``<module>.lora_A.weight`` (r × in) and ``<module>.lora_B.weight`` (out × r) change the
  linear layer's weight to ``W + s · (B @ A)`` (transposed with ``fan_in_fan_out``);
- ``<module>.lora_embedding_A`` (r × vocab) and ``<module>.lora_embedding_B`` (dim × r)
  change an embedding to ``W + s · (B @ A)ᵀ``;
- ``<module>.lora_B.bias`` (with ``lora_bias``) changes the layer's bias to ``b + s · β``;
- any other tensor (``modules_to_save``, a saved ``base_layer``, trained biases) replaces
  the base's tensor of the same name.

The scale ``s`` is PEFT's: ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``,
where ``rank_pattern`` and ``alpha_pattern`` may give a module its own ``r`` and
``lora_alpha`` (a pattern matches a module's name or a dotted suffix of it, as PEFT's
``get_pattern_key``). The arithmetic is PEFT's on the CPU: A and B in float32, ``B @ A``,
times ``s``, added to the weight in float32 and rounded once to the weight's dtype (an
embedding's change is rounded to the weight's dtype before it is added, as PEFT does).
Adapters that are not plain LoRA (DoRA, other PEFT types) are refused in one line naming
the file and what is supported.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pearl_edu.errors import ModelError
from pearl_edu.headers import safetensors_metas
from pearl_edu.hub import download, looks_like_repo_id
from pearl_edu.reading import Closing, ModelHeader, ModelReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
# PEFT options that change the merged weight beyond W + s·(B @ A): refused when set.
UNSUPPORTED_OPTIONS = (
    "use_dora",
    "layer_replication",
    "use_qalora",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
)
SUPPORTED = "a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) of plain LoRA"


def split_reference(ref: str) -> tuple[str, str | None]:
    """``(model, adapter)`` of a reference, as mergekit's ``ModelReference`` splits it.

    ``"org/base+org/lora"`` is ``("org/base", "org/lora")``; a reference without ``+`` has
    no adapter. (`pearl_edu.config_checks.model_ref` refuses more than one ``+``.)
    """
    model, plus, adapter = ref.partition("+")
    return (model, adapter) if plus else (ref, None)


def resolve_adapter(ref: str) -> Path:
    """The local folder of an adapter: ``ref`` itself, or a Hub repository's snapshot.

    A repository (``owner/name``, optionally ``@revision`` as mergekit writes it) is
    downloaded once into the Hugging Face cache, its adapter files only; offline and not
    cached, it is a one-line `HubError` (`pearl_edu.hub.download`).
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    repo, _, revision = ref.partition("@")
    if not looks_like_repo_id(repo) or (ref.count("@") and not revision):
        raise ModelError(f"adapter folder {ref} does not exist (nor is it a Hub repo id)")
    return download(repo, revision=revision or None, patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])


def read_adapters(refs: list[str], headers: Mapping[str, ModelHeader]) -> dict[str, Adapter]:
    """The adapter of each ``base+adapter`` reference among ``refs``, checked against its base."""
    adapters = {}
    for ref in refs:
        adapter_ref = split_reference(ref)[1]
        if adapter_ref is not None:
            adapters[ref] = read_adapter(resolve_adapter(adapter_ref))
            check_adapter_fits(adapters[ref], headers[ref])
    return adapters


def adapted_headers(headers: Mapping[str, Any], adapters: Mapping[str, Adapter]) -> dict[str, Any]:
    """``headers`` with each ``base+adapter`` reference's header wrapped in `AdaptedHeader`."""
    return {
        ref: AdaptedHeader(header, adapters[ref]) if ref in adapters else header
        for ref, header in headers.items()
    }


def open_reader(header: Any) -> Any:
    """The reader of a header: its own ``open_reader()`` when it has one, else `ModelReader`."""
    opener = getattr(header, "open_reader", None)
    return opener() if opener is not None else ModelReader(header)


class AdaptedHeader:
    """The header of ``base+adapter``: the base's tensors (a LoRA changes no shape).

    Everything is the wrapped header's; `open_reader` opens the wrapped header's reader
    (its own ``open_reader()`` when it has one, else a `ModelReader`) inside an
    `AdaptedReader`, so that headers and readers of other wrappers stack on it.
    """

    def __init__(self, inner: Any, adapter: Adapter) -> None:
        self.inner = inner
        self.adapter = adapter

    def open_reader(self) -> AdaptedReader:
        return AdaptedReader(open_reader(self.inner), self.adapter)

    def __getattr__(self, name: str) -> Any:  # tensors, path, config, format, files, ...
        return getattr(self.inner, name)


@dataclass(frozen=True)
class LoraChange:
    """How the adapter changes one base tensor (``target``).

    ``a``/``b`` name the LoRA factors in the adapter file, with ``scale`` and whether the
    product is transposed (embeddings, ``fan_in_fan_out``); ``bias`` names a LoRA bias
    (``lora_B.bias``) added times ``scale``; ``replacement`` names the adapter tensor that
    takes the base tensor's place first.
    """

    target: str
    a: str | None = None
    b: str | None = None
    scale: float = 1.0
    transpose: bool = False
    replacement: str | None = None
    embedding: bool = False
    bias: str | None = None


@dataclass(frozen=True)
class Adapter:
    """A validated LoRA adapter folder: its header, and the change to each base tensor."""

    path: Path
    header: ModelHeader
    changes: dict[str, LoraChange] = field(default_factory=dict)

    def fingerprint(self) -> list[Any]:
        """What identifies the adapter's bytes: its weight file's path, size and mtime."""
        stat = (self.path / ADAPTER_WEIGHTS).stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns]


def read_adapter(folder: str | Path) -> Adapter:
    """Read and check a PEFT LoRA folder; a `ModelError` naming the file otherwise."""
    folder = Path(folder)
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise ModelError(f"{folder}: no {ADAPTER_CONFIG}; expected {SUPPORTED}")
    if not weights.is_file():
        found = f"only {ADAPTER_BIN}, a pickle, " if (folder / ADAPTER_BIN).is_file() else ""
        raise ModelError(
            f"{folder}: {found}no {ADAPTER_WEIGHTS}; pearl_edu reads {SUPPORTED} (save it with "
            "save_pretrained(..., safe_serialization=True))"
        )
    config = _adapter_config(config_path)
    header = ModelHeader(
        path=folder,
        tensors={meta.name: meta for meta in safetensors_metas(weights)},
        config={},
        format="safetensors",
    )
    return Adapter(path=folder, header=header, changes=_changes(config, header, weights))


def _adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported; expected LORA "
            f"({SUPPORTED})"
        )
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ModelError(
                f"{path}: {option} is not supported; pearl_edu applies {SUPPORTED}, "
                "W + scale * (B @ A)"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ModelError(f"{path}: {key}: expected a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ModelError(f"{path}: {key}: expected a mapping of module patterns to numbers")
    return config


def _changes(
    config: Mapping[str, Any], header: ModelHeader, weights: Path
) -> dict[str, LoraChange]:
    """The change to each base tensor, from the adapter's tensor names and config.

    A saved base layer (``<module>.base_layer.weight``) replaces the base's weight first;
    the LoRA of the same module is then added to it, as PEFT loads and merges them.
    """
    factors: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    biases: dict[str, str] = {}
    for name in header.tensors:
        if not name.startswith(PREFIX):
            raise ModelError(f"{weights}: tensor {name} does not start with {PREFIX}")
        inner = name[len(PREFIX) :]
        if inner.endswith(".lora_B.bias") and config.get("lora_bias"):
            biases[inner.removesuffix(".lora_B.bias")] = name
            continue
        match = re.fullmatch(r"(.+)\.lora_(embedding_)?([AB])(\.weight)?", inner)
        if match is None:
            replacements[inner.replace(".base_layer.", ".")] = name
            continue
        module, embedding, which, suffix = match.groups()
        if bool(embedding) == bool(suffix):
            raise ModelError(f"{weights}: tensor {name} is not a LoRA factor PEFT writes")
        factors.setdefault(module, {"kind": "embedding" if embedding else "linear"})[which] = name
    changes = {
        target: LoraChange(target=target, replacement=name) for target, name in replacements.items()
    }
    for module, found in factors.items():
        if "A" not in found or "B" not in found:
            raise ModelError(f"{weights}: module {module} has lora_A or lora_B but not both")
        r, alpha = _rank_and_alpha(config, module)
        a_shape, b_shape = header.tensors[found["A"]].shape, header.tensors[found["B"]].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise ModelError(
                f"{weights}: module {module}: expected factors of rank {r} (adapter_config.json), "
                f"got A {list(a_shape)} and B {list(b_shape)}"
            )
        target = f"{module}.weight"
        changes[target] = LoraChange(
            target=target,
            a=found["A"],
            b=found["B"],
            scale=alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r,
            transpose=found["kind"] == "embedding" or bool(config.get("fan_in_fan_out")),
            replacement=replacements.get(target),
            embedding=found["kind"] == "embedding",
        )
    for module, name in biases.items():
        if module not in factors:
            raise ModelError(f"{weights}: {name} is a LoRA bias of a module without lora_A/B")
        r, alpha = _rank_and_alpha(config, module)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        target = f"{module}.bias"
        changes[target] = LoraChange(
            target=target, scale=scale, bias=name, replacement=replacements.get(target)
        )
    return changes


def _rank_and_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """A module's ``r`` and ``lora_alpha``: from the patterns first, as PEFT finds them."""
    return (
        _pattern_value(config.get("rank_pattern") or {}, module, config["r"]),
        _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]),
    )


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the module or a dotted suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def check_adapter_fits(adapter: Adapter, base: ModelHeader) -> None:
    """Every tensor the adapter changes is in the base, with the shape the change needs."""
    for target, change in adapter.changes.items():
        meta = base.tensors.get(target)
        if meta is None:
            raise ModelError(
                f"{adapter.path / ADAPTER_WEIGHTS}: changes {target}, which {base.path} lacks; "
                "is this the adapter of another model?"
            )
        if change.replacement is not None:
            shape = adapter.header.tensors[change.replacement].shape
            if shape != meta.shape:
                raise ModelError(
                    f"{adapter.path / ADAPTER_WEIGHTS}: {change.replacement} has shape "
                    f"{list(shape)}, {base.path}'s {target} {list(meta.shape)}"
                )
        if change.bias is not None and tuple(meta.shape) != tuple(
            adapter.header.tensors[change.bias].shape
        ):
            raise ModelError(
                f"{adapter.path / ADAPTER_WEIGHTS}: {change.bias} has shape "
                f"{list(adapter.header.tensors[change.bias].shape)}, {base.path}'s {target} "
                f"{list(meta.shape)}"
            )
        if change.a is not None:
            out_dim = adapter.header.tensors[change.b].shape[0]
            in_dim = adapter.header.tensors[change.a].shape[1]
            shape = (in_dim, out_dim) if change.transpose else (out_dim, in_dim)
            if tuple(meta.shape) != shape:
                raise ModelError(
                    f"{adapter.path / ADAPTER_WEIGHTS}: the LoRA of {target} makes shape "
                    f"{list(shape)}, {base.path}'s is {list(meta.shape)}"
                )


class AdaptedReader(Closing):
    """A reader of ``base+adapter``: the base's tensors, changed by the adapter when read.

    It has the interface of `pearl_edu.reading.ModelReader` (``header``, ``read``,
    ``can_map``, ``map``, ``prefetch``, ``close``) and wraps any object that has it, so
    other wrappers can stack on it or under it. A tensor the adapter changes is never
    mapped in place (its bytes are computed, not the file's); the rest pass straight
    through.
    """

    def __init__(self, inner: Any, adapter: Adapter) -> None:
        self.inner = inner
        self.adapter = adapter
        self._factors = ModelReader(adapter.header)

    @property
    def header(self) -> ModelHeader:
        return self.inner.header

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` of the adapted model, in the base's dtype and shape (see ModelReader)."""
        tensor = self.inner.read(name, out=out)
        change = self.adapter.changes.get(name)
        if change is None:
            return tensor
        changed = apply_change(tensor, change, self._factors.read)
        if out is None:
            return changed
        tensor.copy_(changed)  # in the caller's buffer, as ModelReader.read promises
        return tensor

    def can_map(self, name: str) -> bool:
        return name not in self.adapter.changes and self.inner.can_map(name)

    def map(self, name: str, *, populate: bool = False) -> torch.Tensor:
        if name in self.adapter.changes:
            raise ValueError(f"{name} is changed by {self.adapter.path}; read it instead")
        return self.inner.map(name, populate=populate)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def close(self) -> None:
        self._factors.close()
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped reader offers
        return getattr(self.inner, name)


def apply_change(weight: torch.Tensor, change: LoraChange, read: Any) -> torch.Tensor:
    """``weight`` changed as ``change`` says; ``read(name)`` gives an adapter tensor.

    PEFT's arithmetic on the CPU (``merge_and_unload``): the factors in float32 (float64
    for a float64 weight), ``delta = (B @ A)`` transposed for embeddings and
    ``fan_in_fan_out``, times the scale; then ``W + delta`` in that precision, rounded once
    (a linear layer), or ``delta`` rounded to the weight's dtype and then added (an
    embedding, as PEFT's ``Embedding.merge`` does).
    """
    if change.replacement is not None:
        weight = read(change.replacement).to(weight.dtype)
    precision = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if change.bias is not None:  # PEFT: bias += lora_B.bias * scale, rounded once
        delta = read(change.bias).to(precision) * change.scale
        return (weight.to(precision) + delta).to(weight.dtype)
    if change.a is None:
        return weight.clone()
    a = read(change.a).to(precision)
    b = read(change.b).to(precision)
    delta = b @ a
    if change.transpose:
        delta = delta.T
    delta = delta * change.scale
    if change.embedding:  # PEFT's Embedding.merge rounds the change to the weight's dtype first
        return weight + delta.to(weight.dtype)
    return (weight.to(precision) + delta).to(weight.dtype)
