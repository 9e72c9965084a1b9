"""SCE, RAM, RAM+, NearSwap and Arcee Fusion against mergekit 0.1.5, and by hand.

Each method merges tiny local models once with mergekit's Python API and once with
`pearl_edu.merge`, from the same YAML, in bfloat16 and in float32, and every output tensor
must have mergekit's dtype and bits. The tiny models' tensors are all under a million
entries, where Arcee Fusion is deterministic; above, it draws a sample of entries at random
(pearl_edu from a generator of its own), and the tests check what does not depend on the
draw. The core functions are also checked on small tensors whose answer is known by hand,
and the configs mergekit's contracts refuse are refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pearl_edu
from pearl_edu.backends.reference import input_generators
from pearl_edu.core import arcee_fusion, consensus, nearswap, ram, ramplus_tl, sce, selective
from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError
from pearl_edu.methods import METHODS, merge_tensor
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

LATEST = ("sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Model references are local folders; make sure nothing tries the Hub instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def keep_some_changes(model: Path, base: Path, fraction: float, seed: int) -> Path:
    """Make ``model`` differ from ``base`` on about ``fraction`` of each tensor's entries.

    What RL fine-tuning leaves, the RAM paper observes: sparse changes, some shared between
    models and some unique to one, which is where RAM differs from an average.
    """
    weights, original = load_state_dict(model), load_state_dict(base)
    g = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        changed = torch.rand(tensor.shape, generator=g) < fraction
        weights[name] = torch.where(changed, tensor, original[name]).contiguous()
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module", params=sorted(DTYPES))
def family(request, tmp_path_factory) -> list[Path]:
    """A base and three siblings, each changing about 40% of the base's entries."""
    root, dtype = tmp_path_factory.mktemp(request.param), DTYPES[request.param]
    base = make_tiny_model(root / "base", num_layers=2, seed=1, dtype=dtype)
    siblings = [
        make_tiny_model(root / f"m{i}", base=base, noise=0.5, seed=2 + i, dtype=dtype)
        for i in range(3)
    ]
    return [base] + [keep_some_changes(m, base, 0.4, 10 + i) for i, m in enumerate(siblings)]


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


def assert_identical(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"


def config(method: str, models: list[Path], extra: str = "") -> str:
    lines = [f"merge_method: {method}", f"base_model: {models[0]}", "models:"]
    lines += [f"  - model: {path}" for path in models]
    return "\n".join(lines) + "\n" + extra


# --- against mergekit, every tensor, bit for bit -----------------------------------------

CASES = {
    "sce default": ("sce", 4, ""),
    "sce select_topk": ("sce", 4, "parameters: {select_topk: 0.3, int8_mask: true}\n"),
    "sce gradient": ("sce", 3, "parameters: {select_topk: [0.1, 0.9]}\n"),
    "ram": ("ram", 4, ""),
    "ram epsilon": ("ram", 3, "parameters: {epsilon: 0.01}\n"),
    "ramplus_tl": ("ramplus_tl", 4, ""),
    "ramplus_tl parameters": ("ramplus_tl", 4, "parameters: {r: 0.5, alpha: 2.0}\n"),
    "ramplus_tl dtype": ("ramplus_tl", 3, "dtype: bfloat16\n"),
    "ramplus_tl out_dtype": ("ramplus_tl", 3, "out_dtype: bfloat16\n"),
    "nearswap": ("nearswap", 2, "parameters: {t: 0.004}\n"),
    "nearswap gradient": ("nearswap", 2, "parameters: {t: [0.0005, 0.02]}\n"),
    "arcee_fusion": ("arcee_fusion", 2, ""),
    "arcee_fusion dtype": ("arcee_fusion", 2, "dtype: bfloat16\nrandom_seed: 4\n"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_merge_is_mergekits_bit_for_bit(family, tmp_path, case):
    method, count, extra = CASES[case]
    ours, theirs = run_both(config(method, family[:count], extra), tmp_path)
    assert_identical(ours, theirs)
    # Not the base unchanged: the method took something from the other models.
    base = load_state_dict(family[0])
    assert any(not same_bits(ours[name], base[name].to(ours[name].dtype)) for name in ours)


def test_ramplus_tl_and_arcee_fusion_write_float32_from_bfloat16_as_mergekit(tmp_path):
    base = make_tiny_model(tmp_path / "base", num_layers=1, seed=1)
    other = make_tiny_model(tmp_path / "other", base=base, noise=0.5, seed=2)
    for method in ("ramplus_tl", "arcee_fusion"):
        ours, theirs = run_both(config(method, [base, other]), tmp_path / method)
        assert {t.dtype for t in ours.values()} == {torch.float32}
        assert_identical(ours, theirs)


def test_the_base_alone_gives_the_base(tmp_path):
    base = make_tiny_model(tmp_path / "base", num_layers=1, seed=1)
    for method in ("sce", "ram", "ramplus_tl"):
        ours, theirs = run_both(config(method, [base]), tmp_path / method)
        assert_identical(ours, theirs)
        assert_identical(ours, load_state_dict(base))


# --- Arcee Fusion above a million entries: what does not depend on the draw --------------


def big_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1100, 1000, generator=g) * 0.02
    return base, base + 0.01 * torch.randn(1100, 1000, generator=g)


def test_arcee_fusion_above_a_million_entries_takes_the_outliers_of_importance():
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method
    from mergekit.merge_methods.base import TensorGroup

    base, other = big_pair()
    assert base.numel() > selective.QUANTILE_SAMPLE_SIZE
    importance = selective.fusion_importance(other, base)
    ordered = importance.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75))
    exact = float(((importance >= median + 1.5 * (q3 - q1)).sum()) / importance.numel())
    (theirs,) = arcee_fusion_merge_method((TensorGroup.from_tensors([base, other], base_index=0),))
    for merged in (arcee_fusion(base, other, generator=input_generators(7, 1)[0]), theirs):
        taken = merged == other
        # Every entry is the base's or the other's, and those taken are the most important.
        assert bool((taken | (merged == base)).all())
        assert importance[taken].min() >= importance[~taken].max()
        # A million entries estimate the quartiles well: close to the exact fraction taken.
        assert abs(float(taken.float().mean()) - exact) < 0.005


def test_arcee_fusion_draws_from_the_tensors_seed():
    base, other = big_pair(1)
    first = merge_tensor("arcee_fusion", [base, other], 0, {}, seed=11, name="w")
    again = arcee_fusion(base, other, generator=input_generators(11, 1)[0])
    assert same_bits(first, again)
    # Another seed draws another sample: a threshold a little apart, other entries taken.
    other_seed = merge_tensor("arcee_fusion", [base, other], 0, {}, seed=12, name="w")
    assert not same_bits(first, other_seed)
    assert METHODS["arcee_fusion"].random and not METHODS["nearswap"].random


# --- the core on tensors whose answer is known by hand -----------------------------------


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 0.0, 2.0, 0.0, 1e-6])  # the last change is below epsilon
    b = torch.tensor([3.0, 0.0, 0.0, -5.0, 0.0])
    # Shared by two: their mean; changed by one: that change; by none: the base.
    assert same_bits(ram(base, [a, b]), torch.tensor([2.0, 0.0, 2.0, -5.0, 0.0]))
    # A larger epsilon: the changes of 2 or less no longer count.
    assert same_bits(ram(base, [a, b], epsilon=2.0), torch.tensor([3.0, 0.0, 0.0, -5.0, 0.0]))
    assert ram(base, []) is base


def test_ramplus_tl_scales_each_models_unique_changes_by_what_it_shares():
    base = torch.zeros(4, dtype=torch.bfloat16)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.bfloat16)  # 1 shared, 1 unique
    b = torch.tensor([3.0, 0.0, 4.0, 4.0], dtype=torch.bfloat16)  # 1 shared, 2 unique
    merged = ramplus_tl(base, [a, b], r=0.5, alpha=10.0)
    assert merged.dtype == torch.float32  # the factors are float32, as mergekit's
    # lambda_a = 1 + 0.5 * 1/1 = 1.5; lambda_b = 1 + 0.5 * 1/2 = 1.25.
    assert same_bits(merged, torch.tensor([2.0, 3.0, 5.0, 5.0]))
    # alpha caps the ratio: lambda = 1 + 0.5 * 0.2 = 1.1 for both.
    capped = ramplus_tl(base, [a, b], r=0.5, alpha=0.2)
    expected = torch.tensor([2.0, 2.0 * 1.1, 4.0 * 1.1, 4.0 * 1.1])
    assert torch.allclose(capped, expected, rtol=1e-6, atol=0)


def test_sce_weighs_by_mean_square_and_erases_the_disagreeing_signs():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])  # mean square 1.5: weight 0.25
    b = torch.tensor([1.0, 1.0, -4.0, 0.0])  # mean square 4.5: weight 0.75
    assert same_bits(consensus.sce_weights(torch.stack([a, b])), torch.tensor([0.25, 0.75]))
    # Elected signs +, +, -, +: a is erased on entries 1 and 2, b nowhere; entry 3 is 0.
    assert same_bits(sce(base, [a, b]), torch.tensor([1.0, 1.0, -4.0, 0.0]))
    # select_topk 0.5: of the two entries that vary (1 and 2), the one that varies most.
    assert same_bits(sce(base, [a, b], select_topk=0.5), torch.tensor([0.0, 0.0, -4.0, 0.0]))
    # 0 or less selects nothing (the base); 1 or more everything.
    assert same_bits(sce(base, [a, b], select_topk=0.0), base)
    assert same_bits(sce(base, [a, b], select_topk=1.5), sce(base, [a, b]))
    # No model changed anything: equal weights, and the base.
    assert same_bits(consensus.sce_weights(torch.zeros(2, 4)), torch.tensor([0.5, 0.5]))


def test_nearswap_swaps_close_entries_and_clamps_its_weight():
    base = torch.zeros(4)
    other = torch.tensor([0.1, 0.5, 2.0, 0.0])
    # Weights t / distance: 5 -> 1, 1, 0.25, and 1 for equal entries (distance floored).
    assert same_bits(nearswap(base, other, 0.5), torch.tensor([0.1, 0.5, 0.5, 0.0]))
    assert same_bits(nearswap(base, other, -1.0), base)  # a negative t keeps the base
    assert same_bits(nearswap(base, other, 10.0), other)


def test_arcee_fusion_takes_the_changes_above_tukeys_fence():
    base = torch.zeros(2, 8)
    other = base.clone()
    other[0, 3] = 1.0  # the only change, so the only entry of nonzero importance
    merged = arcee_fusion(base, other)
    assert merged.dtype == torch.float32 and same_bits(merged, other)
    # Quartiles as sorted entries at floor(q (N - 1)), with no interpolation.
    values = torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0])
    quartiles = selective.approximate_quantiles(values, torch.tensor([0.25, 0.5, 0.75]))
    assert same_bits(quartiles, torch.tensor([2.0, 3.0, 4.0]))


def test_the_functions_run_the_core_on_every_backend():
    base, other = big_pair(2)
    small = [base[:40, :30], other[:40, :30]]
    for backend in ("reference", "cpu", "device"):
        assert same_bits(
            pearl_edu.functions.nearswap(*small, 0.01, backend=backend), nearswap(*small, 0.01)
        )
        assert same_bits(
            pearl_edu.functions.sce(small[0], small[1:], backend=backend), sce(small[0], small[1:])
        )


# --- the contracts: one-line refusals, nothing written -----------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pair")
    base = make_tiny_model(root / "base", num_layers=1, seed=1)
    return [base] + [
        make_tiny_model(root / f"m{i}", base=base, noise=0.5, seed=2 + i) for i in range(2)
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "merge_method: nearswap\nbase_model: {0}\nmodels:\n  - model: {1}\n  - model: {2}\n"
            "parameters: {{t: 0.1}}\n",
            r"models: nearswap needs exactly 2 models; got 3",
        ),
        (
            "merge_method: arcee_fusion\nbase_model: {0}\nmodels:\n  - model: {1}\n"
            "  - model: {2}\n",
            r"models: arcee_fusion needs exactly 2 models; got 3",
        ),
        (
            "merge_method: nearswap\nbase_model: {0}\nmodels:\n  - model: {1}\n",
            r"parameters\.t: missing; nearswap needs it",
        ),
        (
            "merge_method: sce\nmodels:\n  - model: {1}\n  - model: {2}\n",
            r"base_model: missing; sce needs one of",
        ),
        (
            "merge_method: arcee_fusion\nmodels:\n  - model: {1}\n  - model: {2}\n",
            r"base_model: missing; arcee_fusion needs one of",
        ),
        (
            "merge_method: ram\nbase_model: {0}\nmodels:\n  - model: {1}\n"
            "parameters: {{epsilon: fine}}\n",
            r"parameters\.epsilon",
        ),
    ],
)
def test_configs_outside_mergekits_contracts_are_refused_in_one_line(pair, tmp_path, text, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as err:
        merge(text.format(*pair), out, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_the_five_are_registered_with_mergekits_parameters_and_defaults():
    assert set(LATEST) <= set(METHODS)
    expected = {
        "sce": {"int8_mask": 0.0, "select_topk": 1.0},
        "ram": {"epsilon": 1e-5},
        "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        "nearswap": {"t": None},
        "arcee_fusion": {},
    }
    for name, parameters in expected.items():
        method = METHODS[name]
        assert dict(method.parameters) == parameters, name
        assert method.needs_base and not method.input_parameters, name
    assert (METHODS["nearswap"].min_models, METHODS["nearswap"].max_models) == (2, 2)
    assert (METHODS["arcee_fusion"].min_models, METHODS["arcee_fusion"].max_models) == (2, 2)
    assert METHODS["sce"].min_models == 1 and METHODS["sce"].max_models is None


def test_a_tensor_missing_from_the_other_model_is_refused_in_one_line(pair, tmp_path):
    # mergekit would copy the base's tensor for nearswap where the tensor is optional;
    # pearl_edu's plan needs every tensor in every model and says which one is missing.
    lacking = make_tiny_model(tmp_path / "lacking", base=pair[0], noise=0.5, seed=9)
    weights = load_state_dict(lacking)
    del weights["model.norm.weight"]
    save_file(weights, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    text = config("nearswap", [pair[0], lacking], "parameters: {t: 0.01}\n")
    with pytest.raises(pearl_edu.ModelError, match=r"has no tensor 'model\.norm\.weight'") as err:
        merge(text, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", LATEST)
def test_the_model_card_names_the_method_as_mergekit_does(method):
    from mergekit.merge_methods import registry

    from pearl_edu.card import method_words

    spec = registry.get(method).spec
    assert method_words(method) == f"[{spec.pretty_name}]({spec.reference_url}) (`{method}`)"
