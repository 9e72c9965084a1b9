"""Time `pearl-edu merge` against `mergekit-yaml` and against the I/O floor.

    python bench/bench_merge.py [--layers 2 4] [--runs 3] [--keep]

For each layer count it makes two Mistral-7B-shaped random bfloat16 models under
``bench/out/`` (2 layers: 1.4 GB each, 4 layers: 2.3 GB each), writes a Pearl-like SLERP
config, reads every input once so the page cache is warm, then runs, in turn and
``--runs`` times each:

- ``pearl-edu merge`` on the CPU,
- ``mergekit-yaml --no-copy-tokenizer``,
- the I/O floor (``bench/io_floor.py``: read both inputs, write one output, no math),
  writing the way pearl_edu's writer does (direct I/O, flushed to disk: ``floor``) and
  through the page cache as mergekit does (``floor-buffered``).

Each run is wrapped in GNU time (``/usr/bin/time -v``) for its peak resident memory.
Outputs are deleted between runs, and ``sync`` and a short pause come before each one,
outside the timings; the order of the tools changes from run to run (`run_order`). Results go to
``bench/results.json`` (every run, the medians, the ratios and the targets: the
``summary`` list is one flat record per layer count, ready to plot) and ``bench/results.md``
(the table the book includes). ``bench/out/`` is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from make_models import make_model_pair  # noqa: E402
from proc_memory import run_sampled  # noqa: E402

from pearl_edu.recipes import pearl_recipe  # noqa: E402

GNU_TIME = "/usr/bin/time"
BIN = Path(sys.executable).parent
TOOLS = ("pearl-edu", "mergekit", "floor", "floor-buffered")
# Idle seconds before each timed run, after the previous run's output is flushed.
SETTLE_SECONDS = 2.0


def run_order(run: int) -> list[str]:
    """The order of the tools in run ``run``: a row of a balanced Latin square.

    A run can be slowed by the one before it (its writes still being absorbed by the
    disk, memory still being returned to the system), so the order changes from run to
    run, and over every four runs each tool comes right after each other tool once
    (Williams' design). Rotating one order would not do: every tool would always follow
    the same neighbour.
    """
    n = len(TOOLS)
    first_row = [0]
    for k in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        first_row.append((k + 1) // 2 if k % 2 else n - k // 2)
    return [TOOLS[(i + run) % n] for i in first_row]


# The engine's goals, checked against the medians.
TARGETS = {
    "pearl_over_mergekit_max": 0.3,
    "pearl_over_floor_max": 1.5,
    "pearl_peak_rss_mb_max": 1536,
    "pearl_rss_growth_max": 0.10,
}


def slerp_config(layers: int, a: Path, b: Path) -> str:
    """Pearl-7B-slerp's recipe (its ``t`` gradients, bfloat16) on two stand-ins."""
    recipe = pearl_recipe(a, b, num_layers=layers)
    return f"# Pearl-7B-slerp's recipe on {layers}-layer stand-ins of its parents.\n{recipe}"


def command_for(tool: str, config: Path, models: tuple[Path, Path], out: Path) -> list[str]:
    """The command line that runs ``tool`` on one benchmark case."""
    if tool == "pearl-edu":
        return [
            str(BIN / "pearl-edu"),
            "merge",
            str(config),
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ]
    if tool == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer", "--quiet"]
    floor = [sys.executable, str(BENCH_DIR / "io_floor.py"), str(models[0]), str(models[1])]
    return floor + [str(out)] + (["--buffered"] if tool == "floor-buffered" else [])


def timed_run(command: list[str], engine: Path, rollup: bool = False) -> dict:
    """Run ``command`` under GNU time; its wall and CPU seconds, and its peak memory in MB.

    CPU time (user + system) is reported beside wall time because it is much less
    disturbed by other programs running on the same machine. ``engine`` is the folder
    that holds the copy of ``pearl_edu`` to run (see `snapshot_engine`). Peak memory is
    GNU time's maximum RSS (``peak_rss_mb``), which counts the pages of mapped files, and
    beside it the peaks that `proc_memory.PeakMemory` samples from /proc every 20 ms:
    anonymous memory (``peak_rss_anon_mb``), file pages, and with ``rollup`` the
    proportional set size (``peak_pss_mb``, ``peak_pss_anon_mb``, sampled every second).
    """
    started = time.perf_counter()
    result, peaks = run_sampled(
        [GNU_TIME, "-v", *command],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(engine)},
        rollup=rollup,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    report = gnu_time_fields(result.stderr)
    user, system = float(report["User time (seconds)"]), float(report["System time (seconds)"])
    return {
        "seconds": seconds,
        "cpu_seconds": user + system,
        "peak_rss_mb": int(report["Maximum resident set size (kbytes)"]) * 1024 / 1e6,
        **peaks,
    }


def gnu_time_fields(time_report: str) -> dict[str, str]:
    """The "name: value" lines of GNU time's verbose report."""
    fields = {}
    for line in time_report.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if sep:
            fields[name] = value
    for wanted in ("User time (seconds)", "Maximum resident set size (kbytes)"):
        if wanted not in fields:
            raise SystemExit(f"GNU time printed no '{wanted}' line")
    return fields


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once so that all tools start with the inputs in memory."""
    buffer = bytearray(64 * 1024**2)
    for folder in paths:
        for file in sorted(folder.iterdir()):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def prepare_case(layers: int, out_root: Path) -> tuple[Path, tuple[Path, Path], Path]:
    """The folder, the two models (made if missing) and the SLERP config for ``layers``.

    Every input is read once before this returns, so the runs start with a warm page cache.
    """
    case_dir = out_root / f"layers-{layers}"
    models = (case_dir / "model_a", case_dir / "model_b")
    if not all((m / "config.json").is_file() for m in models):
        print(f"[{layers} layers] writing two Mistral-7B-shaped models ...", flush=True)
        shutil.rmtree(case_dir, ignore_errors=True)
        make_model_pair(case_dir, num_layers=layers, seed=layers)
    config = case_dir / "slerp.yml"
    config.write_text(slerp_config(layers, *models))
    warm_page_cache(list(models))
    return case_dir, models, config


def clean_and_settle(case_dir: Path) -> Path:
    """Remove the last run's output (and any partial one), flush, pause; the output path."""
    out = case_dir / "merged"
    # Also pearl-edu's hidden partial folder, or a run could resume an old one.
    for leftover in (out, *case_dir.glob(".merged*")):
        shutil.rmtree(leftover, ignore_errors=True)
    # The previous tool's writes flushed, then a pause for the disk to settle.
    subprocess.run(["sync"], check=True)
    time.sleep(SETTLE_SECONDS)
    return out


def bench_one(layers: int, runs: int, out_root: Path, engine: Path) -> tuple[list[dict], dict]:
    """Make the models for ``layers``, run every tool ``runs`` times, return runs and summary."""
    case_dir, models, config = prepare_case(layers, out_root)
    records = []
    for run in range(runs):
        for tool in run_order(run):
            out = clean_and_settle(case_dir)
            measured = timed_run(command_for(tool, config, models, out), engine)
            records.append({"layers": layers, "tool": tool, "run": run, **measured})
            print(
                f"[{layers} layers] run {run} {tool:13s} {measured['seconds']:7.2f} s wall "
                f"{measured['cpu_seconds']:7.2f} s CPU {measured['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
    output_bytes = folder_bytes(case_dir / "merged")
    shutil.rmtree(case_dir / "merged", ignore_errors=True)
    row = summarize(layers, records, sum(map(folder_bytes, models)), output_bytes)
    row.update(agreement(case_dir, config, models, engine))
    return records, row


def agreement(case_dir: Path, config: Path, models: tuple[Path, Path], engine: Path) -> dict:
    """Merge once more with each engine (untimed) and compare the two outputs element-wise."""
    from pearl_edu.verification import verify

    outs = {tool: case_dir / f"agreement-{tool}" for tool in ("pearl-edu", "mergekit")}
    for tool, out in outs.items():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            command_for(tool, config, models, out),
            check=True,
            capture_output=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(engine)},
        )
    report = verify(outs["pearl-edu"], outs["mergekit"])
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    print(
        f"[{case_dir.name}] pearl-edu vs mergekit: {report.num_differing} of "
        f"{report.num_elements} elements differ",
        flush=True,
    )
    return {
        "identical_to_mergekit": report.identical,
        "elements_differing_from_mergekit": report.num_differing,
        "elements_compared": report.num_elements,
    }


# The memory-only record: peaks of each tool, apart from the timings (which want a quiet
# machine; memory does not), in a file of its own that both benchmarks add a section to.
MEMORY_RESULTS = BENCH_DIR / "memory_results.json"
MEMORY_FIELDS = (
    "peak_rss_mb",
    "peak_rss_anon_mb",
    "peak_pss_mb",
    "peak_pss_anon_mb",
    "peak_rss_file_mb",
)


def memory_runs(layers: int, runs: int, out_root: Path, engine: Path) -> list[dict]:
    """``pearl-edu merge`` and ``mergekit-yaml`` on the SLERP case, for their memory only."""
    case_dir, models, config = prepare_case(layers, out_root)
    records = []
    for run in range(runs):
        for tool in ("pearl-edu", "mergekit"):
            out = clean_and_settle(case_dir)
            measured = timed_run(command_for(tool, config, models, out), engine, rollup=True)
            records.append(
                {"case": f"slerp, {layers} layers", "tool": tool, "run": run, **measured}
            )
            print(memory_line(records[-1]), flush=True)
    shutil.rmtree(case_dir / "merged", ignore_errors=True)
    return records


def memory_line(record: dict) -> str:
    return (
        f"[{record['case']}] {record['tool']:9s} max RSS {record['peak_rss_mb']:6.0f} MB, "
        f"anonymous {record['peak_rss_anon_mb']:6.0f} MB, PSS {record['peak_pss_mb']:6.0f} MB "
        f"(anonymous {record['peak_pss_anon_mb']:6.0f} MB), file pages "
        f"{record['peak_rss_file_mb']:6.0f} MB"
    )


def memory_section(about: str, records: list[dict], fingerprint: str, note: str) -> dict:
    """One benchmark's memory record: where and when, and the medians per case and tool."""
    from proc_memory import INTERVAL_S, ROLLUP_INTERVAL_S

    summary = []
    for case in dict.fromkeys(r["case"] for r in records):
        for tool in dict.fromkeys(r["tool"] for r in records if r["case"] == case):
            mine = [r for r in records if r["case"] == case and r["tool"] == tool]
            row = {"case": case, "tool": tool, "runs": len(mine)}
            row.update({k: statistics.median(r[k] for r in mine) for k in MEMORY_FIELDS})
            summary.append(row)
    return {
        "about": about,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "note": note,
        "machine": machine(),
        "page_cache": "warm: every input read once before the runs",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "sample_interval_s": INTERVAL_S,
        "pss_interval_s": ROLLUP_INTERVAL_S,
        "pearl_edu_source_sha256": fingerprint,
        "summary": summary,
        "runs": records,
    }


def save_memory_section(key: str, section: dict, path: Path = MEMORY_RESULTS) -> None:
    """Put ``section`` under ``key`` in the memory record (others kept), and its table in .md."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[key] = section
    path.write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(memory_markdown(record))


def memory_markdown(record: dict) -> str:
    """The memory record as Markdown: per section its machine, then one row per case and tool."""
    parts = ["# Peak memory: GNU time's max RSS beside anonymous memory and PSS", ""]
    for key, section in record.items():
        m = section["machine"]
        parts += [
            f"## {key}",
            "",
            f"{section['date']}: {m['cpu_count']} CPU cores, {m['ram_gb']} GB of RAM, "
            f"{section['page_cache']}; load average before {section['load_average_before']}; "
            f"sampled every {section['sample_interval_s'] * 1000:.0f} ms "
            f"(PSS every {section['pss_interval_s']:g} s).",
            "",
            "| case | tool | max RSS (GNU time) | anonymous (RssAnon) | PSS | PSS, anonymous "
            "| file pages (RssFile) |",
            "|:---|:---|---:|---:|---:|---:|---:|",
        ]
        for r in section["summary"]:
            cells = " | ".join(f"{r[k]:,.0f} MB" for k in MEMORY_FIELDS)
            parts.append(f"| {r['case']} | {r['tool']} | {cells} |")
        parts.append("")
    return "\n".join(parts)


def summarize(layers: int, records: list[dict], input_bytes: int, output_bytes: int) -> dict:
    """Medians per tool and the ratios the targets are about, as one flat record."""

    def median(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in records if r["tool"] == tool)

    row = {"layers": layers, "input_gb": input_bytes / 1e9, "output_gb": output_bytes / 1e9}
    for tool in TOOLS:
        key = tool.replace("-", "_")
        row[f"{key}_s"] = median(tool, "seconds")
        row[f"{key}_cpu_s"] = median(tool, "cpu_seconds")
        row[f"{key}_rss_mb"] = median(tool, "peak_rss_mb")
        if all("peak_rss_anon_mb" in r for r in records if r["tool"] == tool):
            row[f"{key}_anon_mb"] = median(tool, "peak_rss_anon_mb")
    row["pearl_over_mergekit"] = row["pearl_edu_s"] / row["mergekit_s"]
    row["pearl_over_floor"] = row["pearl_edu_s"] / row["floor_s"]
    row["pearl_over_mergekit_cpu"] = row["pearl_edu_cpu_s"] / row["mergekit_cpu_s"]
    return row


def check_targets(summary: list[dict]) -> dict:
    """Which of the engine's targets the medians meet."""
    worst_rss = max(row["pearl_edu_rss_mb"] for row in summary)
    smallest, largest = summary[0], summary[-1]
    growth = largest["pearl_edu_rss_mb"] / smallest["pearl_edu_rss_mb"] - 1
    return {
        "pearl_over_mergekit": all(
            r["pearl_over_mergekit"] <= TARGETS["pearl_over_mergekit_max"] for r in summary
        ),
        "pearl_over_floor": all(
            r["pearl_over_floor"] <= TARGETS["pearl_over_floor_max"] for r in summary
        ),
        "pearl_peak_rss": worst_rss <= TARGETS["pearl_peak_rss_mb_max"],
        "pearl_rss_growth": growth < TARGETS["pearl_rss_growth_max"],
        "pearl_rss_growth_measured": growth,
    }


def markdown_table(summary: list[dict]) -> str:
    """The results as a Markdown table (medians; CPU time is user + system)."""
    lines = [
        "| layers | inputs | pearl-edu | mergekit | I/O floor (direct / page cache) "
        "| pearl / mergekit | pearl / floor | CPU time pearl-edu / mergekit "
        "| peak RSS pearl-edu | peak RSS mergekit | output vs mergekit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['layers']} | {r['input_gb']:.1f} GB | {r['pearl_edu_s']:.1f} s "
            f"| {r['mergekit_s']:.1f} s | {r['floor_s']:.1f} s / {r['floor_buffered_s']:.1f} s "
            f"| {r['pearl_over_mergekit']:.2f}x | {r['pearl_over_floor']:.2f}x "
            f"| {r['pearl_edu_cpu_s']:.0f} s / {r['mergekit_cpu_s']:.0f} s "
            f"| {r['pearl_edu_rss_mb']:.0f} MB | {r['mergekit_rss_mb']:.0f} MB "
            f"| {agreement_text(r)} |"
        )
    return "\n".join(lines) + "\n"


def agreement_text(row: dict) -> str:
    """How the two outputs compared, in words ("not checked" for older results)."""
    if "identical_to_mergekit" not in row:
        return "not checked"
    if row["identical_to_mergekit"]:
        return "identical"
    return (
        f"{row['elements_differing_from_mergekit']:,} of {row['elements_compared']:,} "
        "elements differ"
    )


def snapshot_engine(folder: Path) -> Path:
    """Copy ``pearl_edu`` into ``folder``, so that every run measures the same source.

    The runs put ``folder`` first on ``PYTHONPATH``; edits to the working tree while the
    benchmark runs then change nothing.
    """
    shutil.copytree(REPO_ROOT / "pearl_edu", folder / "pearl_edu")
    return folder


def engine_fingerprint(root: Path) -> str:
    """A hash of the ``pearl_edu`` sources (Python and C) under ``root``: the measured state."""
    digest = hashlib.sha256()
    sources = (root / "pearl_edu").rglob("*")
    for path in sorted(p for p in sources if p.suffix in (".py", ".c")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from pearl_edu import kernels

    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(memory_kb / 1e6, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": metadata.version("mergekit"),
        "pearl_edu": metadata.version("pearl-edu"),
        "pearl_edu_kernels": kernels.available(),
    }


def memory_main(args: argparse.Namespace) -> None:
    """``--memory-only``: each tool's peak memory on the SLERP case, into memory_results.json."""
    records = []
    with tempfile.TemporaryDirectory(prefix="pearl-edu-engine-") as snapshot:
        engine = snapshot_engine(Path(snapshot))
        fingerprint = engine_fingerprint(engine)
        try:
            for layers in args.layers:
                records += memory_runs(layers, args.runs or 1, args.out, engine)
        finally:
            if not args.keep:
                shutil.rmtree(args.out, ignore_errors=True)
    about = (
        "Peak memory of a Pearl-like SLERP merge of two Mistral-7B-shaped bfloat16 models "
        "with few layers: GNU time's max RSS, and the peaks of anonymous memory and PSS."
    )
    save_memory_section("slerp", memory_section(about, records, fingerprint, args.note))
    print(MEMORY_RESULTS.with_suffix(".md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--runs", type=int, default=None, help="3 (--memory-only: 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.json")
    parser.add_argument("--keep", action="store_true", help="keep bench/out/ (the models)")
    parser.add_argument("--note", default="", help="conditions worth recording with the results")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure only the peak memory of pearl-edu and mergekit (--runs each, default 1), "
        "into memory_results.json; results.json and its timings are left as they are",
    )
    args = parser.parse_args()
    if not Path(GNU_TIME).is_file():
        raise SystemExit(
            f"{GNU_TIME} (GNU time) is needed for peak memory; install it with "
            "'sudo apt-get install time' (Debian/Ubuntu)"
        )
    if args.memory_only:
        memory_main(args)
        return

    args.runs = args.runs or 3
    all_runs, summary = [], []
    with tempfile.TemporaryDirectory(prefix="pearl-edu-engine-") as snapshot:
        engine = snapshot_engine(Path(snapshot))
        fingerprint = engine_fingerprint(engine)
        try:
            for layers in args.layers:
                runs, row = bench_one(layers, args.runs, args.out, engine)
                all_runs += runs
                summary.append(row)
        finally:
            if not args.keep:
                shutil.rmtree(args.out, ignore_errors=True)

    results = {
        "about": "Median wall time and peak RSS of a Pearl-like SLERP merge of two "
        "Mistral-7B-shaped bfloat16 models with few layers, warm page cache.",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "note": args.note,
        "machine": machine(),
        "pearl_edu_source_sha256": fingerprint,
        "runs_per_tool": args.runs,
        "targets": TARGETS,
        "targets_met": check_targets(summary),
        "summary": summary,
        "runs": all_runs,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(summary)
    args.results.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(json.dumps(results["targets_met"], indent=2))


if __name__ == "__main__":
    main()
