"""Model Breadcrumbs and DELLA (`breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`).

Breadcrumbs is deterministic: every case merges tiny models with mergekit 0.1.5's Python API
and with `pearl_edu.merge` from the same YAML and compares every output tensor, bit for bit.
DELLA draws at random. Drawing from the same generator as mergekit, the reference core gives
mergekit's bits (its pruning and whole merge step are compared with mergekit's own functions
under the same global seed); the engine draws from a generator per tensor and model, as
DARE does, so its merges are compared with mergekit's by the properties that do not depend
on the draw: the fraction kept, the L1 rescaling, that larger entries are kept more often,
and that every entry is one the method could make.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.backends.reference import input_generators
from pearl_edu.card import model_card
from pearl_edu.cli import main
from pearl_edu.config import load_config
from pearl_edu.core import pruning
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError
from pearl_edu.methods import METHODS, merge_tensor, tensor_seed
from pearl_edu.teaching.toy import load_state_dict
from pearl_edu.ulp import same_bits

sys.path.insert(0, str(Path(__file__).parent))
from test_reference_methods import assert_identical, make_family, run_both  # noqa: E402


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fp32"), torch.float32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --- the registry: mergekit's names, parameters and defaults -----------------------------


@pytest.mark.parametrize(
    ("method", "normalize", "rescale", "extra", "default", "random"),
    [
        ("breadcrumbs", 0.0, 0.0, "gamma", 0.01, False),
        ("breadcrumbs_ties", 0.0, 0.0, "gamma", 0.01, False),
        ("della", 1.0, 1.0, "epsilon", 0.15, True),
        ("della_linear", 0.0, 1.0, "epsilon", 0.15, True),
    ],
)
def test_registry_has_mergekits_parameters_and_defaults(
    method, normalize, rescale, extra, default, random
):
    from mergekit.merge_methods import registry

    spec = METHODS[method]
    assert spec.parameters == {
        "normalize": normalize,
        "lambda": 1.0,
        "rescale": rescale,
        "int8_mask": 0.0,
    }
    assert spec.input_parameters == {"weight": None, "density": 1.0, extra: default}
    assert spec.needs_base and not spec.base_has_input_parameters and spec.random == random
    # The same names and defaults as mergekit's own description of the method.
    theirs = {p.name: p.default for p in registry.get(method).spec.parameters}
    ours = {**spec.parameters, **spec.input_parameters}
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        if name != "weight":
            assert float(value) == ours[name], name


# --- the core against mergekit's own functions --------------------------------------------

SHAPES = [(96,), (33, 17), (120, 250), (4, 5, 6)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _delta(shape, dtype, seed=0):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    delta.reshape(-1)[:: max(1, delta.numel() // 7)] = 0.5  # equal magnitudes: ties to break
    return delta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("density", "gamma"),
    [(0.5, 0.01), (0.3, 0.2), (0.7, 0.5), (0.0, 0.1), (1.0, 0.3), (0.001, 0.0), (0.5, 1.0)],
)
def test_breadcrumbs_trim_is_mergekits(dtype, shape, density, gamma):
    from mergekit.sparsify import RescaleNorm, magnitude_outliers

    delta = _delta(shape, dtype)
    for rescale in (False, True):
        norm = RescaleNorm.l1 if rescale else None
        theirs = magnitude_outliers(delta, density, norm, gamma=gamma)
        ours = pruning.magnitude_outliers(delta, density, gamma, rescale=rescale)
        if dtype == torch.float16 and rescale and delta.float().abs().sum() > 65504:
            # The L1 norm overflows float16: mergekit gives NaNs there, and so do we.
            assert bool(ours.isnan().all()) and bool(theirs.isnan().all())
            continue
        assert same_bits(ours, theirs)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("density", "epsilon"),
    [(0.5, 0.15), (0.3, 0.1), (0.9, 0.05), (0.2, 0.0), (0.5, -0.1), (0.0, 0.5), (1.0, 0.9)],
)
def test_della_drop_is_mergekits_from_the_same_generator(dtype, shape, density, epsilon):
    from mergekit.sparsify import RescaleNorm, della_magprune

    delta = _delta(shape, dtype)
    for rescale in (False, True):
        torch.manual_seed(7)
        theirs = della_magprune(delta, density, epsilon, RescaleNorm.l1 if rescale else None)
        torch.manual_seed(7)
        ours = pruning.della_prune(delta, density, epsilon, rescale=rescale)
        assert same_bits(ours, theirs)
        generator = torch.Generator().manual_seed(7)
        assert same_bits(
            pruning.della_prune(delta, density, epsilon, generator, rescale=rescale), ours
        )


def _group(base, others):
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    entries = [TensorEntry("base", base, is_base=True)]
    entries += [TensorEntry(f"m{i}", other) for i, other in enumerate(others)]
    return TensorGroup(entries=tuple(entries))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
@pytest.mark.parametrize(
    "shared",
    [
        {"normalize": True, "rescale": True, "lambda": 0.9},
        {"normalize": False, "rescale": False, "lambda": 1.0},
    ],
)
def test_whole_merge_step_is_mergekits(dtype, method, shared):
    from mergekit.merge_methods import registry

    g = torch.Generator().manual_seed(1)
    base = torch.randn(48, 80, generator=g).to(dtype)
    others = [(base.float() + torch.randn(48, 80, generator=g)).to(dtype) for _ in range(3)]
    weights, densities = [0.5, 0.3, 1.0], [0.4, 0.7, 0.5]
    extra = [0.1, 0.2, 0.15] if "della" in method else [0.05, 0.0, 0.3]
    key = "epsilon" if "della" in method else "gamma"
    per_model = {"weight": weights, "density": densities, key: extra}
    params = {"int8_mask": False, **shared}
    params |= {name: {f"m{i}": v for i, v in enumerate(vs)} for name, vs in per_model.items()}
    torch.manual_seed(5)
    theirs = registry.get(method).merge_group(_group(base, others), **params)
    torch.manual_seed(5)
    options = {
        "sign_election": method in ("della", "breadcrumbs_ties"),
        "normalize": shared["normalize"],
        "scale": shared["lambda"],
        "rescale": shared["rescale"],
    }
    if "della" in method:
        ours = pruning.della(base, others, weights, densities, extra, **options)
    else:
        ours = pruning.breadcrumbs(base, others, weights, densities, extra, **options)
    assert same_bits(ours, theirs)


# --- the engine: Breadcrumbs identical to mergekit's merges ------------------------------


def test_breadcrumbs_bf16_with_a_density_gradient_and_default_gamma(bf16, tmp_path):
    config = f"""
merge_method: breadcrumbs
base_model: {bf16.base}
models:
  - model: {bf16.math}
    parameters: {{weight: 0.6, density: [0.3, 0.8], gamma: 0.05}}
  - model: {bf16.chat}
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  lambda: 1.2
"""
    assert_identical(*run_both(config, tmp_path))


def test_breadcrumbs_ties_bf16_normalized_rescaled_gamma_by_filter(bf16, tmp_path):
    config = f"""
merge_method: breadcrumbs_ties
base_model: {bf16.base}
models:
  - model: {bf16.math}
    parameters:
      weight: 0.5
      density: 0.45
      gamma: [{{filter: mlp, value: 0.1}}, {{value: 0.02}}]
  - model: {bf16.chat}
    parameters: {{weight: [0.2, 0.9], density: 0.6, gamma: 0.0}}
parameters:
  normalize: true
  rescale: true
  int8_mask: true
dtype: bfloat16
"""
    assert_identical(*run_both(config, tmp_path))


def test_breadcrumbs_fp32_density_plus_gamma_above_one_and_density_zero(fp32, tmp_path):
    # density + gamma > 1 leaves no room for both: mergekit drops fewer outliers (it keeps
    # the smallest `density` fraction) rather than refusing, and so does pearl_edu.
    config = f"""
merge_method: breadcrumbs
base_model: {fp32.base}
models:
  - model: {fp32.base}
  - model: {fp32.math}
    parameters: {{weight: 0.7, density: 0.7, gamma: 0.5}}
  - model: {fp32.chat}
    parameters:
      weight: 0.4
      density: [{{filter: self_attn, value: 0.0}}, {{value: 0.9}}]
      gamma: 0.08
parameters:
  normalize: true
"""
    assert_identical(*run_both(config, tmp_path))


def test_breadcrumbs_ties_fp32_in_slices(fp32, tmp_path):
    config = f"""
merge_method: breadcrumbs_ties
base_model: {fp32.base}
slices:
  - sources:
      - {{model: {fp32.base}, layer_range: [0, 2]}}
      - {{model: {fp32.math}, layer_range: [0, 2], parameters: {{weight: 1.0, density: 0.3}}}}
      - {{model: {fp32.chat}, layer_range: [2, 4]}}
    parameters:
      gamma: 0.2
  - sources:
      - {{model: {fp32.base}, layer_range: [2, 4]}}
      - {{model: {fp32.math}, layer_range: [2, 4], parameters: {{weight: 0.3}}}}
      - {{model: {fp32.chat}, layer_range: [0, 2]}}
    parameters:
      lambda: 0.7
parameters:
  weight: 0.6
  density: 0.5
  rescale: true
"""
    assert_identical(*run_both(config, tmp_path))


def test_breadcrumbs_mixed_dtypes_are_promoted_like_mergekit(tmp_path):
    family = make_family(tmp_path / "models", torch.bfloat16, chat_dtype=torch.float16)
    config = f"""
merge_method: breadcrumbs_ties
base_model: {family.base}
models:
  - model: {family.math}
    parameters: {{weight: 0.5, density: 0.5, gamma: 0.1}}
  - model: {family.chat}
    parameters: {{weight: 0.5, density: 0.4}}
"""
    ours, theirs = run_both(config, tmp_path / "promoted")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert_identical(ours, theirs)
    assert_identical(*run_both(config + "out_dtype: bfloat16\n", tmp_path / "out_dtype"))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("family", ["bf16", "fp32"])
def test_della_at_density_one_or_base_alone_is_exact(method, family, request, tmp_path):
    # Nothing is drawn at density 1 (so any epsilon goes, as in mergekit).
    f = request.getfixturevalue(family)
    config = f"""
merge_method: {method}
base_model: {f.base}
models:
  - model: {f.math}
    parameters: {{weight: 0.6, epsilon: 0.9}}
  - model: {f.chat}
    parameters: {{weight: 0.4, density: 1.0}}
parameters:
  normalize: true
  lambda: 0.8
"""
    assert_identical(*run_both(config, tmp_path / "one"))
    alone = f"merge_method: {method}\nbase_model: {f.base}\nmodels:\n  - model: {f.base}\n"
    ours, theirs = run_both(alone, tmp_path / "alone")
    assert_identical(ours, theirs)
    assert_identical(ours, load_state_dict(f.base))


# --- the engine: DELLA by its statistics, on both merges ---------------------------------


def _rank_position(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank in its DELLA row, from 0 (smallest) to 1 (largest)."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    return (ranks / (rows.shape[1] - 1)).reshape(delta.shape)


@pytest.mark.parametrize(("density", "epsilon"), [(0.4, 0.2), (0.6, 0.15)])
def test_della_linear_keeps_density_ranks_by_magnitude_and_rescales(
    fp32, tmp_path, density, epsilon
):
    config = f"""
merge_method: della_linear
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 1.0, density: {density}, epsilon: {epsilon}}}
random_seed: 11
"""
    base, math = load_state_dict(fp32.base), load_state_dict(fp32.math)
    for label, merged in zip(
        ("pearl_edu", "mergekit"), run_both(config, tmp_path, seed=11), strict=True
    ):
        kept_total = elements = 0
        low = [0, 0]  # kept, entries among the fifth smallest of each row
        high = [0, 0]  # the same among the fifth largest
        for name, tensor in merged.items():
            delta = (math[name] - base[name]).double()
            change = tensor.double() - base[name].double()
            kept = change != 0
            kept_total += int(kept.sum())
            elements += tensor.numel()
            scale = delta.abs().sum() / delta[kept].abs().sum()
            rounding = 4 * torch.finfo(torch.float32).eps * tensor.abs().double().max()
            assert bool(((change - delta * scale * kept).abs() <= rounding).all()), (label, name)
            position = _rank_position(delta)
            for counts, where in ((low, position < 0.2), (high, position > 0.8)):
                counts[0] += int(kept[where].sum())
                counts[1] += int(where.sum())
        assert abs(kept_total / elements - density) < 0.01, label
        # Keep probabilities rise linearly from density - epsilon to density + epsilon with
        # the rank: the fifth smallest average density - 0.8 epsilon, the largest + 0.8.
        assert abs(low[0] / low[1] - (density - 0.8 * epsilon)) < 0.02, (label, low)
        assert abs(high[0] / high[1] - (density + 0.8 * epsilon)) < 0.02, (label, high)


def test_della_entries_are_ones_della_could_make(fp32, tmp_path):
    # Without rescaling, each entry of the merge minus the base is 0, one model's delta, or
    # (only where the two agree in sign) their weighted average: normalize is della's default.
    config = f"""
merge_method: della
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {fp32.chat}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.3}}
parameters:
  rescale: false
"""
    base = load_state_dict(fp32.base)
    math, chat = load_state_dict(fp32.math), load_state_dict(fp32.chat)
    for label, merged in zip(
        ("pearl_edu", "mergekit"), run_both(config, tmp_path, seed=5), strict=True
    ):
        for name, tensor in merged.items():
            change = tensor.double() - base[name].double()
            one = (math[name] - base[name]).double()
            two = (chat[name] - base[name]).double()
            same_sign = torch.sign(one) == torch.sign(two)
            both = torch.where(same_sign, (one + 0.5 * two) / 1.5, 0)
            candidates = [torch.zeros_like(one), one, two, both]
            scale = 4 * torch.finfo(torch.float32).eps * tensor.abs().double().max()
            close = torch.stack([(change - c).abs() <= scale for c in candidates])
            assert bool(close.any(dim=0).all()), f"{label}: {name}"


def test_della_bf16_merge_is_the_cores_draw_per_tensor_and_model(bf16, tmp_path):
    # The engine's bits are the core's, drawing model i of a tensor from
    # input_generators(tensor_seed(seed, name), ...)[i]; and mergekit's merge, drawn
    # otherwise, keeps the same fraction.
    config = f"""
merge_method: della
base_model: {bf16.base}
models:
  - model: {bf16.math}
    parameters: {{weight: 0.7, density: 0.3, epsilon: 0.1}}
  - model: {bf16.chat}
    parameters: {{weight: 0.5, density: [0.3, 0.6]}}
parameters:
  lambda: 1.1
random_seed: 3
"""
    ours, theirs = run_both(config, tmp_path, seed=3)
    plan = json.loads(_plan_json(config, tmp_path))["plan"]["tensors"]
    base = load_state_dict(bf16.base)
    others = [load_state_dict(bf16.math), load_state_dict(bf16.chat)]
    for job in plan:
        name = job["name"]
        assert job["seed"] == tensor_seed(3, name)
        rows = job["input_params"][:2]
        expected = pruning.della(
            base[name],
            [other[name] for other in others],
            [row["weight"] for row in rows],
            [row["density"] for row in rows],
            [row["epsilon"] for row in rows],
            input_generators(job["seed"], 2),
            scale=1.1,
        )
        assert same_bits(ours[name], expected), name
    # Where the two models leave the base alone, both dropped: about (1 - 0.3)(1 - density).
    for merged in (ours, theirs):
        unchanged = sum(int((merged[n] == base[n]).sum()) for n in merged)
        assert 0.35 < unchanged / sum(t.numel() for t in merged.values()) < 0.55


def test_della_merges_are_reproducible_per_seed(fp32, tmp_path):
    config = f"""
merge_method: della_linear
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {fp32.chat}
    parameters: {{weight: 0.5, density: 0.5}}
"""
    runs = {}
    for label, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge(config + f"random_seed: {seed}\n", tmp_path / label, device="cpu", progress=False)
        runs[label] = load_state_dict(tmp_path / label)
    assert_identical(runs["a"], runs["b"])
    assert all(not torch.equal(runs["a"][n], runs["c"][n]) for n in runs["a"])


def test_engine_is_the_core_for_each_method():
    g = torch.Generator().manual_seed(2)
    base, a, b = (torch.randn(40, 30, generator=g).to(torch.bfloat16) for _ in range(3))
    shared = {"normalize": 1.0, "lambda": 0.8, "rescale": 1.0, "int8_mask": 0.0}
    for method in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        extra = "epsilon" if "della" in method else "gamma"
        inputs = [{"weight": 0.4, "density": 0.5, extra: 0.1}, {}, {"weight": 1.0, "density": 0.3}]
        merged = merge_tensor(method, [a, base, b], 1, shared, input_params=inputs, seed=9)
        options = {
            "sign_election": method in ("della", "breadcrumbs_ties"),
            "normalize": True,
            "scale": 0.8,
            "rescale": True,
        }
        if "della" in method:
            gens = input_generators(9, 2)
            core = pruning.della(base, [a, b], [0.4, 1.0], [0.5, 0.3], [0.1, 0.15], gens, **options)
        else:
            core = pruning.breadcrumbs(base, [a, b], [0.4, 1.0], [0.5, 0.3], [0.1, 0.01], **options)
        assert same_bits(merged, core), method


def test_della_keep_probabilities_span_density_plus_minus_epsilon():
    delta = torch.tensor([[0.1, -3.0, 0.5, 2.0, -0.01]])
    probabilities = pruning.keep_probabilities(delta, 0.5, 0.2)
    # Ranks by magnitude: -0.01 < 0.1 < 0.5 < 2.0 < -3.0.
    expected = torch.tensor([[0.4, 0.7, 0.5, 0.6, 0.3]])
    assert torch.allclose(probabilities, expected)


# --- bad input: one line, before anything is written -------------------------------------


def _plan_json(config: str, tmp_path: Path) -> str:
    path = tmp_path / "plan.yml"
    path.write_text(config)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(path), "--json"]) == 0
    return out.getvalue()


def _merge_error(config: str, out: Path) -> str:
    with pytest.raises(ConfigError) as err:
        merge(config, out, device="cpu", progress=False)
    assert not out.exists()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_epsilon_out_of_range_is_refused_as_mergekit_refuses_it(fp32, tmp_path):
    config = f"""
merge_method: della
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 0.5, density: 0.1}}
  - model: {fp32.chat}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.05}}
"""
    # density 0.1 with the default epsilon 0.15 would keep entries with probability -0.05.
    message = _merge_error(config, tmp_path / "ours")
    assert f"parameters.epsilon: for {fp32.math}: epsilon 0.15 with density 0.1" in message
    assert "della needs density - epsilon > 0 and density + epsilon < 1" in message
    assert "(tensor model.embed_tokens.weight)" in message
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    theirs = MergeConfiguration.model_validate(yaml.safe_load(config))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False)
    with pytest.raises(ValueError, match="Epsilon must be chosen"):
        run_merge(theirs, str(tmp_path / "mergekit"), options=options)
    too_wide = config.replace("epsilon: 0.05", "epsilon: 0.5")
    assert "epsilon 0.5 with density 0.5 gives keep probabilities from 0 to 1" in _merge_error(
        too_wide.replace("density: 0.1", "density: 0.3, epsilon: 0.2"), tmp_path / "wide"
    )


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_gamma_must_be_a_fraction(fp32, tmp_path, gamma):
    config = f"""
merge_method: breadcrumbs
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 0.5, density: 0.5, gamma: {gamma}}}
"""
    message = _merge_error(config, tmp_path / "out")
    assert f"parameters.gamma: {gamma:g} for {fp32.math}: expected a fraction" in message


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_missing_base_weight_or_models_are_one_line_errors(method):
    def error(text: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(text)
        assert "\n" not in str(err.value)
        return str(err.value)

    two = f"merge_method: {method}\nmodels:\n  - model: a\n  - model: b\n"
    weighted = two.replace("model: b", "model: b\n    parameters: {weight: 1}")
    assert f"base_model: missing; {method} needs one of ['a', 'b']" in error(weighted)
    no_weight = f"base_model: a\n{two}"
    assert f"models[1].parameters.weight: missing for b; {method} needs a weight" in error(
        no_weight
    )
    assert "models: expected a non-empty list" in error(
        f"merge_method: {method}\nbase_model: a\nmodels: []\n"
    )


def test_della_refuses_rows_of_one_entry():
    base, other = torch.zeros(4, 1), torch.ones(4, 1)
    inputs = [{}, {"weight": 1.0, "density": 0.5}]
    params = dict(METHODS["della"].parameters)
    with pytest.raises(ValueError, match="lm_head.weight: della ranks each row's entries"):
        merge_tensor("della", [base, other], 0, params, input_params=inputs, name="lm_head.weight")
    inputs[1]["density"] = 1.0  # nothing to draw: allowed
    assert torch.equal(merge_tensor("della", [base, other], 0, params, input_params=inputs), other)


# --- plan and model card ------------------------------------------------------------------


def test_plan_shows_gamma_and_epsilon(bf16, tmp_path, capsys):
    config = f"""
merge_method: della
base_model: {bf16.base}
models:
  - model: {bf16.math}
    parameters: {{weight: 0.6, density: 0.5, epsilon: [0.1, 0.2]}}
  - model: {bf16.chat}
    parameters: {{weight: 0.5, density: 0.4}}
random_seed: 3
"""
    data = json.loads(_plan_json(config, tmp_path))
    columns = data["schedule"]["columns"]
    assert "epsilon@math" in columns
    tensors = data["plan"]["tensors"]
    assert tensors[0]["input_params"][1]["epsilon"] == 0.15  # chat's default
    layer3 = [t for t in tensors if t["layer"] == 3][0]
    assert layer3["input_params"][0]["epsilon"] == pytest.approx(0.2)
    path = tmp_path / "crumbs.yml"
    path.write_text(config.replace("della", "breadcrumbs").replace("epsilon", "gamma"))
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert "gamma@math[other]" in header.split()


@pytest.mark.parametrize(
    ("method", "words"),
    [
        ("breadcrumbs", "[Model Breadcrumbs](https://arxiv.org/abs/2312.06795)"),
        ("breadcrumbs_ties", "[Model Breadcrumbs with TIES](https://arxiv.org/abs/2312.06795)"),
        ("della", "[DELLA](https://arxiv.org/abs/2406.11617)"),
        ("della_linear", "[Linear DELLA](https://arxiv.org/abs/2406.11617)"),
    ],
)
def test_model_card_names_the_method_its_paper_and_the_seed_of_della(method, words):
    from mergekit.merge_methods import registry

    text = f"merge_method: {method}\nbase_model: a\nmodels:\n  - model: b\n"
    text += "    parameters: {weight: 1}\nrandom_seed: 4\n"
    card = model_card(load_config(text), text, "merged")
    assert f"Merge method: {words} (`{method}`) with a as the base." in card
    assert ("Random seed: `4`" in card) == method.startswith("della")
    spec = registry.get(method).spec  # the same words and link as mergekit's
    assert words == f"[{spec.pretty_name}]({spec.reference_url})"
