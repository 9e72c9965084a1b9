"""Read a mergekit-moe YAML config into a validated `MoEConfig`, with mergekit 0.1.5's meaning.

mergekit-moe's config (mergekit's ``MoEMergeConfig``) names a base model, which gives
everything but the MLPs (embeddings, attention, norms, the head), and a list of experts,
each a model whose MLP becomes one expert of every layer:

.. code-block:: yaml

    base_model: mistralai/Mistral-7B-v0.1
    gate_mode: hidden            # hidden | cheap_embed | random (and mergekit's variants)
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: org/math-7b
        positive_prompts: ["Solve the equation"]
        negative_prompts: ["Write a poem"]   # optional
        noise_scale: 0.01                    # optional: Gaussian noise on its MLP weights
      - source_model: org/chat-7b
        positive_prompts: ["Hello, how are you?"]

Every mistake is a one-line `ConfigError` naming the file and the key. Unknown keys are
ignored as mergekit's pydantic model ignores them, with a one-line `UnknownKeyWarning` (a
typo such as ``positive_prompt:`` would lose the prompts), and refused with ``strict``
(``--strict``), as in `pearl_edu.config`. `check_moe_config` then applies mergekit's
``is_bad_config`` rules, which need no model: they are checked before anything is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pearl_edu.config import torch_dtype
from pearl_edu.config_checks import model_ref, reject_unknown_keys, require_mapping, strict_keys
from pearl_edu.errors import ConfigError
from pearl_edu.yaml_reader import check_size, check_tree, load_yaml, read_text, short, shown_path

# mergekit 0.1.5's gate modes (`mergekit.moe.router.get_gate_params`). "hidden" takes the
# hidden state of each prompt's last token, "hidden_avg" the mean over its tokens;
# "hidden_last" is another name for "hidden".
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
RANDOM_MODES = ("random", "uniform_random")

TOP_LEVEL_KEYS = frozenset(
    {
        "base_model",
        "experts",
        "gate_mode",
        "dtype",
        "experts_per_token",
        "shared_experts",
        "architecture",
    }
)
EXPERT_KEYS = frozenset(
    {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
)


@dataclass(frozen=True)
class Expert:
    """One expert: the model whose MLP it is, its prompts, and optional noise and scale.

    ``noise_scale`` adds ``noise_scale * N(0, 1)`` to each of its MLP weights and
    ``residual_scale`` multiplies its ``down_proj``, as mergekit's ``noise_and_scale``.
    """

    source_model: str
    positive_prompts: tuple[str, ...] | None = None
    negative_prompts: tuple[str, ...] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoEConfig:
    """A validated mergekit-moe config; ``text`` is the YAML as given (kept beside the model)."""

    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] | None = None
    architecture: str | None = None
    source: str = "<config>"
    text: str = ""

    def models(self) -> list[str]:
        """Every model the config reads: the base, then the experts, then shared experts."""
        shared = [e.source_model for e in self.shared_experts or ()]
        return list(
            dict.fromkeys([self.base_model, *(e.source_model for e in self.experts), *shared])
        )

    def yaml_text(self) -> str:
        """The YAML as given, or, for a config made in Python, its fields as YAML."""
        if self.text:
            return self.text

        def entry(expert: Expert) -> dict[str, Any]:
            fields = dataclasses.asdict(expert)
            return {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in fields.items()
                if v is not None
            }

        data: dict[str, Any] = {"base_model": self.base_model, "gate_mode": self.gate_mode}
        if self.dtype:
            data["dtype"] = self.dtype
        data["experts_per_token"] = self.experts_per_token
        if self.architecture:
            data["architecture"] = self.architecture
        data["experts"] = [entry(e) for e in self.experts]
        if self.shared_experts is not None:
            data["shared_experts"] = [entry(e) for e in self.shared_experts]
        return yaml.safe_dump(data, sort_keys=False)


def load_moe_config(source: str | Path | Mapping[str, Any], *, strict: bool = False) -> MoEConfig:
    """Read a mergekit-moe config from a YAML file, YAML text (with a newline) or a mapping.

    ``strict`` refuses keys mergekit would ignore, instead of warning about them.
    """
    if isinstance(source, Mapping):
        where = "<config>"
        raw: Any = dict(source)
        text = yaml.safe_dump(raw, sort_keys=False)
    elif isinstance(source, str) and "\n" in source:
        where = "<string>"
        check_size(source, where)
        text = source
        raw = load_yaml(text, where)
    else:
        where = shown_path(source)
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{where}: no such config file")
        text = read_text(path, where)
        raw = load_yaml(text, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (base_model, experts, ...)")
    with strict_keys(strict):
        return parse_moe_config(raw, where, text)


def parse_moe_config(raw: Mapping[str, Any], where: str, text: str = "") -> MoEConfig:
    """Validate a parsed mergekit-moe mapping (see `load_moe_config`)."""
    check_tree(raw, where)
    reject_unknown_keys(
        raw, TOP_LEVEL_KEYS, where, "", required=(frozenset({"base_model"}), frozenset({"experts"}))
    )
    experts = _experts(raw, "experts", where, required=True)
    shared = _experts(raw, "shared_experts", where, required=False)
    gate_mode = raw.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise ConfigError(
            f"{where}: gate_mode: {short(gate_mode)} is not a gate mode; expected one of "
            f"{', '.join(GATE_MODES)}"
        )
    per_token = raw.get("experts_per_token", 2)
    if not isinstance(per_token, int) or isinstance(per_token, bool):
        raise ConfigError(
            f"{where}: experts_per_token: expected an integer, got {short(per_token)}"
        )
    dtype = _optional_text(raw, "dtype", where)
    if dtype is not None:
        torch_dtype(dtype, where=where, key="dtype")  # a known name, checked before any model
    return MoEConfig(
        base_model=model_ref(raw, "base_model", where, "base_model"),
        experts=experts,
        gate_mode=gate_mode,
        dtype=dtype,
        experts_per_token=per_token,
        shared_experts=shared,
        architecture=_optional_text(raw, "architecture", where),
        source=where,
        text=text,
    )


def _experts(
    raw: Mapping[str, Any], key: str, where: str, *, required: bool
) -> tuple[Expert, ...] | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key}: expected a list of experts, got {short(value)}")
    experts = []
    for index, entry in enumerate(value):
        at = f"{key}[{index}]"
        require_mapping(entry, where, at)
        reject_unknown_keys(entry, EXPERT_KEYS, where, at, required=(frozenset({"source_model"}),))
        experts.append(
            Expert(
                source_model=model_ref(entry, "source_model", where, f"{at}.source_model"),
                positive_prompts=_prompts(entry, "positive_prompts", where, at),
                negative_prompts=_prompts(entry, "negative_prompts", where, at),
                noise_scale=_optional_number(entry, "noise_scale", where, at),
                residual_scale=_optional_number(entry, "residual_scale", where, at),
            )
        )
    return tuple(experts)


def _prompts(entry: Mapping[str, Any], name: str, where: str, at: str) -> tuple[str, ...] | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: {at}.{name}: expected a list of strings, got {short(value)}")
    return tuple(value)


def _optional_number(entry: Mapping[str, Any], name: str, where: str, at: str) -> float | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{where}: {at}.{name}: expected a number, got {short(value)}")
    return float(value)


def _optional_text(raw: Mapping[str, Any], name: str, where: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {name}: expected a string, got {short(value)}")
    return value


def check_moe_config(config: MoEConfig, *, allow_all_same: bool = False) -> None:
    """mergekit 0.1.5's ``is_bad_config``, each refusal a one-line `ConfigError`.

    - at least one expert per token, and at least as many experts as experts per token;
    - prompts for every shared expert or for none (mergekit asserts it while building);
    - except with ``gate_mode: random`` (that exact mode: mergekit returns early for it and
      for no other), every expert needs ``positive_prompts``, the experts' prompts must not
      all be the same (one expert alone counts as all the same, as in mergekit), and the
      experts must not all be one model, unless ``allow_all_same`` (mergekit's
      ``--i-understand-this-is-not-useful-without-training``).
    """
    where = config.source
    if config.experts_per_token < 1:
        raise ConfigError(f"{where}: experts_per_token: must be at least 1")
    if len(config.experts) < config.experts_per_token:
        raise ConfigError(
            f"{where}: experts: {len(config.experts)} experts, fewer than experts_per_token "
            f"({config.experts_per_token}); list at least as many experts"
        )
    shared = config.shared_experts or ()
    if len({bool(e.positive_prompts) for e in shared}) > 1:
        raise ConfigError(
            f"{where}: shared_experts: give positive_prompts to every shared expert or to none"
        )
    if config.gate_mode == "random":
        return
    for index, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise ConfigError(
                f"{where}: experts[{index}].positive_prompts: expected at least one prompt "
                f"(gate_mode {config.gate_mode} routes by the prompts; only gate_mode random "
                "needs none)"
            )

    def prompts(expert: Expert) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return expert.positive_prompts or (), expert.negative_prompts or ()

    if all(prompts(e) == prompts(config.experts[0]) for e in config.experts[1:]):
        raise ConfigError(
            f"{where}: experts: every expert has the same positive_prompts and "
            "negative_prompts, which gives a router that cannot tell them apart; give each "
            "expert prompts of what should be routed to it"
        )
    first = config.experts[0].source_model
    if not allow_all_same and all(e.source_model == first for e in config.experts[1:]):
        raise ConfigError(
            f"{where}: experts: every expert is {first}; the MoE would compute what that "
            "model does at a higher cost (pass --i-understand-this-is-not-useful-without-"
            "training to build it for training)"
        )
