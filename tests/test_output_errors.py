"""A write that fails (a full disk, no permission) is one line, and leaves nothing half-written.

The final output folder appears only by renaming the finished partial folder, so a failed
write must never leave it behind; the partial folder keeps finished shards only, which a
rerun resumes from, and is deleted when it holds none.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from pearl_edu import cli, writing
from pearl_edu.engine import merge
from pearl_edu.errors import OutputError
from pearl_edu.output import MANIFEST, partial_dir
from pearl_edu.teaching.toy import make_tiny_model

CONFIG = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t: 0.4
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("models")
    a = make_tiny_model(root / "a", num_layers=4, dtype=torch.float16, with_tokenizer=True)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    return CONFIG.format(a=a, b=b)


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def disk_full_after(monkeypatch, writes: int) -> None:
    """Let the output's files take ``writes`` writes, then fail as a full disk does."""
    real_write = writing.SequentialFile.write
    count = 0

    def write(self, data, **kwargs):
        nonlocal count
        count += 1
        if count > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as os.write raises it
        real_write(self, data, **kwargs)

    monkeypatch.setattr(writing.SequentialFile, "write", write)


def assert_one_line(err: OutputError, *names: str) -> str:
    message = str(err)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


def test_a_full_disk_is_one_line_and_leaves_finished_shards_only(config, tmp_path, monkeypatch):
    clean = merge(config, tmp_path / "clean" / "out", shard_size="50KB", progress=False)
    assert len(clean.weight_files) >= 3
    output = tmp_path / "out"
    partial = partial_dir(output)
    # Each shard takes 2 writes for its header and 1 per tensor: this fails in a later shard.
    disk_full_after(monkeypatch, writes=20)
    with pytest.raises(OutputError) as caught:
        merge(config, output, shard_size="50KB", progress=False)
    message = assert_one_line(caught.value, str(partial), ".safetensors", "free some space")
    assert os.strerror(errno.ENOSPC) in message
    assert not output.exists(), "no half-written output folder"
    assert not list(partial.glob("*.tmp")), "the half-written shard is deleted"
    finished = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert finished and len(finished) < len(clean.weight_files)
    assert (partial / MANIFEST).is_file()

    # With space again, the same merge resumes from the finished shards, to the same bytes.
    monkeypatch.undo()
    result = merge(config, output, shard_size="50KB", progress=False)
    assert result.resumed_tensors > 0
    assert not partial.exists()
    assert weight_bytes(output) == weight_bytes(clean.output_dir)


def test_a_disk_full_before_any_shard_is_finished_leaves_nothing(config, tmp_path, monkeypatch):
    output = tmp_path / "out"
    disk_full_after(monkeypatch, writes=1)
    with pytest.raises(OutputError, match="No space left|free some space"):
        merge(config, output, progress=False)
    assert not output.exists()
    assert not partial_dir(output).exists(), "nothing to resume: the partial folder is gone"


def test_a_disk_full_while_writing_the_model_files(config, tmp_path, monkeypatch):
    output = tmp_path / "out"
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "README.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OutputError) as caught:
        merge(config, output, progress=False)
    assert_one_line(caught.value, "README.md", "free some space")
    assert not output.exists()
    monkeypatch.undo()
    assert merge(config, output, progress=False).resumed_tensors > 0  # every shard was kept


def test_a_full_disk_through_the_cli_is_exit_2_with_one_line(config, tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "merge.yml"
    config_file.write_text(config)
    output = tmp_path / "out"
    disk_full_after(monkeypatch, writes=3)
    status = cli.main(["merge", str(config_file), str(output), "--quiet"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pearl-edu: error: ")
    assert "free some space" in err
    assert not output.exists()


def test_permission_denied_on_the_output_folders_parent(config, tmp_path, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    output = parent / "out"
    if os.geteuid() == 0:
        # Root ignores permissions: the folder refuses the way it would refuse anyone else.
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(OutputError) as caught:
            merge(config, output, progress=False)
    finally:
        parent.chmod(0o755)
    message = assert_one_line(caught.value, str(partial_dir(output)), "change its permissions")
    assert os.strerror(errno.EACCES) in message
    assert not output.exists() and not partial_dir(output).exists()


def test_a_failed_publish_puts_the_replaced_output_back(config, tmp_path, monkeypatch):
    output = tmp_path / "out"
    merge(config, output, progress=False)
    before = weight_bytes(output)
    real_replace = os.replace

    def replace(source, target, **kwargs):
        if Path(source) == partial_dir(output):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="change its permissions"):
        merge(config.replace("t: 0.4", "t: 0.6"), output, force=True, progress=False)
    assert weight_bytes(output) == before, "the old model is still there, whole"
