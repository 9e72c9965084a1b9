"""Reference tests: linear, task arithmetic, TIES and DARE against mergekit 0.1.5.

Every case merges tiny models (a base and fine-tuned siblings of it) once with mergekit's
Python API and once with `pearl_edu.merge`, from the same YAML, and compares every output
tensor. The deterministic methods, and DARE with ``density: 1``, must be identical bit for
bit. DARE below density 1 draws from a random generator, and the two draw differently
(mergekit from torch's global generator in tensor order, pearl_edu from a generator per
tensor and model), so there the properties that do not depend on the draw are checked on
both outputs: the fraction of entries kept, the L1 rescaling of the survivors, and that
every entry is one TIES could produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.engine import merge
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

NUM_LAYERS = 4


@dataclass(frozen=True)
class Family:
    """A base model and two fine-tuned siblings of it."""

    base: Path
    math: Path
    chat: Path


def make_family(root: Path, dtype: torch.dtype, *, chat_dtype: torch.dtype | None = None) -> Family:
    base = make_tiny_model(root / "base", num_layers=NUM_LAYERS, seed=1, dtype=dtype)
    return Family(
        base=base,
        math=make_tiny_model(root / "math", base=base, noise=0.5, seed=2, dtype=dtype),
        chat=make_tiny_model(
            root / "chat", base=base, noise=0.5, seed=3, dtype=chat_dtype or dtype
        ),
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


def run_both(config_text: str, out: Path, *, seed: int = 0) -> tuple[dict, dict]:
    """The state dicts that pearl_edu and mergekit (seeded with ``seed``) make from a YAML."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    options = MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False, random_seed=seed)
    run_merge(config, str(out / "mergekit"), options=options)
    merge(config_text, out / "pearl", device="cpu", progress=False)
    return load_state_dict(out / "pearl"), load_state_dict(out / "mergekit")


def assert_identical(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"


# --- the deterministic methods: identical to mergekit ------------------------------------


def test_linear_with_gradients_filters_and_the_base_weighted(bf16, tmp_path):
    config = f"""
merge_method: linear
models:
  - model: {bf16.base}
    parameters: {{weight: 0.25}}
  - model: {bf16.math}
    parameters:
      weight: [0.7, 0.2]
  - model: {bf16.chat}
    parameters:
      weight: [{{filter: mlp, value: 0.3}}, {{value: 0.6}}]
"""
    assert_identical(*run_both(config, tmp_path))


def test_task_arithmetic_in_slices_matches_filters_on_input_names(bf16, tmp_path):
    # The second slice takes chat's layers 0-1 into output layers 2-3: mergekit matches
    # per-model filters against the input's name (layers.0.), not the output's (layers.2.).
    config = f"""
merge_method: task_arithmetic
base_model: {bf16.base}
slices:
  - sources:
      - {{model: {bf16.base}, layer_range: [0, 2]}}
      - {{model: {bf16.math}, layer_range: [0, 2], parameters: {{weight: 0.6}}}}
      - {{model: {bf16.chat}, layer_range: [2, 4]}}
  - sources:
      - {{model: {bf16.base}, layer_range: [2, 4]}}
      - {{model: {bf16.math}, layer_range: [2, 4], parameters: {{weight: [0.1, 0.9]}}}}
      - {{model: {bf16.chat}, layer_range: [0, 2]}}
    parameters:
      lambda: 0.7
parameters:
  weight: [{{filter: "layers.0.", value: 0.9}}, {{value: 0.4}}]
  normalize: true
  lambda: 1.3
"""
    assert_identical(*run_both(config, tmp_path))


def test_ties_with_density_gradient_and_an_unlisted_base(bf16, tmp_path):
    # Pearl-34B-ties' shape: two fine-tunes on a base, base_model not listed under models.
    config = f"""
merge_method: ties
base_model: {bf16.base}
models:
  - model: {bf16.math}
    parameters: {{weight: 0.5, density: [0.3, 0.8]}}
  - model: {bf16.chat}
    parameters: {{weight: 0.5, density: 0.48}}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
    assert_identical(*run_both(config, tmp_path))


def test_ties_float32_without_normalize(fp32, tmp_path):
    config = f"""
merge_method: ties
base_model: {fp32.base}
models:
  - model: {fp32.base}
  - model: {fp32.math}
    parameters: {{weight: 0.7, density: 0.2}}
  - model: {fp32.chat}
    parameters: {{weight: [{{filter: self_attn, value: 1.0}}, {{value: 0.3}}], density: 0.6}}
parameters:
  normalize: false
  lambda: 0.8
  rescale: true
"""
    assert_identical(*run_both(config, tmp_path))


def test_mixed_input_dtypes_are_promoted_like_mergekit(tmp_path):
    family = make_family(tmp_path / "models", torch.bfloat16, chat_dtype=torch.float16)
    config = f"""
merge_method: ties
base_model: {family.base}
models:
  - model: {family.math}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {family.chat}
    parameters: {{weight: 0.5, density: 0.5}}
"""
    # bfloat16 and float16 meet in float32, and the merge is written in float32.
    ours, theirs = run_both(config, tmp_path / "promoted")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert_identical(ours, theirs)
    as_bf16 = config + "out_dtype: bfloat16\n"
    assert_identical(*run_both(as_bf16, tmp_path / "out_dtype"))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_density_one_is_exact(bf16, tmp_path, method):
    config = f"""
merge_method: {method}
base_model: {bf16.base}
models:
  - model: {bf16.math}
    parameters: {{weight: 0.6}}
  - model: {bf16.chat}
    parameters: {{weight: 0.4, density: 1.0}}
parameters:
  normalize: true
"""
    assert_identical(*run_both(config, tmp_path))


# --- DARE below density 1: what does not depend on the random draw ----------------------


def test_dare_linear_keeps_density_and_rescales_to_the_l1_norm(fp32, tmp_path):
    density = 0.3
    config = f"""
merge_method: dare_linear
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 1.0, density: {density}}}
random_seed: 11
"""
    base, math = load_state_dict(fp32.base), load_state_dict(fp32.math)
    for label, merged in zip(
        ("pearl_edu", "mergekit"), run_both(config, tmp_path, seed=11), strict=True
    ):
        kept_total = elements = 0
        for name, tensor in merged.items():
            delta = (math[name] - base[name]).double()
            change = tensor.double() - base[name].double()
            kept = change != 0
            kept_total += int(kept.sum())
            elements += tensor.numel()
            # Survivors are scaled so the L1 norm of the delta is kept (mergekit's rescaling),
            # up to the float32 rounding of base + scaled delta.
            scale = delta.abs().sum() / delta[kept].abs().sum()
            rounding = 4 * torch.finfo(torch.float32).eps * tensor.abs().double().max()
            assert bool(((change - delta * scale * kept).abs() <= rounding).all()), (
                f"{label}: {name}"
            )
        fraction = kept_total / elements
        assert abs(fraction - density) < 0.01, f"{label}: kept {fraction:.4f}"


def test_dare_ties_entries_are_ones_ties_could_make(fp32, tmp_path):
    # Without rescaling, each entry of the merge minus the base is 0, one model's weighted
    # delta, or (only where the two agree in sign) their sum: never a sum of opposite signs.
    config = f"""
merge_method: dare_ties
base_model: {fp32.base}
models:
  - model: {fp32.math}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {fp32.chat}
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  rescale: false
"""
    base = load_state_dict(fp32.base)
    math, chat = load_state_dict(fp32.math), load_state_dict(fp32.chat)
    for label, merged in zip(
        ("pearl_edu", "mergekit"), run_both(config, tmp_path, seed=5), strict=True
    ):
        dropped_by_both = elements = 0
        for name, tensor in merged.items():
            change = tensor.double() - base[name].double()
            one = (math[name] - base[name]).double() * 1.0
            two = (chat[name] - base[name]).double() * 0.5
            same_sign = torch.sign(one) == torch.sign(two)
            candidates = [torch.zeros_like(one), one, two, torch.where(same_sign, one + two, 0)]
            scale = 4 * torch.finfo(torch.float32).eps * tensor.abs().double().max()
            close = torch.stack([(change - c).abs() <= scale for c in candidates])
            assert bool(close.any(dim=0).all()), f"{label}: {name}"
            dropped_by_both += int(close[0].sum())
            elements += tensor.numel()
        # An entry stays at the base only when both models dropped it: (1 - 0.5) ** 2.
        assert abs(dropped_by_both / elements - 0.25) < 0.02, label
