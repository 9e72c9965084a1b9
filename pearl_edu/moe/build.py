"""`build_moe`: a mergekit-moe config in, a MoE model folder out, one tensor at a time.

The steps, each reporting bad input in one line before anything is written:

1. the config (`pearl_edu.moe.config`) and mergekit's checks of it;
2. every model's folder and header (no weights read), the output architecture as
   mergekit chooses it (`pearl_edu.moe.arch`: Mixtral, or Qwen2-MoE for a config with a
   shared expert) and every output tensor's name, shape and dtype
   (`pearl_edu.moe.mixtral.mixtral_layout`, `pearl_edu.moe.qwen.qwen_layout`), which checks
   that the experts have every MLP tensor, of the base's shape;
3. the routers (`pearl_edu.moe.router`): for the ``hidden`` modes a forward pass of the
   base model with transformers, loaded once; for ``cheap_embed`` the base's embeddings
   only;
4. the output, as `pearl_edu.merge` writes one (`pearl_edu.output_lock.output_transaction`):
   into a hidden ``.<name>.partial`` folder under the output's lock, shard by shard with
   pearl_edu's writer (`pearl_edu.writing.ShardedWriter`), each output tensor made from one layer's
   inputs read by `pearl_edu.reading.ModelReader`; then the files beside the weights
   (`pearl_edu.moe.files`), then the folder is published whole by a rename. An
   interrupted build rerun with the same inputs and seed resumes from its finished shards.
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

from pearl_edu._version import __version__
from pearl_edu.config import torch_dtype
from pearl_edu.hub import resolve_model
from pearl_edu.moe.arch import select_output
from pearl_edu.moe.config import (
    HIDDEN_MODES,
    RANDOM_MODES,
    Expert,
    MoEConfig,
    check_moe_config,
    load_moe_config,
)
from pearl_edu.moe.files import check_moe_output, write_moe_files
from pearl_edu.moe.mixtral import mixtral_config_text, mixtral_layout
from pearl_edu.moe.qwen import qwen_config_text, qwen_layout
from pearl_edu.moe.router import gate_vectors, warn_degenerate
from pearl_edu.moe.tensors import MoETensor, make_tensor
from pearl_edu.output import (
    output_identity,
    parse_size,
    resolve_output,
    writing,
)
from pearl_edu.output_lock import output_transaction
from pearl_edu.reading import ModelHeader, ModelReader, read_header
from pearl_edu.write_behind import progress_bar
from pearl_edu.writing import OutputTensor, Shard, ShardedWriter, layout_shards


@dataclass(frozen=True)
class MoEResult:
    """What `build_moe` wrote: the folder, its architecture, weight files, tensors, experts."""

    output_dir: Path
    architecture: str
    weight_files: tuple[str, ...]
    num_tensors: int
    num_experts: int
    resumed_tensors: int
    seconds: float


def build_moe(
    config: MoEConfig | str | Path | Mapping[str, Any],
    output_dir: str | Path,
    *,
    force: bool = False,
    copy_tokenizer: bool = True,
    shard_size: str | int = "5GB",
    allow_all_same: bool = False,
    random_seed: int = 0,
    progress: bool | None = None,
    strict: bool = False,
) -> MoEResult:
    """Build the mixture of experts of a mergekit-moe ``config`` into ``output_dir``.

    ``config`` is a `MoEConfig`, a YAML path, YAML text or a mapping. The architecture
    (Mixtral, or Qwen2-MoE with a shared expert) and the tensors are those mergekit
    0.1.5's ``mergekit-moe`` writes for the same config. Its random draws
    (``gate_mode: random`` or ``uniform_random``, ``noise_scale``) come from generators
    seeded with ``random_seed``, so the same seed gives the same model (mergekit's come
    from torch's global generator). ``allow_all_same`` is mergekit's
    ``--i-understand-this-is-not-useful-without-training``. ``force`` replaces a finished
    model folder; ``copy_tokenizer=False`` leaves out the base's tokenizer files.
    ``strict`` refuses config keys that mergekit ignores (by default, a warning each).
    """
    started = time.perf_counter()
    if not isinstance(config, MoEConfig):
        config = load_moe_config(config, strict=strict)
    check_moe_config(config, allow_all_same=allow_all_same)
    max_shard_bytes = parse_size(shard_size)
    model_dirs = {ref: resolve_model(ref) for ref in config.models()}
    given = Path(output_dir).expanduser().absolute()
    output_dir = resolve_output(output_dir)
    check_moe_output(output_dir, list(model_dirs.values()), force=force)
    headers = {ref: read_header(path) for ref, path in model_dirs.items()}
    types = {ref: str(header.config.get("model_type")) for ref, header in headers.items()}
    architecture = select_output(config, types)

    base = headers[config.base_model]
    base_dir = model_dirs[config.base_model]
    out_dtype = output_dtype(config, base)
    router_dtype = torch.bfloat16 if config.gate_mode in HIDDEN_MODES else torch.float32
    gated = gated_experts(config)
    num_experts = len(config.experts)
    if architecture == "Mixtral":
        expert_headers = [headers[e.source_model] for e in config.experts]
        layout = mixtral_layout(base, expert_headers, out_dtype, router_dtype)
        config_json = mixtral_config_text(
            base_dir, num_experts, config.experts_per_token, out_dtype
        )
    else:
        expert_headers = [headers[e.source_model] for e in gated]
        layout = qwen_layout(base, expert_headers, out_dtype, router_dtype)
        config_json = qwen_config_text(base_dir, num_experts, config.experts_per_token, out_dtype)
    gates = compute_gates(config, gated, base, base_dir, random_seed, progress)
    warn_degenerate(gates)

    shards = layout_shards(
        [OutputTensor(t.name, t.shape, t.dtype) for t in layout], max_shard_bytes
    )
    identity = build_identity(config, layout, shards, headers, random_seed, copy_tokenizer)
    inputs = list(model_dirs.values())
    check_again = functools.partial(check_moe_output, output_dir, inputs, force=force)
    with output_transaction(output_dir, identity, shards, check_again) as (partial, finished):
        resumed = _write_tensors(
            config,
            gated,
            layout,
            shards,
            headers,
            gates,
            partial,
            finished,
            random_seed=random_seed,
            progress=progress,
        )
        with writing(partial):
            write_moe_files(
                partial,
                config,
                config_json,
                base_dir,
                given.name,
                architecture=architecture,
                copy_tokenizer=copy_tokenizer,
            )
    return MoEResult(
        output_dir=given,
        architecture=architecture,
        weight_files=tuple(shard.file_name for shard in shards),
        num_tensors=len(layout),
        num_experts=len(config.experts),
        resumed_tensors=resumed,
        seconds=time.perf_counter() - started,
    )


def output_dtype(config: MoEConfig, base: ModelHeader) -> torch.dtype | None:
    """mergekit's ``select_dtype``: ``dtype:`` of the config, else the base config's dtype.

    None (neither says) keeps each tensor's own dtype, as mergekit does.
    """
    if config.dtype:
        return torch_dtype(config.dtype, where=config.source, key="dtype")
    stored = base.config.get("torch_dtype") or base.config.get("dtype")
    if stored is None:
        return None
    return torch_dtype(stored, where=f"{base.path / 'config.json'}", key="torch_dtype")


def gated_experts(config: MoEConfig) -> list[Expert]:
    """The experts that get router rows: the routed ones, then the shared ones when any
    has prompts or the gates are random, as mergekit-moe's ``build`` lists them."""
    shared = list(config.shared_experts or ())
    if any(e.positive_prompts for e in shared) or config.gate_mode in RANDOM_MODES:
        return [*config.experts, *shared]
    return list(config.experts)


def compute_gates(
    config: MoEConfig,
    gated: Sequence[Expert],
    base: ModelHeader,
    base_dir: Path,
    seed: int,
    progress: bool | None = None,
) -> torch.Tensor:
    """Every layer's router rows, (layers, gated experts, d) (`pearl_edu.moe.router`)."""
    embed = None
    if config.gate_mode == "cheap_embed":
        with ModelReader(base) as reader:
            embed = reader.read("model.embed_tokens.weight").clone()
    return gate_vectors(
        config.gate_mode,
        gated,
        base_dir=base_dir,
        embed=embed,
        num_layers=int(base.config["num_hidden_layers"]),
        hidden_size=int(base.config["hidden_size"]),
        vocab_size=int(base.config["vocab_size"]),
        seed=seed,
        progress=progress,
    )


def build_identity(
    config: MoEConfig,
    layout: Sequence[MoETensor],
    shards: Sequence[Shard],
    headers: Mapping[str, ModelHeader],
    seed: int,
    copy_tokenizer: bool,
) -> str:
    """A hash of everything that determines the output's bytes, to recognise a rerun.

    The forward pass of the ``hidden`` modes depends on transformers' version and on
    torch's thread count, so those are part of it.
    """
    import transformers

    description = {
        "version": __version__,
        "kind": "moe",
        "config": repr(config),  # every field, the YAML's text included
        "seed": seed,
        "copy_tokenizer": copy_tokenizer,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "tensors": [[t.name, list(t.shape), str(t.dtype), t.kind] for t in layout],
    }
    return output_identity(description, shards, headers)


def _write_tensors(
    config: MoEConfig,
    gated: Sequence[Expert],
    layout: Sequence[MoETensor],
    shards: Sequence[Shard],
    headers: Mapping[str, ModelHeader],
    gates: torch.Tensor,
    partial: Path,
    finished: set[str],
    *,
    random_seed: int,
    progress: bool | None,
) -> int:
    """Write every tensor not in a ``finished`` shard; returns how many were resumed."""
    shard_of = {t.name: shard.file_name for shard in shards for t in shard.tensors}
    jobs = [job for job in layout if shard_of[job.name] not in finished]
    writer = ShardedWriter(partial, shards, done=finished)
    readers = {ref: ModelReader(header) for ref, header in headers.items()}
    experts = [(expert, readers[expert.source_model]) for expert in gated]
    total = sum(shard.data_bytes for shard in shards)
    nbytes = {t.name: t.nbytes for shard in shards for t in shard.tensors}
    remaining = sum(nbytes[job.name] for job in jobs)
    bar = progress_bar(total, initial=total - remaining, enabled=progress)
    try:
        with writing(partial):
            for job in jobs:
                base = readers[config.base_model]
                num_routed = len(config.experts)
                tensor = make_tensor(job, base, experts, num_routed, gates, seed=random_seed)
                writer.write(job.name, tensor)
                bar.update(nbytes[job.name])
            writer.write_index()
    finally:
        bar.close()
        with contextlib.suppress(OSError):
            writer.close()
        for reader in readers.values():
            reader.close()
    return len(layout) - len(jobs)
