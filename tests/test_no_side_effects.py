"""A library call of `merge` leaves the process as it found it; the command tunes its own.

After `pearl_edu.engine.merge` returns, the threads it started are gone, torch's thread
settings are as they were, glibc's allocator has not been touched, and no tensor carries
anything of the merge's. ``pearl-edu merge`` (`pearl_edu.cli.main`) alone tunes the
allocator, for its own process, before it merges.
"""

from __future__ import annotations

import ctypes
import math
import threading

import pytest
import torch
from faults import after_each_write

import pearl_edu
import pearl_edu.engine as merge_module
from pearl_edu import cli
from pearl_edu.backends import cpu
from pearl_edu.backends.threads import set_threads_for_new_threads, threads_for_new_threads
from pearl_edu.core.interpolation import CHUNK_ELEMENTS
from pearl_edu.engine import merge, merge_into
from pearl_edu.read_ahead import read_ahead
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import make_tiny_model
from pearl_edu.tensor_plan import plan

SLERP = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
      - model: {b}
        layer_range: [0, 2]
merge_method: slerp
base_model: {a}
parameters:
  t: 0.4
dtype: bfloat16
"""


# glibc's mallopt parameters (malloc.h), as `return_freed_memory_to_the_system` sets them.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    """SLERP of two tiny models whose MLP matrices span two of SLERP's chunks, so that the
    merge's helper thread takes their norms (`pearl_edu.backends.cpu.cosine`)."""
    folder = tmp_path_factory.mktemp("models")
    a = make_tiny_model(folder / "a", hidden_size=512, intermediate_size=2304, num_heads=8)
    b = make_tiny_model(folder / "b", base=a, seed=1, noise=0.5)
    sizes = [math.prod(meta.shape) for meta in read_header(a).tensors.values()]
    assert max(sizes) > CHUNK_ELEMENTS
    return SLERP.format(a=a, b=b)


def recorded_mallopt(monkeypatch) -> list[tuple[int, ...]]:
    """The calls of glibc's ``mallopt`` from now on, recorded instead of made."""
    calls: list[tuple[int, ...]] = []
    library = ctypes.CDLL

    class RecordingLibrary:
        def __init__(self, *args, **kwargs) -> None:
            self._library = library(*args, **kwargs)

        def __getattr__(self, name: str):
            if name == "mallopt":
                return lambda *values: calls.append(values) or 1
            return getattr(self._library, name)

    monkeypatch.setattr(ctypes, "CDLL", RecordingLibrary)
    return calls


@pytest.mark.parametrize("progress", [False, True])
def test_a_merge_stops_every_thread_it_starts(progress, config, tmp_path, monkeypatch):
    before = set(threading.enumerate())
    seen: set[str] = set()
    after_each_write(monkeypatch, lambda _: seen.update(t.name for t in threading.enumerate()))
    merge(config, tmp_path / "out", threads=2, progress=progress)
    assert any(name.startswith("pearl-edu-math") for name in seen), "its helper thread ran"
    assert any(name.startswith("pearl-edu-writer") for name in seen)
    assert set(threading.enumerate()) == before
    assert threading.active_count() == len(before)


def test_a_merge_leaves_torchs_thread_settings_as_they_were(config, tmp_path):
    # torch has two settings: this thread's, and the one threads started later take;
    # torch.set_num_threads sets both (the helper thread sets its own to one), so
    # restoring this thread's alone would not do.
    threads, for_new = torch.get_num_threads(), threads_for_new_threads()
    set_threads_for_new_threads(threads + 1)  # the two differ, as another thread may leave them
    try:
        for used in (1, 2, None):
            merge(config, tmp_path / f"out-{used}", threads=used, progress=False)
            assert torch.get_num_threads() == threads
            assert threads_for_new_threads() == threads + 1
    finally:
        set_threads_for_new_threads(for_new)


def test_a_merge_leaves_the_allocator_alone_and_the_command_tunes_it(config, tmp_path, monkeypatch):
    calls = recorded_mallopt(monkeypatch)
    merge(config, tmp_path / "library", progress=False)
    assert calls == [], "merge() must not change glibc's allocator (nothing could undo it)"

    tuned_before_merging = []

    def recording_merge(*args, **kwargs):
        tuned_before_merging.append(list(calls))
        return merge(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge", recording_merge)
    config_file = tmp_path / "slerp.yml"
    config_file.write_text(config)
    assert cli.main(["merge", str(config_file), str(tmp_path / "command"), "--quiet"]) == 0
    expected = [(M_MMAP_THRESHOLD, 4 * 1024**2), (M_TRIM_THRESHOLD, 64 * 1024**2)]
    assert tuned_before_merging == [expected]
    assert calls == expected


def test_host_copies_travel_as_arguments_not_on_the_tensors(config, monkeypatch):
    # The GPU path's inputs lie off the CPU, with the host copies they were read from: on
    # the "meta" device, which has no values, whatever SLERP sums must come from those.
    merge_config = pearl_edu.load_config(config)
    headers = {ref: read_header(ref) for ref in merge_config.models()}
    job = max(plan(merge_config, headers).tensors, key=lambda job: job.nbytes)
    readers = {ref: ModelReader(header) for ref, header in headers.items()}
    monkeypatch.setattr(merge_module, "check_finite", lambda *args, **kwargs: None)  # no values
    summed = []
    cosine = cpu.cosine
    monkeypatch.setattr(
        cpu, "cosine", lambda a, b, **kw: summed.append((a, b)) or cosine(a, b, **kw)
    )
    try:
        for _, inputs, hosts in read_ahead([job], readers, dtype=None, device=torch.device("meta")):
            assert all(x.device.type == "meta" for x in inputs)
            assert all(h.device.type == "cpu" for h in hosts)
            assert not any(vars(x) for x in inputs), "nothing is stashed on the tensors"
            result = torch.empty(job.shape, dtype=job.dtype, device="meta")
            with pytest.raises((NotImplementedError, RuntimeError)):
                merge_into(result, job, inputs)  # no host copies: nothing to sum
            merge_into(result, job, inputs, hosts)
            base, other = hosts[job.base_index], hosts[1 - job.base_index]
            a, b = summed[-1]
            assert torch.equal(a, base.reshape(-1)) and torch.equal(b, other.reshape(-1))
        with pytest.raises((NotImplementedError, RuntimeError)):
            cpu.on_cpu(inputs[0])  # after the tensor's merge, its host copy is forgotten
    finally:
        for reader in readers.values():
            reader.close()
