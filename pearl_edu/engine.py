"""The streaming merge: config -> plan -> read -> math -> write, one tensor at a time.

The heart of this module is the loop in `merge`::

    for job, inputs, hosts in read_ahead(jobs, readers, dtype=..., device=...):
        result = outputs.take(job.nbytes)  # a reused buffer, viewed as the output tensor
        ready = merge_into(result, job, inputs, hosts)  # merge_tensor: the method's math
        write_behind.write(job.name, result, ready=ready)  # hands the buffer back once written

Each step lives in a module of its own, and this one only puts them in order:

- **config** (`pearl_edu.config`) and **plan** (`pearl_edu.plan`): every mistake is
  reported before anything is written;
- **read** (`pearl_edu.read_ahead`) and **write** (`pearl_edu.write_behind`): inputs read
  ahead in a background thread, results written behind by another, into reused buffers, so
  memory stays at a few tensors and the disk and the math overlap;
- **the process's settings** (`pearl_edu.process_settings`): the math's CPU threads for
  the length of the merge, and the allocator tuning that only the command applies;
- **math** (`pearl_edu.methods`, over `pearl_edu.core` and `pearl_edu.backends`);
- **the output folder** (`pearl_edu.output`): written hidden, resumed after a crash,
  published by a rename only when complete; failed writes are one-line `OutputError`s;
- **the files beside the weights** (`pearl_edu.card`): config.json, tokenizer, model card.

Around the loop, the reader thread prepares the next tensor's inputs while the current one
is merged, `pearl_edu.read_ahead.READ_AHEAD_BYTES` ahead at most (in place from the page
cache where they are cached, else read past it by direct I/O into reused buffers:
`pearl_edu.page_cache`); the writer thread writes each result, from one of two reused
buffers, past the page cache while the next is merged;
the CPU math's threads live as long as the merge. On a GPU, inputs go up and results come
down on copy streams of their own, ordered by events (`CudaTransfers`), so the merging
thread never waits for a copy. Fresh memory and the page cache are avoided because on the
machines measured (see the book's performance appendix) touching new pages cost as much as
the arithmetic. A merge leaves the process as it found it: its threads stopped, torch's
thread settings restored, glibc's allocator left alone.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pearl_edu.adapters import adapted_headers, read_adapters, split_reference
from pearl_edu.backends import BACKENDS
from pearl_edu.backends.cpu import host_copies
from pearl_edu.card import write_model_files
from pearl_edu.config import MergeConfig, load_config, torch_dtype
from pearl_edu.devices import choose_device
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.finite import check_finite
from pearl_edu.hub import resolve_model
from pearl_edu.methods import merge_tensor
from pearl_edu.output import (
    check_output_dir,
    merge_identity,
    parse_size,
    resolve_output,
    writing,
)
from pearl_edu.output_lock import output_transaction
from pearl_edu.process_settings import check_threads, math_threads, threads_used
from pearl_edu.read_ahead import CudaTransfers, read_ahead, transfers_for
from pearl_edu.reading import ModelHeader, read_header
from pearl_edu.tensor_plan import MergePlan, TensorPlan, plan
from pearl_edu.tokenizer_build import OutputVocabulary
from pearl_edu.vocabulary import VocabularyAlignment, open_reader
from pearl_edu.write_behind import OutputBuffers, WriteBehind, aligned_view, progress_bar
from pearl_edu.writing import DIRECT_ALIGNMENT, OutputTensor, Shard, ShardedWriter, layout_shards


@dataclass(frozen=True)
class MergeResult:
    """What `merge` did: where the model is, what was written and how long it took."""

    output_dir: Path
    weight_files: tuple[str, ...]
    num_tensors: int
    bytes_written: int
    resumed_tensors: int  # taken from shards finished by an earlier, interrupted run
    device: torch.device
    seconds: float
    device_reason: str = ""  # why the merge ran on ``device`` (`pearl_edu.devices.choose_device`)


def merge(
    config: MergeConfig | str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool | None = None,
    threads: int | None = None,
    copy_tokenizer: bool = True,
    fast_trim: bool = False,
    backend: str = "auto",
    allow_nonfinite: bool = False,
    strict: bool = False,
) -> MergeResult:
    """Merge the models of ``config`` into the Hugging Face model folder ``output_dir``.

    ``config`` is a `MergeConfig`, or anything `load_config` accepts (a YAML path, YAML
    text, a shipped recipe's name), read with ``strict`` (keys mergekit ignores refused).
    ``progress=None`` shows a progress bar only on a terminal; ``False`` never.
    ``copy_tokenizer=False`` leaves out the base model's tokenizer and generation config,
    as mergekit's ``--no-copy-tokenizer`` does; a tokenizer built from the config's
    ``tokenizer_source`` or ``tokenizer:`` is written all the same, as in mergekit
    (`pearl_edu.vocabulary`, which also merges models with different vocabularies).
    ``fast_trim=True`` breaks TIES' ties at its cut by position (see `merge_tensor`).
    ``threads`` is how many CPU threads the math may use on the CPU; by default torch's,
    as mergekit (see `math_threads`). ``device="auto"`` picks the device by the merge
    method (`pearl_edu.devices.choose_device`; the result says which and why).
    ``backend`` (`pearl_edu.backends`): ``"auto"`` runs the math where the device is (on a
    GPU, to the contract of `pearl_edu.backends.device`), ``"cpu"`` gives mergekit 0.1.5's
    bits on any device (``pearl-edu merge --backend cpu``), ``"reference"`` runs the core
    itself, as the book prints it (the same bits as ``"cpu"``, slowly), ``"device"`` the
    GPU's math on any device, the CPU included (to check that contract without a GPU).

    Bad input raises a `PearlEduError` before anything is written. ``force`` replaces an
    existing output folder only when it is a finished model folder
    (`pearl_edu.output.replaceable_model`). A merged tensor with an infinite or NaN value
    stops the merge with a `ConfigError` naming it (nothing is published), unless
    ``allow_nonfinite``, which publishes it with a `NonFiniteWarning`. The merge holds an
    exclusive lock on ``output_dir`` while it runs (`pearl_edu.output_lock.output_lock`).

    A call leaves the process as it found it: the threads it starts (reader, writer, the
    math's helper) are stopped before it returns, torch's thread settings are restored,
    and glibc's allocator is left as it is. The ``pearl-edu merge`` command alone tunes the
    allocator, for its own process, to keep the resident memory at a few tensors
    (`pearl_edu.process_settings.return_freed_memory_to_the_system`, which cannot be undone).
    """
    started = time.perf_counter()
    # config -> plan: every mistake is reported here, before anything is written.
    if not isinstance(config, MergeConfig):
        config = load_config(config, strict=strict)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not understood: expected one of {BACKENDS}")
    check_threads(threads)
    choice = choose_device(device, config.merge_method)
    compute_device = choice.device
    max_shard_bytes = parse_size(shard_size)
    compute_dtype = (
        torch_dtype(config.dtype, where=config.source, key="dtype") if config.dtype else None
    )
    # A `base+adapter` reference reads its base's folder, changed by the adapter as read.
    model_dirs = {ref: resolve_model(split_reference(ref)[0]) for ref in config.models()}
    given = Path(output_dir).expanduser().absolute()
    output_dir = resolve_output(output_dir)  # a symlink is written through
    check_output_dir(output_dir, model_dirs.values(), force=force)
    headers = {ref: read_header(path) for ref, path in model_dirs.items()}
    adapters = read_adapters(config.models(), headers)
    check_output_dir(output_dir, [adapter.path for adapter in adapters.values()], force=force)
    headers = adapted_headers(headers, adapters)
    # With a tokenizer option, the vocabulary tensors are read in the output's vocabulary.
    vocabulary = VocabularyAlignment(config, headers, model_dirs)
    headers = vocabulary.headers
    merge_plan = plan(config, headers)
    vocabulary.use_plan(merge_plan)
    check_input_shapes(merge_plan.tensors, headers)

    # The output files are laid out in advance; an interrupted run may have finished some.
    shards = layout_shards(
        [OutputTensor(job.name, tuple(job.shape), job.dtype) for job in merge_plan.tensors],
        max_shard_bytes,
    )
    options = {
        "fast_trim": fast_trim,
        "backend": backend,
        "device": str(compute_device),
        "threads": threads_used(threads, compute_device),
        "adapters": {ref: adapter.fingerprint() for ref, adapter in adapters.items()},
    }
    identity = merge_identity(merge_plan, shards, headers, options)
    # Checked again under the lock, when no other merge can change the folder.
    check_again = functools.partial(check_output_dir, output_dir, model_dirs.values(), force=force)
    with output_transaction(output_dir, identity, shards, check_again) as (partial, finished):
        result = _merge_into(
            config,
            merge_plan,
            headers,
            model_dirs,
            shards,
            partial,
            finished,
            given.name,
            compute_device=compute_device,
            compute_dtype=compute_dtype,
            progress=progress,
            threads=threads,
            copy_tokenizer=copy_tokenizer,
            fast_trim=fast_trim,
            backend=backend,
            allow_nonfinite=allow_nonfinite,
            vocabulary=vocabulary.vocabulary,
        )
    jobs_done, resumed = result
    return MergeResult(
        output_dir=given,
        weight_files=tuple(shard.file_name for shard in shards),
        num_tensors=len(merge_plan.tensors),
        bytes_written=jobs_done,
        resumed_tensors=resumed,
        device=compute_device,
        seconds=time.perf_counter() - started,
        device_reason=choice.reason,
    )


def _merge_into(
    config: MergeConfig,
    merge_plan: MergePlan,
    headers: Mapping[str, ModelHeader],
    model_dirs: Mapping[str, Path],
    shards: Sequence[Shard],
    partial: Path,
    finished: set[str],
    model_name: str,
    *,
    compute_device: torch.device,
    compute_dtype: torch.dtype | None,
    progress: bool | None,
    threads: int | None,
    copy_tokenizer: bool,
    fast_trim: bool,
    backend: str,
    allow_nonfinite: bool,
    vocabulary: OutputVocabulary | None = None,
) -> tuple[int, int]:
    """The merge proper, into the ``partial`` folder of `output_transaction`: returns
    (bytes written, tensors resumed).

    The shards named in ``finished`` are already there, from an interrupted run of the
    same merge; every other tensor is read, merged and written, then the files beside
    the weights.
    """
    shard_of = {t.name: shard.file_name for shard in shards for t in shard.tensors}
    jobs = [job for job in merge_plan.tensors if shard_of[job.name] not in finished]

    # read -> math -> write, one tensor at a time.
    writer = ShardedWriter(partial, shards, done=finished)
    readers = {ref: open_reader(header) for ref, header in headers.items()}
    total = sum(shard.data_bytes for shard in shards)
    remaining = sum(job.nbytes for job in jobs)
    bar = progress_bar(total, initial=total - remaining, enabled=progress)
    write_behind = WriteBehind(writer)
    transfers = transfers_for(compute_device)  # streams and events on a GPU, else None
    outputs = OutputBuffers(pinned=compute_device.type == "cuda")
    base_dir = model_dirs[merge_plan.base_model]
    try:
        with math_threads(threads, compute_device):
            for job, inputs, hosts in read_ahead(
                jobs, readers, dtype=compute_dtype, device=compute_device, transfers=transfers
            ):
                buffer = outputs.take(job.nbytes + DIRECT_ALIGNMENT)
                result = aligned_view(buffer, job, writer.file_offset(job.name))
                ready = merge_into(
                    result,
                    job,
                    inputs,
                    hosts,
                    fast_trim=fast_trim,
                    backend=backend,
                    transfers=transfers,
                    allow_nonfinite=allow_nonfinite,
                )
                write_behind.write(
                    job.name, result, then=functools.partial(outputs.give, buffer), ready=ready
                )
                bar.update(job.nbytes)
            write_behind.finish()
    finally:
        bar.close()
        write_behind.close()
        with contextlib.suppress(OSError):  # an abandoned shard: the error is raised
            writer.close()
        for reader in readers.values():
            reader.close()
    # The files beside the weights (output_transaction then publishes the folder).
    with writing(partial):
        writer.write_index()
        write_model_files(
            partial,
            config,
            merge_plan,
            base_dir,
            model_name,
            copy_tokenizer,
            model_dirs=model_dirs,
            vocabulary=vocabulary,
        )
    return remaining, len(merge_plan.tensors) - len(jobs)


def merge_into(
    result: torch.Tensor,
    job: TensorPlan,
    inputs: list[torch.Tensor],
    hosts: Sequence[torch.Tensor | None] | None = None,
    *,
    fast_trim: bool = False,
    backend: str = "auto",
    transfers: CudaTransfers | None = None,
    allow_nonfinite: bool = False,
) -> Any:
    """The math of one output tensor, written into ``result`` (a reused output buffer).

    ``hosts`` are the inputs' host copies, None for an input on the CPU (`read_ahead`):
    the CPU backend's sums on a GPU are taken from them
    (`pearl_edu.backends.cpu.host_copies`). Returns None when ``result`` holds the values
    on return, or, with ``transfers`` (on a GPU), the event of the download that fills it
    (see `WriteBehind.write`). A result with an infinite or NaN value is refused
    (`check_finite`).
    """
    base = inputs[job.base_index]
    direct = transfers is None and base.device == result.device and base.dtype == job.dtype
    with host_copies(inputs, hosts if hosts is not None else [None] * len(inputs)):
        merged = merge_tensor(
            job.method,
            inputs,
            job.base_index,
            job.params,
            input_params=job.input_params or None,
            seed=job.seed,
            name=job.name,
            out=result if direct else None,
            fast_trim=fast_trim,
            backend=backend,
        )
    check_finite(merged, job, inputs, allow=allow_nonfinite)
    if merged is result:
        return None
    if transfers is not None:
        return transfers.download(merged, result)
    result.copy_(merged)  # a cast, a copy from the GPU, or an input itself
    return None


# --------------------------------------------------------------------------------------
# Checks made before anything is written
# --------------------------------------------------------------------------------------


def check_input_shapes(jobs: Sequence[TensorPlan], headers: Mapping[str, ModelHeader]) -> None:
    """Refuse, before reading any weight, to merge tensors whose shapes differ."""
    for job in jobs:
        shapes = {i.model: headers[i.model].tensors[i.tensor].shape for i in job.inputs}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{model} {list(shape)}" for model, shape in shapes.items())
            raise ModelError(
                f"{job.name}: shapes differ ({listed}); merge only models of the same "
                "architecture and size (for different vocabularies, give tokenizer_source: "
                "union, base or a model)"
            )
