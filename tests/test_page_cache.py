"""Reading past the page cache: which tensors are cached, and direct reads of the others.

A CPU merge maps a cached tensor in place and reads one that is not cached with O_DIRECT
into a reused buffer (`pearl_edu.page_cache`, `pearl_edu.read_ahead.past_cache`). Both
give the stored bytes; these tests drop files from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)``, which Linux honours for clean pages.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import pearl_edu.page_cache
import pearl_edu.reading
from pearl_edu.engine import merge
from pearl_edu.errors import ModelError
from pearl_edu.page_cache import DIRECT_SLACK, cached_share
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import make_tiny_model
from pearl_edu.ulp import same_bits

linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mincore(2) and O_DIRECT are Linux's"
)


def drop_from_cache(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, then drop its pages from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def takes_direct_io(folder: Path) -> bool:
    """Whether the file system under ``folder`` opens files with O_DIRECT (tmpfs does not)."""
    probe = next(p for p in folder.rglob("*.safetensors"))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.fixture
def models(tiny_checkpoints):
    return tiny_checkpoints  # conftest.py


@linux
def test_cached_share_sees_a_dropped_file_and_a_read_one(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(os.urandom(64 * 4096))
    drop_from_cache(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert cached_share(fd, 4096, 16 * 4096) < 0.5
        path.read_bytes()
        assert cached_share(fd, 4096, 16 * 4096) == 1.0
        assert cached_share(fd, 100, 0) == 1.0  # nothing to tell
    finally:
        os.close(fd)


@linux
@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("shift", [0, 1, 6])
def test_read_past_cache_returns_the_stored_tensors(models, tmp_path, kind, shift):
    folder = shutil.copytree(models[kind], tmp_path / kind)
    header = read_header(folder)
    drop_from_cache(folder)  # after reading the headers, which cache their pages
    largest = max(meta.nbytes for meta in header.tensors.values())
    buffer = torch.empty(largest + DIRECT_SLACK + shift, dtype=torch.uint8)[shift:]
    with ModelReader(header) as reader, ModelReader(header) as plain:
        assert not any(reader.cached(name) for name in header.tensors)
        for name in header.tensors:
            assert same_bits(reader.read_past_cache(name, buffer), plain.read(name)), name
        direct = [fd for fd in reader._direct._fds.values() if fd is not None]
        assert bool(direct) == takes_direct_io(folder)


@linux
def test_reading_past_the_cache_leaves_it_as_it_was(models, tmp_path):
    folder = shutil.copytree(models["single"], tmp_path / "m")
    if not takes_direct_io(folder):
        pytest.skip("this file system refuses O_DIRECT; the fallback is tested below")
    header = read_header(folder)
    drop_from_cache(folder)
    buffer = torch.empty(header.total_bytes + DIRECT_SLACK, dtype=torch.uint8)
    with ModelReader(header) as reader:
        for name in header.tensors:
            reader.read_past_cache(name, buffer)
        with ModelReader(header) as fresh:  # a fresh reader asks the cache again
            assert not any(fresh.cached(name) for name in header.tensors)


def test_read_past_cache_falls_back_where_direct_io_is_missing(models, monkeypatch):
    monkeypatch.setattr(pearl_edu.page_cache, "O_DIRECT", None)
    header = read_header(models["sharded"])
    buffer = torch.empty(header.total_bytes + DIRECT_SLACK, dtype=torch.uint8)
    with ModelReader(header) as reader, ModelReader(header) as plain:
        for name in header.tensors:
            assert same_bits(reader.read_past_cache(name, buffer), plain.read(name)), name
        assert all(fd is None for fd in reader._direct._fds.values())


def test_cached_is_asked_once_per_tensor(models, monkeypatch):
    asked = []
    monkeypatch.setattr(
        pearl_edu.reading, "cached_share", lambda fd, offset, n: asked.append(offset) or 0.0
    )
    header = read_header(models["single"])
    name = next(iter(header.tensors))
    with ModelReader(header) as reader:
        assert reader.cached(name) is False
        assert reader.cached(name) is False
    assert len(asked) == 1


def test_a_truncated_file_read_past_the_cache_is_a_model_error(models, tmp_path):
    path = shutil.copytree(models["single"], tmp_path / "m")
    header = read_header(path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    drop_from_cache(path)
    last = max(header.tensors.values(), key=lambda meta: meta.offset)
    buffer = torch.empty(last.nbytes + DIRECT_SLACK, dtype=torch.uint8)
    with ModelReader(header) as reader:
        with pytest.raises(ModelError, match=f"truncated, tensor {last.name}"):
            reader.read_past_cache(last.name, buffer)


@linux
def test_a_merge_of_uncached_inputs_reads_them_past_the_cache_to_the_same_bits(
    tmp_path, monkeypatch
):
    a = make_tiny_model(tmp_path / "a", num_layers=2, hidden_size=256, intermediate_size=512)
    b = make_tiny_model(tmp_path / "b", base=a, noise=0.5, seed=2)
    config = (
        f"slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
        f"      - model: {b}\n        layer_range: [0, 2]\n"
        f"merge_method: slerp\nbase_model: {a}\nparameters:\n  t: 0.3\ndtype: bfloat16\n"
    )
    merge(config, tmp_path / "warm", progress=False)  # inputs just written: cached
    past, prefetched = [], []
    read_past_cache, prefetch = ModelReader.read_past_cache, ModelReader.prefetch
    monkeypatch.setattr(
        ModelReader,
        "read_past_cache",
        lambda self, name, out: past.append(name) or read_past_cache(self, name, out),
    )
    monkeypatch.setattr(
        ModelReader, "prefetch", lambda self, name: prefetched.append(name) or prefetch(self, name)
    )
    drop_from_cache(a)
    drop_from_cache(b)
    merge(config, tmp_path / "cold", progress=False)
    for file in (tmp_path / "warm").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "cold" / file.name).read_bytes()
    assert past, "no tensor was read past the cache"
    assert not set(past) & set(prefetched), "a tensor read past the cache was also prefetched"
