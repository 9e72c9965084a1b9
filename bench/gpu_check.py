"""Pearl's real case on a GPU and on its host's CPU: time, memory, and the contract checked.

    bench/gpu_check.sh [WORK_DIR]           (the usual way: a CUDA check, then this script)
    python bench/gpu_check.py WORK_DIR [--layers 32] [--gpu cuda] [--methods slerp,ties]

Writes two Mistral-7B-shaped models with ``--layers`` layers, as Pearl's parents are: the
base in float16 (OmniBeagle-7B's dtype), the other in bfloat16 (WizardMath-7B-V1.1's). Then,
for each method (SLERP with Pearl's own recipe and schedule; TIES, density 0.5), with
``dtype: bfloat16``:

1. merges on the GPU (``--gpu``, the device backend: `pearl_edu.backends.device`) and on
   the CPU (``--backend cpu``, mergekit's bits; TIES with ``--fast-trim``, which keeps the
   ties at the cut as the GPU does), each in a process of its own, recording its time, its peak host memory (the
   process's peak resident set) and, on the GPU, torch's peak device memory and the
   device's own peak as ``nvidia-smi`` samples it;
2. checks the contract (`pearl_edu.contract`): every element within one step of the
   dtype at its inputs' scale (``pearl-edu verify --config --input-scale-ulp 1``), and for
   SLERP every tensor's cosine within ``COSINE_TOLERANCE`` of the CPU's;
3. deletes the two outputs (the next method's need the room).

The run is appended to ``bench/gpu_results.json`` (a list of runs) and, as a section, to
``bench/gpu_results.md``; then ``pearl_edu/data/gpu_record.json``, the record that
``pearl-edu merge --device auto`` reads, is rewritten from the runs so far: it lists, run by
run, the methods that met their targets on the GPU (`method_met_targets`), and ``auto``
picks the GPU for those alone. The process exits 0 when the contract held for every method, 1
when it did not, 2 on bad input or missing room. ``--gpu cpu`` stands a CPU in for the GPU
(the device backend on the CPU), so that the whole script runs, small, on any machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS_JSON = ROOT / "bench" / "gpu_results.json"
RESULTS_MD = ROOT / "bench" / "gpu_results.md"
# What `pearl-edu merge --device auto` reads (`pearl_edu.devices.gpu_record`).
PACKAGE_RECORD = ROOT / "pearl_edu" / "data" / "gpu_record.json"
PACKAGE_RECORD_ABOUT = (
    "Runs of bench/gpu_check.sh on a GPU in which a method met its targets (faster than on "
    "the CPU by the method's margin, the GPU contract held, no more host memory), copied "
    "from bench/gpu_results.json by bench/gpu_check.py. pearl-edu merge --device auto picks "
    "the GPU only for a method listed here with targets_met true."
)
METHODS = ("slerp", "ties")
# The parents' dtypes, base first: OmniBeagle-7B ships float16, WizardMath-7B-V1.1 bfloat16.
PARENT_DTYPES = ("float16", "bfloat16")
TIES_DENSITY = 0.5
# Elements of a Mistral-7B-shaped model outside its layers (embeddings and lm_head) and in
# each layer; two bytes each.
OUTSIDE_ELEMENTS = 2 * 32000 * 4096
LAYER_ELEMENTS = 218_103_808
# The targets a run is judged by: SLERP on the GPU no slower than on the CPU, TIES at least
# three times faster, the contract held, the GPU path's peak host memory no higher.
TIES_SPEEDUP = 3.0


def say(text: str) -> None:
    print(f"gpu_check: {text}", flush=True)


def model_gb(layers: int) -> float:
    """The size of one Mistral-7B-shaped model with ``layers`` layers, in GB."""
    return 2 * (OUTSIDE_ELEMENTS + layers * LAYER_ELEMENTS) / 1e9


def configs(model_a: Path, model_b: Path, layers: int) -> dict[str, str]:
    """Each method's config: Pearl's recipe for SLERP, and TIES over the same two models."""
    from pearl_edu.recipes import pearl_recipe

    ties = (
        f"models:\n  - model: {model_a}\n  - model: {model_b}\n    parameters:\n"
        f"      weight: 1.0\n      density: {TIES_DENSITY}\n"
        f"merge_method: ties\nbase_model: {model_a}\ndtype: bfloat16\n"
    )
    return {"slerp": pearl_recipe(model_a, model_b, num_layers=layers), "ties": ties}


def merge_command(
    python: str, config: Path, out: Path, device: str, backend: str, fast_trim: bool
) -> list[str]:
    """The command that runs one measured merge (`measure_one`) in a process of its own."""
    command = [python, str(Path(__file__).resolve()), "--merge-one", str(config), str(out)]
    command += ["--device", device, "--backend", backend]
    return command + (["--fast-trim"] if fast_trim else [])


def measure_one(config: str, out: str, device: str, backend: str, fast_trim: bool) -> dict:
    """One merge, in this process: its time, peak host memory and, on CUDA, device memory.

    A GPU's context is started before the clock (its time is reported apart), so that the
    merge's time is the merge's.
    """
    import resource

    import torch

    from pearl_edu.engine import merge
    from pearl_edu.process_settings import return_freed_memory_to_the_system

    return_freed_memory_to_the_system()  # as the pearl-edu command does before merging
    started = time.perf_counter()
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context, outside the merge's time
        torch.cuda.synchronize(device)
    context_s = time.perf_counter() - started
    result = merge(config, out, device=device, backend=backend, fast_trim=fast_trim, progress=False)
    on_cuda = device.startswith("cuda")
    device_peak = torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda else 0.0
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    return {
        "seconds": round(result.seconds, 2),
        "context_s": round(context_s, 2),
        "peak_host_gb": round(host_peak, 2),
        "peak_device_gb": round(device_peak, 2),
        "device": str(result.device),
    }


def run_measured(command: list[str], sample_gpu: bool) -> dict:
    """Run one measured merge; with ``sample_gpu``, nvidia-smi's peak device memory too."""
    smi = None
    if sample_gpu and shutil.which("nvidia-smi"):
        query = ["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
        smi = subprocess.Popen(
            ["nvidia-smi", *query], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        samples = ""
        if smi is not None:
            smi.terminate()
            samples = smi.communicate()[0]
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    used = [float(line) for line in samples.split() if line.replace(".", "", 1).isdigit()]
    measured["smi_peak_gb"] = round(max(used) * 1.048576 / 1000, 2) if used else None
    return measured


def cosine_gap(config: str, device: str) -> float:
    """The largest |cosine on ``device`` - the CPU's (mergekit's)| over a SLERP merge's tensors."""
    import torch

    from pearl_edu.backends import cpu
    from pearl_edu.backends import device as device_backend
    from pearl_edu.contract import MergeInputs
    from pearl_edu.core.interpolation import NORM_EPS, work_dtype

    inputs = MergeInputs(config)
    largest = 0.0
    try:
        for job in inputs.jobs.values():
            if job.method != "slerp":
                continue
            tensors = []
            for source in job.inputs:
                tensor = inputs.readers[source.model].read(source.tensor)
                tensors.append(tensor.to(inputs.dtype or tensor.dtype))
            v0, v1 = tensors[job.base_index], tensors[1 - job.base_index]
            if v0.numel() == 0:
                continue
            work = work_dtype(v0)
            reference = cpu.cosine(v0.reshape(-1), v1.reshape(-1), eps=NORM_EPS, work=work)
            x, y = (v.reshape(-1).to(device=device, dtype=work) for v in (v0, v1))
            largest = max(largest, abs(float(device_backend.cosine(x, y)) - float(reference)))
            del x, y
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    finally:
        inputs.close()
    return largest


def check_contract(gpu_out: Path, cpu_out: Path, config: str, method: str, device: str) -> dict:
    """`pearl-edu verify` at the inputs' scale, and (SLERP) the cosines: the contract's figures."""
    from pearl_edu.contract import COSINE_TOLERANCE
    from pearl_edu.verification import verify

    report = verify(cpu_out, gpu_out, config=config, input_scale_ulp=1)
    figures = {
        "max_input_scale_ulp": report.max_input_scale_ulp_diff,
        "elements_differing": report.num_differing,
        "elements": report.num_elements,
        "verify_ok": report.ok,
    }
    ok = report.ok
    if method == "slerp":
        gap = cosine_gap(config, device)
        figures["max_cosine_diff"] = gap
        ok = ok and gap <= COSINE_TOLERANCE
    figures["contract_ok"] = ok
    return figures


def method_met_targets(method: str, m: dict) -> bool:
    """Whether one method's figures met its targets: its speed-up, the contract, host memory.

    SLERP must be no slower on the GPU, TIES at least `TIES_SPEEDUP` times faster; a
    method without a speed target here never meets its targets.
    """
    if method == "slerp":
        fast_enough = m["cuda_s"] <= m["cpu_s"]
    elif method == "ties":
        fast_enough = m["cpu_s"] >= TIES_SPEEDUP * m["cuda_s"]
    else:
        return False
    return bool(fast_enough and m["contract_ok"] and m["peak_host_gb"] <= m["cpu_peak_host_gb"])


def package_record(runs: list[dict]) -> dict:
    """The package's GPU record (``pearl_edu/data/gpu_record.json``) from the runs recorded.

    Only runs on a real GPU, and in each only the methods that met their targets there:
    ``pearl-edu merge --device auto`` picks the GPU for those methods alone.
    """
    kept = []
    for run in runs:
        if "standing in" in str(run.get("device", "")):
            continue
        met = {
            name: {"targets_met": True, "cpu_s": m["cpu_s"], "cuda_s": m["cuda_s"]}
            for name, m in run.get("methods", {}).items()
            if method_met_targets(name, m)
        }
        if met:
            fields = ("date", "device", "host", "layers", "command")
            kept.append({**{k: run[k] for k in fields if k in run}, "methods": met})
    return {"about": PACKAGE_RECORD_ABOUT, "runs": kept}


def sync_package_record(results_json: Path, path: Path) -> dict:
    """Write the package's GPU record from ``results_json`` (the runs so far); return it."""
    runs = json.loads(results_json.read_text()) if results_json.is_file() else []
    made = package_record(runs)
    path.write_text(json.dumps(made, indent=2) + "\n")
    return made


def judge(methods: dict[str, dict]) -> dict[str, bool | None]:
    """Whether a run met each target (None where its method was not run)."""
    slerp, ties = methods.get("slerp"), methods.get("ties")
    return {
        "slerp_no_slower_on_gpu": slerp["cuda_s"] <= slerp["cpu_s"] if slerp else None,
        "ties_3x_faster_on_gpu": ties["cpu_s"] >= TIES_SPEEDUP * ties["cuda_s"] if ties else None,
        "contract_held": all(m["contract_ok"] for m in methods.values()),
        "host_memory_no_higher": all(
            m["peak_host_gb"] <= m["cpu_peak_host_gb"] for m in methods.values()
        ),
    }


def record(run: dict, results_json: Path, results_md: Path) -> None:
    """Append ``run`` to the JSON list of runs and a section to the Markdown log."""
    runs = json.loads(results_json.read_text()) if results_json.exists() else []
    runs.append(run)
    results_json.write_text(json.dumps(runs, indent=2) + "\n")
    text = results_md.read_text() if results_md.exists() else "# `bench/gpu_check.sh`\n"
    results_md.write_text(text.rstrip("\n") + "\n\n" + markdown_section(run))


def markdown_section(run: dict) -> str:
    """A run as a section of ``gpu_results.md``: the machine, one row per method, the verdict."""
    rows = [
        f"## Check of {run['date']}: {run['layers']} layers, parents float16 and bfloat16",
        "",
        f"Machine: {run['device']}; {run['host']}. Command: `{run['command']}`.",
        "",
        "| method | CPU | GPU | peak host memory (GPU / CPU run) | peak GPU memory "
        "(torch / device) | contract | largest difference at the inputs' scale |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, m in run["methods"].items():
        smi = "-" if m.get("smi_peak_gb") is None else f"{m['smi_peak_gb']:.2f}"
        steps = m.get("max_input_scale_ulp")
        rows.append(
            f"| {name}{' (CPU: --fast-trim)' if name == 'ties' else ''} | {m['cpu_s']:.1f} s "
            f"| {m['cuda_s']:.1f} s | {m['peak_host_gb']:.2f} / {m['cpu_peak_host_gb']:.2f} GB "
            f"| {m['peak_device_gb']:.2f} / {smi} GB | {'held' if m['contract_ok'] else 'FAILED'} "
            f"| {'-' if steps is None else f'{steps:.3g} ULP'} |"
        )
    slerp = run["methods"].get("slerp", {})
    if "max_cosine_diff" in slerp:
        rows += ["", f"SLERP's largest cosine difference: {slerp['max_cosine_diff']:.3g}."]
    met = ", ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in run["targets"].items())
    return "\n".join([*rows, "", f"Targets met: {met}.", ""])


def machine_description(gpu: str) -> tuple[str, str]:
    """The GPU (or its stand-in) and the host, in words, for the record."""
    import torch

    if gpu.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(gpu))
        device = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    else:
        device = f"{gpu} standing in for a GPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    host = f"{os.cpu_count()} CPU cores, {memory:.0f} GiB of RAM, torch {torch.__version__}"
    return device, host


def free_gb(path: Path) -> float:
    """Free space on ``path``'s file system in GB (``path`` is made when missing)."""
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 1e9


def check_room_for_inputs(work: Path, layers: int, model_args: str) -> None:
    """Refuse to start (SystemExit 2) when WORK_DIR cannot hold the two inputs."""
    if model_args.strip():
        return  # other shapes than Mistral-7B's: the outputs' check, after, measures them
    need = 2 * model_gb(layers) * 1.05
    if free_gb(work) < need:
        raise SystemExit(
            f"gpu_check: error: {work} has {free_gb(work):.1f} GB free, {need:.1f} GB are "
            f"needed for the two {layers}-layer inputs (set LAYERS lower)"
        )


def plan_outputs(work: Path, outputs: Path | None, model_bytes: int) -> Path:
    """Where the outputs go: OUTPUTS_DIR, else WORK_DIR, else /dev/shm, the first with room.

    One method's two outputs are there at a time (``model_bytes`` each). Raises
    SystemExit(2), saying what to do, when none has room.
    """
    need = 2 * model_bytes * 1.05 / 1e9
    for folder in [outputs] if outputs is not None else [work, Path("/dev/shm")]:
        if folder.is_dir() and free_gb(folder) >= need:
            return folder / "gpu-check-outputs"
    raise SystemExit(
        f"gpu_check: error: no room for two outputs ({need:.1f} GB) beside the inputs; "
        "set OUTPUTS_DIR to another disk, or LAYERS lower"
    )


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="folder for the two input models")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--gpu", default="cuda", help="cuda, cuda:N, or cpu to stand in")
    parser.add_argument("--methods", default=",".join(METHODS), help="slerp,ties or one of them")
    parser.add_argument("--outputs", type=Path, default=None, help="folder for the outputs")
    parser.add_argument("--model-args", default="", help="more arguments for make_models.py")
    parser.add_argument("--make-only", action="store_true", help="write the models and stop")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--results-json", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    parser.add_argument("--package-record", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true", help="append nothing to the results")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or not set(methods) <= set(METHODS):
        parser.error(f"--methods: expected some of {','.join(METHODS)}, got {args.methods!r}")
    if args.layers < 1:
        parser.error(f"--layers: expected a positive number, got {args.layers}")
    args.methods = methods
    # A real GPU's run is recorded in the repository's files; a stand-in's only where asked.
    standing_in = not args.gpu.startswith("cuda")
    if args.results_json is None and not standing_in:
        args.results_json = RESULTS_JSON
    if args.results_md is None and not standing_in:
        args.results_md = RESULTS_MD
    # The package's record follows the repository's results only.
    if args.package_record is None and args.results_json == RESULTS_JSON:
        args.package_record = PACKAGE_RECORD
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--merge-one"]:
        one = argparse.ArgumentParser()
        for name in ("config", "out"):
            one.add_argument(name)
        one.add_argument("--device", required=True)
        one.add_argument("--backend", required=True)
        one.add_argument("--fast-trim", action="store_true")
        a = one.parse_args(argv[1:])
        print(json.dumps(measure_one(a.config, a.out, a.device, a.backend, a.fast_trim)))
        return 0
    args = parse_args(argv)
    work = args.work.resolve()
    python = sys.executable
    make = [python, str(ROOT / "bench" / "make_models.py"), str(work), "--layers", str(args.layers)]
    make += ["--dtypes", ",".join(PARENT_DTYPES), "--device", args.gpu, *args.model_args.split()]
    if args.dry_run:
        say(
            f"would write two {args.layers}-layer models ({model_gb(args.layers):.1f} GB each, "
            f"{' and '.join(PARENT_DTYPES)}) into {work}: {' '.join(make)}"
        )
        for method in args.methods:
            cpu_backend = "--backend cpu" + (", --fast-trim" if method == "ties" else "")
            say(
                f"would merge {method} on {args.gpu} (device backend) and on cpu ({cpu_backend}), "
                "then verify --input-scale-ulp 1"
            )
        say(f"would record to {args.results_json or 'nothing'} and {args.results_md or 'nothing'}")
        return 0
    check_room_for_inputs(work, args.layers, args.model_args)
    outputs: list[Path] = []  # where run() put the outputs, to delete
    try:
        return run(args, work, outputs, make, python)
    finally:
        if not args.keep:
            for folder in [work, *outputs]:
                shutil.rmtree(folder, ignore_errors=True)


def run(
    args: argparse.Namespace, work: Path, made: list[Path], make: list[str], python: str
) -> int:
    from pearl_edu import kernels

    state = "loaded" if kernels.available() else "not built (torch loops)"
    say(f"{os.cpu_count()} CPU cores; compiled kernels: {state}")
    say(f"writing two Mistral-7B-shaped models with {args.layers} layers into {work}")
    started = time.perf_counter()
    subprocess.run(make, check=True, stdout=subprocess.DEVNULL)
    size = folder_bytes(work / "model_a") / 1e9
    say(
        f"models written in {time.perf_counter() - started:.1f} s "
        f"({' and '.join(PARENT_DTYPES)}, {size:.2f} GB each)"
    )
    if args.make_only:
        from pearl_edu.verification import verify

        if not verify(work / "model_a", work / "model_a").identical:
            raise SystemExit("gpu_check: error: model_a cannot be read back")
        say("MAKE_ONLY=1: stopping after the models")
        return 0

    outputs = plan_outputs(work, args.outputs, folder_bytes(work / "model_a"))
    made.append(outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    say(f"outputs in {outputs}")
    device, host = machine_description(args.gpu)
    results: dict[str, dict] = {}
    for method, text in configs(work / "model_a", work / "model_b", args.layers).items():
        if method not in args.methods:
            continue
        config = work / f"{method}.yml"
        config.write_text(text)
        gpu_out, cpu_out = outputs / f"{method}-gpu", outputs / f"{method}-cpu"
        say(f"{method}: merging on {args.gpu}, the device backend ...")
        on_gpu = run_measured(
            merge_command(python, config, gpu_out, args.gpu, "device", False),
            sample_gpu=args.gpu.startswith("cuda"),
        )
        say(f"{method}: merging on cpu, mergekit's bits ...")
        on_cpu = run_measured(
            merge_command(python, config, cpu_out, "cpu", "cpu", method == "ties"),
            sample_gpu=False,
        )
        say(f"{method}: checking the contract ...")
        contract = check_contract(gpu_out, cpu_out, str(config), method, args.gpu)
        results[method] = {
            "cpu_s": on_cpu["seconds"],
            "cuda_s": on_gpu["seconds"],
            "contract_ok": contract["contract_ok"],
            "peak_host_gb": on_gpu["peak_host_gb"],
            "peak_device_gb": on_gpu["peak_device_gb"],
            "cpu_peak_host_gb": on_cpu["peak_host_gb"],
            "smi_peak_gb": on_gpu["smi_peak_gb"],
            "cuda_context_s": on_gpu["context_s"],
            **{k: v for k, v in contract.items() if k != "contract_ok"},
        }
        say(
            f"{method}: cpu {on_cpu['seconds']:.1f} s, {args.gpu} {on_gpu['seconds']:.1f} s, "
            f"contract {'held' if contract['contract_ok'] else 'FAILED'}"
        )
        if not args.keep:
            shutil.rmtree(gpu_out, ignore_errors=True)
            shutil.rmtree(cpu_out, ignore_errors=True)

    run_record = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "host": host,
        "layers": args.layers,
        "parents": list(PARENT_DTYPES),
        "kernels": kernels.available(),
        "command": ("" if args.layers == 32 else f"LAYERS={args.layers} ") + "bench/gpu_check.sh",
        "methods": results,
    }
    run_record["targets"] = judge(results)
    print(markdown_section(run_record))
    if args.results_json is not None and not args.no_record:
        record(run_record, args.results_json, args.results_md or RESULTS_MD)
        say(f"recorded in {args.results_json}")
        if args.package_record is not None:
            made = sync_package_record(args.results_json, args.package_record)
            passed = sorted({name for run in made["runs"] for name in run["methods"]})
            say(
                f"{args.package_record}: --device auto now picks the GPU for "
                f"{', '.join(passed) if passed else 'no method'}"
            )
    held = run_record["targets"]["contract_held"]
    say("OK: the contract held for every method" if held else "FAILED: the contract did not hold")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
