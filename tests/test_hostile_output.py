"""The output folder under hostile conditions: two merges at once, --force, symlinks, resume.

Each test is the smallest case that showed a merge publishing a mixed model, deleting the
user's files, resuming with other bits, or writing a broken model with exit status 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import after_each_write, signalled_merge_command

from pearl_edu import cli
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, OutputError
from pearl_edu.output import partial_dir
from pearl_edu.teaching.toy import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]

SLERP = """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t: {t}
dtype: bfloat16
"""

TIES = """\
models:
  - model: {a}
  - model: {b}
    parameters: {{density: 0.5, weight: 0.7}}
  - model: {c}
    parameters: {{density: 0.5, weight: 0.4}}
merge_method: ties
base_model: {a}
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    a = make_tiny_model(root / "a", num_layers=4, dtype=torch.bfloat16, with_tokenizer=True)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    c = make_tiny_model(root / "c", base=a, noise=0.5, seed=3)
    return {"a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def slerp_file(models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "slerp.yml"
    path.write_text(SLERP.format(a=models["a"], b=models["b"], t=0.4))
    return path


@pytest.fixture(scope="module")
def clean(slerp_file, tmp_path_factory) -> Path:
    """The reference: the same merge, run alone, in 20 KB shards."""
    out = tmp_path_factory.mktemp("clean") / "out"
    merge(slerp_file, out, shard_size="20KB", progress=False)
    return out


def lock_path(output: Path) -> Path:
    """Where a merge keeps the lock of ``output``: ``.<name>.lock`` beside it."""
    return output.parent / f".{output.name}.lock"


def files(folder: Path) -> dict[str, bytes]:
    """The folder's files and their bytes (the model card aside: it names the folder)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "README.md"
    }


def leftovers(parent: Path) -> list[str]:
    """Hidden files and folders a merge may leave beside its output (lock, partial, ...)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pearl-edu: error: "), err
    return lines[0]


def pausing_merge(config: Path, output: Path) -> list[str]:
    """A merge that stops itself (SIGSTOP) after writing two tensors, so that a second merge
    can be started while it holds the output; the test continues it with SIGCONT."""
    args = ["merge", str(config), str(output), "--quiet", "--shard-size", "20KB"]
    return signalled_merge_command("STOP", 2, args)


def wait_until_stopped(process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{process.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the first merge never paused")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends SIGSTOP")
@pytest.mark.parametrize("second", ["same config", "another config"])
def test_a_second_merge_into_a_busy_output_is_refused(
    second, slerp_file, clean, models, tmp_path, capsys
):
    """Item 1: merge B while A is paused mid-shard: B is refused in one line, A publishes whole."""
    output = tmp_path / "out"
    first = subprocess.Popen(
        pausing_merge(slerp_file, output),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_stopped(first)
        config = slerp_file
        if second == "another config":
            config = tmp_path / "other.yml"
            config.write_text(SLERP.format(a=models["a"], b=models["b"], t=0.9))
        code = cli.main(["merge", str(config), str(output), "--quiet", "--force"])
        message = one_line_error(capsys)
        assert code == 2
        assert "is being written by another merge" in message
        assert f"process {first.pid}" in message
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert f"into {output}" in out, "published"
    assert files(output) == files(clean), "the published model is the first merge's, whole"
    assert leftovers(tmp_path) == [], "no lock, no partial folder left"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_the_lock_of_a_killed_merge_is_taken_over(slerp_file, clean, tmp_path):
    """Item 1: kill -9 leaves the lock file behind; the next merge takes it over and resumes."""
    output = tmp_path / "out"
    args = ["merge", str(slerp_file), str(output), "--quiet", "--shard-size", "20KB"]
    command = [sys.executable, "-m", "pearl_edu", *args]
    killed = subprocess.run(
        signalled_merge_command("KILL", 12, args),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert lock_path(output).is_file(), "the killed merge's lock file is left behind"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    assert files(output) == files(clean)
    assert leftovers(tmp_path) == []


def interrupted_after(monkeypatch, tensors: int) -> None:
    """Make the next merge stop as Ctrl-C stops it, after writing ``tensors`` tensors."""

    def stop(count: int) -> None:
        if count >= tensors:
            raise KeyboardInterrupt

    after_each_write(monkeypatch, stop)


def test_resume_with_another_fast_trim_starts_afresh(models, tmp_path, monkeypatch):
    """Item 3: a --fast-trim TIES merge interrupted, rerun without it: the plain merge's bits."""
    config = TIES.format(**models)
    plain = merge(config, tmp_path / "plain", shard_size="20KB", progress=False)
    fast = merge(config, tmp_path / "fast", shard_size="20KB", progress=False, fast_trim=True)
    assert files(plain.output_dir) != files(fast.output_dir), "the two modes must differ here"

    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupted_after(patch, 12)
        with pytest.raises(KeyboardInterrupt):
            merge(config, output, shard_size="20KB", progress=False, fast_trim=True)
    assert partial_dir(output).is_dir() and not list(partial_dir(output).glob("*.tmp"))
    rerun = merge(config, output, shard_size="20KB", progress=False)
    assert rerun.resumed_tensors == 0
    assert files(output) == files(plain.output_dir)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"threads": 1}, {"threads": 2}),
        ({"backend": "device"}, {"backend": "cpu"}),
    ],
)
def test_resume_with_another_bit_changing_option_starts_afresh(
    first, second, slerp_file, tmp_path, monkeypatch
):
    """Item 3: threads and backend decide SLERP's last bits; a change is not a resume."""
    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupted_after(patch, 12)
        with pytest.raises(KeyboardInterrupt):
            merge(slerp_file, output, shard_size="20KB", progress=False, **first)
    again = merge(slerp_file, output, shard_size="20KB", progress=False, **second)
    assert again.resumed_tensors == 0
    with monkeypatch.context() as patch:
        interrupted_after(patch, 12)
        with pytest.raises(KeyboardInterrupt):
            merge(slerp_file, tmp_path / "same", shard_size="20KB", progress=False, **second)
    same = merge(slerp_file, tmp_path / "same", shard_size="20KB", progress=False, **second)
    assert same.resumed_tensors > 0, "the same options still resume"


def test_force_in_a_project_folder_deletes_nothing(slerp_file, tmp_path, capsys, monkeypatch):
    """Item 4: `pearl-edu merge merge.yml . --force` from a project folder is refused."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "merge.yml").write_text(slerp_file.read_text())
    (project / "notes.md").write_text("mine")
    monkeypatch.chdir(project)
    assert cli.main(["merge", "merge.yml", ".", "--force", "--quiet"]) == 2
    assert "merge.yml is not a model file" in one_line_error(capsys)
    assert sorted(p.name for p in project.iterdir()) == ["merge.yml", "notes.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_force_replaces_a_mergekit_model_folder(slerp_file, clean, tmp_path):
    """Item 4: a folder as mergekit writes it (shards, index, card, tokenizer) is a model."""
    output = tmp_path / "out"
    output.mkdir()
    for name in (
        "config.json",
        "mergekit_config.yml",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "README.md",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        (output / name).write_text("old")
    with pytest.raises(OutputError, match="holds a merged model; pass --force"):
        merge(slerp_file, output, shard_size="20KB", progress=False)
    merge(slerp_file, output, shard_size="20KB", progress=False, force=True)
    assert files(output) == files(clean)
    (output / "subfolder").mkdir()
    with pytest.raises(OutputError, match="subfolder is not a model file"):
        merge(slerp_file, output, shard_size="20KB", progress=False, force=True)


def test_a_symlinked_output_is_written_through_its_link(slerp_file, clean, tmp_path):
    """Item 5: the model lands where the link points; the link stays; nothing hidden is left."""
    disk = tmp_path / "big-disk"
    disk.mkdir()
    (disk / "merged").mkdir()
    here = tmp_path / "here"
    here.mkdir()
    link = here / "out"
    link.symlink_to(disk / "merged")
    merge(slerp_file, link, shard_size="20KB", progress=False)
    assert link.is_symlink() and files(disk / "merged") == files(clean)
    assert sorted(p.name for p in here.iterdir()) == ["out"]
    assert leftovers(disk) == []
    # --force through the link replaces the model it points to, and keeps the link.
    merge(slerp_file, link, shard_size="20KB", progress=False, force=True)
    assert link.is_symlink() and files(disk / "merged") == files(clean)
    assert sorted(p.name for p in here.iterdir()) == ["out"] and leftovers(disk) == []


def test_a_dangling_output_link_is_written_to_its_target(slerp_file, clean, tmp_path):
    """Item 5: a link to a folder not made yet: the folder is made there, nothing hidden left."""
    here = tmp_path / "here"
    here.mkdir()
    link = here / "out"
    link.symlink_to(tmp_path / "elsewhere" / "merged")
    merge(slerp_file, link, shard_size="20KB", progress=False)
    assert link.is_symlink() and files(tmp_path / "elsewhere" / "merged") == files(clean)
    assert sorted(p.name for p in here.iterdir()) == ["out"]
    assert leftovers(tmp_path / "elsewhere") == [] and leftovers(here) == []


@pytest.mark.parametrize("threads", ["0", "-3", "99999999999"])
def test_bad_threads_are_one_line_and_write_nothing(slerp_file, tmp_path, capsys, threads):
    """Items 6 and 7: --threads 0 wrote a manifest; 99999999999 gave torch's traceback."""
    output = tmp_path / "new" / "out"
    code = cli.main(["merge", str(slerp_file), str(output), "--threads", threads, "--quiet"])
    assert code == 2
    assert "threads: expected a whole number from 1 to" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "not even the parent folder"


def test_a_very_long_output_path_is_one_line(slerp_file, tmp_path, capsys):
    """Item 6: a 5,000-character output path ('File name too long')."""
    output = tmp_path / ("x" * 5000)
    assert cli.main(["merge", str(slerp_file), str(output), "--quiet"]) == 2
    assert "File name too long" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


INTERRUPT_IMPORT = """\
import sys


class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_ctrl_c_during_start_up_is_one_line(how, tmp_path):
    """Item 6: Ctrl-C while torch is imported (simulated at its import, by sitecustomize)."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    command = (
        [str(Path(sys.executable).with_name("pearl-edu"))]
        if how == "console script"
        else [sys.executable, "-m", "pearl_edu"]
    )
    done = subprocess.run(
        [*command, "plan", "x.yml"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 130
    assert done.stderr == "pearl-edu: interrupted\n"


NONFINITE = {
    "slerp t: 1e308": SLERP.replace("t: {t}", "t: 1e308"),
    "linear weight: 1e308": """\
models:
  - model: {a}
    parameters: {{weight: 1e308}}
  - model: {b}
    parameters: {{weight: 1.0}}
merge_method: linear
dtype: bfloat16
""",
    "multislerp weights 0": """\
models:
  - model: {a}
    parameters: {{weight: 0.0}}
  - model: {b}
    parameters: {{weight: 0.0}}
merge_method: multislerp
dtype: bfloat16
""",
}


@pytest.mark.parametrize("case", sorted(NONFINITE))
def test_non_finite_results_are_refused(case, models, tmp_path, capsys):
    """Item 9: these gave an all-NaN model and exit 0; now one line, exit 2, nothing left."""
    config = tmp_path / "merge.yml"
    config.write_text(NONFINITE[case].format(**models))
    output = tmp_path / "out"
    assert cli.main(["merge", str(config), str(output), "--quiet"]) == 2
    message = one_line_error(capsys)
    assert "infinite or NaN values, from finite inputs" in message
    assert "--allow-nonfinite" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]

    assert cli.main(["merge", str(config), str(output), "--quiet", "--allow-nonfinite"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert warnings and all(line.startswith("pearl-edu: warning: ") for line in warnings)
    assert (output / "config.json").is_file()


def test_an_error_mid_merge_keeps_finished_shards_only(models, tmp_path):
    """Item 7: an error that is not a write error (here a non-finite tensor in the last
    layer) used to leave the unfinished shard's .tmp behind; now only finished shards."""
    t = "[{filter: layers.3, value: 1e308}, {value: 0.5}]"
    config = SLERP.format(a=models["a"], b=models["b"], t=t)
    output = tmp_path / "out"
    with pytest.raises(ConfigError, match="layers.3.*infinite or NaN"):
        merge(config, output, shard_size="20KB", progress=False)
    partial = partial_dir(output)
    assert not list(partial.glob("*.tmp"))
    assert list(partial.glob("model-*.safetensors")), "finished shards are kept for a rerun"
    assert not output.exists() and not lock_path(output).exists()
    with pytest.warns(UserWarning, match="layers.3"):
        again = merge(config, output, shard_size="20KB", progress=False, allow_nonfinite=True)
    assert again.resumed_tensors > 0


def test_output_equal_to_an_input_says_so(models, slerp_file, capsys):
    """Item 10: output == input said 'inside input model folder'."""
    assert cli.main(["merge", str(slerp_file), str(models["a"]), "--force", "--quiet"]) == 2
    assert "is the input model folder" in one_line_error(capsys)


def test_the_lock_file_names_its_merge(slerp_file, tmp_path, monkeypatch):
    """The lock file says which process holds it; it is gone once the merge is published."""
    seen = {}

    def look(count: int) -> None:
        if count == 1:
            seen.update(json.loads(lock_path(tmp_path / "out").read_text()))

    after_each_write(monkeypatch, look)
    merge(slerp_file, tmp_path / "out", progress=False)
    assert seen["pid"] == os.getpid()
    assert not lock_path(tmp_path / "out").exists()
