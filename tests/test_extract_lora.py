"""``pearl-edu extract-lora`` against mergekit-extract-lora, and the LoRA round trip.

mergekit's extraction is deterministic (an SVD in float32), so pearl_edu's adapter must
hold mergekit's tensors bit for bit and the same adapter_config.json. Applied back with
``model: base+adapter``, a full-rank adapter gives the fine-tune within float32 rounding,
and a rank-r adapter misses it by exactly what Eckart–Young says: the root sum of squares
of the singular values left out (Frobenius), the largest one left out (spectral).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pearl_edu.cli import main
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, OutputError
from pearl_edu.extract_lora import ExtractOptions, extract_lora
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

LINEAR = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def pair(root: Path, dtype: torch.dtype, arch: str = "mistral") -> tuple[Path, Path]:
    base = make_tiny_model(root / "base", arch=arch, num_layers=2, seed=1, dtype=dtype)
    tuned = make_tiny_model(root / "tuned", base=base, noise=0.3, seed=2, dtype=dtype)
    return base, tuned


def mergekit_extract(model: Path, base: Path, out: Path, *args: str) -> Path:
    from mergekit.scripts.extract_lora import main as mergekit_main

    argv = ["--model", str(model), "--base-model", str(base), "--out-path", str(out), *args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mergekit_main.main(argv, standalone_mode=False)
    return out


def applied(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model ``base+adapter``, through a merge of it alone (linear, weight 1)."""
    text = f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1}}\n"
    merge(text, out, device="cpu", progress=False)
    return load_state_dict(out)


@pytest.mark.parametrize(
    ("dtype", "args"),
    [
        (torch.bfloat16, ()),
        (torch.float32, ()),
        (torch.float32, ("--max-rank", "6", "--no-distribute-scale")),
        (torch.bfloat16, ("--max-rank", "8", "--embed-lora")),
        (torch.float32, ("--max-rank", "8", "--sv-epsilon", "0.07", "-e", "mlp")),
    ],
    ids=["bf16", "fp32", "rank6-no-distribute", "bf16-embed-lora", "sv-epsilon-exclude"],
)
def test_the_adapter_is_mergekits_bit_for_bit(tmp_path, dtype, args):
    base, tuned = pair(tmp_path, dtype)
    theirs = mergekit_extract(tuned, base, tmp_path / "mergekit", *args)
    options = {"--max-rank": "128", "--sv-epsilon": "0", "-e": None}
    flags = list(args)
    for i, flag in enumerate(flags):
        if flag in options:
            options[flag] = flags[i + 1]
    ours = extract_lora(
        str(tuned),
        str(base),
        tmp_path / "pearl",
        ExtractOptions(
            rank=int(options["--max-rank"]),
            distribute_scale="--no-distribute-scale" not in args,
            embed_lora="--embed-lora" in args,
            sv_epsilon=float(options["--sv-epsilon"]),
            exclude_regexes=(options["-e"],) if options["-e"] else (),
        ),
    )
    mine, reference = (load_file(p / "adapter_model.safetensors") for p in (ours, theirs))
    assert sorted(mine) == sorted(reference)
    for name, tensor in mine.items():
        assert tensor.dtype == reference[name].dtype, name
        assert same_bits(tensor, reference[name]), f"{name} differs from mergekit's"
    config, expected = (json.loads((p / "adapter_config.json").read_text()) for p in (ours, theirs))
    assert config.pop("lora_bias") is False  # pearl_edu says so; no bias to extract here
    for key in ("target_modules", "modules_to_save"):
        assert sorted(config.pop(key)) == sorted(expected.pop(key))
    assert config == expected
    if "--sv-epsilon" in args:  # the threshold lowered some ranks below --max-rank
        assert config["rank_pattern"] and all(r < 8 for r in config["rank_pattern"].values())


def test_full_rank_round_trip_gives_the_fine_tune_back(tmp_path):
    base, tuned = pair(tmp_path, torch.float32)
    adapter = extract_lora(str(tuned), str(base), tmp_path / "lora", ExtractOptions(rank=1000))
    back, want = applied(base, adapter, tmp_path / "back"), load_state_dict(tuned)
    assert sorted(back) == sorted(want)
    for name, tensor in back.items():
        # B @ A reproduces the task vector to float32 SVD precision (a few ulp of its
        # largest entries), and base + (B @ A) is rounded once to float32.
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(load_state_dict(base)[LINEAR], want[LINEAR])


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_low_rank_error_is_the_discarded_singular_values(tmp_path, rank):
    base, tuned = pair(tmp_path, torch.float32)
    adapter = extract_lora(str(tuned), str(base), tmp_path / "lora", ExtractOptions(rank=rank))
    back = applied(base, adapter, tmp_path / "back")
    before, after = load_state_dict(base), load_state_dict(tuned)
    decomposed = [n for n in after if n.endswith("_proj.weight")]
    assert len(decomposed) == 14
    for name in decomposed:
        delta = after[name].double() - before[name].double()
        values = torch.linalg.svdvals(delta)  # in float64, apart from the extraction's own
        error = back[name].double() - after[name].double()
        left_out = values[rank:]
        frobenius = left_out.square().sum().sqrt()
        assert torch.linalg.matrix_norm(error).item() == pytest.approx(frobenius.item(), rel=1e-4)
        spectral = torch.linalg.matrix_norm(error, ord=2).item()
        assert spectral == pytest.approx(left_out[0].item(), rel=1e-4)
    # What is not a linear layer is saved whole: the norms and embeddings come back exactly.
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(back[name], after[name])


def test_biases_of_decomposed_layers_round_trip(tmp_path):
    base, tuned = pair(tmp_path, torch.float32, arch="qwen2")
    adapter = extract_lora(str(tuned), str(base), tmp_path / "lora", ExtractOptions(rank=1000))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert f"base_model.model.{bias.removesuffix('.bias')}.lora_B.bias" in load_file(
        adapter / "adapter_model.safetensors"
    )
    back, want = applied(base, adapter, tmp_path / "back"), load_state_dict(tuned)
    assert not torch.equal(load_state_dict(base)[bias], want[bias])
    for name, tensor in back.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cli_extracts_and_refuses_in_one_line(tmp_path, capsys):
    base, tuned = pair(tmp_path, torch.bfloat16)
    out = tmp_path / "lora"
    command = ["extract-lora", "--model", str(tuned), "--base", str(base), "--rank", "4"]
    assert main([*command, str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "README.md").is_file()
    capsys.readouterr()
    for extra, message in [
        ([], f"{out}: exists and is not empty; give --force"),
        (["--force", "-i", "("], "--include-regex '(': not a regular expression"),
        (["--force", "--rank", "0"], "--rank 0: expected a positive whole number"),
    ]:
        assert main([*command, *extra, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"pearl-edu: error: {message}") and "\n" not in err
    assert main([*command, "--force", str(out)]) == 0
    with pytest.raises(OutputError, match="lies inside the input"):
        extract_lora(str(tuned), str(base), tuned / "lora", ExtractOptions(rank=4))
    with pytest.raises(ConfigError, match="--exclude-regex"):
        extract_lora(
            str(tuned), str(base), tmp_path / "x", ExtractOptions(4, exclude_regexes=("[",))
        )


def test_a_model_given_as_base_plus_adapter_is_extracted_from(tmp_path):
    # mergekit-extract-lora merges a +adapter reference first; so does pearl_edu's reader.
    base, tuned = pair(tmp_path, torch.float32)
    first = extract_lora(str(tuned), str(base), tmp_path / "first", ExtractOptions(rank=3))
    again = extract_lora(
        f"{base}+{first}", str(base), tmp_path / "again", ExtractOptions(rank=1000)
    )
    want = applied(base, first, tmp_path / "want")
    back = applied(base, again, tmp_path / "back")
    # The change of base+first is of rank 3; extracted again it has rank 3 in substance.
    for name, tensor in back.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)
    delta = want[LINEAR] - load_state_dict(base)[LINEAR]
    assert torch.linalg.matrix_rank(delta.double(), atol=1e-5).item() == 3
