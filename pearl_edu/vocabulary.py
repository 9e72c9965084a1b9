"""Embeddings and lm_head moved into the output vocabulary, as mergekit 0.1.5 moves them.

When a config builds a tokenizer (`pearl_edu.tokenizer_build`), every model's vocabulary
tensors (``*embed_tokens.weight`` and ``lm_head.weight``: one row per token) are given one
row per output token before they are merged:

- a row the model has is its own row of that token (unless ``force: true``);
- a row it lacks is filled as mergekit's ``PermutedVocabulary`` fills it: from the only
  model that has the token, else from the base model when it has it, else the average of
  the models that have it; a token of ``tokenizer.tokens`` from its ``source`` (a model's
  row of the same token, ``{kind: model_token}``'s row, or ``{kind: zero}``); a token no
  model has is zero;
- rows past the vocabulary (``pad_to_multiple_of``) are the mean of the others.

The rows a model lacks depend on the other models' tensors of the same output tensor, so
the tensors of one output tensor are aligned together (`pearl_edu.vocabulary_rows`), when
the first of them is read, and handed out model by model.

This is done by a reader wrapper: `AlignedHeader` reports the aligned shapes (so the plan
and its shape checks see one vocabulary) and `AlignedReader` gives the aligned tensors;
every other tensor passes through to the reader it wraps, which may be any object with
`pearl_edu.reading.ModelReader`'s interface. A model with tied embeddings (no
``lm_head``) gets an ``lm_head.weight`` of its own when another model of the last slice
has one: its embeddings, aligned with the other lm_heads, as mergekit aligns them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pearl_edu.config import MergeConfig, torch_dtype
from pearl_edu.errors import ModelError
from pearl_edu.layout import LM_HEAD, TIED_TO
from pearl_edu.reading import ModelReader
from pearl_edu.tokenizer_build import (
    TOKENIZER_MARKERS,
    OutputVocabulary,
    build_vocabulary,
    tokenizer_source,
)
from pearl_edu.vocabulary_rows import align_rows


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (mergekit's ``vocabulary_axis: 0``)."""
    return name == LM_HEAD or name.endswith("embed_tokens.weight")


def open_reader(header: Any) -> Any:
    """The reader of a header: its own ``open_reader()`` when it has one, else `ModelReader`."""
    opener = getattr(header, "open_reader", None)
    return opener() if opener is not None else ModelReader(header)


class VocabularyAlignment:
    """The output vocabulary of a merge, and the aligned headers and readers of its models.

    >>> alignment = VocabularyAlignment(config, headers, model_dirs)
    >>> headers = alignment.headers  # aligned shapes, for the plan
    >>> alignment.use_plan(merge_plan)  # which tensors are merged together
    >>> readers = {ref: open_reader(h) for ref, h in headers.items()}

    Without a tokenizer option (``tokenizer_source``, ``tokenizer``) it changes nothing:
    ``headers`` are those given and ``vocabulary`` is None.
    """

    def __init__(
        self, config: MergeConfig, headers: Mapping[str, Any], model_dirs: Mapping[str, Path]
    ) -> None:
        self.config = config
        self.vocabulary: OutputVocabulary | None = None
        self.headers: dict[str, Any] = dict(headers)
        self.readers: dict[str, Any] = {}  # the wrapped readers, as they are opened
        self.groups: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self.bases: dict[tuple[tuple[str, str], ...], str | None] = {}
        self._aligned: dict[tuple[tuple[str, str], ...], dict[str, torch.Tensor]] = {}
        if tokenizer_source(config) is None:
            return
        self.vocabulary = build_vocabulary(config, headers, model_dirs)
        self.dtype = (
            torch_dtype(config.dtype, where=config.source, key="dtype") if config.dtype else None
        )
        last = config.slices[-1].models()
        heads = any(LM_HEAD in headers[model].tensors for model in last)
        # The dtype each vocabulary tensor is aligned in: the inputs' (cast to ``dtype``),
        # promoted over the models, as mergekit promotes the tensors it aligns together.
        self.row_dtypes: dict[str, torch.dtype] = {}
        for header in headers.values():
            names = {name: name for name in header.tensors if is_vocabulary_tensor(name)}
            if heads and LM_HEAD not in header.tensors and TIED_TO in header.tensors:
                names[LM_HEAD] = TIED_TO
            for name, source in names.items():
                dtype = self.dtype or header.tensors[source].dtype
                self.row_dtypes[name] = torch.promote_types(self.row_dtypes.get(name, dtype), dtype)
        self.headers = {
            model: AlignedHeader.wrap(header, model, self, model_dirs[model], tied_head=heads)
            for model, header in headers.items()
        }

    def use_plan(self, merge_plan: Any) -> None:
        """Learn, from the plan, which models' vocabulary tensors are merged together."""
        if self.vocabulary is None:
            return
        for job in merge_plan.tensors:
            if job.layer is not None or not is_vocabulary_tensor(job.name):
                continue
            group = tuple((i.model, i.tensor) for i in job.inputs)
            index = 0 if "embed" in job.name else len(self.config.slices) - 1
            base = self.config.slice_base(index)
            self.bases[group] = base if base in [model for model, _ in group] else None
            for member in group:
                self.groups[member] = group

    def aligned(self, model: str, name: str) -> torch.Tensor:
        """Model ``model``'s tensor ``name`` in the output vocabulary (aligned with its group)."""
        group = self.groups.get((model, name))
        if group is None:
            raise ModelError(f"{model}: tensor {name} is read outside the merge's plan")
        if group not in self._aligned:
            tensors = {}
            for member, tensor in group:
                header = self.headers[member]
                raw = self.readers[member].read(header.source_name(tensor))
                tensors[member] = (
                    raw.to(self.dtype) if self.dtype and raw.dtype != self.dtype else raw
                )
            self._aligned[group] = align_rows(
                tensors, name, self.vocabulary, self.config, self.bases[group]
            )
        results = self._aligned[group]
        tensor = results.pop(model)
        if not results:
            del self._aligned[group]
        return tensor


@dataclasses.dataclass(frozen=True)
class AlignedHeader:
    """A model's header with its vocabulary tensors in the output vocabulary's shape.

    ``inner`` is the header it wraps (`pearl_edu.reading.ModelHeader` or another wrapper);
    ``tensors`` are its tensors, the vocabulary ones with the output's row count and the
    dtype they are merged in. ``files`` adds the model's tokenizer files to its weight
    files: they change the output too.
    """

    inner: Any
    model: str
    alignment: VocabularyAlignment
    tensors: dict[str, Any]
    tokenizer_files: tuple[Path, ...]

    @classmethod
    def wrap(
        cls, inner: Any, model: str, alignment: VocabularyAlignment, folder: Path, tied_head: bool
    ) -> AlignedHeader:
        vocabulary = alignment.vocabulary
        tensors = dict(inner.tensors)
        if tied_head and LM_HEAD not in tensors and TIED_TO in tensors:
            tensors[LM_HEAD] = dataclasses.replace(inner.tensors[TIED_TO], name=LM_HEAD)
        for name, meta in tensors.items():
            if is_vocabulary_tensor(name) and len(meta.shape) >= 1:
                dtype = alignment.row_dtypes[name]
                shape = (vocabulary.rows, *meta.shape[1:])
                nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
                tensors[name] = dataclasses.replace(
                    meta, shape=shape, dtype=dtype, nbytes=nbytes, offset=None
                )
                check_rows(
                    model,
                    name,
                    inner.tensors[name if name in inner.tensors else TIED_TO],
                    vocabulary.permutations[model],
                )
        files = tuple(folder / name for name in TOKENIZER_MARKERS if (folder / name).is_file())
        return cls(inner, model, alignment, tensors, files)

    @property
    def path(self) -> Path:
        return self.inner.path

    @property
    def config(self) -> dict:
        return self.inner.config

    @property
    def format(self) -> str:
        return self.inner.format

    @property
    def files(self) -> list[Path]:
        return [*self.inner.files, *self.tokenizer_files]

    @property
    def total_bytes(self) -> int:
        return sum(meta.nbytes for meta in self.tensors.values())

    def is_aligned(self, name: str) -> bool:
        return is_vocabulary_tensor(name) and name in self.tensors

    def source_name(self, name: str) -> str:
        """The wrapped model's tensor behind ``name`` (the embeddings for a tied lm_head)."""
        return name if name in self.inner.tensors else TIED_TO

    def open_reader(self) -> AlignedReader:
        inner = open_reader(self.inner)
        self.alignment.readers[self.model] = inner
        return AlignedReader(inner, self)


class AlignedReader:
    """`pearl_edu.reading.ModelReader`'s interface over an `AlignedHeader`.

    Vocabulary tensors come aligned (`VocabularyAlignment.aligned`), copied into ``out``
    when given; the rest are the wrapped reader's.
    """

    def __init__(self, inner: Any, header: AlignedHeader) -> None:
        self.inner = inner
        self.header = header

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.header.is_aligned(name):
            return self.inner.read(name, out=out)
        tensor = self.header.alignment.aligned(self.header.model, name)
        meta = self.header.tensors[name]
        if out is None:
            return tensor.to(meta.dtype)
        view = out[: meta.nbytes].view(meta.dtype).view(meta.shape)
        view.copy_(tensor)
        return view

    def can_map(self, name: str) -> bool:
        return not self.header.is_aligned(name) and self.inner.can_map(name)

    def map(self, name: str, *, populate: bool = False) -> torch.Tensor:
        return self.inner.map(name, populate=populate)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(self.header.source_name(name) if self.header.is_aligned(name) else name)

    def cached(self, name: str) -> bool:
        return self.header.is_aligned(name) or self.inner.cached(name)

    def read_past_cache(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return (
            self.read(name, out)
            if self.header.is_aligned(name)
            else self.inner.read_past_cache(name, out)
        )

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> AlignedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_rows(model: str, name: str, meta: Any, permutation: Sequence[int]) -> None:
    """Refuse a tensor with fewer rows than the model's vocabulary gives its tokens."""
    needed = max(permutation, default=-1) + 1
    if meta.shape[0] < needed:
        raise ModelError(
            f"{model}: tensor {name} has {meta.shape[0]} rows, but its tokenizer and "
            f"vocab_size give tokens up to id {needed - 1}"
        )
