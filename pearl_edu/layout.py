"""A model's tensors as the plan sees them: sorted into layers and the rest, by name.

Architectures are recognised by tensor names, not by a list of model types: anything named
``<prefix>.layers.<i>.<rest>`` is a layer tensor (Llama, Mistral, Qwen2 and their kin); the
other tensors are embeddings (names containing ``embed``) or come after the layers. Only the
headers are needed (names, shapes, dtypes), never a weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pearl_edu.errors import ModelError

LM_HEAD = "lm_head.weight"
# A model with tied embeddings has no lm_head; its input embeddings play that role.
TIED_TO = "model.embed_tokens.weight"
LAYER_TENSOR = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Buffers that some checkpoints store but that are not weights; mergekit skips them too.
NOT_WEIGHTS = ("rotary_emb.inv_freq",)


class TensorInfo(Protocol):
    """What the plan needs of one tensor in a header: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Header(Protocol):
    """What the plan needs of a model header (see :func:`pearl_edu.reading.read_header`)."""

    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, Any]


@dataclass(frozen=True)
class TensorInput:
    """One input of an output tensor: which tensor of which model."""

    model: str
    tensor: str


@dataclass(frozen=True)
class ModelLayout:
    """A model's tensors sorted into layers and the rest, recognised by their names."""

    model: str
    tensors: Mapping[str, TensorInfo]
    layer_prefix: str
    layers: tuple[tuple[str, ...], ...]  # per layer index, the names after the index
    outside: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        """How many layers the model has (counted from its tensor names)."""
        return len(self.layers)

    def layer_tensor(self, index: int, rest: str) -> str:
        """Full name of a tensor of layer ``index``, e.g. ``model.layers.3.mlp.up_proj.weight``."""
        return f"{self.layer_prefix}.{index}.{rest}"


def model_layout(model: str, header: Header) -> ModelLayout:
    """Sort a model's tensor names into layers and the tensors outside them."""
    by_layer: dict[int, list[str]] = {}
    prefixes = set()
    outside = []
    for name in header.tensors:
        if name.endswith(NOT_WEIGHTS):
            continue
        match = LAYER_TENSOR.match(name)
        if match is None:
            outside.append(name)
            continue
        prefixes.add(match["prefix"])
        by_layer.setdefault(int(match["index"]), []).append(match["rest"])
    if len(prefixes) > 1:
        raise ModelError(f"{model}: layers under several prefixes ({', '.join(sorted(prefixes))})")
    count = max(by_layer, default=-1) + 1
    missing = [i for i in range(count) if i not in by_layer]
    if missing:
        raise ModelError(f"{model}: no tensors for layer {missing[0]} of {count}")
    declared = header.config.get("num_hidden_layers")
    if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool)):
        kinds = {str: "a string", float: "a number", bool: "a boolean", list: "a list"}
        kind = kinds.get(type(declared), "an object")
        raise ModelError(
            f"{model}: config.json: num_hidden_layers is {repr(declared)[:60]} ({kind}); "
            "expected an integer"
        )
    if declared is not None and declared != count:
        raise ModelError(
            f"{model}: config.json says num_hidden_layers={declared!r} but the weights have "
            f"{count} layers"
        )
    return ModelLayout(
        model=model,
        tensors=header.tensors,
        layer_prefix=prefixes.pop() if prefixes else "model.layers",
        layers=tuple(tuple(sorted(by_layer[i], key=natural_key)) for i in range(count)),
        outside=tuple(outside),
    )


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``experts.2`` before ``experts.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
