"""`pearl-edu merge`: the CLI is a thin shell; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pearl_edu.cli import main
from pearl_edu.cli_options import EXIT_BAD_INPUT
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a = make_tiny_model(root / "a", num_layers=2, with_tokenizer=True)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    path = root / "merge.yml"
    path.write_text(
        "models:\n"
        f"  - model: {a}\n"
        f"  - model: {b}\n"
        "merge_method: slerp\n"
        f"base_model: {a}\n"
        "parameters:\n  t: 0.3\n"
        "dtype: bfloat16\n"
    )
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pearl-edu: error: ")
    return lines[0]


def test_merge_writes_a_loadable_model(config_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "merged" in out and str(output) in out and "on cpu" in out
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.dtype == torch.bfloat16


def test_shard_size_option(config_file, tmp_path):
    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet", "--shard-size", "40KB"]) == 0
    shards = sorted(output.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert (output / "model.safetensors.index.json").is_file()


def test_python_dash_m_works_the_same(config_file, tmp_path):
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "merge", str(config_file), str(output), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    in_process = tmp_path / "in-process"
    assert main(["merge", str(config_file), str(in_process), "--quiet"]) == 0
    assert (output / "model.safetensors").read_bytes() == (
        in_process / "model.safetensors"
    ).read_bytes()
    assert len(load_state_dict(output)) == 2 + 2 * 9 + 1


def test_bad_input_exits_2_with_one_line(config_file, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "x").write_text("x")
    assert main(["merge", str(config_file), str(output), "--quiet"]) == EXIT_BAD_INPUT
    assert "is not empty and is not a merged model" in one_line_error(capsys)

    assert main(["merge", str(config_file), str(tmp_path / "o2"), "--shard-size", "big"]) == 2
    assert "shard size 'big'" in one_line_error(capsys)
    assert not (tmp_path / "o2").exists()

    missing = tmp_path / "missing.yml"
    assert main(["merge", str(missing), str(tmp_path / "o3")]) == EXIT_BAD_INPUT
    assert "missing.yml" in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when there is no GPU")
def test_cuda_without_gpu_exits_2(config_file, tmp_path, capsys):
    assert main(["merge", str(config_file), str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "--device cpu" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_force_replaces_a_merged_model_only(config_file, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet"]) == 0
    (output / "model.safetensors").write_bytes(b"old")
    assert main(["merge", str(config_file), str(output), "--quiet"]) == 2
    assert "pass --force" in one_line_error(capsys)
    assert main(["merge", str(config_file), str(output), "--quiet", "--force"]) == 0
    assert (output / "model.safetensors").stat().st_size > 3
    (output / "old.txt").write_text("old")
    assert main(["merge", str(config_file), str(output), "--quiet", "--force"]) == 2
    assert "old.txt is not a model file" in one_line_error(capsys)
    assert (output / "old.txt").read_text() == "old"


def test_shipped_recipe_offline_names_the_repo_and_writes_nothing(tmp_path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    output = tmp_path / "pearl"
    done = subprocess.run(
        [sys.executable, "-m", "pearl_edu", "merge", "pearl-7b-slerp", str(output), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == EXIT_BAD_INPUT
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlabonne/OmniBeagle-7B" in lines[0], done.stderr
    assert not output.exists() and not (tmp_path / ".pearl.partial").exists()


# --------------------------------------------------------------------------------------
# mergekit-yaml's options, with mergekit 0.1.5's meaning
# --------------------------------------------------------------------------------------

NUM_TENSORS = 2 + 2 * 9 + 1  # embeddings, two layers of nine tensors, norm (+ lm_head: 1)
LAZYMERGEKIT_FLAGS = [
    "--copy-tokenizer",
    "--allow-crimes",
    "--out-shard-size",
    "1B",
    "--lazy-unpickle",
]


def pearl_edu_command() -> list[str]:
    script = Path(sys.executable).parent / "pearl-edu"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pearl_edu"]


def weight_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def plain_merge(config_file, tmp_path_factory) -> Path:
    """The config merged with no options but --quiet: what the options are measured against."""
    output = tmp_path_factory.mktemp("plain") / "out"
    assert main(["merge", str(config_file), str(output), "--quiet"]) == 0
    return output


@pytest.fixture(scope="module")
def dare_config(tmp_path_factory):
    """A DARE-TIES config over tiny models, and a function that writes it with a YAML seed."""
    root = tmp_path_factory.mktemp("dare")
    base = make_tiny_model(root / "base", num_layers=2, seed=1)
    math = make_tiny_model(root / "math", base=base, noise=0.5, seed=2)
    chat = make_tiny_model(root / "chat", base=base, noise=0.5, seed=3)

    def write(name: str, seed_line: str = "") -> Path:
        path = root / name
        path.write_text(
            "models:\n"
            f"  - model: {base}\n"
            f"  - model: {math}\n"
            "    parameters: {weight: 0.5, density: 0.5}\n"
            f"  - model: {chat}\n"
            "    parameters: {weight: 0.5, density: 0.5}\n"
            "merge_method: dare_ties\n"
            f"base_model: {base}\n"
            "dtype: float32\n"
            f"{seed_line}"
        )
        return path

    return write


def test_lazymergekit_command_line_runs_unchanged(config_file, plain_merge, tmp_path):
    """LazyMergekit's `mergekit-yaml config.yaml merge ...`, with pearl-edu merge in its place."""
    (tmp_path / "config.yaml").write_text(config_file.read_text())
    done = subprocess.run(
        [*pearl_edu_command(), "merge", "config.yaml", "merge", *LAZYMERGEKIT_FLAGS],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    output = tmp_path / "merge"
    # 1B is a billion bytes: one file, the same bytes as the default 5GB gives.
    assert weight_files(output) == weight_files(plain_merge)
    assert list(weight_files(output)) == ["model.safetensors"]
    assert (output / "tokenizer.json").read_bytes() == (plain_merge / "tokenizer.json").read_bytes()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)


@pytest.mark.parametrize(
    "value",
    ["1B", "1b", "5B", "500M", "2k", "2K", "1000", "0", "0B", "-1B", "+2M", " 1B", "1_000k"]
    + ["-1", "1.5B", "5GB", "1e9", "", "B", "k", "x", "1 B"],
)
def test_out_shard_size_is_parsed_as_mergekit_parses_it(value):
    from pearl_edu.cli import NO_SHARD_LIMIT, parse_out_shard_size
    from pearl_edu.errors import ConfigError

    common = pytest.importorskip("mergekit.common")
    try:
        expected = common.parse_kmb(value)
    except (ValueError, IndexError):
        with pytest.raises(ConfigError, match="--out-shard-size"):
            parse_out_shard_size(value)
    else:
        # mergekit writes one file when the size is 0 or less (TensorWriter.save_tensor).
        assert parse_out_shard_size(value) == (expected if expected > 0 else NO_SHARD_LIMIT)


def test_out_shard_size_counts_bytes_in_mergekit_units(config_file, plain_merge, tmp_path):
    kmb = tmp_path / "kmb"
    assert main(["merge", str(config_file), str(kmb), "--quiet", "--out-shard-size", "40k"]) == 0
    si = tmp_path / "si"
    assert main(["merge", str(config_file), str(si), "--quiet", "--shard-size", "40KB"]) == 0
    assert len(weight_files(kmb)) > 1
    assert weight_files(kmb) == weight_files(si)
    assert (kmb / "model.safetensors.index.json").read_bytes() == (
        si / "model.safetensors.index.json"
    ).read_bytes()

    # mergekit's 1B is a billion; --shard-size's 1B is one byte, so one tensor a shard.
    one_byte = tmp_path / "one-byte"
    assert main(["merge", str(config_file), str(one_byte), "--quiet", "--shard-size", "1B"]) == 0
    assert len(weight_files(one_byte)) == NUM_TENSORS
    for value in ("1B", "0"):
        output = tmp_path / f"out-{value}"
        assert (
            main(["merge", str(config_file), str(output), "--quiet", "--out-shard-size", value])
            == 0
        )
        assert weight_files(output) == weight_files(plain_merge)


def test_out_shard_size_mistakes_are_one_line(config_file, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["merge", str(config_file), str(output), "--quiet"]
    assert main([*args, "--out-shard-size", "1GB"]) == EXIT_BAD_INPUT
    assert "--out-shard-size '1GB' is not understood" in one_line_error(capsys)
    assert main([*args, "--out-shard-size", "1B", "--shard-size", "1GB"]) == EXIT_BAD_INPUT
    assert "not both" in one_line_error(capsys)
    assert not output.exists()


def test_no_copy_tokenizer_leaves_the_tokenizer_out(config_file, plain_merge, tmp_path):
    from pearl_edu.card import TOKENIZER_FILES

    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet", "--no-copy-tokenizer"]) == 0
    copied = [name for name in TOKENIZER_FILES if (plain_merge / name).is_file()]
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    assert not [name for name in TOKENIZER_FILES if (output / name).exists()]
    assert weight_files(output) == weight_files(plain_merge)
    for name in ("config.json", "mergekit_config.yml"):
        assert (output / name).is_file()
    # As mergekit: the generation config goes with the tokenizer.
    assert (plain_merge / "generation_config.json").is_file()
    assert not (output / "generation_config.json").exists()
    again = tmp_path / "again"
    assert main(["merge", str(config_file), str(again), "--quiet", "--copy-tokenizer"]) == 0
    assert all((again / name).is_file() for name in copied)


def test_cuda_flag_is_device_cuda(config_file, tmp_path, capsys):
    by_flag = ["merge", str(config_file), str(tmp_path / "a"), "--quiet", "--cuda"]
    by_device = ["merge", str(config_file), str(tmp_path / "b"), "--quiet", "--device", "cuda"]
    if torch.cuda.is_available():
        assert main(by_flag) == 0
        assert "on cuda:0" in capsys.readouterr().out
    else:
        assert main(by_flag) == EXIT_BAD_INPUT
        flag_error = one_line_error(capsys)
        assert main(by_device) == EXIT_BAD_INPUT
        assert flag_error == one_line_error(capsys)
        assert "--device cpu" in flag_error
        assert not (tmp_path / "a").exists()
    # As in mergekit, an explicit --device wins over --cuda.
    output = tmp_path / "c"
    assert (
        main(["merge", str(config_file), str(output), "--quiet", "--cuda", "--device", "cpu"]) == 0
    )
    assert "on cpu" in capsys.readouterr().out


def test_random_seed_replaces_the_yaml_seed(dare_config, tmp_path):
    def run(config: Path, name: str, *options: str) -> Path:
        output = tmp_path / name
        assert main(["merge", str(config), str(output), "--quiet", *options]) == 0
        return output

    unseeded = dare_config("dare.yml")
    default = run(unseeded, "default")
    flag = run(unseeded, "flag", "--random-seed", "7")
    in_yaml = run(dare_config("dare-seed-7.yml", "random_seed: 7\n"), "yaml")
    overridden = run(
        dare_config("dare-seed-3.yml", "seed: 3\n"), "overridden", "--random-seed", "7"
    )
    assert weight_files(flag) == weight_files(in_yaml) == weight_files(overridden)
    assert weight_files(flag) != weight_files(default)
    import yaml

    recorded = yaml.safe_load((overridden / "mergekit_config.yml").read_text())
    assert recorded["random_seed"] == 7 and "seed" not in recorded
    assert "Random seed: `7`" in (flag / "README.md").read_text()


def test_random_seed_leaves_deterministic_methods_alone(config_file, plain_merge, tmp_path):
    output = tmp_path / "out"
    assert main(["merge", str(config_file), str(output), "--quiet", "--random-seed", "7"]) == 0
    assert weight_files(output) == weight_files(plain_merge)
    assert (output / "mergekit_config.yml").read_bytes() == (
        plain_merge / "mergekit_config.yml"
    ).read_bytes()


def test_verbose_prints_the_settings(dare_config, tmp_path, capsys):
    config = dare_config("dare-verbose.yml")
    output = tmp_path / "out"
    options = ["--quiet", "-v", "--out-shard-size", "1B", "--random-seed", "5"]
    assert main(["merge", str(config), str(output), *options, "--no-copy-tokenizer"]) == 0
    err = capsys.readouterr().err
    assert "shards of at most 1000000000 bytes" in err
    assert "random seed 5" in err and "tokenizer left out" in err and "device auto" in err
    assert main(["merge", str(config), str(tmp_path / "o2"), "--quiet", "--verbose"]) == 0
    assert "random seed 0" in capsys.readouterr().err


def test_options_reach_merge_wherever_they_are(monkeypatch, tmp_path):
    """--quiet and --debug before or after the subcommand; mergekit's names for the rest."""

    # pearl_edu.merge is also the name of the function the package exports.
    import pearl_edu.engine as merge_module
    from pearl_edu.errors import OutputError

    calls = []

    def spy(config, output_dir, **options):
        calls.append(options)
        raise OutputError("stop here")

    monkeypatch.setattr(merge_module, "merge", spy)
    config = tmp_path / "merge.yml"
    config.write_text(
        "models: [{model: a}, {model: b}]\nmerge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\n"
    )
    out = str(tmp_path / "out")
    assert main(["merge", str(config), out, "--quiet", "--cuda", "-j", "3"]) == EXIT_BAD_INPUT
    assert main(["--quiet", "merge", str(config), out, "--num-threads", "2"]) == EXIT_BAD_INPUT
    assert main(["merge", str(config), out]) == EXIT_BAD_INPUT
    assert [(c["progress"], c["device"], c["threads"]) for c in calls] == [
        (False, "cuda", 3),
        (False, "auto", 2),
        (None, "auto", None),
    ]
    assert [c["shard_size"] for c in calls] == ["5GB"] * 3
    for argv in (["--debug", "merge", str(config), out], ["merge", str(config), out, "--debug"]):
        with pytest.raises(OutputError, match="stop here"):
            main(argv)


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.yml"
    for position in ("after", "before"):
        command = ["merge", str(missing), str(tmp_path / "out")]
        command = [*command, "--debug"] if position == "after" else ["--debug", *command]
        done = subprocess.run(
            [sys.executable, "-m", "pearl_edu", *command],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
        )
        assert done.returncode not in (0, EXIT_BAD_INPUT), position
        assert "Traceback (most recent call last)" in done.stderr, position
        assert "missing.yml" in done.stderr.strip().splitlines()[-1]


def test_option_mistakes_are_one_line_exit_2(config_file, tmp_path, capsys):
    output = str(tmp_path / "out")
    for options, expected in (
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--random-seed", "x"], "--random-seed: invalid int value: 'x'"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["merge", str(config_file), output, *options])
        assert stopped.value.code == EXIT_BAD_INPUT
        line = one_line_error(capsys)
        assert expected in line and "--help" in line
    assert not (tmp_path / "out").exists()


def test_help_says_what_each_mergekit_option_does_here(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--copy-tokenizer", "--no-copy-tokenizer", "--out-shard-size", "--cuda"):
        assert option in text
    for option in ("--random-seed", "--allow-crimes", "--lazy-unpickle", "--verbose", "-j"):
        assert option in text
    assert "1B = --shard-size 1GB" in text
    assert text.count("no effect") >= 2
    assert "the same as --device cuda" in text
