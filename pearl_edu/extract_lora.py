"""Extract a LoRA adapter from a fine-tune: ``pearl-edu extract-lora``.

The counterpart of mergekit 0.1.5's ``mergekit-extract-lora``: the change a fine-tune made
to each linear layer, its task vector ``Δ = W_model − W_base``, is replaced by its best
rank-r approximation, the truncated SVD ``Δ ≈ U_r Σ_r V_rᵀ`` (Eckart–Young: no rank-r
matrix is closer, and the Frobenius error is the root sum of squares of the singular
values left out). With the scale spread over both factors (mergekit's default,
``distribute_scale``) the adapter stores

    A = √Σ_r V_rᵀ   (r × in),        B = U_r √Σ_r   (out × r),

so that ``B @ A = U_r Σ_r V_rᵀ``; without it ``A = Σ_r V_rᵀ`` and ``B = U_r``. The SVD runs
in float32 and the factors are stored in the task vector's dtype, as mergekit does.
``lora_alpha`` equals each module's rank, so PEFT's scale is 1.

What is not a linear layer is mergekit's too: the input and output embeddings are saved
whole in ``modules_to_save`` (or, with ``embed_lora``, the input embedding is decomposed
as PEFT's embedding LoRA, transposed), and other weights (norms) are saved whole
(``modules_to_save``) unless ``skip_undecomposable``. A decomposed layer's bias is saved as
its task vector, ``lora_B.bias``, with ``lora_bias`` set so that PEFT (and
`pearl_edu.adapters`) apply it. pearl_edu tells embeddings apart by their module's name
(``embed_tokens``, ``wte``, ``word_embeddings``, ``embed_in``; ``lm_head``, ``embed_out``),
where mergekit asks transformers for the model's classes.

The work streams module by module: two tensors are read, one SVD is computed, the factors
are written, and the folder appears whole at the end. The output is a PEFT adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``) that
``model: base+adapter`` applies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pearl_edu.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PREFIX,
    adapted_headers,
    open_reader,
    read_adapters,
    split_reference,
)
from pearl_edu.errors import ConfigError, ModelError, OutputError
from pearl_edu.hub import resolve_model
from pearl_edu.output import writing
from pearl_edu.reading import read_header
from pearl_edu.writing import OutputTensor, Shard, ShardedWriter, safetensors_header

EMBEDDING_KEYS = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in"})
OUTPUT_EMBEDDING_KEYS = frozenset({"lm_head", "embed_out"})


@dataclass(frozen=True)
class ExtractOptions:
    """mergekit-extract-lora's options, with its defaults."""

    rank: int
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    include_regexes: tuple[str, ...] = ()
    exclude_regexes: tuple[str, ...] = ()
    sv_epsilon: float = 0.0
    skip_undecomposable: bool = False


@dataclass(frozen=True)
class ModuleJob:
    """One module of the fine-tune: decomposed (``lora``, ``embedding``) or ``save``d whole."""

    module: str
    kind: str
    tensors: tuple[str, ...]  # the fine-tune's tensors of the module (weight, then bias)
    rank: int = 0


def extract_lora(
    model: str, base: str, output_dir: str | Path, options: ExtractOptions, *, force: bool = False
) -> Path:
    """Write the LoRA adapter that takes ``base`` to ``model`` into ``output_dir``.

    ``model`` and ``base`` are model references (folders, Hub ids, ``+adapter`` forms).
    Returns the adapter folder. Bad input is a one-line `ModelError` or `OutputError`
    before anything is written; the folder appears only when complete.
    """
    if options.rank < 1:
        raise ConfigError(f"--rank {options.rank}: expected a positive whole number")
    for flag, patterns in (
        ("--include-regex", options.include_regexes),
        ("--exclude-regex", options.exclude_regexes),
    ):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{flag} {pattern!r}: not a regular expression ({err})") from None
    refs = [model, base]
    dirs = {ref: resolve_model(split_reference(ref)[0]) for ref in refs}
    headers = {ref: read_header(path) for ref, path in dirs.items()}
    headers = adapted_headers(headers, read_adapters(refs, headers))
    output = Path(output_dir).expanduser().absolute()
    _check_output(output, list(dirs.values()), force=force)
    readers = {ref: open_reader(header) for ref, header in headers.items()}
    try:
        jobs = plan_extraction(options, readers[model], readers[base])
        tensors = _output_tensors(jobs, headers[model], headers[base])
        partial = output.parent / f".{output.name}.partial"
        with writing(partial):
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            shard = Shard(ADAPTER_WEIGHTS, tuple(tensors), safetensors_header(tensors))
            writer = ShardedWriter(partial, [shard])
            try:
                for job in jobs:
                    for name, tensor in _job_tensors(job, readers[model], readers[base], options):
                        writer.write(name, tensor)
            finally:
                writer.close()
            config = adapter_config(base, jobs, options)
            (partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
            (partial / "README.md").write_text(_card(model, base, config))
            if output.exists():
                shutil.rmtree(output)
            os.replace(partial, output)
    finally:
        for reader in readers.values():
            reader.close()
    return output


def plan_extraction(options: ExtractOptions, model_reader, base_reader) -> list[ModuleJob]:
    """Which modules are decomposed and which saved whole, as mergekit decides it.

    The readers' headers say which tensors there are; the tensors are read only with
    ``sv_epsilon``, whose ranks depend on the singular values.
    """
    model, base = model_reader.header, base_reader.header
    modules: dict[str, list[str]] = {}
    for name in model.tensors:
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    save = set(options.modules_to_save)
    embed_lora = options.embed_lora and _same_vocabulary(model, base)
    jobs = []
    for module, names in modules.items():
        key = module.split(".")[-1]
        weight = f"{module}.weight"
        tensors = tuple(sorted(names, key=lambda n: n != weight))
        is_embedding, is_output = key in EMBEDDING_KEYS, key in OUTPUT_EMBEDDING_KEYS
        excluded = any(re.search(r, module) for r in options.exclude_regexes)
        if not embed_lora and (is_embedding or is_output) and not excluded:
            save.add(key)
        if module in save or key in save:
            jobs.append(ModuleJob(module, "save", tensors))
            continue
        if not _should_extract(module, options):
            continue
        decomposable = set(names) <= {weight, f"{module}.bias"}
        if weight in names and len(model.tensors[weight].shape) == 2 and decomposable:
            kind = "embedding" if is_embedding else "lora"
            rank = _rank(module, kind, options, model_reader, base_reader)
            jobs.append(ModuleJob(module, kind, tensors, rank))
        elif not options.skip_undecomposable:
            save.add(key)
            jobs.append(ModuleJob(module, "save", tensors))
    if not any(job.kind != "save" for job in jobs):
        raise ModelError("no linear layer to decompose: every module is saved whole or excluded")
    return jobs


def _should_extract(module: str, options: ExtractOptions) -> bool:
    if options.include_regexes and not any(re.search(r, module) for r in options.include_regexes):
        return False
    return not any(re.search(r, module) for r in options.exclude_regexes)


def _same_vocabulary(model, base) -> bool:
    """mergekit saves the embeddings whole when the vocabularies differ, even with embed_lora."""

    def rows(header) -> set[int]:
        return {
            meta.shape[0]
            for name, meta in header.tensors.items()
            if name.endswith(".weight") and name.split(".")[-2] in EMBEDDING_KEYS
        }

    return rows(model) == rows(base)


def _rank(module: str, kind: str, options: ExtractOptions, model, base) -> int:
    """The module's rank: ``rank``, at most the matrix's, fewer with ``sv_epsilon``.

    Known before any factor is written (the file's header comes first): without
    ``sv_epsilon`` from the shapes; with it, from the singular values (a first pass).
    """
    weight = f"{module}.weight"
    shape = model.header.tensors[weight].shape
    rank = min(options.rank, *shape)
    if options.sv_epsilon > 0:
        values = torch.linalg.svdvals(_task_vector(model, base, weight, kind).to(torch.float32))
        rank = min(int((values > options.sv_epsilon).sum()), rank)
    return rank


def _task_vector(model, base, name: str, kind: str) -> torch.Tensor:
    """``model − base`` in their dtypes (mergekit's TaskVectorTask), transposed for embeddings."""
    if name not in base.header.tensors:
        raise ModelError(f"{base.header.path}: has no tensor named {name}, which the model has")
    after, before = model.read(name), base.read(name)
    if after.shape != before.shape:
        raise ModelError(
            f"{name}: shape {list(after.shape)} in the model, {list(before.shape)} in the base; "
            "a layer can only be decomposed when both have the same shape (save it whole with "
            "--save-module)"
        )
    delta = after - before
    return delta.T if kind == "embedding" else delta


def decompose(
    delta: torch.Tensor, rank: int, *, distribute_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``.

    mergekit's TaskVectorDecompositionTask: the SVD in float32, the factors in ``delta``'s
    dtype; with ``distribute_scale`` each factor carries √Σ, else A carries Σ.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    if distribute_scale:
        scale_a = scale_b = torch.diag(torch.sqrt(s[:rank]))
    else:
        scale_a, scale_b = torch.diag(s[:rank]), torch.eye(rank)
    a = scale_a @ vh[:rank]
    b = u[:, :rank] @ scale_b
    return a.to(delta.dtype), b.to(delta.dtype)


def _output_tensors(jobs: Sequence[ModuleJob], model, base) -> list[OutputTensor]:
    """Names, shapes and dtypes of the adapter's tensors, in the order they are written."""
    tensors = []
    for job in jobs:
        weight = model.tensors[f"{job.module}.weight"] if job.kind != "save" else None
        if job.kind == "save":
            tensors += [
                OutputTensor(PREFIX + n, tuple(model.tensors[n].shape), model.tensors[n].dtype)
                for n in job.tensors
            ]
            continue
        dtype = torch.promote_types(weight.dtype, base.tensors[weight.name].dtype)
        out_dim, in_dim = weight.shape
        if job.kind == "embedding":
            out_dim, in_dim = in_dim, out_dim
        label = "lora_embedding_{}" if job.kind == "embedding" else "lora_{}.weight"
        tensors.append(OutputTensor(_name(job, label, "A"), (job.rank, in_dim), dtype))
        tensors.append(OutputTensor(_name(job, label, "B"), (out_dim, job.rank), dtype))
        for bias in job.tensors[1:]:
            meta = model.tensors[bias]
            bias_dtype = torch.promote_types(meta.dtype, base.tensors[bias].dtype)
            tensors.append(
                OutputTensor(f"{PREFIX}{job.module}.lora_B.bias", meta.shape, bias_dtype)
            )
    return tensors


def _name(job: ModuleJob, label: str, which: str) -> str:
    return f"{PREFIX}{job.module}.{label.format(which)}"


def _job_tensors(job: ModuleJob, model, base, options: ExtractOptions):
    """The adapter tensors of one module, computed as they are written."""
    if job.kind == "save":
        for name in job.tensors:
            yield PREFIX + name, model.read(name)
        return
    delta = _task_vector(model, base, job.tensors[0], job.kind)
    a, b = decompose(delta, job.rank, distribute_scale=options.distribute_scale)
    label = "lora_embedding_{}" if job.kind == "embedding" else "lora_{}.weight"
    yield _name(job, label, "A"), a
    yield _name(job, label, "B"), b
    for bias in job.tensors[1:]:
        yield f"{PREFIX}{job.module}.lora_B.bias", _task_vector(model, base, bias, "bias")


def adapter_config(base: str, jobs: Sequence[ModuleJob], options: ExtractOptions) -> dict:
    """adapter_config.json as mergekit's make_config_dict writes it (``lora_bias`` added)."""
    ranks = {job.module: job.rank for job in jobs if job.kind != "save"}
    top = max(ranks.values())
    others = {module: rank for module, rank in ranks.items() if rank != top}
    saved = sorted({job.module.split(".")[-1] for job in jobs if job.kind == "save"})
    return {
        "base_model_name_or_path": split_reference(base)[0],
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({module.split(".")[-1] for module in ranks}),
        "modules_to_save": saved,
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": others,
        "alpha_pattern": others,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_bias": any(len(job.tensors) > 1 for job in jobs if job.kind != "save"),
    }


def _check_output(output: Path, inputs: list[Path], *, force: bool) -> None:
    for folder in inputs:
        if output == folder or folder.resolve() in output.resolve().parents:
            raise OutputError(f"{output}: lies inside the input {folder}; choose another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not force:
            raise OutputError(f"{output}: exists and is not empty; give --force to replace it")
        if not (output / ADAPTER_CONFIG).is_file():
            raise OutputError(
                f"{output}: exists and is not an adapter folder (no {ADAPTER_CONFIG}); "
                "--force replaces only an adapter folder"
            )


def _card(model: str, base: str, config: dict) -> str:
    return (
        f"---\nbase_model: {split_reference(base)[0]}\nlibrary_name: peft\ntags:\n"
        "- pearl-edu\n- lora\n---\n\n"
        f"# LoRA extracted from {model}\n\n"
        f"The rank-{config['r']} LoRA that takes [{base}]({base}) to {model}: the truncated "
        "SVD of each linear layer's task vector, extracted with `pearl-edu extract-lora` "
        "(mergekit-extract-lora's counterpart). Apply it with `model: base+adapter` in a "
        "merge config, or with PEFT.\n"
    )
