"""Reference tests: `pearl_edu.merge` and mergekit 0.1.5 make the same model.

Every case writes tiny models with `make_tiny_model`, merges them once with mergekit (its
Python API, offline, no tokenizer copy) and once with pearl_edu, then compares the two
output folders tensor by tensor with `pearl_edu.verify`.

What "the same" means: every tensor has the same name, shape and dtype, and identical
values, bit for bit. pearl_edu follows mergekit 0.1.5's float32 order of sums, so nothing
looser is needed here. (On tensors of 10^8 elements, a float32 sum split over a different
number of threads could round a rare element the other way, by one unit in the last place;
the tiny tensors here are never split. The counts are printed with ``pytest -s``.)
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import ulp_distance
from pearl_edu.verification import VerifyReport, verify

NUM_LAYERS = 6
# The fraction of elements allowed to differ (by one ULP at most): none.
MAX_ONE_ULP_FRACTION = 0.0
# Keys of config.json that mergekit and pearl_edu may legitimately write differently.
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path"}

PEARL_T = """\
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""


# --------------------------------------------------------------------------------------
# The models: a base, and siblings of it (the base plus noise), as real fine-tunes are
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path


def sibling_pair(root: Path, name: str, *, noise: float = 0.5, **options) -> Pair:
    """Model ``a`` and model ``b`` = ``a`` plus relative noise, with shared options.

    ``options`` go to both calls of `make_tiny_model`; keys ending in ``_a`` or ``_b``
    go to one model only (``dtype_a=torch.float16``, ``shard_count_b=3``...).
    """
    common = {k: v for k, v in options.items() if not k.endswith(("_a", "_b"))}
    only_a = {k[:-2]: v for k, v in options.items() if k.endswith("_a")}
    only_b = {k[:-2]: v for k, v in options.items() if k.endswith("_b")}
    a = make_tiny_model(root / f"{name}-a", num_layers=NUM_LAYERS, seed=1, **common, **only_a)
    shape_free = {k: v for k, v in common.items() if k in ("dtype", "shard_count", "fmt")}
    b = make_tiny_model(root / f"{name}-b", base=a, noise=noise, seed=2, **shape_free, **only_b)
    return Pair(a, b)


# --------------------------------------------------------------------------------------
# Running the two implementations
# --------------------------------------------------------------------------------------


def run_mergekit(config_text: str, out_dir: Path) -> Path:
    """Merge with mergekit's Python API: offline, no tokenizer, default 5B shard size."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False)
    run_merge(config, str(out_dir), options=options)
    return out_dir


def run_pearl(config_text: str, out_dir: Path) -> Path:
    """Merge with pearl_edu on the CPU."""
    from pearl_edu.engine import merge

    merge(config_text, out_dir, device="cpu", progress=False)
    return out_dir


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Model references are local folders; make sure nothing tries the Hub instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------------------
# Comparing the outputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How the elements of two outputs compare, counted over the whole model."""

    elements: int
    identical: int
    one_ulp: int

    def __str__(self) -> str:
        fraction = self.one_ulp / self.elements
        return (
            f"{self.elements} elements: {self.identical} identical, "
            f"{self.one_ulp} one ULP apart ({fraction:.2e})"
        )


def assert_same_model(pearl_dir: Path, mergekit_dir: Path, label: str) -> Agreement:
    """Same tensors, shapes and dtypes; values identical or 1 ULP apart on a tiny fraction."""
    report = verify(pearl_dir, mergekit_dir)
    assert report.only_in_a == (), f"{label}: only pearl_edu wrote {report.only_in_a}"
    assert report.only_in_b == (), f"{label}: only mergekit wrote {report.only_in_b}"
    for t in report.tensors:
        assert t.same_layout, (
            f"{label}: {t.name} is {t.shape_a} {t.dtype_a} vs {t.shape_b} {t.dtype_b}"
        )
        assert t.max_ulp_diff is not None and t.max_ulp_diff <= 1, (
            f"{label}: {t.name} differs by up to {t.max_ulp_diff} ULP on "
            f"{t.num_differing} elements (max |diff| {t.max_abs_diff:.3g})"
        )

    ours, theirs = load_state_dict(pearl_dir), load_state_dict(mergekit_dir)
    counts = Counter()
    for name, x in ours.items():
        ulps = ulp_distance(x, theirs[name])
        counts["elements"] += x.numel()
        counts["identical"] += int((ulps == 0).sum())
        counts["one_ulp"] += int((ulps == 1).sum())
    agreement = Agreement(**counts)
    print(f"{label}: {agreement}")
    # verify's count and this one must agree: every element is 0 or 1 ULP apart.
    assert agreement.identical + agreement.one_ulp == agreement.elements
    assert agreement.one_ulp == report.num_differing
    assert agreement.one_ulp <= MAX_ONE_ULP_FRACTION * agreement.elements, f"{label}: {agreement}"
    return agreement


def assert_same_hf_config(pearl_dir: Path, mergekit_dir: Path) -> None:
    """The output config.json describes the same model (read through transformers).

    mergekit saves its config through transformers, which leaves out default values;
    pearl_edu copies the base's file and updates it. Loading both normalizes that away.
    """
    from transformers import AutoConfig

    ours = AutoConfig.from_pretrained(pearl_dir).to_dict()
    theirs = AutoConfig.from_pretrained(mergekit_dir).to_dict()
    differing = {
        key: (ours.get(key), theirs.get(key))
        for key in (set(ours) | set(theirs)) - VOLATILE_CONFIG_KEYS
        if ours.get(key) != theirs.get(key)
    }
    assert differing == {}, f"config.json differs (pearl_edu, mergekit): {differing}"


def assert_same_recorded_config(pearl_dir: Path, config_text: str) -> None:
    """The YAML pearl_edu records beside the weights means, to mergekit, the config it ran."""
    from mergekit.config import MergeConfiguration

    recorded = yaml.safe_load((pearl_dir / "mergekit_config.yml").read_text())
    assert MergeConfiguration.model_validate(recorded) == MergeConfiguration.model_validate(
        yaml.safe_load(config_text)
    )


def merge_both(config_text: str, root: Path, label: str) -> VerifyReport:
    """Run both implementations on ``config_text`` and compare everything they wrote."""
    mergekit_dir = run_mergekit(config_text, root / f"{label}-mergekit")
    pearl_dir = run_pearl(config_text, root / f"{label}-pearl")
    assert_same_model(pearl_dir, mergekit_dir, label)
    report = verify(pearl_dir, mergekit_dir)
    assert_same_hf_config(pearl_dir, mergekit_dir)
    assert_same_recorded_config(pearl_dir, config_text)
    assert weight_names_in_index_or_file(pearl_dir) == weight_names_in_index_or_file(mergekit_dir)
    return report


def weight_names_in_index_or_file(model_dir: Path) -> set[str]:
    return set(load_state_dict(model_dir))


def slerp_yaml(pair: Pair, *, base: Path | None = None, extra: str = "", t: str = PEARL_T) -> str:
    """Pearl's recipe over all layers of ``pair``, with ``base`` (default ``pair.a``)."""
    return (
        "slices:\n"
        "  - sources:\n"
        f"      - model: {pair.a}\n"
        f"        layer_range: [0, {NUM_LAYERS}]\n"
        f"      - model: {pair.b}\n"
        f"        layer_range: [0, {NUM_LAYERS}]\n"
        "merge_method: slerp\n"
        f"base_model: {base or pair.a}\n"
        "parameters:\n"
        f"{t}"
        f"{extra}"
    )


# --------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_pearl_recipe_scaled_to_a_tiny_model(tmp_path, arch):
    pair = sibling_pair(tmp_path, arch, arch=arch)
    merge_both(slerp_yaml(pair, extra="dtype: bfloat16\n"), tmp_path, f"pearl-{arch}")


def test_base_model_second(tmp_path):
    pair = sibling_pair(tmp_path, "pair")
    merge_both(slerp_yaml(pair, base=pair.b, extra="dtype: bfloat16\n"), tmp_path, "base-second")


def test_float16_base_merged_in_bfloat16(tmp_path):
    # Like OmniBeagle (float16) merged with WizardMath (bfloat16) under `dtype: bfloat16`.
    pair = sibling_pair(tmp_path, "pair", dtype_a=torch.float16, dtype_b=torch.bfloat16)
    report = merge_both(slerp_yaml(pair, extra="dtype: bfloat16\n"), tmp_path, "fp16-in-bf16")
    assert {t.dtype_a for t in report.tensors} == {torch.bfloat16}


def test_without_dtype_the_output_takes_the_base_dtype(tmp_path):
    # In float32 no rounding to bfloat16 hides the last bits of the SLERP weights.
    pair = sibling_pair(tmp_path, "pair", dtype=torch.float32)
    report = merge_both(slerp_yaml(pair), tmp_path, "float32-no-dtype")
    assert {t.dtype_a for t in report.tensors} == {torch.float32}


def test_out_dtype(tmp_path):
    pair = sibling_pair(tmp_path, "pair", dtype=torch.float32)
    config = slerp_yaml(pair, extra="dtype: float32\nout_dtype: bfloat16\n")
    report = merge_both(config, tmp_path, "out-dtype")
    assert {t.dtype_a for t in report.tensors} == {torch.bfloat16}


def test_nearly_collinear_models_fall_back_to_lerp(tmp_path):
    pair = sibling_pair(tmp_path, "pair", noise=0.005)
    a, b = load_state_dict(pair.a), load_state_dict(pair.b)
    cosines = [
        float(
            torch.nn.functional.cosine_similarity(
                a[n].double().flatten(), b[n].double().flatten(), 0
            )
        )
        for n in a
    ]
    assert min(cosines) > 0.9995, "every tensor must take the linear branch"
    merge_both(slerp_yaml(pair, extra="dtype: bfloat16\n"), tmp_path, "collinear")


def test_sharded_and_pickled_inputs(tmp_path):
    # WizardMath ships only pickle shards: model b is three .bin shards.
    pair = sibling_pair(tmp_path, "pair", shard_count_a=2, shard_count_b=3, fmt_b="bin")
    assert (pair.b / "pytorch_model.bin.index.json").is_file()
    merge_both(slerp_yaml(pair, extra="dtype: bfloat16\n"), tmp_path, "sharded")


def test_tied_embeddings(tmp_path):
    pair = sibling_pair(tmp_path, "pair", tie_embeddings=True)
    report = merge_both(slerp_yaml(pair, extra="dtype: bfloat16\n"), tmp_path, "tied")
    assert "lm_head.weight" not in {t.name for t in report.tensors}


def test_models_form_with_a_scalar_t(tmp_path):
    pair = sibling_pair(tmp_path, "pair")
    config = (
        "models:\n"
        f"  - model: {pair.a}\n"
        f"  - model: {pair.b}\n"
        "merge_method: slerp\n"
        f"base_model: {pair.a}\n"
        "parameters:\n"
        "  t: 0.3\n"
        "dtype: bfloat16\n"
    )
    merge_both(config, tmp_path, "models-form")


def test_two_slices_with_their_own_parameters(tmp_path):
    # Layers 0-3 then 2-5: eight output layers, the gradient restarting in each slice, and
    # the second slice overriding the top-level t for its attention.
    pair = sibling_pair(tmp_path, "pair")
    config = (
        "slices:\n"
        "  - sources:\n"
        f"      - model: {pair.a}\n"
        "        layer_range: [0, 4]\n"
        f"      - model: {pair.b}\n"
        "        layer_range: [0, 4]\n"
        "  - sources:\n"
        f"      - model: {pair.a}\n"
        "        layer_range: [2, 6]\n"
        f"      - model: {pair.b}\n"
        "        layer_range: [2, 6]\n"
        "    parameters:\n"
        "      t:\n"
        "        - filter: self_attn\n"
        "          value: [0.9, 0.1]\n"
        "        - value: 0.25\n"
        "merge_method: slerp\n"
        f"base_model: {pair.a}\n"
        f"parameters:\n{PEARL_T}"
        "dtype: bfloat16\n"
    )
    report = merge_both(config, tmp_path, "two-slices")
    layers = {int(t.name.split(".")[2]) for t in report.tensors if ".layers." in t.name}
    assert layers == set(range(8))
    assert (
        json.loads((tmp_path / "two-slices-pearl" / "config.json").read_text())["num_hidden_layers"]
        == 8
    )


def test_gradients_on_the_tensors_outside_the_layers(tmp_path):
    # Which x do embed_tokens, the final norm and lm_head get? A gradient makes it visible.
    pair = sibling_pair(tmp_path, "pair")
    t = (
        "  t:\n"
        "    - filter: embed_tokens\n"
        "      value: [0.1, 0.9]\n"
        "    - filter: model.norm\n"
        "      value: [0.2, 0.8]\n"
        "    - filter: lm_head\n"
        "      value: [0.3, 0.7]\n"
        "    - value: 0.5\n"
    )
    merge_both(slerp_yaml(pair, t=t, extra="dtype: bfloat16\n"), tmp_path, "outside-layers")


def test_the_two_implementations_are_not_trivially_equal(tmp_path):
    """Guard against a comparison that cannot fail: t = 0 and t = 1 give different models."""
    pair = sibling_pair(tmp_path, "pair")
    base_only = run_pearl(slerp_yaml(pair, t="  t: 0.0\n"), tmp_path / "t0")
    other_only = run_mergekit(slerp_yaml(pair, t="  t: 1.0\n"), tmp_path / "t1")
    assert verify(base_only, pair.a).identical
    assert verify(other_only, pair.b).identical
    assert not verify(base_only, other_only).ok
