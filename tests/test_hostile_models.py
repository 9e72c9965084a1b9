"""A damaged or crafted model folder is one line naming the file at fault, never a traceback.

Reading a folder touches nothing outside it: an index json cannot name a shard by an
absolute path or through ``..`` (a shard that is a symbolic link to a file elsewhere, as in
the Hugging Face cache, is still read). The tests run as root, for whom a ``chmod 000``
file stays readable: an unreadable file is simulated by making its opening raise
``PermissionError`` as the operating system does.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pathlib
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pearl_edu import reading
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, HubError, ModelError
from pearl_edu.headers import SAFETENSORS_INDEX
from pearl_edu.hub import resolve_model
from pearl_edu.output import partial_dir
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import make_tiny_model


def one_line(caught: pytest.ExceptionInfo, *names: str) -> str:
    """The error's message, checked to be one line naming each of ``names``."""
    message = str(caught.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def write_safetensors(folder: Path, header: object, data: bytes = b"") -> Path:
    """A model folder whose ``model.safetensors`` has exactly this header and data."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(header).encode("utf-8")
    file = folder / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return file


def deny(monkeypatch, target: Path) -> None:
    """Make every opening of ``target`` fail as an unreadable file does (EACCES)."""
    target = os.path.realpath(target)

    def denied(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.realpath(path) == target

    def error(path) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_path_open, real_os_open = builtins.open, pathlib.Path.open, os.open

    def fake_open(file, *args, **kwargs):
        if denied(file):
            raise error(file)
        return real_open(file, *args, **kwargs)

    def fake_path_open(self, *args, **kwargs):
        if denied(self):
            raise error(self)
        return real_path_open(self, *args, **kwargs)

    def fake_os_open(path, *args, **kwargs):
        if denied(path):
            raise error(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(pathlib.Path, "open", fake_path_open)
    monkeypatch.setattr(os, "open", fake_os_open)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A two-layer model in two shards, with an index json."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(
        root / "m", num_layers=2, hidden_size=16, intermediate_size=32, vocab_size=32, shard_count=2
    )


def copy_model(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


# ---------------------------------------------------------------------------------------
# 1. config.json


@pytest.mark.parametrize("text", ["[]", "3", '"a string"', "null"])
def test_config_json_that_is_not_an_object_is_refused(tmp_path, text):
    write_safetensors(
        tmp_path, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)
    )
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "config.json", "expected a JSON object")


@pytest.mark.parametrize(
    "text, reason",
    [("[" * 100_000, "nested too deeply"), ('{"n": ' + "9" * 5000 + "}", "not valid JSON")],
)
def test_config_json_the_parser_chokes_on_is_one_line(tmp_path, text, reason):
    write_safetensors(tmp_path, {})
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "config.json", reason)


# ---------------------------------------------------------------------------------------
# 2 and 8. safetensors headers

GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "entry, expected",
    [
        (3, "expected an object"),
        (["F32", [2, 2]], "expected an object"),
        ({"shape": [2, 2], "data_offsets": [0, 16]}, "no dtype"),
        ({"dtype": "F32", "data_offsets": [0, 16]}, "no shape"),
        ({"dtype": "F32", "shape": [2, 2]}, "no data_offsets"),
        ({**GOOD, "data_offsets": [0, 16, 16]}, "data_offsets is [0, 16, 16]"),
        ({**GOOD, "data_offsets": [0]}, "data_offsets"),
        ({**GOOD, "data_offsets": [0, 16.0]}, "data_offsets"),
        ({**GOOD, "data_offsets": [-4, 12]}, "data_offsets"),
        ({**GOOD, "data_offsets": "0-16"}, "data_offsets"),
        ({**GOOD, "data_offsets": [16, 0]}, "data_offsets [16, 0] end before"),
        ({**GOOD, "shape": [-2, -2]}, "shape is [-2, -2]"),
        ({**GOOD, "shape": [2.0, 2]}, "expected a list of non-negative integers"),
        ({**GOOD, "shape": ["2", 2]}, "expected a list of non-negative integers"),
        ({**GOOD, "shape": [True, 4]}, "expected a list of non-negative integers"),
        ({**GOOD, "shape": 4}, "expected a list of non-negative integers"),
        ({**GOOD, "dtype": ["F32"]}, "dtype is"),
        ({**GOOD, "dtype": None}, "dtype is null"),
    ],
)
def test_a_bad_safetensors_entry_names_the_file_and_the_tensor(tmp_path, entry, expected):
    write_safetensors(tmp_path, {"model.norm.weight": GOOD, "model.bad.weight": entry}, bytes(32))
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "model.safetensors", "model.bad.weight", expected)


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ([], "__metadata__ is a list"),
        ("pt", "__metadata__ is a string"),
        ({"format": 1}, "__metadata__['format'] is an integer"),
    ],
)
def test_metadata_must_be_an_object_of_strings(tmp_path, metadata, expected):
    write_safetensors(tmp_path, {"__metadata__": metadata, "x": GOOD}, bytes(16))
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "model.safetensors", expected)


def test_metadata_null_or_strings_is_read_as_the_safetensors_library_reads_it(tmp_path):
    write_safetensors(tmp_path, {"__metadata__": None, "x": GOOD}, bytes(16))
    assert read_header(tmp_path).tensors["x"].shape == (2, 2)
    write_safetensors(tmp_path, {"__metadata__": {"format": "pt"}, "x": GOOD}, bytes(16))
    assert read_header(tmp_path).tensors["x"].shape == (2, 2)


@pytest.mark.parametrize(
    "header, found", [([GOOD], "a list"), ("x", "a string"), (7, "an integer")]
)
def test_a_safetensors_header_that_is_not_an_object_is_refused(tmp_path, header, found):
    write_safetensors(tmp_path, header, bytes(16))
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "model.safetensors", f"header is {found}; expected a JSON object")


def test_a_shape_whose_bytes_disagree_is_refused(tmp_path):
    write_safetensors(
        tmp_path, {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(20)
    )
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "model.safetensors", "tensor x", "20 bytes, expected 24")


def test_a_tensor_name_with_a_line_break_stays_on_one_line(tmp_path):
    write_safetensors(tmp_path, {"bad\nname": {**GOOD, "shape": [-1]}}, bytes(16))
    with pytest.raises(ModelError) as caught:
        read_header(tmp_path)
    one_line(caught, "model.safetensors", "'bad\\nname'")


# ---------------------------------------------------------------------------------------
# 3. index json


@pytest.mark.parametrize(
    "index, expected",
    [
        ({"weight_map": ["model-00001-of-00002.safetensors"]}, "weight_map is a list"),
        ({"weight_map": "model.safetensors"}, "weight_map is a string"),
        ({"metadata": {}}, "weight_map is missing"),
        ([{"weight_map": {}}], "index json is a list"),
        ({"weight_map": {"model.norm.weight": 3}}, "weight_map['model.norm.weight'] is 3"),
        ({"weight_map": {"model.norm.weight": None}}, "weight_map['model.norm.weight'] is null"),
        ({"weight_map": {"model.norm.weight": ["a"]}}, "expected the name of a weight file"),
    ],
)
def test_a_malformed_index_is_one_line(tiny, tmp_path, index, expected):
    folder = copy_model(tiny, tmp_path / "m")
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelError) as caught:
        read_header(folder)
    one_line(caught, SAFETENSORS_INDEX, expected)


# ---------------------------------------------------------------------------------------
# 4. shards confined to the folder


def point_index_at(folder: Path, shard: str) -> None:
    """Make the index json send one tensor to ``shard``."""
    path = folder / SAFETENSORS_INDEX
    index = json.loads(path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    path.write_text(json.dumps(index))


def test_an_index_cannot_bring_in_another_models_weights(tmp_path):
    a = make_tiny_model(
        tmp_path / "a",
        num_layers=2,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=32,
        shard_count=2,
    )
    other = make_tiny_model(
        tmp_path / "other", num_layers=3, hidden_size=16, intermediate_size=32, vocab_size=32
    )
    for shard in (
        "../other/model.safetensors",
        "sub/../../other/model.safetensors",
        "..\\other\\model.safetensors",
        str(other / "model.safetensors"),
    ):
        point_index_at(a, shard)
        with pytest.raises(ModelError) as caught:
            read_header(a)
        one_line(caught, SAFETENSORS_INDEX, repr(shard), "outside the model folder")


def test_an_index_cannot_open_a_system_file(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "m")
    for shard in ("/etc/hostname", "/dev/zero", "C:\\Windows\\win.ini"):
        point_index_at(folder, shard)
        with pytest.raises(ModelError) as caught:
            read_header(folder)
        one_line(caught, repr(shard), "outside the model folder")


def test_a_shard_that_links_outside_the_folder_is_read(tiny, tmp_path):
    """The Hugging Face cache's snapshots are links to blobs elsewhere: they still work."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in tiny.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    header, original = read_header(snapshot), read_header(tiny)
    assert header.tensors.keys() == original.tensors.keys()
    with ModelReader(header) as linked, ModelReader(original) as reader:
        for name in header.tensors:
            assert torch.equal(linked.read(name), reader.read(name))


# ---------------------------------------------------------------------------------------
# 5. unreadable files


def test_an_unreadable_config_json_is_one_line(tiny, tmp_path, monkeypatch):
    """Simulated: opening config.json raises PermissionError (root could read a chmod 000)."""
    folder = copy_model(tiny, tmp_path / "m")
    deny(monkeypatch, folder / "config.json")
    with pytest.raises(ModelError) as caught:
        read_header(folder)
    one_line(caught, "config.json", os.strerror(errno.EACCES))


def test_an_unreadable_index_is_one_line(tiny, tmp_path, monkeypatch):
    """Simulated: opening the index json raises PermissionError."""
    folder = copy_model(tiny, tmp_path / "m")
    deny(monkeypatch, folder / SAFETENSORS_INDEX)
    with pytest.raises(ModelError) as caught:
        read_header(folder)
    one_line(caught, SAFETENSORS_INDEX, os.strerror(errno.EACCES))


def test_an_unreadable_shard_is_one_line(tiny, tmp_path, monkeypatch):
    """Simulated: opening a shard raises PermissionError."""
    folder = copy_model(tiny, tmp_path / "m")
    shard = folder / "model-00002-of-00002.safetensors"
    deny(monkeypatch, shard)
    with pytest.raises(ModelError) as caught:
        read_header(folder)
    one_line(caught, shard.name, os.strerror(errno.EACCES))


def test_an_unreadable_bin_checkpoint_is_one_line(tmp_path, monkeypatch):
    """Simulated: opening pytorch_model.bin raises PermissionError."""
    folder = make_tiny_model(
        tmp_path / "m", num_layers=1, hidden_size=16, intermediate_size=32, vocab_size=32, fmt="bin"
    )
    deny(monkeypatch, folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as caught:
        read_header(folder)
    one_line(caught, "pytorch_model.bin", os.strerror(errno.EACCES))


def test_a_failing_read_of_a_tensor_is_one_line(tiny, monkeypatch):
    """Simulated: the positioned read fails as a failing disk makes it fail (EIO)."""
    header = read_header(tiny)
    name = next(iter(header.tensors))

    def failing(fd, view, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(reading, "read_at", failing)
    with ModelReader(header) as reader, pytest.raises(ModelError) as caught:
        reader.read(name)
    one_line(caught, header.tensors[name].file.name, name, os.strerror(errno.EIO))


# ---------------------------------------------------------------------------------------
# 6. num_hidden_layers


LINEAR = """\
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
merge_method: linear
"""


def set_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "declared, expected",
    [
        ("2", "num_hidden_layers is '2' (a string); expected an integer"),
        (2.0, "num_hidden_layers is 2.0 (a number); expected an integer"),
        (True, "num_hidden_layers is True (a boolean); expected an integer"),
        ([2], "num_hidden_layers is [2] (a list); expected an integer"),
    ],
)
def test_num_hidden_layers_that_is_not_an_integer_is_named(tiny, tmp_path, declared, expected):
    a = copy_model(tiny, tmp_path / "a")
    set_config(a, num_hidden_layers=declared)
    output = tmp_path / "out"
    with pytest.raises(ModelError) as caught:
        merge(LINEAR.format(a=a, b=tiny), output, progress=False)
    one_line(caught, "config.json", expected)
    assert not output.exists() and not partial_dir(output).exists()


# ---------------------------------------------------------------------------------------
# 7. a missing local folder is not sent to the Hub


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache, in a folder holding ``models/``."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    monkeypatch.chdir(work)


@pytest.mark.parametrize("ref", ["models/x", "models/x@main"])
def test_a_missing_folder_in_a_local_folder_says_the_folder_does_not_exist(offline, ref):
    with pytest.raises(ModelError) as caught:
        resolve_model(ref)
    message = one_line(caught, f"model folder {ref} does not exist", "Hugging Face")
    assert message.startswith("model folder")


@pytest.mark.parametrize("ref", ["./models/x", "../models/x", "models/x/y", "~/no-such-model"])
def test_a_path_is_a_missing_folder(offline, ref):
    with pytest.raises(ModelError) as caught:
        resolve_model(ref)
    one_line(caught, f"model folder {ref} does not exist")


def test_a_home_folder_of_no_user_is_a_missing_folder(offline):
    with pytest.raises(ModelError) as caught:
        resolve_model("~no-such-user-pearl/x")
    one_line(caught, "model folder ~no-such-user-pearl/x does not exist")


def test_a_repo_id_still_goes_to_the_hub(offline):
    with pytest.raises(HubError) as caught:
        resolve_model("no-such-org/x")
    one_line(caught, "no-such-org/x", "Hugging Face cache")


# ---------------------------------------------------------------------------------------
# 9. float8 inputs


@pytest.fixture(scope="module")
def float8_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models whose weights are stored in float8 (e4m3 and e5m2)."""
    root = tmp_path_factory.mktemp("float8")
    a = make_tiny_model(
        root / "a",
        num_layers=2,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=32,
        dtype=torch.float32,
    )
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2, dtype=torch.float32)
    for folder, dtype in ((a, torch.float8_e4m3fn), (b, torch.float8_e5m2)):
        file = folder / "model.safetensors"
        weights = {name: t.to(dtype) for name, t in load_file(file).items()}
        save_file(weights, file, metadata={"format": "pt"})
    return a, b


FLOAT8_CONFIGS = {
    "linear": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: linear\n"
    "parameters:\n  weight: 0.5\n",
    "ties": "models:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    "merge_method: ties\nbase_model: {a}\n",
    "slerp": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\n"
    "parameters:\n  t: 0.4\n",
    "task_arithmetic": "models:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    "merge_method: task_arithmetic\nbase_model: {a}\n",
}


@pytest.mark.parametrize("method", [m for m in FLOAT8_CONFIGS if m != "slerp"])
def test_float8_inputs_without_dtype_are_refused_alike_before_writing(
    float8_models, tmp_path, method
):
    a, b = float8_models
    output = tmp_path / "out"
    with pytest.raises(ConfigError) as caught:
        merge(FLOAT8_CONFIGS[method].format(a=a, b=b), output, progress=False)
    one_line(caught, "model.embed_tokens.weight", "float8_e4m3fn", "'dtype: bfloat16'")
    assert not output.exists() and not partial_dir(output).exists()


@pytest.mark.parametrize("method", list(FLOAT8_CONFIGS))
def test_float8_inputs_are_merged_in_the_dtype_the_config_gives(float8_models, tmp_path, method):
    a, b = float8_models
    config = FLOAT8_CONFIGS[method].format(a=a, b=b) + "dtype: bfloat16\n"
    merge(config, tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_float8_slerp_needs_no_dtype_as_in_mergekit(float8_models, tmp_path):
    """SLERP computes in float32 and writes the base's float8, as mergekit 0.1.5 does."""
    a, b = float8_models
    merge(FLOAT8_CONFIGS["slerp"].format(a=a, b=b), tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float8_e4m3fn}


def test_a_float8_passthrough_copy_needs_no_dtype(float8_models, tmp_path):
    """A copy does no arithmetic: the float8 bytes go out as they came in."""
    a, _ = float8_models
    config = f"slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
    merge(config + "merge_method: passthrough\n", tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(a / "model.safetensors")
    assert all(
        torch.equal(merged[name].view(torch.uint8), original[name].view(torch.uint8))
        for name in original
    )
