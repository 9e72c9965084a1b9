"""Reading headers and tensors lazily and safely; writing byte-valid safetensors shards."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import pearl_edu.writing
from pearl_edu.errors import ModelError, OutputError
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import load_state_dict
from pearl_edu.writing import (
    DIRECT_ALIGNMENT,
    STAGING_BYTES,
    OutputTensor,
    SequentialFile,
    ShardedWriter,
    layout_shards,
)


class CreatesMarker:
    """Unpickling this would call os.system and create a marker file: it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def models(tiny_checkpoints):
    return tiny_checkpoints  # conftest.py


@pytest.mark.parametrize("kind", ["single", "sharded", "bin", "bin-single"])
def test_header_describes_every_tensor(models, kind):
    path = models[kind]
    header = read_header(path)
    weights = load_state_dict(path)
    assert set(header.tensors) == set(weights)
    for name, tensor in weights.items():
        meta = header.tensors[name]
        assert meta.shape == tuple(tensor.shape)
        assert meta.dtype == tensor.dtype
        assert meta.nbytes == tensor.numel() * tensor.element_size()
    assert header.format == ("bin" if kind.startswith("bin") else "safetensors")
    assert header.config["num_hidden_layers"] == 2


def test_header_names_the_shard_of_each_tensor(models):
    header = read_header(models["sharded"])
    index = json.loads((models["sharded"] / "model.safetensors.index.json").read_text())
    for name, file_name in index["weight_map"].items():
        assert header.tensors[name].file.name == file_name
    assert len(header.files) == 3


@pytest.mark.parametrize("kind", ["single", "sharded", "bin", "bin-single"])
def test_reader_returns_the_stored_tensors(models, kind):
    weights = load_state_dict(models[kind])
    with ModelReader(read_header(models[kind])) as reader:
        for name, tensor in weights.items():
            got = reader.read(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_reader_reads_into_a_reused_buffer(models):
    weights = load_state_dict(models["single"])
    buffer = torch.empty(64 * 1024, dtype=torch.uint8)
    with ModelReader(read_header(models["single"])) as reader:
        first = reader.read("model.norm.weight", out=buffer).clone()
        second = reader.read("lm_head.weight", out=buffer)
        assert second.data_ptr() == buffer.data_ptr()
        assert torch.equal(second, weights["lm_head.weight"])
        assert torch.equal(first, weights["model.norm.weight"])
        with pytest.raises(ValueError, match="buffer"):
            reader.read("lm_head.weight", out=torch.empty(10, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_mapped_tensors_equal_the_stored_ones_and_are_not_copies(models, kind):
    weights = load_state_dict(models[kind])
    with ModelReader(read_header(models[kind])) as reader:
        for name, tensor in weights.items():
            assert reader.can_map(name), name
            mapped = reader.map(name)
            assert mapped.dtype == tensor.dtype and torch.equal(mapped, tensor), name
            mapped.zero_()  # copy-on-write: the file is left as it was
    assert all(torch.equal(t, load_state_dict(models[kind])[n]) for n, t in weights.items())


def test_pickle_tensors_cannot_be_mapped(models):
    with ModelReader(read_header(models["bin"])) as reader:
        assert not any(reader.can_map(name) for name in reader.header.tensors)
        assert not reader.can_map("model.nope")


def test_prefetch_advises_the_kernel_of_the_tensors_bytes_only(models, monkeypatch):
    import pearl_edu.reading

    advice = []
    monkeypatch.setattr(pearl_edu.reading, "fadvise", lambda *args: advice.append(args))
    header = read_header(models["sharded"])
    name = "model.layers.1.mlp.up_proj.weight"
    meta = header.tensors[name]
    with ModelReader(header) as reader:
        reader.prefetch(name)
        reader.prefetch("model.nope")  # unknown: nothing to advise
        (fd, offset, length, what) = advice[0]
        assert (offset, length, what) == (meta.offset, meta.nbytes, pearl_edu.reading.FADV_WILLNEED)
        assert os.path.samefile(f"/proc/self/fd/{fd}", meta.file) and len(advice) == 1
    with ModelReader(read_header(models["bin"])) as reader:  # pickle: no byte range to advise
        reader.prefetch(next(iter(reader.header.tensors)))
    assert len(advice) == 1


def test_a_map_lives_as_long_as_its_tensor(models):
    """The map is undone with the last view of the tensor, not before."""
    import gc
    import weakref

    header = read_header(models["single"])
    with ModelReader(header) as reader:
        mapped = reader.map("lm_head.weight")
    row = mapped[1]  # a view keeps the map alive after the reader is closed
    region = weakref.ref(mapped.untyped_storage())
    del mapped
    gc.collect()
    assert torch.equal(row, load_state_dict(models["single"])["lm_head.weight"][1])
    del row
    gc.collect()
    assert region() is None


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("sizes", [[0], [1], [7, DIRECT_ALIGNMENT], [STAGING_BYTES + 3, 5, 4096]])
def test_sequential_file_writes_exactly_the_bytes_given(tmp_path, direct, sizes):
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes() for n in sizes]
    file = SequentialFile(tmp_path / "out.bin", direct=direct)
    for piece in pieces:
        file.write(piece)
    file.finish()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
    assert file.fd == -1  # closed


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("phase", [0, 8, 4094])
def test_sequential_file_writes_aligned_memory_without_copying_it(
    tmp_path, monkeypatch, phase, aligned
):
    """Bytes that lie on the file's block boundaries in memory too skip the staging buffer."""
    staged = []
    real_stage = SequentialFile._stage
    monkeypatch.setattr(
        SequentialFile,
        "_stage",
        lambda self, view: staged.append(len(view)) or real_stage(self, view),
    )
    header = bytes(range(256))[: 100 + phase % 100]  # the tensor starts mid-block
    size = 3 * STAGING_BYTES // 2 + 12345
    memory = torch.randint(0, 256, (size + 2 * DIRECT_ALIGNMENT,), dtype=torch.uint8)
    shift = (len(header) - memory.data_ptr()) % DIRECT_ALIGNMENT + (0 if aligned else 2)
    tensor = memory[shift : shift + size]
    file = SequentialFile(tmp_path / "out.bin")
    file.write(header)
    file.write(memoryview(tensor.numpy()), address=tensor.data_ptr())
    file.write(b"tail")
    file.finish()
    assert (tmp_path / "out.bin").read_bytes() == header + tensor.numpy().tobytes() + b"tail"
    if file.direct and aligned:
        assert sum(staged) < len(header) + 2 * DIRECT_ALIGNMENT + 4  # only the edges
    elif file.direct:
        assert sum(staged) == len(header) + size + 4  # copied through the staging buffer


@pytest.mark.skipif(pearl_edu.writing.O_DIRECT is None, reason="no O_DIRECT and fcntl here")
def test_sequential_file_falls_back_where_direct_io_is_refused(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes still gets the bytes."""
    import errno
    import os

    real_write = os.write
    refused = []

    def write(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = bytes(range(256)) * 40
    file = SequentialFile(tmp_path / "out.bin")
    file.write(data)
    file.finish()
    assert refused and (tmp_path / "out.bin").read_bytes() == data


def test_unknown_tensor_is_a_model_error(models):
    with ModelReader(read_header(models["single"])) as reader:
        with pytest.raises(ModelError, match="no tensor named model.nope"):
            reader.read("model.nope")


def test_missing_folder_and_folder_without_weights(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_header(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no weights found"):
        read_header(tmp_path / "empty")


def test_shard_missing_from_index_names_the_file(models, tmp_path):
    path = shutil.copytree(models["sharded"], tmp_path / "m")
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model-00002-of-00003\.safetensors.*missing"):
        read_header(path)


def test_truncated_safetensors_names_file_and_expected_size(models, tmp_path):
    path = shutil.copytree(models["single"], tmp_path / "m")
    file = path / "model.safetensors"
    full_size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ModelError) as err:
        read_header(path)
    message = str(err.value)
    assert "model.safetensors" in message and "truncated" in message
    assert str(full_size) in message and "\n" not in message


@pytest.mark.parametrize("how", ["read", "map"])
def test_file_truncated_after_the_header_was_read(models, tmp_path, how):
    path = shutil.copytree(models["single"], tmp_path / "m")
    header = read_header(path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    last = max(header.tensors.values(), key=lambda meta: meta.offset)
    with ModelReader(header) as reader:
        with pytest.raises(ModelError, match=f"truncated, tensor {last.name}"):
            getattr(reader, how)(last.name)


def test_truncated_bin_is_a_model_error(models, tmp_path):
    path = shutil.copytree(models["bin-single"], tmp_path / "m")
    file = path / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:-500])
    with pytest.raises(ModelError, match=r"pytorch_model\.bin: truncated or damaged"):
        read_header(path)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "code-ran"
    model = tmp_path / "evil"
    model.mkdir()
    payload = {"model.norm.weight": torch.ones(4), "x": CreatesMarker(marker)}
    with open(model / "pytorch_model.bin", "wb") as f:
        if how == "torch.save":
            torch.save(payload, f)
        else:
            pickle.dump(payload, f)

    with pytest.raises(ModelError) as err:
        read_header(model)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "\n" not in message
    if how == "torch.save":
        assert "could run code" in message and "system" in message
    else:
        assert "legacy (pre-zip) pickle" in message
    assert not marker.exists()


def test_file_that_is_no_checkpoint_is_refused(tmp_path):
    model = tmp_path / "junk"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        read_header(model)


def test_bin_with_non_tensor_values_is_refused(tmp_path):
    model = tmp_path / "odd"
    model.mkdir()
    torch.save({"model.norm.weight": torch.ones(4), "step": 3}, model / "pytorch_model.bin")
    with pytest.raises(ModelError, match="tensor"):
        read_header(model)


# --- writing ------------------------------------------------------------------------


def output_tensors(weights):
    return [OutputTensor(n, tuple(t.shape), t.dtype) for n, t in weights.items()]


def test_layout_respects_the_shard_size_and_keeps_order(models):
    tensors = output_tensors(load_state_dict(models["single"]))
    shards = layout_shards(tensors, max_shard_bytes=40_000)
    assert len(shards) > 2
    assert [t for s in shards for t in s.tensors] == tensors
    for shard in shards:
        assert shard.data_bytes <= 40_000 or len(shard.tensors) == 1
        assert len(shard.header) % 8 == 0
    n = len(shards)
    assert [s.file_name for s in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert layout_shards(tensors, 40_000) == shards  # deterministic
    single = layout_shards(tensors, max_shard_bytes=10**9)
    assert [s.file_name for s in single] == ["model.safetensors"]


def test_tensor_larger_than_the_shard_size_gets_its_own_shard():
    tensors = [
        OutputTensor("a", (10,), torch.float32),
        OutputTensor("big", (1000,), torch.float32),
        OutputTensor("b", (10,), torch.float32),
    ]
    shards = layout_shards(tensors, max_shard_bytes=100)
    assert [[t.name for t in s.tensors] for s in shards] == [["a"], ["big"], ["b"]]


def test_written_shards_load_with_safetensors_and_transformers(models, tmp_path):
    weights = load_state_dict(models["single"])
    shards = layout_shards(output_tensors(weights), max_shard_bytes=40_000)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, shards)
    for name, tensor in weights.items():
        writer.write(name, tensor)
    writer.write_index()

    loaded = {}
    for shard in shards:
        file = out / shard.file_name
        assert file.stat().st_size == shard.file_bytes
        loaded.update(load_file(file))
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights.values())
    assert index["weight_map"] == {t.name: s.file_name for s in shards for t in s.tensors}
    assert not list(out.glob("*.tmp"))

    from transformers import AutoModelForCausalLM

    shutil.copy(models["single"] / "config.json", out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(model.state_dict()["model.norm.weight"], weights["model.norm.weight"])


def test_shard_is_a_tmp_file_until_its_last_tensor(models, tmp_path):
    weights = load_state_dict(models["single"])
    shards = layout_shards(output_tensors(weights), max_shard_bytes=10**9)
    writer = ShardedWriter(tmp_path, shards)
    first_name, first = next(iter(weights.items()))
    writer.write(first_name, first)
    assert (tmp_path / "model.safetensors.tmp").exists()
    assert not (tmp_path / "model.safetensors").exists()
    writer.close()
    assert writer.write_index() is None


def test_writer_refuses_wrong_shape_dtype_or_order(models, tmp_path):
    weights = load_state_dict(models["single"])
    names = list(weights)
    writer = ShardedWriter(tmp_path, layout_shards(output_tensors(weights), 10**9))
    with pytest.raises(OutputError, match="layout expects"):
        writer.write(names[0], weights[names[0]].float())
    with pytest.raises(OutputError, match="out of order"):
        writer.write(names[2], weights[names[2]])
    writer.close()


def test_pickle_is_remapped_to_release_pages_and_still_reads_right(models, monkeypatch):
    import pearl_edu.reading as reading

    monkeypatch.setattr(reading, "BIN_REMAP_BYTES", 1)  # unmap after every tensor
    weights = load_state_dict(models["bin"])
    with ModelReader(read_header(models["bin"])) as reader:
        for name, tensor in weights.items():
            assert torch.equal(reader.read(name), tensor), name
            assert not reader._bin_states  # nothing stays mapped between reads
