"""Linear, task arithmetic, TIES and DARE: worked examples, config errors, plan and seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import signalled_merge_command

from pearl_edu.backends.reference import input_generators
from pearl_edu.cli import main
from pearl_edu.config import load_config
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError
from pearl_edu.functions import (
    dare,
    elect_signs,
    linear,
    magnitude_prune,
    random_drop,
    task_arithmetic,
    ties,
)
from pearl_edu.layer_schedule import parameter_value
from pearl_edu.methods import METHODS, merge_tensor, tensor_seed
from pearl_edu.output import partial_dir
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.tensor_plan import plan
from pearl_edu.ulp import same_bits

REPO_ROOT = Path(__file__).resolve().parents[1]


def tensor(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- worked by hand ---------------------------------------------------------------------


def test_linear_by_hand():
    a, b = tensor(1, 2), tensor(3, 4)
    # (1 * [1, 2] + 3 * [3, 4]) / (1 + 3)
    assert torch.equal(linear([a, b], [1, 3]), tensor(2.5, 3.5))
    assert torch.equal(linear([a, b], [1, 3], normalize=False), tensor(10, 14))
    bf16 = linear([a.bfloat16(), b.bfloat16()], [0.5, 0.5])
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, tensor(2, 3).bfloat16())


def test_task_arithmetic_by_hand():
    base = tensor(1, 1)
    deltas = [tensor(1, -1), tensor(0, 2)]
    models = [base + delta for delta in deltas]  # [2, 0] and [1, 3]: the models, not deltas
    # base + lambda * (0.5 * [1, -1] + 1 * [0, 2]) = [1, 1] + 2 * [0.5, 1.5]
    assert torch.equal(task_arithmetic(base, models, [0.5, 1], scale=2), tensor(2, 4))
    # normalize divides by 0.5 + 1 first
    normalized = task_arithmetic(base, models, [0.5, 1], scale=2, normalize=True)
    assert torch.allclose(normalized, tensor(1 + 2 * 0.5 / 1.5, 1 + 2 * 1.5 / 1.5))
    assert torch.equal(task_arithmetic(base, [], []), base)


def test_ties_three_elements_by_hand():
    base = tensor(0, 0, 0)
    a = tensor(1.0, -2.0, 0.5)
    b = tensor(-3.0, 1.0, 0.25)
    # No trimming. Sum of deltas [-2, -1, 0.75]: elected signs [-, -, +]. Element 0: only
    # b agrees (-3 / 1); element 1: only a (-2 / 1); element 2: both, (0.5 + 0.25) / 2.
    assert torch.equal(ties(base, [a, b], [1, 1], [1, 1]), tensor(-3, -2, 0.375))
    # density 0.7 keeps int(0.7 * 3) = 2 entries of each: a -> [1, -2, 0], b -> [-3, 1, 0].
    assert torch.equal(magnitude_prune(a, 0.7), tensor(1, -2, 0))
    # Element 2 is now zero in both, agrees with nothing, and stays at the base.
    assert torch.equal(ties(base, [a, b], [1, 1], [0.7, 0.7]), tensor(-3, -2, 0))
    # Weights 0.5 and 1: element 1 sums to 0.5 * -2 + 1 * 1 = 0, and zero elects "+",
    # so only b's +1 survives there, divided by b's weight alone. Element 2 agrees in both:
    # (0.5 * 0.5 + 1 * 0.25) / (0.5 + 1).
    assert torch.equal(ties(base, [a, b], [0.5, 1], [1, 1]), tensor(-3, 1, 0.5 / 1.5))
    # Without normalize the agreeing weighted deltas are just summed.
    plain = ties(base, [a, b], [0.5, 1], [1, 1], normalize=False)
    assert torch.equal(plain, tensor(-3, 1, 0.25 + 0.25))


def test_sign_election_zero_never_agrees_and_int8_mask_changes_nothing():
    weighted = torch.stack([tensor(1, 0, -1), tensor(-2, 0, -1)])
    expected = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    assert torch.equal(elect_signs(weighted), expected)
    # int8_mask, mergekit's way to store these signs in less memory, is a parameter of the
    # methods that elect signs, and changes no bit of their results.
    base, a, b = tensor(0, 0, 0, 0), tensor(1.0, -2.0, 0.5, 0), tensor(-3.0, 1.0, 0.25, 2)
    inputs = [{}, {"weight": 0.5, "density": 0.7}, {"weight": 1.0, "density": 0.7}]
    for method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        params = _defaults(method)
        plain, masked = (
            merge_tensor(
                method, [base, a, b], 0, params | {"int8_mask": flag}, input_params=inputs, seed=3
            )
            for flag in (0.0, 1.0)
        )
        assert same_bits(plain, masked), method


def test_magnitude_prune_limits():
    delta = tensor(0.1, -5, 3, 0.2)
    assert torch.equal(magnitude_prune(delta, 1.0), delta)
    assert torch.equal(magnitude_prune(delta, 0.0), torch.zeros(4))
    assert torch.equal(magnitude_prune(delta, 0.01), tensor(0, -5, 0, 0))  # at least one
    rescaled = magnitude_prune(delta, 0.5, rescale=True)
    assert torch.allclose(rescaled.abs().sum(), delta.abs().sum())


def test_random_drop_keeps_density_and_the_l1_norm():
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    dropped = random_drop(delta, 0.3, torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005  # about 5 standard deviations
    scale = delta.abs().sum() / delta[kept].abs().sum()
    assert torch.allclose(dropped[kept], delta[kept] * scale)
    assert torch.allclose(dropped.abs().sum(), delta.abs().sum(), rtol=1e-5)
    unscaled = random_drop(delta, 0.3, torch.Generator().manual_seed(1), rescale=False)
    assert torch.equal(unscaled[kept], delta[kept]) and torch.equal(unscaled != 0, kept)
    assert torch.equal(random_drop(delta, 1.0, torch.Generator()), delta)


def test_dare_with_density_one_is_task_arithmetic_and_ties():
    base = tensor(0.5, -1, 2, 0)
    others = [tensor(1, -2, 2.5, 1), tensor(0, 1, 1, -1)]
    generators = input_generators(3, 2)
    plain = task_arithmetic(base, others, [0.3, 0.7])
    assert torch.equal(dare(base, others, [0.3, 0.7], [1, 1], generators), plain)
    elected = dare(base, others, [0.3, 0.7], [1, 1], generators, sign_election=True)
    assert torch.equal(elected, ties(base, others, [0.3, 0.7], [1, 1], normalize=False))


def test_bfloat16_task_vectors_are_computed_in_bfloat16_like_mergekit():
    base = torch.tensor([1.0, 2.0]).bfloat16()
    other = torch.tensor([1.5, 2.5]).bfloat16()
    result = merge_tensor(
        "task_arithmetic",
        [base, other],
        0,
        _defaults("task_arithmetic"),
        input_params=[{}, {"weight": 0.3}],
    )
    # The weight becomes bfloat16 0.30078125 before it multiplies the delta.
    weight = torch.tensor(0.3).bfloat16()
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, base + (other - base) * weight)


# --- the engine's entry point ------------------------------------------------------------


def _defaults(method: str) -> dict[str, float]:
    return {name: value for name, value in METHODS[method].parameters.items() if value is not None}


def test_registry_describes_the_new_methods():
    ties_spec = METHODS["ties"]
    assert ties_spec.needs_base and not ties_spec.random
    assert ties_spec.required_input_parameters() == ["weight"]
    assert ties_spec.input_parameters["density"] == 1.0
    assert ties_spec.parameters["normalize"] == 1.0 and ties_spec.parameters["lambda"] == 1.0
    assert METHODS["dare_ties"].random and METHODS["dare_ties"].parameters["rescale"] == 1.0
    assert METHODS["dare_linear"].parameters["normalize"] == 0.0
    assert METHODS["task_arithmetic"].parameters["normalize"] == 0.0
    assert METHODS["linear"].base_has_input_parameters and not METHODS["linear"].needs_base


def test_merge_tensor_passes_per_input_parameters_and_checks_them():
    base, a, b = tensor(0, 0, 0), tensor(1.0, -2.0, 0.5), tensor(-3.0, 1.0, 0.25)
    params = _defaults("ties")
    inputs = [{"weight": 0.5}, {}, {"weight": 1.0}]  # the base, second, gets nothing
    result = merge_tensor("ties", [a, base, b], 1, params, input_params=inputs)
    assert torch.equal(result, tensor(-3, 1, 0.5 / 1.5))
    with pytest.raises(ValueError, match="input 0 has no 'weight'"):
        merge_tensor("ties", [a, base, b], 1, params, input_params=[{}, {}, {"weight": 1}])
    linear_inputs = [{"weight": 1}, {"weight": 3}]
    merged = merge_tensor(
        "linear", [tensor(1, 2), tensor(3, 4)], 0, {"normalize": 1.0}, input_params=linear_inputs
    )
    assert torch.equal(merged, tensor(2.5, 3.5))


def test_dare_seed_decides_the_drops_and_nothing_else_does():
    base = torch.zeros(10_000)
    other = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    params = _defaults("dare_linear")
    inputs = [{}, {"weight": 1.0, "density": 0.5}]

    def run(seed: int | None, name: str = "model.layers.0.mlp.up_proj.weight") -> torch.Tensor:
        return merge_tensor(
            "dare_linear", [base, other], 0, params, input_params=inputs, seed=seed, name=name
        )

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    # Without an explicit seed, the tensor's seed comes from seed 0 and its name.
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(run(None, name), run(tensor_seed(0, name)))
    assert tensor_seed(0, name) != tensor_seed(0, "model.layers.2.mlp.up_proj.weight")
    assert tensor_seed(0, name) != tensor_seed(1, name)


# --- config errors: one line, naming the key ---------------------------------------------

TIES = """
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/math
    parameters: {weight: 0.5, density: 0.45}
  - model: org/chat
    parameters: {weight: 0.5, density: 0.48}
parameters:
  normalize: true
"""


def _config_error(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(text)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_config_reads_per_model_parameters_and_seed():
    config = load_config(TIES + "random_seed: 42\n")
    assert config.random_seed == 42
    assert load_config(TIES).random_seed == 0
    assert load_config(TIES + "seed: 3\n").random_seed == 3
    math = config.slices[0].sources[1]
    assert math.parameters["density"].rules[0].value == 0.45


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "density: 0.45",
            "density: 1.5",
            "models[1].parameters.density: expected a fraction of entries to keep, "
            "from 0 to 1, got 1.5",
        ),
        ("normalize: true", "normalize: 2", "parameters.normalize: expected true or false, got 2"),
        (
            "weight: 0.5, density: 0.45",
            "density: 0.45",
            "models[1].parameters.weight: missing for org/math; ties needs a weight",
        ),
        ("normalize: true", "lambda: much", "parameters.lambda: expected a number, got 'much'"),
    ],
)
def test_bad_parameters_name_the_key(old, new, expected):
    assert expected in _config_error(TIES.replace(old, new, 1))


def test_bad_seeds_and_missing_base():
    assert "random_seed: expected an integer, got 'x'" in _config_error(TIES + "random_seed: x\n")
    assert "give either random_seed or seed" in _config_error(TIES + "seed: 1\nrandom_seed: 2\n")
    no_base = TIES.replace("base_model: org/base\n", "").replace("  - model: org/base\n", "")
    assert "base_model: missing; ties needs one of" in _config_error(no_base)


def test_models_form_adds_an_unlisted_base_model_last():
    config = load_config(TIES.replace("  - model: org/base\n", ""))
    assert config.slices[0].models() == ["org/math", "org/chat", "org/base"]


def test_linear_weights_that_sum_to_zero_are_refused(tmp_path):
    a = make_tiny_model(
        tmp_path / "a", num_layers=1, hidden_size=8, intermediate_size=8, vocab_size=8
    )
    b = make_tiny_model(tmp_path / "b", base=a, seed=1)
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: -1}}\n"
    with pytest.raises(ConfigError, match="parameters.weight: the weights for tensor .* sum to 0"):
        merge(text, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- the plan and `pearl-edu plan` ------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model and two fine-tuned siblings of it (float32, 4 layers)."""
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_model(
        root / "base",
        num_layers=4,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=32,
        dtype=torch.float32,
    )
    return {
        "base": base,
        "math": make_tiny_model(root / "math", base=base, noise=0.5, seed=2, dtype=torch.float32),
        "chat": make_tiny_model(root / "chat", base=base, noise=0.5, seed=3, dtype=torch.float32),
    }


def dare_yaml(family: dict[str, Path], seed: int = 7) -> str:
    return f"""
merge_method: dare_ties
base_model: {family["base"]}
random_seed: {seed}
models:
  - model: {family["math"]}
    parameters:
      weight: [{{filter: mlp, value: [0.2, 0.8]}}, {{value: 0.5}}]
      density: 0.5
  - model: {family["chat"]}
    parameters: {{weight: 0.5}}
parameters:
  density: 0.7
"""


def test_plan_carries_per_input_parameters_and_seeds(family):
    from pearl_edu.reading import read_header

    config = load_config(dare_yaml(family))
    headers = {m: read_header(m) for m in config.models()}
    merge_plan = plan(config, headers)
    up = next(t for t in merge_plan.tensors if t.name == "model.layers.3.mlp.up_proj.weight")
    assert [i.model for i in up.inputs] == [
        str(family["math"]),
        str(family["chat"]),
        str(family["base"]),
    ]
    assert up.base_index == 2
    assert up.input_params == ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.7}, {})
    assert up.input_filters[0] == {"weight": "mlp", "density": None}
    assert up.seed == tensor_seed(7, up.name)
    assert len({t.seed for t in merge_plan.tensors}) == len(merge_plan.tensors)
    q = next(t for t in merge_plan.tensors if t.name == "model.layers.1.self_attn.q_proj.weight")
    assert q.input_params[0]["weight"] == 0.5 and q.params["normalize"] == 0.0
    data = merge_plan.to_dict()["tensors"]
    assert (
        data[0]["input_params"][1] == {"weight": 0.5, "density": 0.7}
        and data[0]["seed"] is not None
    )


def test_flag_gradients_step_instead_of_interpolating():
    # mergekit reads a gradient of booleans as steps: [false, true] is false until x = 1.
    config = load_config(TIES.replace("normalize: true", "normalize: [false, false, true]"))
    values = [
        parameter_value("normalize", "any", x, [config.parameters]) for x in (0, 0.5, 0.99, 1)
    ]
    assert [value for value, _ in values] == [0.0, 0.0, 0.0, 1.0]


def test_cli_plan_shows_per_model_parameters_per_layer(family, capsys):
    config_file = family["base"].parent / "dare.yml"
    config_file.write_text(dare_yaml(family))
    assert main(["plan", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "dare_ties, dtype of each input, random seed 7" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:3] == ["layer", "slice", "x"])
    assert header.split()[3:] == [
        "weight@math[mlp]",
        "weight@math[other]",
        "weight@chat[other]",
        "density@math[other]",
        "density@chat[other]",
    ]
    rows = [line.split() for line in lines[lines.index(header) + 1 : lines.index(header) + 5]]
    assert [row[3] for row in rows] == ["0.2000", "0.4000", "0.6000", "0.8000"]
    assert all(row[4:] == ["0.5000", "0.5000", "0.5000", "0.7000"] for row in rows)
    # Outside the layers, from the models' headers: every value and the filter that gave it.
    head = next(line for line in lines if line.strip().startswith("lm_head.weight"))
    assert head.split("  ")[2:] == [
        "normalize = 0.0000 (other)",
        "lambda = 1.0000 (other)",
        "rescale = 1.0000 (other)",
        "int8_mask = 0.0000 (other)",
        "weight@math = 0.5000 (other)",
        "density@math = 0.5000 (other)",
        "weight@chat = 0.5000 (other)",
        "density@chat = 0.7000 (other)",
    ]


# --- DARE in the engine: reproducible, independent of order and of resumption -------------


def test_dare_merge_is_reproducible_and_each_tensor_stands_alone(family, tmp_path):
    first = merge(dare_yaml(family), tmp_path / "one", device="cpu", progress=False)
    again = merge(dare_yaml(family), tmp_path / "two", device="cpu", progress=False)
    other_seed = merge(dare_yaml(family, seed=8), tmp_path / "three", device="cpu", progress=False)
    one, two, three = (load_state_dict(r.output_dir) for r in (first, again, other_seed))
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(one[n], three[n]) for n in one)
    assert "Random seed: `7`" in (first.output_dir / "README.md").read_text()

    # Each tensor, merged alone and in reverse order, is the tensor the engine wrote.
    from pearl_edu.reading import read_header

    config = load_config(dare_yaml(family))
    headers = {m: read_header(m) for m in config.models()}
    weights = {m: load_state_dict(m) for m in config.models()}
    for job in reversed(plan(config, headers).tensors):
        inputs = [weights[i.model][i.tensor] for i in job.inputs]
        alone = merge_tensor(
            job.method,
            inputs,
            job.base_index,
            job.params,
            input_params=job.input_params,
            seed=job.seed,
            name=job.name,
        )
        assert same_bits(alone, one[job.name]), job.name


def test_killed_dare_merge_resumes_to_identical_files(family, tmp_path):
    config_file = tmp_path / "dare.yml"
    config_file.write_text(dare_yaml(family))
    clean = merge(config_file, tmp_path / "clean" / "out", shard_size="20KB", progress=False)
    output = tmp_path / "resumed" / "out"
    args = ["merge", str(config_file), str(output), "--quiet", "--shard-size", "20KB"]
    command = [sys.executable, "-m", "pearl_edu", *args]
    killed = subprocess.run(
        signalled_merge_command("KILL", 15, args),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert partial_dir(output).is_dir()
    rerun = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name in clean.weight_files:
        assert (output / name).read_bytes() == (clean.output_dir / name).read_bytes(), name
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index["weight_map"]
