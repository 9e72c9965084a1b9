"""The engine without Linux's I/O: where fcntl, preadv, O_DIRECT or madvise are missing
(Windows, macOS), pearl_edu still imports and writes the same bytes.

Features are hidden in a fresh interpreter, before pearl_edu is imported, because the
engine looks them up once, at import: so the import itself is tested too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pearl_edu import reading, writing
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.writing import SequentialFile

REPO_ROOT = Path(__file__).resolve().parents[1]

# Hides the scenario's features from the os and mmap modules, then imports pearl_edu,
# merges, and copies each model through ModelReader.read (the GPU path's reads, which a
# CPU merge does not use) into shards of its own.
SCRIPT = r"""
import json, mmap, os, sys
from pathlib import Path
scenario, models, out = sys.argv[1], sys.argv[2:4], sys.argv[4]
maps = []
if scenario == "no-preadv":  # an older macOS: pread only
    for name in ("preadv",):
        delattr(os, name)
elif scenario == "windows":  # none of Linux's fast paths, and no fcntl module
    sys.modules["fcntl"] = None
    for name in ("preadv", "pread", "pwrite", "pwritev", "O_DIRECT", "posix_fadvise",
                 "sendfile", "splice", "copy_file_range"):
        if hasattr(os, name):
            delattr(os, name)
    for name in [n for n in dir(mmap) if n.startswith("MADV_")]:
        delattr(mmap, name)

    class NoAdvice(mmap.mmap):
        def __init__(self, *args, **kwargs):
            maps.append(1)

        def madvise(self, *args):
            raise AssertionError("madvise called where the system has none")

    mmap.mmap = NoAdvice

import torch
import pearl_edu  # the import is under test
from pearl_edu import reading, writing
from pearl_edu.engine import merge

config = (
    "slices:\n  - sources:\n"
    f"      - model: {models[0]}\n        layer_range: [0, 4]\n"
    f"      - model: {models[1]}\n        layer_range: [0, 4]\n"
    f"merge_method: slerp\nbase_model: {models[0]}\n"
    "parameters:\n  t: [0, 0.5, 0.3, 0.7, 1]\ndtype: bfloat16\n"
)
merge(config, out + "/merged/model", shard_size="50KB", progress=False, threads=1)
for i, model in enumerate(models):
    header = reading.read_header(model)
    names = sorted(header.tensors)
    shards = writing.layout_shards(
        [writing.OutputTensor(n, header.tensors[n].shape, header.tensors[n].dtype) for n in names],
        30_000,
    )
    writer = writing.ShardedWriter(Path(out) / f"copy{i}", shards)
    writer.folder.mkdir()
    buffer = torch.empty(1 << 20, dtype=torch.uint8)
    with reading.ModelReader(header) as reader:
        for name in names:
            writer.write(name, reader.read(name, out=buffer))
    writer.write_index()
print(json.dumps({
    "fcntl": writing.fcntl is not None,
    "read_at": reading.read_at.__name__,
    "O_DIRECT": writing.O_DIRECT is not None,
    "MADV_WILLNEED": reading.MADV_WILLNEED is not None,
    "maps": len(maps),
}))
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    a = make_tiny_model(root / "a", num_layers=4, dtype=torch.float16, with_tokenizer=True)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2, shard_count=3)
    return a, b


def run_scenario(scenario: str, pair, out: Path) -> dict:
    out.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, scenario, *map(str, pair), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def native(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "out"
    return run_scenario("native", pair, out), out


@pytest.mark.parametrize("scenario", ["no-preadv", "windows"])
def test_without_linux_io_the_output_is_the_same_bytes(pair, native, scenario, tmp_path):
    found, native_out = native
    chosen = run_scenario(scenario, pair, tmp_path / "out")
    if scenario == "windows":
        assert chosen == {
            "fcntl": False,
            "read_at": "read_at_seek",
            "O_DIRECT": False,
            "MADV_WILLNEED": False,
            "maps": chosen["maps"],
        }
        assert chosen["maps"] > 0  # the merge mapped its inputs, without advice
    else:
        assert chosen["read_at"] == "read_at_pread"
    if sys.platform.startswith("linux"):  # the fast paths stay where they exist
        assert found["read_at"] == "read_at_preadv" and found["fcntl"]
        assert found["O_DIRECT"] and found["MADV_WILLNEED"]
    expected = folder_bytes(native_out)
    assert len([n for n in expected if n.endswith(".safetensors")]) >= 6
    assert folder_bytes(tmp_path / "out") == expected


@pytest.mark.parametrize(
    "read_at", [reading.read_at_preadv, reading.read_at_pread, reading.read_at_seek]
)
def test_every_way_of_reading_gives_the_stored_tensors(pair, monkeypatch, read_at):
    needed = read_at.__name__.removeprefix("read_at_")
    if needed != "seek" and not hasattr(os, needed):
        pytest.skip(f"os.{needed} is missing here")
    monkeypatch.setattr(reading, "read_at", read_at)
    weights = load_state_dict(pair[1])
    with ModelReader(read_header(pair[1])) as reader:
        for name, tensor in weights.items():
            assert torch.equal(reader.read(name), tensor)


def test_short_reads_are_resumed(pair, monkeypatch):
    """A read may return fewer bytes than asked (Windows caps one read): the rest follows."""
    calls = []

    def at_most_100_bytes(fd, view, offset):
        calls.append(offset)
        return reading.read_at_seek(fd, view[:100], offset)

    monkeypatch.setattr(reading, "read_at", at_most_100_bytes)
    weights = load_state_dict(pair[0])
    with ModelReader(read_header(pair[0])) as reader:
        assert torch.equal(reader.read("lm_head.weight"), weights["lm_head.weight"])
    assert len(calls) == -(-weights["lm_head.weight"].nbytes // 100)


def test_files_are_opened_in_binary_mode(pair, tmp_path, monkeypatch):
    """os.O_BINARY (Windows) goes into every os.open; here a harmless flag stands in for it."""
    stand_in = os.O_CLOEXEC
    monkeypatch.setattr(reading, "O_BINARY", stand_in)
    monkeypatch.setattr(writing, "O_BINARY", stand_in)
    flags = []
    real_open = os.open

    def spy(path, flag, *args, **kwargs):
        flags.append(flag)
        return real_open(path, flag, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    with ModelReader(read_header(pair[0])) as reader:
        reader.read("lm_head.weight")
        reader.map("lm_head.weight")
    for direct in (True, False):
        file = SequentialFile(tmp_path / f"out-{direct}.bin", direct=direct)
        file.write(b"\n\x1a\r\n")
        file.finish()
        assert (tmp_path / f"out-{direct}.bin").read_bytes() == b"\n\x1a\r\n"
    assert len(flags) >= 3 and all(flag & stand_in for flag in flags)


def test_index_json_has_unix_line_ends(pair, tmp_path):
    header = read_header(pair[1])
    names = sorted(header.tensors)
    shards = writing.layout_shards(
        [writing.OutputTensor(n, header.tensors[n].shape, header.tensors[n].dtype) for n in names],
        30_000,
    )
    path = writing.ShardedWriter(tmp_path, shards).write_index()
    assert b"\r" not in path.read_bytes() and path.read_bytes().endswith(b"}\n")


def test_the_native_run_compared_with_writes_loadable_shards(native):
    _, out = native
    merged = out / "merged" / "model"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        assert load_file(merged / file)
