"""Write a pair of Mistral-7B-shaped random models, fast, deterministically, tensor by tensor.

    python bench/make_models.py OUT_DIR --layers 2

writes ``OUT_DIR/model_a`` and ``OUT_DIR/model_b``: Hugging Face folders with Mistral-7B's
shapes (hidden 4096, intermediate 14336, 32/8 heads, vocab 32000) and ``--layers`` decoder
layers, bfloat16 safetensors shards plus an index (``--dtypes float16,bfloat16`` gives each
model a dtype of its own, as Pearl's parents have). ``model_b`` is ``model_a`` plus noise,
like two fine-tunes of one parent: SLERP sees an angle of about 27 degrees, well away
from its linear fallback. One tensor of each model is in memory at a time, so the full
32-layer pair (2 x 14.5 GB) can be made on a machine with a few GB of RAM.

Shape arguments let tests make the same kind of pair at toy size.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pearl_edu.teaching.toy import hf_config, tensor_shapes  # noqa: E402

# Mistral-7B-v0.1, the shape of both of Pearl-7B-slerp's parents.
MISTRAL_7B = dict(
    hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=32000
)
INIT_STD = 0.02
NORM_SPREAD = 0.1
# model_b = model_a + SIBLING_NOISE * N(0, std^2): cos(angle) = 1 / sqrt(1 + 0.5^2) = 0.89.
SIBLING_NOISE = 0.5
DEFAULT_SHARD_BYTES = 5 * 10**9
# The dtypes a model can be written in (two bytes each), with safetensors' names for them.
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16"}


def make_model_pair(out_dir: str | Path, **options) -> tuple[Path, Path]:
    """Write ``model_a`` and ``model_b`` under ``out_dir`` and return their paths.

    ``device="cuda"`` draws the random numbers on the GPU, many times faster for the
    full-size pair; the values then differ from the CPU's (each is deterministic).
    """
    a, b = make_models(out_dir, count=2, **options)
    return a, b


def make_models(
    out_dir: str | Path,
    *,
    num_layers: int,
    count: int = 2,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    hidden_size: int = MISTRAL_7B["hidden_size"],
    intermediate_size: int = MISTRAL_7B["intermediate_size"],
    num_heads: int = MISTRAL_7B["num_heads"],
    num_kv_heads: int = MISTRAL_7B["num_kv_heads"],
    vocab_size: int = MISTRAL_7B["vocab_size"],
    device: str = "cpu",
    dtypes: Sequence[str] | None = None,
) -> tuple[Path, ...]:
    """Write ``count`` models, ``model_a``, ``model_b``, ... under ``out_dir``; their paths.

    ``model_a`` is random; every other model is ``model_a`` plus noise of its own, like
    fine-tunes of one parent (the task-vector methods' benchmark takes ``model_a`` as the
    base). A pair is the same whatever code asks for it: the third model's noise is
    drawn only when there is one. ``dtypes`` names each model's dtype (``"bfloat16"``, the
    default, or ``"float16"``); the values are drawn alike and rounded to it.
    """
    dtypes = tuple(dtypes) if dtypes is not None else ("bfloat16",) * count
    if len(dtypes) != count or not set(dtypes) <= set(SAFETENSORS_DTYPES):
        raise ValueError(f"dtypes: expected {count} of {sorted(SAFETENSORS_DTYPES)}, got {dtypes}")
    config = hf_config(
        arch="mistral",
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        tie_embeddings=False,
    )
    shapes = tensor_shapes(config)
    shards = split_by_bytes(shapes, shard_bytes)

    dirs = tuple(Path(out_dir) / f"model_{chr(ord('a') + i)}" for i in range(count))
    for model_dir, dtype in zip(dirs, dtypes, strict=True):
        model_dir.mkdir(parents=True, exist_ok=True)
        write_json(model_dir / "config.json", {**config, "torch_dtype": dtype, "dtype": dtype})
        write_json(model_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})

    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = sibling_tensors(shapes, generator, count=count)
    weight_map = {}
    for file_name, names in shards.items():
        files = [open(model_dir / file_name, "wb") for model_dir in dirs]  # noqa: SIM115
        try:
            for file, dtype in zip(files, dtypes, strict=True):
                file.write(safetensors_header({name: shapes[name] for name in names}, dtype))
            for name in names:
                made, *values = next(tensors)
                assert made == name, "tensors are generated in shard order"
                for file, value, dtype in zip(files, values, dtypes, strict=True):
                    value = value.to(getattr(torch, dtype))
                    file.write(value.view(torch.uint8).numpy())
        finally:
            for file in files:
                file.close()
        weight_map.update(dict.fromkeys(names, file_name))

    if len(shards) > 1:
        total = sum(2 * numel(shape) for shape in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        for model_dir in dirs:
            write_json(model_dir / "model.safetensors.index.json", index)
    return dirs


def sibling_tensors(
    shapes: dict[str, tuple[int, ...]], generator: torch.Generator, count: int = 2
) -> Iterator[tuple[str | torch.Tensor, ...]]:
    """Yield (name, a, b, ...) in ``shapes`` order: a random bf16 tensor a, the rest a + noise.

    The tensors are drawn on the generator's device and returned on the CPU, in bfloat16
    (a model written in float16 holds them rounded to float16: the same values but for the
    smallest, below float16's normal range, where float16 has fewer bits).
    """
    device = generator.device
    for name, shape in shapes.items():
        a = torch.randn(shape, generator=generator, device=device)
        if name.endswith("norm.weight"):
            a = 1.0 + NORM_SPREAD * a
            noise_scale = NORM_SPREAD * SIBLING_NOISE
        else:
            a = INIT_STD * a
            noise_scale = INIT_STD * SIBLING_NOISE
        siblings = [
            torch.randn(shape, generator=generator, device=device).mul_(noise_scale).add_(a)
            for _ in range(count - 1)
        ]
        yield name, *(x.to("cpu", torch.bfloat16) for x in (a, *siblings))


def split_by_bytes(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> dict[str, list[str]]:
    """Group tensors, in order, into shards of at most ``shard_bytes`` (bf16), HF-named."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * numel(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    count = len(groups)
    return {f"model-{i:05d}-of-{count:05d}.safetensors": g for i, g in enumerate(groups, 1)}


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: str = "bfloat16") -> bytes:
    """The 8-byte length plus JSON header of a 16-bit safetensors file holding ``shapes``."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    code = SAFETENSORS_DTYPES[dtype]
    for name, shape in shapes.items():
        end = offset + 2 * numel(shape)
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data that follows starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--count", type=int, default=2, help="how many models (the first is the base)"
    )
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9)
    parser.add_argument("--hidden-size", type=int, default=MISTRAL_7B["hidden_size"])
    parser.add_argument("--intermediate-size", type=int, default=MISTRAL_7B["intermediate_size"])
    parser.add_argument("--vocab-size", type=int, default=MISTRAL_7B["vocab_size"])
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="each model's dtype, comma-separated (bfloat16 or float16; default: all bfloat16)",
    )
    args = parser.parse_args()
    dirs = make_models(
        args.out_dir,
        num_layers=args.layers,
        count=args.count,
        seed=args.seed,
        shard_bytes=int(args.shard_gb * 1e9),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        device=args.device,
        dtypes=args.dtypes.split(",") if args.dtypes else None,
    )
    print(*dirs)


if __name__ == "__main__":
    main()
