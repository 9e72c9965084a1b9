"""Peak memory of a process and its children, sampled from /proc: anonymous memory beside RSS.

GNU time's "maximum resident set size" counts every page a process has mapped and touched,
the pages of memory-mapped files included. A merge that maps its inputs whole (mergekit
does) is charged with them, although they belong to the page cache, which the kernel may
drop and read again when memory runs short. What a process needs RAM for is its anonymous
memory: tensors, buffers, the heap (``RssAnon`` in ``/proc/PID/status``). The
proportional set size (``Pss`` in ``/proc/PID/smaps_rollup``) divides each page between
the processes that map it; a file mapped by one process alone still counts whole there,
which is why ``Pss_Anon`` is recorded beside it.

`PeakMemory` polls the tree of processes under one PID every `INTERVAL_S` seconds and keeps
the peak of each sum. A peak shorter than the interval can be missed; GNU time's figure,
a high-water mark kept by the kernel, cannot, so both are recorded side by side. The PSS
fields are read less often, every `ROLLUP_INTERVAL_S`: reading smaps_rollup walks the
process's page tables under its memory-map lock, which stalls a process that maps gigabytes
(every 20 ms, it slowed a mergekit merge several times over on a busy 2-core machine), so
their peaks are lower bounds.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PROC = Path("/proc")
INTERVAL_S = 0.02
ROLLUP_INTERVAL_S = 1.0
# Fields summed over the tree, in kB as /proc gives them: from status (cheap counters)...
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
# ... and from smaps_rollup (a walk of the page tables: read only when asked).
ROLLUP_FIELDS = ("Pss", "Pss_Anon", "Pss_File")


def kb_fields(text: str, names: Sequence[str]) -> dict[str, int]:
    """The ``Name:  1234 kB`` lines of a /proc file, for ``names``, in kB (missing: absent)."""
    wanted, found = set(names), {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name in wanted:
            found[name] = int(rest.split()[0])
    return found


def children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, from the ``children`` file of each of its threads."""
    found = []
    for task in (PROC / str(pid) / "task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or the process has gone
            continue
    return found


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        if pid in tree:
            continue
        tree.append(pid)
        queue += children(pid)
    return tree


def tree_memory(root: int, rollup: bool = False) -> dict[str, int]:
    """The memory fields summed over ``root``'s process tree, in kB, as it is now.

    With ``rollup``, also the proportional set sizes of smaps_rollup. A process that ends
    while it is read is left out.
    """
    total = dict.fromkeys(STATUS_FIELDS + (ROLLUP_FIELDS if rollup else ()), 0)
    for pid in process_tree(root):
        try:
            fields = kb_fields((PROC / str(pid) / "status").read_text(), STATUS_FIELDS)
            if rollup:
                text = (PROC / str(pid) / "smaps_rollup").read_text()
                fields.update(kb_fields(text, ROLLUP_FIELDS))
        except (OSError, ProcessLookupError):
            continue
        for name, kb in fields.items():
            total[name] += kb
    return total


class PeakMemory:
    """Polls a process tree in a thread of its own and keeps the peak of each field.

    ``with PeakMemory(pid) as peak: ...``; then ``peak.megabytes()`` gives the peaks in MB
    (10^6 bytes), keyed ``peak_vmrss_mb``, ``peak_rss_anon_mb``, ... and ``peak_pss_mb``.
    """

    def __init__(
        self,
        root: int,
        interval: float = INTERVAL_S,
        rollup: bool = False,
        rollup_interval: float = ROLLUP_INTERVAL_S,
    ) -> None:
        self.root, self.interval, self.rollup = root, interval, rollup
        self.rollup_interval = rollup_interval
        self.peaks_kb: dict[str, int] = {}
        self.samples = self.rollup_samples = 0
        self._last_rollup = -float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                self.sample()  # once more: the process may have grown since
                return

    def sample(self) -> None:
        rollup = self.rollup and time.monotonic() - self._last_rollup >= self.rollup_interval
        now = tree_memory(self.root, rollup)
        if not now.get("VmRSS"):
            return  # the process has gone (or not started)
        self.samples += 1
        if rollup:
            self._last_rollup = time.monotonic()
            self.rollup_samples += 1
        for name, kb in now.items():
            self.peaks_kb[name] = max(kb, self.peaks_kb.get(name, 0))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def megabytes(self) -> dict[str, float]:
        key = {
            "VmRSS": "peak_vmrss_mb",
            "RssAnon": "peak_rss_anon_mb",
            "RssFile": "peak_rss_file_mb",
            "RssShmem": "peak_rss_shmem_mb",
            "Pss": "peak_pss_mb",
            "Pss_Anon": "peak_pss_anon_mb",
            "Pss_File": "peak_pss_file_mb",
        }
        peaks = {key[name]: kb * 1024 / 1e6 for name, kb in self.peaks_kb.items()}
        return {**peaks, "memory_samples": self.samples, "pss_samples": self.rollup_samples}


def run_sampled(
    command: Sequence[str],
    env: dict[str, str] | None = None,
    rollup: bool = False,
    rollup_interval: float = ROLLUP_INTERVAL_S,
) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run ``command`` (output captured, as text) while `PeakMemory` samples its tree."""
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    with PeakMemory(process.pid, rollup=rollup, rollup_interval=rollup_interval) as peak:
        stdout, stderr = process.communicate()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done, peak.megabytes()
