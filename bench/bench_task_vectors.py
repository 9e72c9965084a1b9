"""Time TIES and DARE with `pearl-edu merge` against `mergekit-yaml`.

    python bench/bench_task_vectors.py [--layers 2] [--runs 3] [--keep]

Makes three Mistral-7B-shaped random bfloat16 models under ``bench/out/`` (2 layers: 1.4 GB
each): a base and two fine-tunes of it (the base plus noise of their own), then merges the
two over the base, density 0.5 and weight 0.5 each, ``dtype: bfloat16``:

- ``ties`` (normalized, as mergekit's default): ``pearl-edu merge``, which keeps mergekit's
  bits, ``pearl-edu merge --fast-trim``, which breaks ties at the trim's cut by position
  instead of sorting, and ``mergekit-yaml``;
- ``dare_ties`` (rescaled, as mergekit's default): ``pearl-edu merge`` and ``mergekit-yaml``.

Each run is wrapped in GNU time for its peak resident memory, after ``sync`` and a pause,
with the inputs in the page cache; the order of the tools rotates from run to run. After
the timed runs, each pearl-edu output is compared with mergekit's: TIES must be identical
(and with ``--fast-trim`` may differ only in entries tied at the cut: the count is
recorded); DARE draws differently by design (a generator per tensor and model, where
mergekit draws from torch's global generator), so for it the fraction of task-vector
entries kept is recorded for both. Results go to ``bench/task_vector_results.json`` and
``bench/task_vector_results.md`` (the table the book includes).
"""

from __future__ import annotations

import argparse
import json
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
    BIN,
    GNU_TIME,
    MEMORY_RESULTS,
    SETTLE_SECONDS,
    clean_and_settle,
    engine_fingerprint,
    folder_bytes,
    machine,
    memory_line,
    memory_section,
    save_memory_section,
    snapshot_engine,
    timed_run,
    warm_page_cache,
)
from make_models import make_models  # noqa: E402

TARGETS = {"pearl_over_mergekit_max": 0.5, "pearl_peak_rss_mb_max": 2500}
DENSITY = 0.5
WEIGHT = 0.5
# (case, method, pearl-edu's extra flags): what is timed, with mergekit beside each method.
CASES = {
    "ties": ("ties", []),
    "ties --fast-trim": ("ties", ["--fast-trim"]),
    "dare_ties": ("dare_ties", []),
}


def config_text(method: str, models: tuple[Path, ...]) -> str:
    """Two fine-tunes over the base, density 0.5 and weight 0.5 each, bfloat16."""
    base, *others = models
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for other in others:
        lines += [
            f"  - model: {other}",
            f"    parameters: {{density: {DENSITY}, weight: {WEIGHT}}}",
        ]
    return "\n".join(lines + ["dtype: bfloat16", ""])


def command(tool: str, config: Path, out: Path, flags: list[str]) -> list[str]:
    if tool == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer", "--quiet"]
    return [
        str(BIN / "pearl-edu"),
        "merge",
        str(config),
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ] + flags


def tools_for(method: str) -> list[tuple[str, list[str]]]:
    """(label, pearl-edu flags) of every run for one method, mergekit last."""
    runs = [(case, flags) for case, (m, flags) in CASES.items() if m == method]
    return runs + [(f"mergekit {method}", [])]


def kept_fraction(merged: Path, base: Path) -> float:
    """The fraction of entries where the merged model differs from the base (kept somewhere)."""
    from pearl_edu.reading import ModelReader, read_header

    changed = total = 0
    header = read_header(merged)
    with ModelReader(header) as out, ModelReader(read_header(base)) as reference:
        for name in header.tensors:
            a, b = out.read(name), reference.read(name)
            changed += int((a != b).sum())
            total += a.numel()
    return changed / total


def sort_seconds(base: Path, others: tuple[Path, ...]) -> float:
    """Seconds that sorting every task vector's magnitudes takes, as mergekit's TIES sorts.

    ``torch.argsort`` of the float32 magnitudes, descending, of each tensor of each
    fine-tune's task vector, one after another: the part of TIES that mergekit's bits
    require, timed alone in this process.
    """
    import torch

    from pearl_edu.reading import ModelReader, read_header

    header = read_header(base)
    seconds = 0.0
    with ModelReader(header) as reference:
        for other in others:
            with ModelReader(read_header(other)) as model:
                for name in header.tensors:
                    delta = model.read(name) - reference.read(name)
                    magnitudes = delta.abs().reshape(-1).float()
                    started = time.perf_counter()
                    torch.argsort(magnitudes, descending=True)
                    seconds += time.perf_counter() - started
    return seconds


def compare(a: Path, b: Path) -> dict:
    from pearl_edu.verification import verify

    report = verify(a, b)
    return {
        "identical": report.identical,
        "differing": report.num_differing,
        "compared": report.num_elements,
    }


def prepare_models(layers: int, out_root: Path) -> tuple[Path, tuple[Path, ...]]:
    """The case's folder and its three models (made if missing), read once: a warm cache."""
    case_dir = out_root / f"task-vectors-{layers}"
    models = tuple(case_dir / f"model_{c}" for c in "abc")
    if not all((m / "config.json").is_file() for m in models):
        print(f"[{layers} layers] writing three Mistral-7B-shaped models ...", flush=True)
        shutil.rmtree(case_dir, ignore_errors=True)
        make_models(case_dir, num_layers=layers, count=3, seed=layers)
    warm_page_cache(list(models))
    return case_dir, models


def memory_runs(layers: int, runs: int, out_root: Path, engine: Path) -> list[dict]:
    """Every case and mergekit's merge of each method, for their peak memory only."""
    case_dir, models = prepare_models(layers, out_root)
    records = []
    for method in ("ties", "dare_ties"):
        config = case_dir / f"{method}.yml"
        config.write_text(config_text(method, models))
        for run in range(runs):
            for label, flags in tools_for(method):
                out = clean_and_settle(case_dir)
                tool = "mergekit" if label.startswith("mergekit") else "pearl-edu"
                measured = timed_run(command(tool, config, out, flags), engine, rollup=True)
                case = label.removeprefix("mergekit ")
                records.append({"case": case, "tool": tool, "run": run, **measured})
                print(memory_line(records[-1]), flush=True)
    shutil.rmtree(case_dir / "merged", ignore_errors=True)
    return records


def bench(layers: int, runs: int, out_root: Path, engine: Path) -> tuple[list[dict], list[dict]]:
    case_dir, models = prepare_models(layers, out_root)
    records, summary = [], []
    for method in ("ties", "dare_ties"):
        config = case_dir / f"{method}.yml"
        config.write_text(config_text(method, models))
        tools = tools_for(method)
        for run in range(runs):
            order = tools[run % len(tools) :] + tools[: run % len(tools)]
            for label, flags in order:
                out = case_dir / "merged"
                for leftover in (out, *case_dir.glob(".merged*")):
                    shutil.rmtree(leftover, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                time.sleep(SETTLE_SECONDS)
                tool = "mergekit" if label.startswith("mergekit") else "pearl-edu"
                measured = timed_run(command(tool, config, out, flags), engine)
                records.append({"layers": layers, "case": label, "run": run, **measured})
                print(
                    f"[{method}] run {run} {label:22s} {measured['seconds']:7.2f} s wall "
                    f"{measured['cpu_seconds']:7.2f} s CPU {measured['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
                if run == runs - 1:
                    keep = case_dir / f"kept-{label.replace(' ', '_')}"
                    shutil.rmtree(keep, ignore_errors=True)
                    out.rename(keep)
        summary += summarize(method, tools, records, case_dir, models)
    return records, summary


def summarize(method, tools, records, case_dir: Path, models) -> list[dict]:
    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in records if r["case"] == label)

    mergekit_label = f"mergekit {method}"
    mergekit_out = case_dir / f"kept-{mergekit_label.replace(' ', '_')}"
    rows = []
    for label, _ in tools[:-1]:
        out = case_dir / f"kept-{label.replace(' ', '_')}"
        row = {
            "case": label,
            "method": method,
            "input_gb": sum(map(folder_bytes, models)) / 1e9,
            "pearl_edu_s": median(label, "seconds"),
            "mergekit_s": median(mergekit_label, "seconds"),
            "pearl_edu_cpu_s": median(label, "cpu_seconds"),
            "mergekit_cpu_s": median(mergekit_label, "cpu_seconds"),
            "pearl_edu_rss_mb": median(label, "peak_rss_mb"),
            "mergekit_rss_mb": median(mergekit_label, "peak_rss_mb"),
        }
        if all("peak_rss_anon_mb" in r for r in records if r["case"] in (label, mergekit_label)):
            row["pearl_edu_anon_mb"] = median(label, "peak_rss_anon_mb")
            row["mergekit_anon_mb"] = median(mergekit_label, "peak_rss_anon_mb")
        row["pearl_over_mergekit"] = row["pearl_edu_s"] / row["mergekit_s"]
        row["pearl_over_mergekit_cpu"] = row["pearl_edu_cpu_s"] / row["mergekit_cpu_s"]
        if method == "ties":
            row["versus_mergekit"] = compare(out, mergekit_out)
            if label == "ties":
                row["sort_s"] = sort_seconds(models[0], models[1:])
        else:
            row["kept_fraction"] = kept_fraction(out, models[0])
            row["mergekit_kept_fraction"] = kept_fraction(mergekit_out, models[0])
        row["targets_met"] = {
            "pearl_over_mergekit": row["pearl_over_mergekit"] <= TARGETS["pearl_over_mergekit_max"],
            "pearl_peak_rss": row["pearl_edu_rss_mb"] <= TARGETS["pearl_peak_rss_mb_max"],
        }
        rows.append(row)
    for path in case_dir.glob("kept-*"):
        shutil.rmtree(path, ignore_errors=True)
    return rows


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| merge | pearl-edu | mergekit | pearl / mergekit | CPU time pearl-edu / mergekit "
        "| peak RSS pearl-edu | peak RSS mergekit | output vs mergekit |",
        "|:---|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in summary:
        lines.append(
            f"| `{r['case']}` | {r['pearl_edu_s']:.1f} s | {r['mergekit_s']:.1f} s "
            f"| {r['pearl_over_mergekit']:.2f}x "
            f"| {r['pearl_edu_cpu_s']:.0f} s / {r['mergekit_cpu_s']:.0f} s "
            f"| {r['pearl_edu_rss_mb']:.0f} MB | {r['mergekit_rss_mb']:.0f} MB | {agreement(r)} |"
        )
    return "\n".join(lines) + "\n"


def agreement(row: dict) -> str:
    if "versus_mergekit" in row:
        v = row["versus_mergekit"]
        if v["identical"]:
            return "identical"
        return (
            f"{v['differing']:,} of {v['compared']:,} differ ({v['differing'] / v['compared']:.3%})"
        )
    return (
        f"other draws; entries changed {row['kept_fraction']:.1%} "
        f"(mergekit {row['mergekit_kept_fraction']:.1%})"
    )


def memory_main(args: argparse.Namespace) -> None:
    """``--memory-only``: the peaks of TIES and DARE's merges, into memory_results.json."""
    with tempfile.TemporaryDirectory(prefix="pearl-edu-engine-") as snapshot:
        engine = snapshot_engine(Path(snapshot))
        fingerprint = engine_fingerprint(engine)
        try:
            records = memory_runs(args.layers, args.runs or 1, args.out, engine)
        finally:
            if not args.keep:
                shutil.rmtree(args.out, ignore_errors=True)
    about = (
        f"Peak memory of TIES and DARE-TIES merges of two Mistral-7B-shaped bfloat16 fine-tunes "
        f"over their base ({args.layers} layers, density 0.5): GNU time's max RSS, and the "
        "peaks of anonymous memory and PSS."
    )
    section = memory_section(about, records, fingerprint, args.note)
    save_memory_section("task_vectors", section)
    print(MEMORY_RESULTS.with_suffix(".md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="3 (--memory-only: 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "task_vector_results.json")
    parser.add_argument("--keep", action="store_true", help="keep bench/out/ (the models)")
    parser.add_argument("--note", default="", help="conditions worth recording with the results")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure only the peak memory of each case and of mergekit (--runs each, default "
        "1), into memory_results.json; task_vector_results.json is left as it is",
    )
    args = parser.parse_args()
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} (GNU time) is needed for peak memory: apt-get install time")
    if args.memory_only:
        memory_main(args)
        return
    args.runs = args.runs or 3
    with tempfile.TemporaryDirectory(prefix="pearl-edu-engine-") as snapshot:
        engine = snapshot_engine(Path(snapshot))
        try:
            records, summary = bench(args.layers, args.runs, args.out, engine)
        finally:
            if not args.keep:
                shutil.rmtree(args.out, ignore_errors=True)
        fingerprint = engine_fingerprint(engine)
    results = {
        "about": "Median wall time and peak RSS of TIES and DARE-TIES merges of two "
        "Mistral-7B-shaped bfloat16 fine-tunes over their base, density 0.5, warm page cache.",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "note": args.note,
        "machine": machine(),
        "pearl_edu_source_sha256": fingerprint,
        "layers": args.layers,
        "runs_per_tool": args.runs,
        "targets": TARGETS,
        "summary": summary,
        "runs": records,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(summary)
    args.results.with_suffix(".md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
