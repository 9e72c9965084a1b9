"""Which MoE architecture a mergekit-moe config makes, as mergekit 0.1.5 chooses it.

mergekit knows four output architectures, tried in this order: Mixtral, DeepSeek MoE,
Qwen MoE (Qwen2-MoE) and Qwen3 MoE. ``architecture:`` keeps those whose name starts with
it (case-insensitive: ``qwen`` keeps both Qwen ones). Of those, the ones that support the
config remain, and Mixtral is taken when it is among them, else the first:

- **Mixtral**: no shared experts; every model (base and experts) ``llama``, or every one
  ``mistral``;
- **DeepSeek MoE**: at most one shared expert, without prompts; all ``llama`` or all
  ``mistral``;
- **Qwen MoE**: exactly one shared expert, with ``positive_prompts`` unless
  ``gate_mode: random``; every model (shared expert included) of one type, ``llama``,
  ``mistral`` or ``qwen2``;
- **Qwen3 MoE**: no shared experts; every model ``qwen3``.

pearl_edu writes Mixtral and Qwen MoE (`WRITTEN`); a config for which mergekit would write
another is refused in one line naming it (`select_output`).
"""

from __future__ import annotations

from collections.abc import Mapping

from pearl_edu.errors import ConfigError
from pearl_edu.moe.config import MoEConfig

OUTPUT_ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
WRITTEN = ("Mixtral", "Qwen MoE")


def why_not(name: str, config: MoEConfig, model_types: Mapping[str, str]) -> str | None:
    """None when architecture ``name`` supports ``config``, else the reason, as a phrase."""
    shared = config.shared_experts or ()
    refs = [config.base_model, *(e.source_model for e in config.experts)]
    refs += [e.source_model for e in shared]
    types = [model_types[ref] for ref in refs]
    if name in ("Mixtral", "Qwen3 MoE") and shared:
        return "it has no shared experts"
    if name == "DeepSeek MoE" and len(shared) > 1:
        return "it takes at most one shared expert"
    if (
        name == "DeepSeek MoE"
        and shared
        and (shared[0].positive_prompts or shared[0].negative_prompts)
    ):
        return "its shared expert has no router (no prompts)"
    if name == "Qwen MoE":
        if len(shared) != 1:
            return "it needs exactly one shared expert"
        if config.gate_mode != "random" and not shared[0].positive_prompts:
            return "its shared expert needs positive_prompts"
    if name == "Qwen3 MoE":
        return None if set(types) == {"qwen3"} else "it is made from qwen3 models only"
    if len(set(types)) != 1:
        return "it needs every model of one model_type"
    allowed = ("llama", "mistral", "qwen2") if name == "Qwen MoE" else ("llama", "mistral")
    if types[0] not in allowed:
        return f"it is made from {', '.join(allowed)} models only"
    return None


def select_output(config: MoEConfig, model_types: Mapping[str, str]) -> str:
    """The architecture mergekit 0.1.5 writes for ``config``, when pearl_edu writes it too.

    ``model_types`` maps each model of the config to its ``config.json`` ``model_type``.
    Anything else is a one-line `ConfigError`: no architecture fits (with each one's
    reason), or mergekit would write one that pearl_edu does not.
    """
    where = config.source
    wanted = config.architecture
    candidates = [
        name
        for name in OUTPUT_ARCHITECTURES
        if not wanted or name.lower().startswith(wanted.lower())
    ]
    if not candidates:
        raise ConfigError(
            f"{where}: architecture: {wanted!r} names no MoE architecture; mergekit 0.1.5 "
            f"knows {', '.join(OUTPUT_ARCHITECTURES)}"
        )
    reasons = {name: why_not(name, config, model_types) for name in candidates}
    supported = [name for name in candidates if reasons[name] is None]
    if not supported:
        listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        shown = ", ".join(f"{ref} is {kind!r}" for ref, kind in model_types.items())
        raise ConfigError(
            f"{where}: no MoE architecture fits these models ({shown}) and experts: {listed}"
        )
    chosen = "Mixtral" if "Mixtral" in supported else supported[0]
    if chosen not in WRITTEN:
        raise ConfigError(
            f"{where}: mergekit 0.1.5 would write this config as {chosen}, which pearl-edu "
            f"moe does not write (it writes {' and '.join(WRITTEN)})"
        )
    return chosen
