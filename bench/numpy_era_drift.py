"""How far a NumPy-era mergekit's SLERP drifts from mergekit 0.1.5 (and so from pearl_edu).

Pearl-7B-slerp was merged in early 2024 by a mergekit whose SLERP ran in NumPy: each tensor
converted to a float32 array, ``np.linalg.norm`` for the norms, ``np.sum`` of the product
of the normalized arrays for the cosine (pairwise sums over the whole tensor), NumPy 1.x
scalars for the angle and the weights. mergekit 0.1.5, which pearl_edu reproduces bit for
bit, sums in torch, in float32 chunks of 2^20 elements. The two cosines differ in their last
bits, and so do the weights; the bfloat16 rounding of a few outputs goes the other way.

This script measures it on stand-ins of Pearl's parents (the real ones are 29 GB to
download): it merges them with Pearl's recipe three ways, with the old mergekit (in a
scratch virtual environment, run as a ``mergekit-yaml`` subprocess), with mergekit 0.1.5
and with pearl_edu (both from this environment), compares the outputs element by element
and writes a few-KB summary, ``pearl_edu/data/numpy_era_drift.json``.

Stand-in pairs ("runs"), all with Pearl's file formats (the OmniBeagle stand-in float16
safetensors in 2 shards, the WizardMath stand-in bfloat16 pickle ``.bin`` in 2 shards):

- ``book``: the book's own stand-ins, `pearl_edu.teaching.fullrun.make_stand_ins` (32 layers of
  hidden size 64, siblings at cosine ~0.8): every ``t`` of Pearl's schedule, short sums.
- ``mistral-slerp``: Mistral-7B's shapes (4096 hidden, 14336 MLP, 32000 vocabulary) with
  ``--layers`` layers (5 by default: the layer positions then fall on Pearl's gradient
  points, t = 0, 0.5, 0.3, 0.7, 1), siblings at cosine ~0.8: the SLERP branch, with sums
  of 131 million terms (the embeddings).
- ``mistral-lerp``: the same shapes, siblings at cosine ~0.9999: above SLERP's 0.9995
  threshold, so the linear fallback, as for fine-tunes that moved little from one parent.

The difference of two outputs is counted in steps of bfloat16 (ULP) of the output, and,
more meaningfully, at the inputs' scale: divided by one bfloat16 step of
``|w0 * x| + |w1 * y|`` (the weights applied to the inputs). A float32 evaluation of
``w0 * x + w1 * y`` with weights off in their last bits errs by a tiny fraction of that
scale, so a difference within 1 step at that scale is rounding, whatever the output's own
size (where the two terms cancel, the output is small and 1 step at the inputs' scale is
many ULPs of the output). The step at the tensor's largest value is recorded too: that is
the scale `pearl_edu.verify` can use, having only the two outputs. For contrast, a real
mistake is measured the same way: pearl_edu's merge with the catch-all ``t`` 0.6 instead of
0.5 (the embeddings, norms and ``lm_head``), against mergekit 0.1.5's merge.

Setup, once: a scratch virtual environment outside the repository with the NumPy-era
mergekit, from PyPI (0.0.6 still has the NumPy SLERP; it needs transformers 4.x):

    python3 -m venv /tmp/mk006
    /tmp/mk006/bin/pip install torch==2.13.0
    /tmp/mk006/bin/pip install mergekit==0.0.6 "numpy<2" transformers==4.48.3 torch==2.13.0

Run, from the repository root, with the repository's environment (nothing is downloaded):

    .venv/bin/python bench/numpy_era_drift.py --old-mergekit /tmp/mk006/bin/mergekit-yaml

(or set ``OLD_MERGEKIT``). ``--work DIR`` keeps the stand-ins there and reuses them on the
next run; ``--runs book`` runs the cheap pair alone; ``--out`` says where the JSON goes.
On 2 CPU cores the default runs take about 6 minutes and up to 25 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pearl_edu.config import load_config  # noqa: E402
from pearl_edu.core.interpolation import DOT_THRESHOLD  # noqa: E402
from pearl_edu.engine import merge  # noqa: E402
from pearl_edu.reading import ModelReader, read_header  # noqa: E402
from pearl_edu.recipes import pearl_recipe  # noqa: E402
from pearl_edu.teaching import fullrun  # noqa: E402
from pearl_edu.teaching.toy import (  # noqa: E402
    hf_config,
    set_config_dtype,
    shard_file_names,
    split_into_shards,
    tensor_shapes,
    write_json,
)
from pearl_edu.tensor_plan import plan  # noqa: E402
from pearl_edu.ulp import ulp_distance  # noqa: E402

DATA_FILE = REPO_ROOT / "pearl_edu" / "data" / "numpy_era_drift.json"
DEFAULT_OLD_MERGEKIT = "/tmp/mk006/bin/mergekit-yaml"
RUNS = ("book", "mistral-slerp", "mistral-lerp")
# Sibling noise, relative to the common parent's spread: 0.5 gives cosine 1 / 1.25 = 0.8,
# 0.01 gives 1 / 1.0001 = 0.9999 (above DOT_THRESHOLD: the linear fallback).
NOISE = {"mistral-slerp": 0.5, "mistral-lerp": 0.01}
MISTRAL_7B = dict(
    hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=32000
)
INIT_STD = 0.02
NORM_SPREAD = 0.1
PAIRS = (("old", "mergekit_0.1.5"), ("old", "pearl_edu"), ("mergekit_0.1.5", "pearl_edu"))
# What a real mistake looks like at the same scales: the catch-all t 0.6 instead of 0.5
# (embeddings, norms, lm_head), merged by pearl_edu, against mergekit 0.1.5's merge.
MISTAKE = ("mergekit_0.1.5", "pearl_edu_t0.6")
# Elements compared per step (float64 work on the differing ones only).
CHUNK = 16 * 1024 * 1024
BF16_EPS = torch.finfo(torch.bfloat16).eps  # one step at 1.0: 2^-7


# --------------------------------------------------------------------------------------
# Stand-ins


def make_mistral_stand_ins(root: Path, *, num_layers: int, noise: float, seed: int = 0):
    """Two siblings of a random common parent, with Mistral-7B's shapes and Pearl's formats.

    Each is ``common + noise * spread * N(0, 1)``; the OmniBeagle stand-in is float16
    safetensors, the WizardMath stand-in bfloat16 ``.bin``, both in 2 shards with an index.
    One shard of each is in memory at a time.
    """
    config = hf_config(arch="mistral", num_layers=num_layers, tie_embeddings=False, **MISTRAL_7B)
    shapes = tensor_shapes(config)
    layouts = (
        (root / "OmniBeagle-7B-stand-in", torch.float16, "safetensors"),
        (root / "WizardMath-7B-V1.1-stand-in", torch.bfloat16, "bin"),
    )
    groups = split_into_shards(list(shapes), 2)
    generator = torch.Generator().manual_seed(seed)
    weight_maps: list[dict[str, str]] = [{}, {}]
    total_sizes = [0, 0]
    for shard_index, names in enumerate(groups):
        shards: list[dict[str, torch.Tensor]] = [{}, {}]
        for name in names:
            spread = NORM_SPREAD if name.endswith("norm.weight") else INIT_STD
            common = torch.randn(shapes[name], generator=generator).mul_(spread)
            if name.endswith("norm.weight"):
                common += 1.0
            for which, (_, dtype, _) in enumerate(layouts):
                sibling = torch.randn(shapes[name], generator=generator)
                sibling.mul_(noise * spread).add_(common)
                shards[which][name] = sibling.to(dtype)
                total_sizes[which] += sibling.numel() * dtype.itemsize
                del sibling
            del common
        for which, (folder, _, fmt) in enumerate(layouts):
            folder.mkdir(parents=True, exist_ok=True)
            file_name = shard_file_names(len(groups), fmt)[shard_index]
            if fmt == "safetensors":
                from safetensors.torch import save_file

                save_file(shards[which], folder / file_name, metadata={"format": "pt"})
            else:
                torch.save(shards[which], folder / file_name)
            weight_maps[which].update(dict.fromkeys(names, file_name))
        del shards
    for which, (folder, dtype, fmt) in enumerate(layouts):
        folder_config = dict(config)
        set_config_dtype(folder_config, dtype)
        write_json(folder / "config.json", folder_config)
        index_name = (
            "model.safetensors.index.json"
            if fmt == "safetensors"
            else "pytorch_model.bin.index.json"
        )
        index = {"metadata": {"total_size": total_sizes[which]}, "weight_map": weight_maps[which]}
        write_json(folder / index_name, index)
    return layouts[0][0], layouts[1][0]


def stand_ins(run: str, root: Path, num_layers: int) -> tuple[Path, Path, int]:
    """The run's two parents (made unless ``root`` has them from an earlier run) and layers."""
    done = root / "stand-ins.done"
    if run == "book":
        layers = 32
        folders = (root / "OmniBeagle-7B-stand-in", root / "WizardMath-7B-V1.1-stand-in")
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            made = fullrun.make_stand_ins(root, num_layers=layers)
            folders = (made.omnibeagle, made.wizardmath)
    else:
        layers = num_layers
        folders = (root / "OmniBeagle-7B-stand-in", root / "WizardMath-7B-V1.1-stand-in")
        expected = f"layers={layers} noise={NOISE[run]}"
        if not done.is_file() or done.read_text() != expected:
            shutil.rmtree(root, ignore_errors=True)
            folders = make_mistral_stand_ins(root, num_layers=layers, noise=NOISE[run])
    done.write_text("layers=32" if run == "book" else f"layers={layers} noise={NOISE[run]}")
    return folders[0], folders[1], layers


# --------------------------------------------------------------------------------------
# The three merges


def merge_three_ways(
    recipe: str, root: Path, old_mergekit: str
) -> tuple[dict[str, Path], dict[str, float]]:
    """Merge ``recipe`` with the old mergekit, mergekit 0.1.5 and pearl_edu; their folders."""
    names = ("old", "mergekit_0.1.5", "pearl_edu", MISTAKE[1])
    outputs = {name: root / f"merged-{name}" for name in names}
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    recipe_file = root / "recipe.yml"
    recipe_file.write_text(recipe, encoding="utf-8")
    seconds = {}

    started = time.perf_counter()
    command = [old_mergekit, str(recipe_file), str(outputs["old"])]
    command += ["--no-copy-tokenizer", "--no-lazy-unpickle", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"the old mergekit failed:\n{result.stderr[-3000:]}")
    seconds["old"] = time.perf_counter() - started

    started = time.perf_counter()
    fullrun.mergekit_merge(recipe, outputs["mergekit_0.1.5"])
    seconds["mergekit_0.1.5"] = time.perf_counter() - started

    started = time.perf_counter()
    merge(recipe, outputs["pearl_edu"], device="cpu", progress=False)
    seconds["pearl_edu"] = time.perf_counter() - started

    assert "{value: 0.5}" in recipe, "the recipe's catch-all t"
    mistake = recipe.replace("{value: 0.5}", "{value: 0.6}")
    merge(mistake, outputs[MISTAKE[1]], device="cpu", progress=False)
    return outputs, seconds


# --------------------------------------------------------------------------------------
# Comparison


def bf16_step(magnitude: torch.Tensor) -> torch.Tensor:
    """One bfloat16 step (ULP) at each magnitude, in float64: 2^(floor(log2 |m|) - 7).

    Below the smallest normal number the step is that of the smallest normal.
    """
    smallest = torch.finfo(torch.bfloat16).smallest_normal
    _, exponent = torch.frexp(magnitude.clamp(min=smallest))
    return torch.ldexp(torch.full_like(magnitude, BF16_EPS / 2), exponent)


def ulp_bucket(ulps: int) -> str:
    """Histogram bucket: "1" ... "8" alone, then powers of two: "9-16", "17-32", ..."""
    if ulps <= 8:
        return str(ulps)
    upper = 16
    while ulps > upper:
        upper *= 2
    return f"{upper // 2 + 1}-{upper}"


def bucket_order(key: str) -> int:
    return int(key.split("-")[0])


class PairStats:
    """Running totals of one pair of outputs' differences."""

    def __init__(self) -> None:
        self.tensors = self.tensors_differing = self.elements = self.differing = 0
        self.max_tensor_fraction = 0.0
        self.worst_tensor: str | None = None
        self.max_ulp = 0
        self.max_abs_diff = 0.0
        self.max_input_scale_steps = 0.0
        self.max_tensor_scale_steps = 0.0
        self.histogram: dict[str, int] = {}

    def add(self, name, a, b, x, y, w0, w1) -> None:
        """Compare outputs ``a``, ``b`` (flat bfloat16) of inputs ``x``, ``y``, weights w0, w1."""
        self.tensors += 1
        self.elements += a.numel()
        tensor_step = float(bf16_step(torch.tensor(float(max(a.abs().max(), b.abs().max())))))
        differing = 0
        for start in range(0, a.numel(), CHUNK):
            part = slice(start, start + CHUNK)
            where = (a[part] != b[part]).nonzero().flatten()
            if where.numel() == 0:
                continue
            differing += where.numel()
            ca, cb = a[part][where], b[part][where]
            ulps = ulp_distance(ca, cb)
            diff = (ca.double() - cb.double()).abs()
            scale = (w0 * x[part][where].double()).abs() + (w1 * y[part][where].double()).abs()
            self.max_ulp = max(self.max_ulp, int(ulps.max()))
            self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
            self.max_input_scale_steps = max(
                self.max_input_scale_steps, float((diff / bf16_step(scale)).max())
            )
            self.max_tensor_scale_steps = max(
                self.max_tensor_scale_steps, float(diff.max()) / tensor_step
            )
            values, counts = ulps.unique(return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                key = ulp_bucket(value)
                self.histogram[key] = self.histogram.get(key, 0) + count
        if differing:
            self.tensors_differing += 1
            self.differing += differing
            fraction = differing / a.numel()
            if fraction > self.max_tensor_fraction:
                self.max_tensor_fraction, self.worst_tensor = fraction, name

    def to_dict(self) -> dict:
        return {
            "tensors": self.tensors,
            "tensors_differing": self.tensors_differing,
            "elements": self.elements,
            "differing": self.differing,
            "fraction": self.differing / self.elements if self.elements else 0.0,
            "max_tensor_fraction": self.max_tensor_fraction,
            "worst_tensor": self.worst_tensor,
            "max_ulp": self.max_ulp,
            "max_abs_diff": self.max_abs_diff,
            "max_input_scale_steps": round(self.max_input_scale_steps, 6),
            "max_tensor_scale_steps": round(self.max_tensor_scale_steps, 6),
            "ulp_histogram": dict(
                sorted(self.histogram.items(), key=lambda kv: bucket_order(kv[0]))
            ),
        }


def weights_of(x: torch.Tensor, y: torch.Tensor, t: float) -> tuple[float, float, str]:
    """SLERP's weights (w0, w1) for flat inputs x, y, from float64 sums, and the branch."""
    dot = norm_x = norm_y = 0.0
    for start in range(0, x.numel(), CHUNK):
        cx, cy = x[start : start + CHUNK].double(), y[start : start + CHUNK].double()
        dot += float(cx @ cy)
        norm_x += float(cx @ cx)
        norm_y += float(cy @ cy)
    cos = dot / (norm_x * norm_y) ** 0.5
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t, "lerp"
    import math

    theta = math.acos(cos)
    return (
        math.sin((1 - t) * theta) / math.sin(theta),
        math.sin(t * theta) / math.sin(theta),
        "slerp",
    )


def compare_outputs(recipe: str, outputs: dict[str, Path]) -> tuple[dict, dict]:
    """Every pair of outputs compared tensor by tensor; and how many tensors took each branch."""
    config = load_config(recipe)
    headers = {model: read_header(model) for model in config.models()}
    merge_plan = plan(config, headers)
    out_headers = {name: read_header(folder) for name, folder in outputs.items()}
    for name, header in out_headers.items():
        if set(header.tensors) != {t.name for t in merge_plan.tensors}:
            sys.exit(f"{name}: the merged model's tensors are not the plan's")
    stats = {f"{a}_vs_{b}": PairStats() for a, b in (*PAIRS, MISTAKE)}
    branches = {"slerp": 0, "lerp": 0, "copy": 0}
    readers = {name: ModelReader(header) for name, header in {**headers, **out_headers}.items()}
    try:
        for job in merge_plan.tensors:
            base = job.inputs[job.base_index]
            other = job.inputs[1 - job.base_index]
            # The merge casts both inputs to the recipe's dtype, bfloat16, first.
            x = readers[base.model].read(base.tensor).to(torch.bfloat16).reshape(-1)
            y = readers[other.model].read(other.tensor).to(torch.bfloat16).reshape(-1)
            t = job.params["t"]
            w0, w1, branch = weights_of(x, y, t)
            branches["copy" if t in (0.0, 1.0) else branch] += 1
            out = {name: readers[name].read(job.name).reshape(-1) for name in outputs}
            for a, b in (*PAIRS, MISTAKE):
                stats[f"{a}_vs_{b}"].add(job.name, out[a], out[b], x, y, w0, w1)
    finally:
        for reader in readers.values():
            reader.close()
    # The mistake's weights are not the recipe's: its scale at the inputs means little.
    mistake = stats.pop("_vs_".join(MISTAKE)).to_dict()
    del mistake["max_input_scale_steps"]
    comparisons = {key: value.to_dict() for key, value in stats.items()}
    return {**comparisons, "mistake_t0.6_vs_mergekit_0.1.5": mistake}, branches


# --------------------------------------------------------------------------------------
# Versions and the old mergekit's source


def old_environment(old_mergekit: str) -> dict:
    """Versions in the old mergekit's environment, and whether its SLERP is NumPy's."""
    python = Path(old_mergekit).parent / "python"
    code = (
        "import inspect, json\n"
        "from importlib import metadata\n"
        "import mergekit.merge_methods.slerp as s\n"
        "src = inspect.getsource(s)\n"
        "print(json.dumps({'versions': {p: metadata.version(p) for p in "
        "('mergekit', 'numpy', 'torch', 'transformers')}, "
        "'numpy_slerp': all(k in src for k in ('np.linalg.norm', 'np.sum(v0 * v1)', "
        "'.numpy()')), 'source_file': s.__file__}))\n"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"cannot inspect the old mergekit with {python}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------


def run_one(run: str, root: Path, num_layers: int, old_mergekit: str) -> dict:
    started = time.perf_counter()
    omnibeagle, wizardmath, layers = stand_ins(run, root, num_layers)
    seconds = {"stand_ins": time.perf_counter() - started}
    recipe = pearl_recipe(omnibeagle, wizardmath, num_layers=layers)
    outputs, merge_seconds = merge_three_ways(recipe, root, old_mergekit)
    seconds.update(merge_seconds)
    started = time.perf_counter()
    comparisons, branches = compare_outputs(recipe, outputs)
    seconds["compare"] = time.perf_counter() - started
    shapes = read_header(omnibeagle).config
    for folder in outputs.values():
        shutil.rmtree(folder)
    print(f"{run}: {json.dumps(comparisons['old_vs_mergekit_0.1.5'])}", file=sys.stderr)
    return {
        "name": run,
        "layers": layers,
        "hidden_size": shapes["hidden_size"],
        "intermediate_size": shapes["intermediate_size"],
        "vocab_size": shapes["vocab_size"],
        "sibling_noise": NOISE.get(run, 0.5),
        "tensors_by_branch": branches,
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
        "comparisons": comparisons,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--old-mergekit",
        default=os.environ.get("OLD_MERGEKIT", DEFAULT_OLD_MERGEKIT),
        help="the NumPy-era mergekit's mergekit-yaml (default: $OLD_MERGEKIT or %(default)s)",
    )
    parser.add_argument(
        "--runs", default=",".join(RUNS), help="comma-separated, of " + ", ".join(RUNS)
    )
    parser.add_argument("--layers", type=int, default=5, help="layers of the Mistral-shaped pairs")
    parser.add_argument("--work", type=Path, default=None, help="keep (and reuse) stand-ins here")
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args()
    runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    if unknown := sorted(set(runs) - set(RUNS)):
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    if not Path(args.old_mergekit).is_file():
        parser.error(f"no {args.old_mergekit}: make the scratch environment (see the docstring)")

    old = old_environment(args.old_mergekit)
    if not old["numpy_slerp"]:
        sys.exit(f"{old['source_file']}: this mergekit's SLERP is not the NumPy one")
    work = args.work or Path(tempfile.mkdtemp(prefix="numpy-era-drift-"))
    started = time.perf_counter()
    try:
        results = [run_one(run, work / run, args.layers, args.old_mergekit) for run in runs]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    record = {
        "what": "Pearl's recipe merged by a NumPy-era mergekit, mergekit 0.1.5 and pearl_edu, "
        "on stand-in parents; differences between the bfloat16 outputs",
        "recorded": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "old_mergekit": old["versions"]["mergekit"],
            "old_numpy": old["versions"]["numpy"],
            "old_torch": old["versions"]["torch"],
            "old_transformers": old["versions"]["transformers"],
            "mergekit": metadata.version("mergekit"),
            "torch": torch.__version__,
            "numpy": metadata.version("numpy"),
            "pearl_edu": metadata.version("pearl_edu"),
            "python": platform.python_version(),
        },
        "old_slerp_uses_numpy": old["numpy_slerp"],
        "scale_notes": {
            "max_ulp": "bfloat16 steps of the output",
            "max_input_scale_steps": "|a - b| / one bfloat16 step of |w0 x| + |w1 y|",
            "max_tensor_scale_steps": "|a - b| / one bfloat16 step of the tensor's max |value|",
        },
        "seconds": round(time.perf_counter() - started, 1),
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
