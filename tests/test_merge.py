"""The streaming merge: correct tensors, a proper HF folder, safe output, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from faults import signalled_merge_command
from safetensors.torch import load_file

from pearl_edu import __version__
from pearl_edu.config import load_config
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, ModelError, OutputError, PearlEduError
from pearl_edu.methods import merge_tensor
from pearl_edu.output import MANIFEST, parse_size, partial_dir
from pearl_edu.read_ahead import read_ahead
from pearl_edu.reading import ModelReader, read_header
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.tensor_plan import plan
from pearl_edu.ulp import same_bits
from pearl_edu.verification import verify

PEARL_T = """\
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""
REPO_ROOT = Path(__file__).resolve().parents[1]


def slerp_config(a: Path, b: Path, *, layers=(0, 4), dtype="bfloat16", t=PEARL_T) -> str:
    """A Pearl-style config over two model folders."""
    dtype_line = f"dtype: {dtype}\n" if dtype else ""
    return (
        "slices:\n"
        "  - sources:\n"
        f"      - model: {a}\n        layer_range: [{layers[0]}, {layers[1]}]\n"
        f"      - model: {b}\n        layer_range: [{layers[0]}, {layers[1]}]\n"
        "merge_method: slerp\n"
        f"base_model: {a}\n"
        f"parameters:\n{t}{dtype_line}"
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 4-layer float16 base with a tokenizer, and a bfloat16 sibling of it."""
    root = tmp_path_factory.mktemp("pair")
    a = make_tiny_model(root / "a", num_layers=4, dtype=torch.float16, with_tokenizer=True)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    return a, b


def expected_weights(config_text: str) -> dict[str, torch.Tensor]:
    """The merge computed the slow, obvious way: whole models in memory, same functions."""
    config = load_config(config_text)
    headers = {ref: read_header(ref) for ref in config.models()}
    weights = {ref: load_state_dict(ref) for ref in config.models()}
    dtype = getattr(torch, config.dtype) if config.dtype else None
    result = {}
    for job in plan(config, headers).tensors:
        inputs = [weights[i.model][i.tensor] for i in job.inputs]
        inputs = [x.to(dtype) if dtype else x for x in inputs]
        merged = merge_tensor(job.method, inputs, job.base_index, job.params, name=job.name)
        result[job.name] = merged.to(job.dtype)
    return result


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not partial_dir(output).exists()


# --- the result ------------------------------------------------------------------------


def test_merged_tensors_match_the_plan_and_load_with_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = pair
    config = slerp_config(a, b)
    result = merge(config, tmp_path / "out", device="cpu", progress=False)

    written = load_state_dict(result.output_dir)
    expected = expected_weights(config)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == torch.bfloat16
        assert same_bits(written[name], tensor), name
    # t = 0 at layer 0 for self_attn: exactly the base model's tensor (cast to bf16).
    base_q = load_state_dict(a)["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert same_bits(written["model.layers.0.self_attn.q_proj.weight"], base_q)

    model, info = AutoModelForCausalLM.from_pretrained(result.output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    assert result.num_tensors == len(expected) and result.resumed_tensors == 0
    assert result.device == torch.device("cpu")


def test_without_dtype_the_result_takes_the_base_dtype(pair, tmp_path):
    a, b = pair
    config = slerp_config(a, b, dtype=None)
    result = merge(config, tmp_path / "out", device="cpu", progress=False)
    written = load_state_dict(result.output_dir)
    assert all(t.dtype == torch.float16 for t in written.values())
    expected = expected_weights(config)
    assert all(same_bits(written[n], expected[n]) for n in expected)
    hf_config = json.loads((result.output_dir / "config.json").read_text())
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "float16"


def test_float64_merges_as_it_plans(pair, tmp_path):
    # `pearl-edu plan` accepts every dtype mergekit reads; the merge computes in float64 too.
    a, b = pair
    config = slerp_config(a, b, dtype="float64")
    planned = plan(load_config(config), {ref: read_header(ref) for ref in (str(a), str(b))})
    assert {job.dtype for job in planned.tensors} == {torch.float64}
    result = merge(config, tmp_path / "out", device="cpu", progress=False)
    written = load_state_dict(result.output_dir)
    expected = expected_weights(config)
    assert all(written[n].dtype == torch.float64 for n in expected)
    assert all(same_bits(written[n], expected[n]) for n in expected)
    hf_config = json.loads((result.output_dir / "config.json").read_text())
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "float64"


def test_an_unknown_dtype_is_refused_alike_by_plan_and_merge(pair, tmp_path):
    a, b = pair
    config_file = tmp_path / "merge.yml"
    config_file.write_text(slerp_config(a, b, dtype="bf16"))
    with pytest.raises(ConfigError) as planned:
        load_config(config_file)
    with pytest.raises(ConfigError) as merged:
        merge(config_file, tmp_path / "out", progress=False)
    assert str(planned.value) == str(merged.value)
    assert str(planned.value).startswith(f"{config_file}: dtype: unknown dtype 'bf16'")
    assert_nothing_written(tmp_path / "out")


def test_sharded_and_bin_inputs_give_the_same_bytes(tmp_path):
    plain_a = make_tiny_model(tmp_path / "plain-a", num_layers=2)
    plain_b = make_tiny_model(tmp_path / "plain-b", base=plain_a, noise=0.5, seed=2)
    sharded_a = make_tiny_model(tmp_path / "sharded-a", num_layers=2, shard_count=3)
    bin_b = make_tiny_model(
        tmp_path / "bin-b", base=plain_a, noise=0.5, seed=2, fmt="bin", shard_count=2
    )
    plain = merge(slerp_config(plain_a, plain_b, layers=(0, 2)), tmp_path / "o1", progress=False)
    mixed = merge(slerp_config(sharded_a, bin_b, layers=(0, 2)), tmp_path / "o2", progress=False)
    assert (plain.output_dir / "model.safetensors").read_bytes() == (
        mixed.output_dir / "model.safetensors"
    ).read_bytes()


def test_output_folder_layout(pair, tmp_path):
    a, b = pair
    config = slerp_config(a, b, layers=(1, 3))
    result = merge(config, tmp_path / "out", shard_size="60KB", progress=False)
    out = result.output_dir
    files = sorted(p.name for p in out.iterdir())
    n = len(result.weight_files)
    assert n > 2
    assert [f for f in files if f.endswith(".safetensors")] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert name in files
    assert "mergekit_config.yml" in files and "model.safetensors.index.json" in files
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")]

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for file_name in result.weight_files:
        assert (out / file_name).stat().st_size <= 60_000 + 8 + 4096
        shard = load_file(out / file_name)
        assert all(index["weight_map"][name] == file_name for name in shard)
        tensors.update(shard)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())

    # Two layers taken from the middle of four: renumbered 0 and 1.
    assert "model.layers.1.mlp.up_proj.weight" in tensors
    assert "model.layers.2.mlp.up_proj.weight" not in tensors
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 2
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "bfloat16"
    assert hf_config["architectures"] == ["MistralForCausalLM"]
    assert (out / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()

    card = (out / "README.md").read_text()
    assert __version__ in card and str(b) in card and "merge_method: slerp" in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == yaml.safe_load(config)


def test_output_tensor_order_is_embeddings_layers_norm_head(pair, tmp_path):
    a, b = pair
    result = merge(slerp_config(a, b), tmp_path / "out", progress=False)
    with open(result.output_dir / "model.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    layers = [int(n.split(".")[2]) for n in names[1:-2]]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2, 3}


def test_same_merge_twice_gives_identical_files(pair, tmp_path):
    a, b = pair
    config = slerp_config(a, b)
    one = merge(config, tmp_path / "one", shard_size="50KB", progress=False)
    two = merge(config, tmp_path / "two", shard_size="50KB", progress=False)
    first, second = weight_bytes(one.output_dir), weight_bytes(two.output_dir)
    first.pop("README.md"), second.pop("README.md")  # names its own folder
    assert first == second


# --- resume after kill -9 ------------------------------------------------------------


def run_merge_cli(config_file: Path, output: Path, *extra: str, kill_after: int | None = None):
    """``pearl-edu merge`` in a process of its own; with ``kill_after``, killed (``kill -9``)
    once it has written that many tensors."""
    args = ["merge", str(config_file), str(output), "--quiet", "--shard-size", "50KB", *extra]
    if kill_after is None:
        command = [sys.executable, "-m", "pearl_edu", *args]
    else:
        command = signalled_merge_command("KILL", kill_after, args)
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_killed_merge_resumes_to_byte_identical_files(pair, tmp_path):
    a, b = pair
    config_file = tmp_path / "merge.yml"
    config_file.write_text(slerp_config(a, b))
    clean = merge(config_file, tmp_path / "clean", shard_size="50KB", progress=False)
    assert len(clean.weight_files) >= 3

    # The same folder name as the clean run, elsewhere: the model card names the folder.
    (tmp_path / "resumed").mkdir()
    output = tmp_path / "resumed" / "clean"
    killed = run_merge_cli(config_file, output, kill_after=12)
    assert killed.returncode == -9, killed.stderr
    partial = partial_dir(output)
    assert not output.exists() and (partial / MANIFEST).is_file()
    finished = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert finished and len(finished) < len(clean.weight_files)

    rerun = run_merge_cli(config_file, output)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    assert not partial.exists()
    assert weight_bytes(output) == weight_bytes(clean.output_dir)


def test_partial_folder_of_another_merge_is_started_afresh(pair, tmp_path):
    a, b = pair
    output = tmp_path / "out"
    config_file = tmp_path / "merge.yml"
    config_file.write_text(slerp_config(a, b, t="  t: 0.25\n"))
    killed = run_merge_cli(config_file, output, kill_after=12)
    assert killed.returncode == -9

    config = slerp_config(a, b)
    result = merge(config, output, shard_size="50KB", progress=False)
    assert result.resumed_tensors == 0
    expected = expected_weights(config)
    written = load_state_dict(output)
    assert all(same_bits(written[n], expected[n]) for n in expected)


def test_foreign_partial_folder_is_refused_not_deleted(pair, tmp_path):
    a, b = pair
    output = tmp_path / "out"
    partial_dir(output).mkdir()
    (partial_dir(output) / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not made by pearl-edu"):
        merge(slerp_config(a, b), output, progress=False)
    assert (partial_dir(output) / "notes.txt").read_text() == "mine"


# --- bad input: a clear one-line error and nothing written ---------------------------


def assert_refused(config, output, error, match, **options):
    with pytest.raises(error) as err:
        merge(config, output, progress=False, **options)
    message = str(err.value)
    assert "\n" not in message
    assert match in message, message
    assert_nothing_written(output)
    return message


def test_missing_model_folder(pair, tmp_path):
    a, _ = pair
    missing = tmp_path / "no-such-model"
    message = assert_refused(
        slerp_config(a, missing), tmp_path / "out", ModelError, "does not exist"
    )
    assert str(missing) in message


def test_missing_weight_file(pair, tmp_path):
    a, _ = pair
    b = make_tiny_model(tmp_path / "b", base=a, seed=2, shard_count=2)
    (b / "model-00002-of-00002.safetensors").unlink()
    assert_refused(
        slerp_config(a, b), tmp_path / "out", ModelError, "model-00002-of-00002.safetensors"
    )


def test_truncated_weight_file(pair, tmp_path):
    a, _ = pair
    b = make_tiny_model(tmp_path / "b", base=a, seed=2)
    file = b / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    message = assert_refused(slerp_config(a, b), tmp_path / "out", ModelError, "truncated")
    assert str(file) in message


def test_models_of_different_shapes(pair, tmp_path):
    a, _ = pair
    other = make_tiny_model(tmp_path / "other", num_layers=4, vocab_size=130)
    message = assert_refused(
        slerp_config(a, other), tmp_path / "out", ModelError, "model.embed_tokens.weight"
    )
    assert "128" in message and "130" in message


def test_malicious_pickle_is_refused_and_never_runs(pair, tmp_path):
    a, _ = pair
    marker = tmp_path / "code-ran"
    evil = make_tiny_model(tmp_path / "evil", base=a, seed=2, fmt="bin")

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(evil / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = RunsCode()
    with open(evil / "pytorch_model.bin", "wb") as f:
        torch.save(state, f)
    assert_refused(slerp_config(a, evil), tmp_path / "out", ModelError, "pytorch_model.bin")
    assert not marker.exists()


def test_a_folder_of_other_files_is_refused_even_with_force(pair, tmp_path):
    a, b = pair
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(OutputError, match="is not a merged model .keep.txt"):
            merge(slerp_config(a, b), output, force=force, progress=False)
        assert (output / "keep.txt").read_text() == "precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_merged_model_is_replaced_only_with_force(pair, tmp_path):
    a, b = pair
    output = tmp_path / "out"
    merge(slerp_config(a, b), output, progress=False)
    with pytest.raises(OutputError, match="holds a merged model; pass --force"):
        merge(slerp_config(a, b, t="  t: 0.25\n"), output, progress=False)
    merge(slerp_config(a, b, t="  t: 0.25\n"), output, force=True, progress=False)
    assert "0.25" in (output / "mergekit_config.yml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_output_folder_is_fine(pair, tmp_path):
    a, b = pair
    (tmp_path / "out").mkdir()
    merge(slerp_config(a, b), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_output_inside_an_input_folder_is_refused(pair, tmp_path):
    a, b = pair
    copy = shutil.copytree(a, tmp_path / "a")
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(OutputError, match="inside input model folder"):
        merge(slerp_config(copy, b), copy / "merged", force=True, progress=False)
    with pytest.raises(OutputError, match="is the input model folder .*; choose another"):
        merge(slerp_config(copy, b), copy, force=True, progress=False)
    assert sorted(p.name for p in copy.iterdir()) == before


def test_output_containing_an_input_folder_is_refused(pair, tmp_path):
    _, b = pair
    inner = make_tiny_model(tmp_path / "work" / "a", num_layers=4, dtype=torch.float16)
    with pytest.raises(OutputError, match="contains input model folder"):
        merge(slerp_config(inner, b), tmp_path / "work", force=True, progress=False)
    assert (inner / "model.safetensors").is_file()


def test_bad_shard_size_and_device(pair, tmp_path):
    a, b = pair
    assert_refused(slerp_config(a, b), tmp_path / "o", ConfigError, "5GB", shard_size="lots")
    assert_refused(slerp_config(a, b), tmp_path / "o", ConfigError, "tpu", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when there is no GPU")
def test_cuda_without_gpu_is_refused(pair, tmp_path):
    a, b = pair
    assert_refused(slerp_config(a, b), tmp_path / "o", ConfigError, "--device cpu", device="cuda")


def test_auto_device_is_cpu_without_gpu(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a, b = pair
    assert merge(slerp_config(a, b), tmp_path / "o", progress=False).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_merge_matches_cpu_merge(pair, tmp_path):
    a, b = pair
    cpu = merge(slerp_config(a, b), tmp_path / "cpu" / "m", device="cpu", progress=False)
    gpu = merge(
        slerp_config(a, b), tmp_path / "gpu" / "m", device="cuda", progress=False, backend="cpu"
    )
    assert gpu.device.type == "cuda"
    # The cosine is summed on the CPU on both paths, the rest is elementwise: the same bits.
    report = verify(cpu.output_dir, gpu.output_dir)
    assert report.identical, report.summary()
    # By default everything runs on the GPU: within the contract at the inputs' scale.
    fast = merge(slerp_config(a, b), tmp_path / "fast" / "m", device="cuda", progress=False)
    report = verify(cpu.output_dir, fast.output_dir, config=slerp_config(a, b), input_scale_ulp=1)
    assert report.ok, report.summary()


def test_quiet_merge_prints_nothing(pair, tmp_path, capfd):
    a, b = pair
    merge(slerp_config(a, b), tmp_path / "o", progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and "merging" not in captured.err


def test_progress_bar_counts_bytes(pair, tmp_path, capfd):
    a, b = pair
    result = merge(slerp_config(a, b), tmp_path / "o", progress=True)
    err = capfd.readouterr().err
    assert "merging" in err and "100%" in err
    assert result.bytes_written == sum(
        t.numel() * 2 for t in load_state_dict(result.output_dir).values()
    )


# --- the pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("64kib", 64 * 1024),
        ("1000000", 1_000_000),
        (123456, 123456),
        ("100 KB", 100_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", 0, "five"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(PearlEduError) as err:
        parse_size(text)
    assert "\n" not in str(err.value)


def test_read_ahead_yields_every_job_in_order_with_cast_inputs(pair):
    a, b = pair
    config = load_config(slerp_config(a, b))
    headers = {ref: read_header(ref) for ref in config.models()}
    jobs = plan(config, headers).tensors
    readers = {ref: ModelReader(h) for ref, h in headers.items()}
    weights = {ref: load_state_dict(ref) for ref in config.models()}
    seen = []
    # A tiny budget forces the reader to wait for every job: order must still hold.
    for job, inputs, hosts in read_ahead(
        jobs, readers, dtype=torch.float32, device=torch.device("cpu"), budget_bytes=1
    ):
        seen.append(job.name)
        assert hosts == [None] * len(inputs)  # on the CPU: no host copies
        for tensor_input, tensor in zip(job.inputs, inputs, strict=True):
            assert tensor.dtype == torch.float32
            stored = weights[tensor_input.model][tensor_input.tensor]
            assert torch.equal(tensor, stored.float())
    assert seen == [job.name for job in jobs]


def test_read_ahead_raises_reader_errors_in_the_caller(pair, tmp_path):
    a, _ = pair
    copy = shutil.copytree(a, tmp_path / "a")
    header = read_header(copy)
    last = max(header.tensors.values(), key=lambda meta: meta.offset)
    file = copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])

    class Job:
        def __init__(self, name):
            self.name = name
            self.inputs = [type("Input", (), {"model": "a", "tensor": name})()]

    jobs = [Job(name) for name in header.tensors]
    readers = {"a": ModelReader(header)}
    with pytest.raises(ModelError, match=f"truncated, tensor {last.name}"):
        for _ in read_ahead(jobs, readers, dtype=None, device=torch.device("cpu")):
            pass


def test_write_behind_writes_in_order_and_reports_errors(tmp_path):
    from pearl_edu.write_behind import WriteBehind
    from pearl_edu.writing import OutputTensor, ShardedWriter, layout_shards

    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}
    layout = layout_shards([OutputTensor(n, (4,), torch.float32) for n in tensors], 10**6)
    write_behind = WriteBehind(ShardedWriter(tmp_path, layout))
    for name, tensor in tensors.items():
        write_behind.write(name, tensor)
    write_behind.finish()
    written = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(written[name], tensor) for name, tensor in tensors.items())

    failing = WriteBehind(ShardedWriter(tmp_path / "x", layout))
    failing.write("t0", torch.zeros(4, dtype=torch.float16))  # the layout says float32
    with pytest.raises(OutputError, match="t0: merged tensor"):
        failing.finish()


def test_output_buffers_are_reused_and_grow_to_the_largest_tensor():
    from pearl_edu.write_behind import OutputBuffers

    outputs = OutputBuffers(count=2, small_bytes=0)
    first, second = outputs.take(100), outputs.take(50)
    assert first.numel() >= 100 and second.numel() >= 50
    assert first.data_ptr() != second.data_ptr()
    outputs.give(first)
    assert outputs.take(80).data_ptr() == first.data_ptr()  # reused, not reallocated
    outputs.give(second)
    grown = outputs.take(500)
    assert grown.numel() >= 500


def test_small_outputs_do_not_hold_the_kept_buffers():
    from pearl_edu.write_behind import OutputBuffers

    outputs = OutputBuffers(count=1, small_bytes=64)
    large = outputs.take(1000)
    small = [outputs.take(64) for _ in range(3)]  # no wait: the one kept buffer is taken
    assert all(s.numel() >= 64 and s.data_ptr() != large.data_ptr() for s in small)
    for s in small:
        outputs.give(s)
    assert outputs.free == [], "small buffers are dropped, not kept"
    outputs.give(large)
    assert outputs.take(900).data_ptr() == large.data_ptr()


@pytest.mark.parametrize("second_write", ["at once", "once the thread has failed"])
def test_write_behind_hands_buffers_back_even_after_an_error(tmp_path, second_write):
    """Every buffer comes back and the thread stops, whichever way the race goes.

    The first tensor fails in the writer thread. A second one queued before the thread
    has failed is dropped there; one written after it is refused by `write` itself, which
    raises the error in the merging thread.
    """
    from pearl_edu.write_behind import WriteBehind
    from pearl_edu.writing import OutputTensor, ShardedWriter, layout_shards

    layout = layout_shards([OutputTensor("t0", (4,), torch.float32)], 10**9)
    handed_back = []
    failing = WriteBehind(ShardedWriter(tmp_path, layout))
    wrong_dtype = torch.zeros(4, dtype=torch.float16)
    try:
        with pytest.raises(OutputError, match="t0: merged tensor"):
            failing.write("t0", wrong_dtype, then=lambda: handed_back.append(1))
            if second_write == "once the thread has failed":
                deadline = time.monotonic() + 30
                while failing.error is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert failing.error is not None
            failing.write("t0", wrong_dtype, then=lambda: handed_back.append(2))
            failing.finish()
    finally:
        failing.close()
    assert sorted(handed_back) == [1, 2]
    assert not failing.thread.is_alive()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_endpoint_and_cast_merges_are_copied_out_of_the_reused_buffers(pair, tmp_path, dtype):
    """t = 0 gives the base tensor's values, whatever the dtype of the output."""
    config_text = slerp_config(*pair, t="  t: 0.0\n", dtype=dtype)
    merge(config_text, tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    base = load_state_dict(pair[0])
    for name, tensor in expected_weights(config_text).items():
        assert same_bits(written[name], tensor), name
        assert torch.equal(written[name].float(), base[name].float()), name


def test_buffers_are_allocated_once_and_oversized_ones_dropped():
    from pearl_edu.read_ahead import BufferSet

    buffers = BufferSet(keep_bytes=1000, pinned=False)
    first = buffers.buffer(0, 10)
    assert first.numel() == 1000
    for size in (999, 1, 1000, 500):
        assert buffers.buffer(0, size).data_ptr() == first.data_ptr()
    big = buffers.buffer(0, 5000)
    assert big.numel() == 5000
    after = buffers.buffer(0, 10)
    assert after.numel() == 1000  # the oversized buffer is not kept
    assert buffers.buffer(1, 20).numel() == 1000


def test_math_threads_defaults_to_torchs_and_restores_the_setting():
    import torch

    from pearl_edu.errors import ConfigError
    from pearl_edu.process_settings import math_threads

    before = torch.get_num_threads()
    with math_threads(None, torch.device("cpu")) as used:
        assert used == before == torch.get_num_threads()  # as mergekit runs
    assert torch.get_num_threads() == before
    with math_threads(1, torch.device("cpu")) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"), math_threads(0, torch.device("cpu")):
        pass
