"""Before a 7B merge: what the run needs, what the machine has, and whether to start.

A full Pearl-7B merge downloads two 14.5 GB models, writes a third, and (to verify it)
downloads the published one. Finding out after an hour that the disk is full is the
commonest way such a run fails, so the chapter checks first.

The check is split in three so that each part can be tested on its own:

- `measure_resources` reads the machine: free disk under each folder, available RAM,
  the GPUs torch sees, whether the Hub answers;
- `requirements` works out what a run needs from the model references: downloads (from the
  Hub's file listing, or from the model cards when offline), output size, memory;
- `decide` is a pure function of the two records. It returns a `Preflight` whose
  `raise_if_refused` raises `PreflightError` with one line per run saying what to change.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from pearl_edu.errors import PearlEduError

GB = 1000**3

# Download sizes stated on the model cards, used when the Hub's file listing cannot be
# read (offline). OmniBeagle ships 2 safetensors shards; WizardMath only pickle .bin
# shards (9.94 + 4.54 GB); the published Pearl-7B-slerp 8 safetensors shards.
KNOWN_DOWNLOAD_BYTES = {
    "mlabonne/OmniBeagle-7B": int(14.5 * GB),
    "WizardLM/WizardMath-7B-V1.1": int((9.94 + 4.54) * GB),
    "louisbrulenaudet/Pearl-7B-slerp": int(14.5 * GB),
}
# A merged Mistral-7B in bfloat16: 7.24 billion parameters of 2 bytes each.
MISTRAL_7B_PARAMETERS = 7_241_732_096
# What the streaming merge holds, as an estimate (not measured on a 7B run): the read-ahead
# budget plus a few float32 copies of the largest tensor (the embeddings).
MERGE_WORKING_COPIES = 6
# Loading the model to generate text: its weights plus room for activations (an estimate).
USE_MEMORY_FACTOR = 1.2
# Free space to keep on a disk after the run, so the system stays usable.
DISK_MARGIN_BYTES = 2 * GB


class PreflightError(PearlEduError):
    """The machine cannot do the run as asked; the message says what to change."""


@dataclass(frozen=True)
class DiskSpace:
    """Free bytes under a folder, and which filesystem holds it (``os.stat().st_dev``)."""

    free_bytes: int
    filesystem: int


@dataclass(frozen=True)
class Gpu:
    """One GPU as torch sees it."""

    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Resources:
    """What the machine has, measured once by `measure_resources` (or made up by a test)."""

    disk: dict[Path, DiskSpace]
    ram_available_bytes: int
    gpus: tuple[Gpu, ...] = ()
    hub_reachable: bool = True


@dataclass(frozen=True)
class Requirements:
    """What a run needs: bytes to write under each folder, memory, a GPU, the Hub."""

    disk_bytes: dict[Path, int]
    ram_bytes: int
    gpu_memory_bytes: int = 0
    """Needed on the GPU when the run uses one; 0 when it does not."""
    device: str = "auto"
    downloads: dict[str, int] = field(default_factory=dict)
    """Repo id -> bytes still to download (repos already in the cache are left out)."""
    download_source: str = "none"
    """Where the download sizes come from: ``Hub listing``, ``model cards`` or ``none``."""
    model_bytes: int = 0
    """Memory to load the merged model for generation, on a GPU or else in RAM; 0: not used."""


@dataclass(frozen=True)
class Check:
    """One line of the preflight: what is needed, what there is, and what to change."""

    what: str
    needed: str
    available: str
    ok: bool
    advice: str = ""


@dataclass(frozen=True)
class Preflight:
    """The decision: every check, and whether the run may start."""

    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(check.ok for check in self.checks)

    def table(self) -> str:
        """The checks as an aligned text table."""
        rows = [("check", "needed", "available", "")]
        rows += [(c.what, c.needed, c.available, "ok" if c.ok else "NO") for c in self.checks]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )

    def raise_if_refused(self) -> None:
        """Raise `PreflightError` naming every failed check and what to change."""
        failed = [c for c in self.checks if not c.ok]
        if failed:
            reasons = "; ".join(
                f"{c.what}: needs {c.needed}, has {c.available} ({c.advice})" for c in failed
            )
            raise PreflightError(f"preflight refused the run: {reasons}")


# --------------------------------------------------------------------------------------
# The decision: a pure function of what is needed and what there is
# --------------------------------------------------------------------------------------


def decide(needs: Requirements, has: Resources) -> Preflight:
    """Compare a run's `Requirements` with a machine's `Resources`, check by check."""
    checks = [*_disk_checks(needs, has), _ram_check(needs, has), _gpu_check(needs, has)]
    if needs.model_bytes:
        checks.append(_use_check(needs, has))
    if needs.downloads:
        checks.append(_hub_check(needs, has))
    return Preflight(tuple(checks))


def _disk_checks(needs: Requirements, has: Resources) -> list[Check]:
    """One check per filesystem: folders on the same disk share its free space."""
    needed_on: dict[int, int] = {}
    folders_on: dict[int, list[Path]] = {}
    for folder, nbytes in needs.disk_bytes.items():
        space = has.disk[folder]
        needed_on[space.filesystem] = needed_on.get(space.filesystem, 0) + nbytes
        folders_on.setdefault(space.filesystem, []).append(folder)
    checks = []
    for filesystem, nbytes in needed_on.items():
        folders = folders_on[filesystem]
        free = has.disk[folders[0]].free_bytes
        needed = nbytes + DISK_MARGIN_BYTES if nbytes else 0
        checks.append(
            Check(
                what="disk " + " + ".join(str(f) for f in folders),
                needed=human_bytes(needed),
                available=human_bytes(free) + " free",
                ok=free >= needed,
                advice="free space there, or point the output folder or HF_HOME at a bigger disk",
            )
        )
    return checks


def _ram_check(needs: Requirements, has: Resources) -> Check:
    return Check(
        what="RAM",
        needed=human_bytes(needs.ram_bytes),
        available=human_bytes(has.ram_available_bytes) + " available",
        ok=has.ram_available_bytes >= needs.ram_bytes,
        advice="close other programs or use a machine with more memory",
    )


def _gpu_check(needs: Requirements, has: Resources) -> Check:
    """A GPU is optional with ``auto`` and ``cpu``; asking for ``cuda`` requires one."""
    best = max((gpu.memory_bytes for gpu in has.gpus), default=0)
    gpus = ", ".join(f"{g.name} ({human_bytes(g.memory_bytes)})" for g in has.gpus) or "none"
    wants_gpu = needs.device.startswith("cuda")
    if not has.gpus:
        return Check(
            what="GPU",
            needed="one" if wants_gpu else "optional (the CPU works, slower)",
            available=gpus,
            ok=not wants_gpu,
            advice="set device = 'auto' or 'cpu', or use a machine with a GPU",
        )
    return Check(
        what="GPU memory",
        needed=human_bytes(needs.gpu_memory_bytes),
        available=gpus,
        ok=best >= needs.gpu_memory_bytes or not wants_gpu,
        advice="set device = 'cpu', or use a GPU with more memory",
    )


def _use_check(needs: Requirements, has: Resources) -> Check:
    """Generating text needs the whole model in memory: on a GPU if one is big enough."""
    needed = int(needs.model_bytes * USE_MEMORY_FACTOR)
    fitting_gpus = [g for g in has.gpus if g.memory_bytes >= needed]
    if fitting_gpus and needs.device != "cpu":
        where = f"GPU {fitting_gpus[0].name}"
        ok = True
    else:
        where = f"RAM ({human_bytes(has.ram_available_bytes)} available, slow on a CPU)"
        ok = has.ram_available_bytes >= needed
    return Check(
        what="memory to use the model",
        needed=human_bytes(needed),
        available=where,
        ok=ok,
        advice="use a GPU or a machine with more memory, or skip the generation step",
    )


def _hub_check(needs: Requirements, has: Resources) -> Check:
    missing = ", ".join(needs.downloads)
    return Check(
        what="Hugging Face Hub",
        needed=f"download {human_bytes(sum(needs.downloads.values()))} ({missing})",
        available="reachable" if has.hub_reachable else "unreachable",
        ok=has.hub_reachable,
        advice="connect to the network (and unset HF_HUB_OFFLINE), or give local folders",
    )


# --------------------------------------------------------------------------------------
# Measuring the machine
# --------------------------------------------------------------------------------------


def measure_resources(folders: list[str | Path], *, check_hub: bool = True) -> Resources:
    """Measure free disk under each folder, available RAM, the GPUs and the Hub."""
    from pearl_edu.hub import hub_reachable

    disk = {Path(folder): disk_space(folder) for folder in folders}
    return Resources(
        disk=disk,
        ram_available_bytes=available_ram_bytes(),
        gpus=visible_gpus(),
        hub_reachable=hub_reachable() if check_hub else False,
    )


def disk_space(folder: str | Path) -> DiskSpace:
    """Free space of the disk that holds ``folder`` (or would hold it, if not made yet)."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    return DiskSpace(shutil.disk_usage(existing).free, os.stat(existing).st_dev)


def available_ram_bytes() -> int:
    """Memory that can be used without swapping: psutil when installed, else /proc/meminfo."""
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def _meminfo_available() -> int:
    """Linux's own estimate of the memory available to a new program."""
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.is_file() else []
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise PreflightError("cannot measure the available RAM here: pip install psutil")


def visible_gpus() -> tuple[Gpu, ...]:
    """The CUDA GPUs torch can use, with their total memory."""
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(
        Gpu(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
        for i in range(torch.cuda.device_count())
    )


# --------------------------------------------------------------------------------------
# What a run needs
# --------------------------------------------------------------------------------------


def requirements(
    parents: list[str | Path],
    output_dir: str | Path,
    *,
    published: str | Path | None = None,
    device: str = "auto",
    online: bool = True,
) -> Requirements:
    """What merging ``parents`` into ``output_dir`` (and verifying against ``published``) needs.

    Local folders are measured from their headers; repositories not yet in the cache are
    sized from the Hub's file listing when ``online``, else from the model cards.
    """
    refs = [*parents, *([published] if published is not None else [])]
    downloads: dict[str, int] = {}
    sources = set()
    for ref in refs:
        if local_folder(ref) is None:
            size, source = download_size(str(ref), online=online)
            downloads[str(ref)] = size
            sources.add(source)
    largest = largest_tensor_elements(parents)
    output_bytes = merged_size_bytes(parents)
    disk = {Path(output_dir): output_bytes}
    if downloads:
        disk[Path(hub_cache_dir())] = sum(downloads.values())
    return Requirements(
        disk_bytes=disk,
        ram_bytes=merge_memory_bytes(largest),
        gpu_memory_bytes=merge_memory_bytes(largest) if device != "cpu" else 0,
        device=device,
        downloads=downloads,
        download_source=" and ".join(sorted(sources)) or "none",
        model_bytes=output_bytes,
    )


def merge_memory_bytes(largest_tensor_elements: int) -> int:
    """Estimated peak memory of the streaming merge (an estimate, not a measurement).

    $$ M \\approx B_{\\text{read-ahead}} + k \\cdot 4 \\cdot n_{\\max} $$

    with $n_{\\max}$ the elements of the largest tensor, 4 bytes per float32 element and
    $k$ = `MERGE_WORKING_COPIES` working copies (inputs, their float32 versions, the result).
    """
    from pearl_edu.read_ahead import READ_AHEAD_BYTES

    return READ_AHEAD_BYTES + MERGE_WORKING_COPIES * 4 * largest_tensor_elements


def local_folder(ref: str | Path) -> Path | None:
    """The folder of ``ref`` if it is on disk, as a local path or in the Hugging Face cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    return cached_snapshot(str(ref))


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id``, if it holds weights; never uses the network."""
    from huggingface_hub import snapshot_download

    from pearl_edu.hub import looks_like_repo_id

    if not looks_like_repo_id(repo_id):
        return None
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache, in any of the ways the client reports it
        return None
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    return folder if has_weights else None


def download_size(repo_id: str, *, online: bool = True) -> tuple[int, str]:
    """Bytes `pearl_edu.hub.download` would fetch for ``repo_id``, and where that number is from.

    Online, the Hub lists every file with its size; the files the download would skip
    (other weight formats, images, ...) are left out. Offline, the model card's size.
    """
    if online:
        try:
            return _listed_download_size(repo_id), "Hub listing"
        except Exception:  # no answer from the Hub: fall back on the documented sizes
            pass
    if repo_id in KNOWN_DOWNLOAD_BYTES:
        return KNOWN_DOWNLOAD_BYTES[repo_id], "model cards"
    raise PreflightError(
        f"{repo_id}: download size unknown offline (not one of {', '.join(KNOWN_DOWNLOAD_BYTES)}); "
        "connect to the network or download the model first"
    )


def _listed_download_size(repo_id: str) -> int:
    from huggingface_hub import HfApi

    from pearl_edu.hub import BIN_PATTERNS, METADATA_PATTERNS, SAFETENSORS_PATTERNS

    info = HfApi().model_info(repo_id, files_metadata=True)
    files = {s.rfilename: s.size or 0 for s in info.siblings or []}
    has_safetensors = any(fnmatch(name, SAFETENSORS_PATTERNS[0]) for name in files)
    weights = SAFETENSORS_PATTERNS if has_safetensors else BIN_PATTERNS
    patterns = METADATA_PATTERNS + weights
    return sum(size for name, size in files.items() if any(fnmatch(name, p) for p in patterns))


def merged_size_bytes(parents: list[str | Path]) -> int:
    """Bytes of the merged bfloat16 model: 2 per parameter of the first local parent."""
    return 2 * parameter_count(parents)


def parameter_count(parents: list[str | Path]) -> int:
    """Parameters of the first parent on disk, else of a Mistral-7B (Pearl's shape)."""
    from pearl_edu.reading import read_header

    for ref in parents:
        folder = local_folder(ref)
        if folder is not None:
            return sum(math.prod(meta.shape) for meta in read_header(folder).tensors.values())
    return MISTRAL_7B_PARAMETERS


def largest_tensor_elements(parents: list[str | Path]) -> int:
    """Elements of the largest tensor: from a local parent, else Mistral-7B's embeddings."""
    from pearl_edu.reading import read_header

    for ref in parents:
        folder = local_folder(ref)
        if folder is not None:
            return max(math.prod(meta.shape) for meta in read_header(folder).tensors.values())
    return 32000 * 4096


def hub_cache_dir() -> str:
    """The folder the Hugging Face client downloads into (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def human_bytes(nbytes: int | float) -> str:
    """Bytes in decimal units, as model cards state sizes: ``14.5 GB``."""
    for unit, scale in (("TB", 1000**4), ("GB", GB), ("MB", 1000**2), ("kB", 1000)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"
