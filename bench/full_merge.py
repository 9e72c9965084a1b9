"""Time the full 32-layer Mistral-7B-shaped merge from a cold page cache, against the I/O floor.

    python bench/full_merge.py [--layers 32] [--runs 3] [--keep]

Makes (unless it is already there) the full-size pair of random bfloat16 models with
`make_models.py` in ``bench/out/layers-32/`` (2 x 14.5 GB), writes Pearl-7B-slerp's recipe
for it (the shipped ``pearl-7b-slerp`` recipe, the one in ``shared/configs/``: its ``t``
schedules over the layers for ``self_attn`` and ``mlp``, 0.5 elsewhere, bfloat16, with the
pair's paths; `bench_merge.slerp_config`), then runs ``--runs`` rounds of four variants,
in an order that changes from round to round:

- ``pearl-edu``: ``pearl-edu merge --device cpu --quiet``, with the compiled loops;
- ``pearl-edu-torch``: the same with ``PEARL_EDU_KERNELS=0`` (SLERP's arithmetic in torch);
- ``floor``: the I/O floor (``io_floor.py``: read both inputs, write one output, no math),
  reading and writing as pearl-edu does (direct I/O, flushed to disk), each step in turn;
- ``floor-pipelined``: the same, with the next tensor read while this one is written
  (``io_floor.py --pipelined``), as pearl-edu overlaps them.

Each variant's ratio to the floor is to the faster of the two floors (by median): which
one is faster depends on the disk.

Every run starts from a cold page cache, without root: the previous output's pages are
dropped and the output deleted, ``sync``, then every file of both inputs is opened and
``posix_fadvise(POSIX_FADV_DONTNEED)`` drops its cached pages. Each drop is checked: the
inputs' resident pages are counted with ``mincore(2)`` over a mapping of each file (through
ctypes; nothing is read) before the drop and again right before the run, and
``/proc/meminfo``'s ``Cached`` is read before and after. Then a 2 s pause, the load
average, and the run under GNU time (``/usr/bin/time -v``): wall time, CPU time (user +
system) and peak RSS. Each pearl-edu output is hashed (sha256 per file, untimed) before it
is deleted, so that the two pearl-edu variants can be checked byte for byte while only one
output is ever on disk. As in `bench_merge.py`, every run uses a copy of ``pearl_edu``
taken at the start (and of ``io_floor.py`` beside it), so edits to the working tree during
the hour-long benchmark change nothing.

Results go to ``bench/full_merge.json`` (every run with its cache check, the medians, each
variant's ratio to the floor, the machine, the date, the torch version and whether the
compiled loops were loaded in each variant) and ``bench/full_merge.md`` (the table). The
outputs are deleted at the end, the inputs too unless ``--keep``. ``--layers`` makes a
smaller pair (``--layers 1 --runs 1`` checks the script in a few minutes, 3 GB of disk).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_merge import (  # noqa: E402
    GNU_TIME,
    SETTLE_SECONDS,
    engine_fingerprint,
    gnu_time_fields,
    machine,
    slerp_config,
    snapshot_engine,
)
from make_models import MISTRAL_7B, make_model_pair, numel  # noqa: E402

from pearl_edu.teaching.toy import hf_config, tensor_shapes  # noqa: E402

BIN = Path(sys.executable).parent
VARIANTS = ("pearl-edu", "pearl-edu-torch", "floor", "floor-pipelined")
FLOORS = ("floor", "floor-pipelined")
LABELS = {
    "pearl-edu": "pearl-edu merge, compiled loops",
    "pearl-edu-torch": "pearl-edu merge, PEARL_EDU_KERNELS=0",
    "floor": "I/O floor, each step in turn (direct I/O)",
    "floor-pipelined": "I/O floor, pipelined (direct I/O)",
}
# A drop counts as done when at most this share of the inputs' bytes is still cached.
COLD_SHARE = 0.001


def run_order(run: int) -> list[str]:
    """The variants' order in round ``run``: a rotation of them, every other one reversed.

    Rounds 0, 1, 2, 3, ... are (a, b, c, d), (d, c, b, a), (b, c, d, a), (a, d, c, b), ...:
    no variant always runs first, or always right after the same one.
    """
    n = len(VARIANTS)
    rotated = [VARIANTS[(i + run // 2) % n] for i in range(n)]
    return rotated[::-1] if run % 2 else rotated


def model_bytes(layers: int) -> int:
    """The bytes of tensor data in one Mistral-7B-shaped bfloat16 model of ``layers`` layers."""
    config = hf_config(arch="mistral", num_layers=layers, tie_embeddings=False, **MISTRAL_7B)
    return sum(2 * numel(shape) for shape in tensor_shapes(config).values())


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def model_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole model: its config, and every shard as long as its header says."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"].values())
    else:
        names = {"model.safetensors"}
    for name in names:
        path = folder / name
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if path.stat().st_size != 8 + length + end:
            return False
    return True


# --- the page cache ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(path: Path) -> int:
    """How many bytes of ``path`` are in the page cache, by ``mincore(2)`` (nothing is read)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + PAGE - 1) // PAGE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            resident = bytes(vector).translate(_LOW_BIT).count(1)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    return min(resident * PAGE, size)


# mincore's bytes: bit 0 says the page is resident, the other bits are reserved.
_LOW_BIT = bytes(b & 1 for b in range(256))


def drop_from_cache(files: list[Path]) -> None:
    """``posix_fadvise(DONTNEED)`` on each file: its clean cached pages are dropped."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def meminfo_cached_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise SystemExit("/proc/meminfo has no Cached line")


def cold_start(case_dir: Path, models: tuple[Path, Path]) -> tuple[Path, dict]:
    """Delete the last output, flush, drop both inputs from the page cache, check, pause.

    Returns the output path and the check: the inputs' resident bytes (``mincore``) before
    the drop and right before the run, and ``/proc/meminfo``'s ``Cached`` around the drop.
    """
    out = case_dir / "merged"
    # The output and pearl-edu's hidden partial folder (a run could resume an old one).
    for leftover in (out, *case_dir.glob(".merged*")):
        if leftover.is_dir():
            drop_from_cache([p for p in leftover.rglob("*") if p.is_file()])
        shutil.rmtree(leftover, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    inputs = [p for m in models for p in sorted(m.iterdir()) if p.is_file()]
    input_bytes = sum(p.stat().st_size for p in inputs)
    before = sum(map(resident_bytes, inputs))
    cached_before = meminfo_cached_mb()
    drop_from_cache(inputs)
    time.sleep(SETTLE_SECONDS)
    after = sum(map(resident_bytes, inputs))
    if after > COLD_SHARE * input_bytes:  # once more (pages still being written back?)
        subprocess.run(["sync"], check=True)
        drop_from_cache(inputs)
        time.sleep(SETTLE_SECONDS)
        after = sum(map(resident_bytes, inputs))
    check = {
        "input_mb": input_bytes / 1e6,
        "resident_before_drop_mb": before / 1e6,
        "resident_at_start_mb": after / 1e6,
        "meminfo_cached_before_mb": cached_before,
        "meminfo_cached_at_start_mb": meminfo_cached_mb(),
        "cold": after <= COLD_SHARE * input_bytes,
    }
    if not check["cold"]:
        print(f"  warning: {after / 1e6:.0f} MB of the inputs still cached", flush=True)
    return out, check


# --- the runs ---------------------------------------------------------------------------


def environment(variant: str, engine: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(engine)}
    env.pop("PEARL_EDU_KERNELS", None)
    if variant == "pearl-edu-torch":
        env["PEARL_EDU_KERNELS"] = "0"
    return env


def command_for(variant: str, config: Path, models: tuple[Path, Path], out: Path, engine: Path):
    if variant in FLOORS:
        floor = engine / "bench" / "io_floor.py"
        pipelined = ["--pipelined"] if variant == "floor-pipelined" else []
        return [sys.executable, str(floor), str(models[0]), str(models[1]), str(out), *pipelined]
    return [str(BIN / "pearl-edu"), "merge", str(config), str(out), "--device", "cpu", "--quiet"]


def kernels_loaded(variant: str, engine: Path) -> bool:
    """Whether ``pearl_edu``'s compiled loops load in ``variant``'s environment."""
    probe = "from pearl_edu import kernels; print(kernels.available())"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment(variant, engine),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip() == "True"


def timed_run(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command`` under GNU time: wall and CPU seconds, peak RSS."""
    started = time.perf_counter()
    result = subprocess.run([GNU_TIME, "-v", *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    report = gnu_time_fields(result.stderr)
    user, system = float(report["User time (seconds)"]), float(report["System time (seconds)"])
    return {
        "seconds": seconds,
        "cpu_seconds": user + system,
        "user_seconds": user,
        "system_seconds": system,
        "peak_rss_mb": int(report["Maximum resident set size (kbytes)"]) * 1024 / 1e6,
    }


def output_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of an output folder, by name."""
    hashes = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with open(path, "rb") as f:
            hashes[path.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return hashes


def bench(args: argparse.Namespace, engine: Path) -> dict:
    case_dir = args.out / f"layers-{args.layers}"
    models = (case_dir / "model_a", case_dir / "model_b")
    one_model = model_bytes(args.layers)
    made_s = None
    if not all(map(model_complete, models)):
        needed = 3 * one_model + 10**9
        free = shutil.disk_usage(args.out).free
        if free < needed:
            raise SystemExit(f"{needed / 1e9:.1f} GB of disk needed, {free / 1e9:.1f} GB free")
        print(
            f"writing two {args.layers}-layer Mistral-7B-shaped models "
            f"(2 x {one_model / 1e9:.1f} GB) in {case_dir} ...",
            flush=True,
        )
        shutil.rmtree(case_dir, ignore_errors=True)
        started = time.perf_counter()
        make_model_pair(case_dir, num_layers=args.layers, seed=args.layers, device=args.device)
        made_s = time.perf_counter() - started
        print(f"  made in {made_s:.0f} s", flush=True)
    else:
        print(f"using the pair in {case_dir}", flush=True)
    config = case_dir / "slerp.yml"
    config.write_text(slerp_config(args.layers, *models))

    kernels = {v: kernels_loaded(v, engine) for v in VARIANTS if v not in FLOORS}
    if not kernels["pearl-edu"] or kernels["pearl-edu-torch"]:
        raise SystemExit(f"the compiled loops should load with pearl-edu only; loaded: {kernels}")

    records = []
    for run in range(args.runs):
        for position, variant in enumerate(run_order(run)):
            out, cache = cold_start(case_dir, models)
            load = os.getloadavg()
            started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            env = environment(variant, engine)
            measured = timed_run(command_for(variant, config, models, out, engine), env)
            record = {
                "variant": variant,
                "run": run,
                "position": position,
                "started": started_at,
                "load_average_before": [round(x, 2) for x in load],
                **measured,
                "output_mb": sum(p.stat().st_size for p in safetensors_files(out)) / 1e6,
                "cache": cache,
            }
            if variant not in FLOORS:
                record["output_sha256"] = output_hashes(out)
            records.append(record)
            print(
                f"run {run} {variant:15s} {measured['seconds']:7.1f} s wall "
                f"{measured['cpu_seconds']:7.1f} s CPU {measured['peak_rss_mb']:6.0f} MB  "
                f"(inputs cached: {cache['resident_before_drop_mb']:.0f} MB before the drop, "
                f"{cache['resident_at_start_mb']:.0f} MB at the start; load "
                f"{load[0]:.2f})",
                flush=True,
            )
    for leftover in (case_dir / "merged", *case_dir.glob(".merged*")):
        shutil.rmtree(leftover, ignore_errors=True)
    return {
        "case_dir": case_dir,
        "models_made_s": made_s,
        "input_gb": 2 * one_model / 1e9,
        "kernels": kernels,
        "records": records,
    }


def summarize(records: list[dict]) -> tuple[dict, dict]:
    """Per variant: medians, every run's times, the ratio to the floor; and the hash check.

    The floor is the faster of the two floors by median; in a round, the faster of the two
    runs of that round.
    """
    medians = {
        v: statistics.median(r["seconds"] for r in records if r["variant"] == v) for v in FLOORS
    }
    floor_median = min(medians.values())
    floor_by_run: dict[int, float] = {}
    for r in records:
        if r["variant"] in FLOORS:
            floor_by_run[r["run"]] = min(r["seconds"], floor_by_run.get(r["run"], r["seconds"]))
    summary = {}
    for variant in VARIANTS:
        mine = [r for r in records if r["variant"] == variant]
        summary[variant] = {
            "label": LABELS[variant],
            "runs": len(mine),
            "seconds_median": statistics.median(r["seconds"] for r in mine),
            "seconds_all": [round(r["seconds"], 2) for r in mine],
            "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in mine),
            "cpu_seconds_all": [round(r["cpu_seconds"], 2) for r in mine],
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in mine),
            "peak_rss_mb_all": [round(r["peak_rss_mb"]) for r in mine],
            "over_floor_median": statistics.median(r["seconds"] for r in mine) / floor_median,
            "over_floor_same_round": [
                round(r["seconds"] / floor_by_run[r["run"]], 3) for r in mine
            ],
        }
    hashed = [r for r in records if "output_sha256" in r]

    def tensors(r: dict) -> dict:
        return {k: v for k, v in r["output_sha256"].items() if k.endswith(".safetensors")}

    reference = tensors(hashed[0])
    identical = {
        "safetensors_files": len(reference),
        "identical": all(tensors(r) == reference for r in hashed),
        "all_files_identical": all(
            r["output_sha256"] == hashed[0]["output_sha256"] for r in hashed
        ),
        "outputs_compared": len(hashed),
        "how": "sha256 of every safetensors file of every pearl-edu output, both variants",
    }
    return summary, identical


def markdown(results: dict) -> str:
    m = results["machine"]
    loads = [r["load_average_before"][0] for r in results["runs"]]
    cache = [r["cache"] for r in results["runs"]]
    same = results["outputs_a_b"]
    lines = [
        f"# Full merge, {results['layers']} layer(s), cold page cache",
        "",
        f"{results['date']}: {m['cpu_count']} CPU cores, {m['ram_gb']} GB of RAM, "
        f"torch {m['torch']}, Python {m['python']}; inputs 2 x {results['input_gb'] / 2:.1f} GB; "
        f"{results['config_about']}. Load average (1 min) before the runs: "
        f"{min(loads):.2f} to {max(loads):.2f}.",
        "",
        "Page cache: " + results["page_cache"] + " Inputs cached at the start of a run: "
        f"at most {max(c['resident_at_start_mb'] for c in cache):.1f} MB "
        f"(before the drops: up to {max(c['resident_before_drop_mb'] for c in cache):,.0f} MB); "
        "Cached in /proc/meminfo fell by "
        f"{min(c['meminfo_cached_before_mb'] - c['meminfo_cached_at_start_mb'] for c in cache):,.0f}"
        f" to {max(c['meminfo_cached_before_mb'] - c['meminfo_cached_at_start_mb'] for c in cache):,.0f}"
        " MB per drop.",
        "",
        "| variant | wall, median | wall, every run | CPU (user + sys), median "
        "| CPU, every run | peak RSS, median | wall / faster floor |",
        "|:---|---:|:---|---:|:---|---:|---:|",
    ]
    for s in results["summary"].values():
        lines.append(
            f"| {s['label']} | {s['seconds_median']:.1f} s "
            f"| {', '.join(f'{x:.1f}' for x in s['seconds_all'])} "
            f"| {s['cpu_seconds_median']:.1f} s "
            f"| {', '.join(f'{x:.1f}' for x in s['cpu_seconds_all'])} "
            f"| {s['peak_rss_mb_median']:,.0f} MB | {s['over_floor_median']:.2f}x |"
        )
    verdict = "byte-identical" if same["identical"] else "NOT identical"
    lines += [
        "",
        f"The faster floor: {LABELS[results['floor']]}.",
        "",
        f"The outputs of both pearl-edu variants ({same['outputs_compared']} merges): "
        f"{verdict} (sha256 of each of {same['safetensors_files']} safetensors files).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="rounds of the four variants")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "full_merge.json")
    parser.add_argument("--keep", action="store_true", help="keep the input pair")
    parser.add_argument("--device", default="cpu", help="where to draw the pair's random numbers")
    parser.add_argument("--note", default="", help="conditions worth recording with the results")
    args = parser.parse_args()
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} (GNU time) is needed: sudo apt-get install time")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="pearl-edu-engine-") as snapshot:
        engine = snapshot_engine(Path(snapshot))
        (engine / "bench").mkdir()
        shutil.copy2(BENCH_DIR / "io_floor.py", engine / "bench" / "io_floor.py")
        fingerprint = engine_fingerprint(engine)
        case_dir = args.out / f"layers-{args.layers}"
        try:
            measured = bench(args, engine)
        finally:
            for leftover in (case_dir / "merged", *case_dir.glob(".merged*")):
                shutil.rmtree(leftover, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(case_dir, ignore_errors=True)

    summary, identical = summarize(measured["records"])
    results = {
        "about": f"Wall time, CPU time and peak RSS of a SLERP merge of two {args.layers}-layer "
        "Mistral-7B-shaped bfloat16 models from a cold page cache, with and without "
        "pearl_edu's compiled loops, against the I/O floor (the faster of two: each step "
        "in turn, or reads overlapping writes).",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "note": args.note,
        "layers": args.layers,
        "input_gb": measured["input_gb"],
        "models_made_s": measured["models_made_s"],
        "config_about": "Pearl-7B-slerp's recipe (its t schedules for self_attn and mlp, "
        "0.5 elsewhere, bfloat16) with the pair's paths",
        "page_cache": "cold: before each run the last output is deleted, `sync`, and every "
        "input file is dropped with posix_fadvise(POSIX_FADV_DONTNEED); the inputs' resident "
        "pages are counted with mincore(2) before the drop and right before the run "
        "(`cache` of each run, with /proc/meminfo's Cached).",
        "machine": {**machine(), "pearl_edu_kernels": measured["kernels"]},
        "pearl_edu_source_sha256": fingerprint,
        "run_order": [run_order(run) for run in range(args.runs)],
        "floor": min(FLOORS, key=lambda v: summary[v]["seconds_median"]),
        "summary": summary,
        "outputs_a_b": identical,
        "runs": measured["records"],
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.results.with_suffix(".md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
