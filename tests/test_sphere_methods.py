"""nuslerp, multislerp, karcher and model_stock against mergekit 0.1.5, bit for bit.

Three layers of checks:

- the reference core (`pearl_edu.core.sphere`, `pearl_edu.core.model_stock`) against
  mergekit's own methods, called through its Python API on small tensors chosen to reach
  every branch (colinear rows, zero tensors, opposite tensors, singular Model Stock angles);
- whole merges of tiny models, once with mergekit's ``run_merge`` and once with
  `pearl_edu.engine.merge`, every output tensor compared bit for bit;
- the config's one-line errors, and a property of the math: the Karcher mean of two points
  with weights (1 - t, t) is their SLERP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pearl_edu import core
from pearl_edu.card import model_card
from pearl_edu.config import load_config
from pearl_edu.core import model_stock as stock
from pearl_edu.core import sphere
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.methods import merge_tensor
from pearl_edu.plan_table import show_plan
from pearl_edu.reading import read_header
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.tensor_plan import plan
from pearl_edu.ulp import same_bits

NUM_LAYERS = 3


# ---------------------------------------------------------------------------------------
# The core against mergekit's methods, tensor by tensor


def mergekit_merge(method: str, tensors, *, base_index=None, **parameters) -> torch.Tensor:
    """One tensor merged by mergekit 0.1.5's method ``method`` (its Python API)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(list(tensors), base_index=base_index)
    (result,) = registry.get(method)((group,), parameters=parameters)
    return result


def siblings(shape, count, dtype, *, seed=0, spread=0.3):
    """A base tensor and ``count`` noisy copies of it (fine-tuned siblings)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    others = [base + spread * torch.randn(shape, generator=g) for _ in range(count)]
    return base.to(dtype), [other.to(dtype) for other in others]


DTYPES = [torch.bfloat16, torch.float32]
SHAPES = [(33,), (12, 40), (40, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_core_nuslerp_is_mergekits(dtype, shape, flatten, row_wise, with_base):
    base, (a, b) = siblings(shape, 2, dtype, seed=len(shape))
    if len(shape) == 2:  # rows that are colinear, opposite and zero reach every branch
        a[0], b[0] = a[1], 2 * a[1]
        a[2], b[2] = b[3], -b[3]
        a[4] = b[4] = base[4]
    weights = [0.35, 1.4]
    ours = sphere.nuslerp(
        [a, b], weights, base=base if with_base else None, row_wise=row_wise, flatten=flatten
    )
    theirs = mergekit_merge(
        "nuslerp",
        [base, a, b] if with_base else [a, b],
        base_index=0 if with_base else None,
        weight=weights,
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    assert same_bits(ours, theirs)


def test_core_nuslerp_weights_summing_to_zero_give_the_midpoint():
    _, (a, b) = siblings((50,), 2, torch.float32)
    ours = sphere.nuslerp([a, b], [1.0, -1.0])
    assert sphere.nuslerp_t([1.0, -1.0]) == 0.5
    assert same_bits(ours, mergekit_merge("nuslerp", [a, b], weight=[1.0, -1.0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_core_multislerp_is_mergekits(dtype, count, with_base, normalize_weights):
    base, others = siblings((6, 20), count, dtype, seed=count)
    weights = [0.5, 0.2, 0.9, 0.4][:count]
    ours = sphere.multislerp(
        others, weights, base=base if with_base else None, normalize_weights=normalize_weights
    )
    theirs = mergekit_merge(
        "multislerp",
        [base, *others] if with_base else others,
        base_index=0 if with_base else None,
        weight=weights,
        normalize_weights=normalize_weights,
    )
    assert same_bits(ours, theirs)


def test_core_multislerp_with_eps_and_opposite_tensors():
    base, (a, b) = siblings((30,), 2, torch.float32, seed=4)
    assert same_bits(
        sphere.multislerp([a, b], [1.0, 3.0], eps=0.25),
        mergekit_merge("multislerp", [a, b], weight=[1.0, 3.0], eps=0.25),
    )
    # Opposite task vectors of equal weight have no mean direction: two are averaged
    # linearly (eighths, so that every difference is exact)...
    base, d = (8 * base).round() / 8, (8 * a).round() / 8
    ours = sphere.multislerp([base + d, base - d], [1.0, 1.0], base=base)
    theirs = mergekit_merge("multislerp", [base, base + d, base - d], base_index=0, weight=[1, 1])
    assert same_bits(ours, theirs)
    assert torch.equal(ours, base + (d * 0.5 + (-d) * 0.5))
    # ...and more than two are refused, by mergekit too.
    with pytest.raises(sphere.AntipodalError):
        sphere.multislerp([a, -a, a, -a], [1.0] * 4)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit_merge("multislerp", [a, -a, a, -a], weight=[1.0] * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_core_karcher_is_mergekits(dtype, count):
    _, others = siblings((9, 16), count, dtype, seed=10 + count, spread=1.0)
    ours = sphere.karcher_mean(others, [1.0 / count] * count)
    assert same_bits(ours, mergekit_merge("karcher", others))
    few = sphere.karcher_mean(others, [1.0 / count] * count, max_iter=2, tol=1e-3)
    assert same_bits(few, mergekit_merge("karcher", others, max_iter=2, tol=1e-3))


def test_core_karcher_with_zero_and_repeated_tensors():
    _, (a, b) = siblings((40,), 2, torch.float32, seed=7, spread=2.0)
    zero = torch.zeros_like(a)
    for tensors in ([a, zero, b], [a, a, b], [zero, zero], [a]):
        weights = [1.0 / len(tensors)] * len(tensors)
        assert same_bits(
            sphere.karcher_mean(tensors, weights), mergekit_merge("karcher", tensors)
        ), len(tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_core_model_stock_is_mergekits(dtype, shape, count, filter_wise):
    base, others = siblings(shape, count, dtype, seed=20 + count)
    if len(shape) == 2 and count == 2:  # a row whose two updates are opposite: t = 0 there
        others[1][0] = 2 * base[0] - others[0][0]
    ours = stock.model_stock(base, others, filter_wise=filter_wise)
    theirs = mergekit_merge("model_stock", [base, *others], base_index=0, filter_wise=filter_wise)
    assert same_bits(ours, theirs)


def test_core_model_stock_t_at_its_ends():
    cos = torch.tensor([[1.0], [0.0], [-1.0]])
    # Identical siblings: their average; unrelated: the base; opposite pair: the base.
    assert stock.model_stock_t(cos, 2).flatten().tolist() == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------
# A property: the Karcher mean of two points is SLERP


@settings(max_examples=60, deadline=None)
@given(
    angle=st.floats(0.05, 3.0),
    t=st.floats(0.02, 0.98),
    norm=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_karcher_mean_of_two_points_is_slerp(angle, t, norm, seed):
    # Two float64 vectors of equal norm at `angle`. On the great circle through them, the
    # Karcher step from any point of the arc lands at angle t * angle from the first (the
    # two logarithm maps are collinear, so their weighted sum is the exact distance to the
    # minimizer): one step is the answer, in exact arithmetic. What is left is the float64
    # rounding of a few dozen operations on numbers of size `norm`, each within 1.1e-16
    # relative: 1e-12 * norm leaves a margin of about a thousand.
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.linalg.qr(torch.randn(64, 2, generator=g, dtype=torch.float64))[0].T
    a = norm * e1
    b = norm * (math.cos(angle) * e1 + math.sin(angle) * e2)
    expected = core.slerp(a, b, t)
    exact = sphere.karcher_mean([a, b], [1 - t, t], tol=1e-12)
    assert float((exact - expected).abs().max()) <= 1e-12 * norm
    # With mergekit's tol = 1e-5 the iteration may stop before that step (the normalized
    # Euclidean mean is already within 1e-5 of the minimizer for small angles): the error
    # is then at most the length of the step not taken, tol, times the norm.
    default = sphere.karcher_mean([a, b], [1 - t, t])
    assert float(torch.linalg.vector_norm(default - expected)) <= (1e-5 + 1e-12) * norm


# ---------------------------------------------------------------------------------------
# Whole merges of tiny models: pearl_edu.merge against mergekit's run_merge


@dataclass(frozen=True)
class Family:
    """A base model, three fine-tuned siblings of it and an unrelated model."""

    base: Path
    math: Path
    chat: Path
    code: Path
    stranger: Path


def make_family(root: Path, dtype: torch.dtype) -> Family:
    base = make_tiny_model(root / "base", num_layers=NUM_LAYERS, seed=1, dtype=dtype)

    def sibling(name: str, seed: int) -> Path:
        return make_tiny_model(root / name, base=base, noise=0.5, seed=seed, dtype=dtype)

    return Family(
        base=base,
        math=sibling("math", 2),
        chat=sibling("chat", 3),
        code=sibling("code", 4),
        stranger=make_tiny_model(root / "stranger", num_layers=NUM_LAYERS, seed=9, dtype=dtype),
    )


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp("fp32"), torch.float32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Model references are local folders; make sure nothing tries the Hub instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_both(config_text: str, out: Path) -> tuple[dict, dict]:
    """The state dicts that pearl_edu and mergekit make from one YAML."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False)
    run_merge(config, str(out / "mergekit"), options=options)
    merge(config_text, out / "pearl", device="cpu", progress=False)
    return load_state_dict(out / "pearl"), load_state_dict(out / "mergekit")


def assert_identical(ours: dict, theirs: dict, inputs: list[Path]) -> None:
    """Every tensor identical to mergekit's, and the merge not simply one of its inputs."""
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"
    for model in inputs:
        weights = load_state_dict(model)
        assert any(not torch.equal(ours[n], weights[n].to(ours[n].dtype)) for n in ours), model


def models_yaml(entries: list[tuple[Path, str]]) -> str:
    """``models:`` entries, each a model with its (possibly empty) inline parameters."""
    lines = []
    for model, parameters in entries:
        lines.append(f"  - model: {model}")
        if parameters:
            lines.append(f"    parameters: {parameters}")
    return "\n".join(lines)


def case_config(family: Family, case: str) -> tuple[str, list[Path]]:
    """The YAML of one reference case, and the models it merges."""
    f = family
    cases = {
        # nuslerp: the weights themselves, siblings and strangers; task vectors with a base,
        # taken as one vector, row by row and column by column.
        "nuslerp": (
            "nuslerp",
            None,
            [(f.math, "{weight: 0.3}"), (f.chat, "{weight: 0.7}")],
            "",
        ),
        "nuslerp-stranger": (
            "nuslerp",
            None,
            [(f.math, "{weight: 1.0}"), (f.stranger, "{weight: [0.2, 1.0]}")],
            "",
        ),
        "nuslerp-base": (
            "nuslerp",
            f.base,
            [(f.math, "{weight: 0.6}"), (f.chat, "{weight: 0.4}")],
            "",
        ),
        "nuslerp-base-rows": (
            "nuslerp",
            f.base,
            [(f.math, "{weight: 0.25}"), (f.chat, "{weight: 0.75}")],
            "parameters: {nuslerp_flatten: false}\n",
        ),
        "nuslerp-base-columns": (
            "nuslerp",
            f.base,
            [(f.math, "{weight: [{filter: mlp, value: 0.9}, {value: 0.5}]}"), (f.chat, "")],
            "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true, weight: 0.5}\n",
        ),
        # multislerp: three models with and without a base, weights not normalized, eps.
        "multislerp": (
            "multislerp",
            None,
            [(f.math, "{weight: 0.5}"), (f.chat, "{weight: 0.3}"), (f.code, "{weight: 0.2}")],
            "",
        ),
        "multislerp-base": (
            "multislerp",
            f.base,
            [(f.math, "{weight: 1.0}"), (f.chat, "{weight: [0.5, 2.0]}"), (f.code, "")],
            "parameters: {weight: 1.5, normalize_weights: false}\n",
        ),
        "multislerp-eps": (
            "multislerp",
            None,
            [(f.math, "{weight: 2}"), (f.stranger, "{weight: 1}")],
            "parameters: {eps: 0.001}\n",
        ),
        # karcher: equal weights over every model, the base too when one is named.
        "karcher": ("karcher", None, [(f.math, ""), (f.chat, ""), (f.code, "")], ""),
        "karcher-base": (
            "karcher",
            f.base,
            [(f.math, ""), (f.stranger, "")],
            "parameters: {max_iter: 3, tol: 1.0e-4}\n",
        ),
        # model_stock: the base and two or three siblings, one t per tensor or per row.
        "model_stock": ("model_stock", f.base, [(f.math, ""), (f.chat, ""), (f.code, "")], ""),
        "model_stock-filter_wise": (
            "model_stock",
            f.base,
            [(f.base, ""), (f.math, ""), (f.chat, "")],
            "parameters: {filter_wise: true}\n",
        ),
    }
    method, base, entries, extra = cases[case]
    text = f"merge_method: {method}\n"
    text += f"base_model: {base}\n" if base else ""
    text += "models:\n" + models_yaml(entries) + "\n" + extra
    models = [model for model, _ in entries] + ([base] if base else [])
    return text, list(dict.fromkeys(models))


CASES = [
    "nuslerp",
    "nuslerp-stranger",
    "nuslerp-base",
    "nuslerp-base-rows",
    "nuslerp-base-columns",
    "multislerp",
    "multislerp-base",
    "multislerp-eps",
    "karcher",
    "karcher-base",
    "model_stock",
    "model_stock-filter_wise",
]


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_merges_are_mergekits(bf16, tmp_path, case):
    config, models = case_config(bf16, case)
    assert_identical(*run_both(config, tmp_path), models)


@pytest.mark.parametrize(
    "case", ["nuslerp-base-rows", "multislerp-base", "karcher", "model_stock-filter_wise"]
)
def test_float32_merges_are_mergekits(fp32, tmp_path, case):
    config, models = case_config(fp32, case)
    assert_identical(*run_both(config, tmp_path), models)


@pytest.mark.parametrize("case", ["nuslerp-base", "karcher-base", "model_stock"])
def test_merges_in_another_dtype_are_mergekits(bf16, tmp_path, case):
    # dtype: inputs are cast when read (float64 math for karcher); out_dtype: when written.
    config, models = case_config(bf16, case)
    config += "dtype: float64\nout_dtype: float32\n" if case == "karcher-base" else ""
    config += "dtype: float32\n" if case == "nuslerp-base" else ""
    config += "out_dtype: float16\n" if case == "model_stock" else ""
    assert_identical(*run_both(config, tmp_path), models)


def test_nuslerp_in_slices_with_a_slice_base(bf16, tmp_path):
    config = f"""
merge_method: nuslerp
slices:
  - sources:
      - {{model: {bf16.math}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
      - {{model: {bf16.chat}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}
      - {{model: {bf16.base}, layer_range: [0, 2]}}
    base_model: {bf16.base}
  - sources:
      - {{model: {bf16.math}, layer_range: [2, 3], parameters: {{weight: 0.3}}}}
      - {{model: {bf16.chat}, layer_range: [2, 3], parameters: {{weight: 0.7}}}}
"""
    assert_identical(*run_both(config, tmp_path), [bf16.base, bf16.math, bf16.chat])


# ---------------------------------------------------------------------------------------
# The engine's entry point, the plan and the model card


def test_merge_tensor_without_and_with_an_optional_base():
    base, (a, b) = siblings((5, 8), 2, torch.float32)
    weights = [{"weight": 0.4}, {"weight": 0.6}]
    params = {"nuslerp_flatten": 1.0, "nuslerp_row_wise": 0.0}
    # No base: every input has its weight, the one at base_index too.
    alone = merge_tensor("nuslerp", [a, b], 0, params, input_params=weights)
    assert same_bits(alone, sphere.nuslerp([a, b], [0.4, 0.6]))
    # A base: its row is empty, and the others' task vectors are interpolated.
    rows = [weights[0], {}, weights[1]]
    based = merge_tensor("nuslerp", [a, base, b], 1, params, input_params=rows)
    assert same_bits(based, sphere.nuslerp([a, b], [0.4, 0.6], base=base))


def test_multislerp_of_opposite_tensors_names_the_tensor():
    _, (a,) = siblings((10,), 1, torch.float32)
    params = {"normalize_weights": 1.0, "eps": 1e-8}
    rows = [{"weight": 1.0}] * 4
    with pytest.raises(ModelError, match=r"^model\.norm\.weight: multislerp: the weighted mean"):
        merge_tensor(
            "multislerp", [a, -a, a, -a], 0, params, input_params=rows, name="model.norm.weight"
        )


def test_plan_shows_the_parameters_and_the_card_names_the_method(bf16):
    config_text, models = case_config(bf16, "multislerp-base")
    config = load_config(config_text)
    headers = {m: read_header(m) for m in config.models()}
    merge_plan = plan(config, headers)
    shown = show_plan(config, merge_plan)
    for expected in ("normalize_weights = 0.0000", "eps = 1e-08", "weight@math = 1.0000"):
        assert expected in shown
    assert "weight@base" not in shown  # the base takes no weight
    lm_head = next(t for t in merge_plan.tensors if t.name == "lm_head.weight")
    assert lm_head.params == {"normalize_weights": 0.0, "eps": 1e-8}
    card = model_card(config, config_text, "merged")
    assert "[Multi-SLERP](https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)" in card
    karcher = load_config(case_config(bf16, "karcher")[0])
    shown = show_plan(karcher, plan(karcher, {m: read_header(m) for m in karcher.models()}))
    assert "max_iter = 10.0000 (other)  tol = 1e-05 (other)" in shown
    assert "Merge method: [Karcher Mean](https://arxiv.org/abs/2603.04972) (`karcher`)" in (
        model_card(karcher, "", "merged")
    )


# ---------------------------------------------------------------------------------------
# One-line errors


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(text)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_model_stock_needs_a_base_and_two_more_models():
    no_base = "merge_method: model_stock\nmodels:\n  - model: a\n  - model: b\n  - model: c\n"
    assert "base_model: missing; model_stock needs one of ['a', 'b', 'c']" in config_error(no_base)
    too_few = "merge_method: model_stock\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
    assert "models: model_stock needs at least 3 models; got 2" in config_error(too_few)


def test_nuslerp_takes_exactly_two_models_besides_the_base():
    three = (
        "merge_method: nuslerp\nbase_model: base\nparameters: {weight: 1}\n"
        "models:\n  - model: a\n  - model: b\n  - model: c\n"
    )
    assert "models: nuslerp needs exactly 2 models besides the base model; got 3" in (
        config_error(three)
    )
    one = "merge_method: nuslerp\nparameters: {weight: 1}\nmodels:\n  - model: a\n"
    assert "nuslerp needs exactly 2 models besides the base model; got 1" in config_error(one)


def test_multislerp_needs_weights_and_an_optional_base_among_the_models():
    no_weight = "merge_method: multislerp\nmodels:\n  - model: a\n  - model: b\n"
    assert "models[0].parameters.weight: missing for a" in config_error(no_weight)
    elsewhere = """
merge_method: multislerp
base_model: c
parameters: {weight: 1}
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2]}
"""
    assert "base_model: 'c' is not among the models of slices[0] (a, b)" in config_error(elsewhere)
    only_base = "merge_method: multislerp\nbase_model: a\nmodels:\n  - model: a\n"
    assert "multislerp needs at least 1 model besides the base model; got 0" in (
        config_error(only_base)
    )


def test_flags_are_booleans_and_unknown_parameters_are_typos():
    nuslerp = "merge_method: nuslerp\nmodels:\n  - model: a\n  - model: b\nparameters:\n"
    bad_flag = nuslerp + "  weight: 1\n  nuslerp_row_wise: 0.5\n"
    assert "parameters.nuslerp_row_wise: expected true or false, got 0.5" in config_error(bad_flag)
    typo = nuslerp + "  weight: 1\n  nuslerp_flaten: false\n"
    message = config_error(typo)
    assert "models[1].parameters.wieght: unknown parameter; did you mean 'weight'?" in config_error(
        "merge_method: nuslerp\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {wieght: 1}\n"
    )
    assert (
        "parameters.nuslerp_flaten: unknown parameter; did you mean 'nuslerp_flatten'?" in message
    )
    # A parameter of another method is left alone, as mergekit leaves it.
    load_config(nuslerp + "  weight: 1\n  t: 0.5\n")


def test_karcher_max_iter_is_a_whole_number(bf16):
    text = case_config(bf16, "karcher")[0] + "parameters: {max_iter: 2.5}\n"
    config = load_config(text)
    headers = {m: read_header(m) for m in config.models()}
    with pytest.raises(ConfigError, match=r"parameters\.max_iter: expected a whole number"):
        plan(config, headers)
