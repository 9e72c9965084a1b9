r"""Mini-Pearl's parents as LoRA adapters: fine-tuned with PEFT, saved, and cached.

The chapter "LoRA adapters are task vectors" fine-tunes the two parents of mini-Pearl a
second time, from the same base and on the same data as `minipearl.fine_tune`, but with the
base frozen and a low-rank change trained in each linear layer (PEFT's LoRA):

$$ W = W_0 + \frac{\alpha}{r} B A, \qquad B \in \mathbb{R}^{d \times r},\;
   A \in \mathbb{R}^{r \times k}. $$

Each adapter is a PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``) that
``model: base+adapter`` applies in a `pearl_edu` recipe. Training one takes tens of seconds
on one core, so adapters are trained once and read back from the cache, next to mini-Pearl
(``$PEARL_EDU_CACHE/mini-pearl-lora``), in a folder named after everything that decides them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pearl_edu.teaching import minipearl

# Every linear layer of a Mistral block: attention's four projections and the MLP's three.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """What decides an adapter beyond mini-Pearl's settings: rank, alpha, learning rate.

    The steps, batch size and data are the full fine-tune's (`minipearl.fine_tune`); LoRA's
    learning rate is ten times the full fine-tune's, as a low-rank change starting from
    zero needs larger steps.
    """

    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 5e-3

    @property
    def scale(self) -> float:
        r"""PEFT's scale of the change, $\alpha / r$."""
        return self.alpha / self.rank


def peft():
    """`peft`, imported with the warning its first import of tqdm gives in a notebook silenced
    (as `minipearl` imports `transformers`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import peft
    return peft


def lora_config(settings: LoraSettings):
    """PEFT's `LoraConfig` for every linear layer of mini-Pearl, without dropout."""
    return peft().LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
    )


def with_adapter(base: str | Path, settings: LoraSettings, *, seed: int):
    """The base model of ``base`` wrapped by PEFT with a fresh adapter (B = 0, A random).

    The draw of the A factors is seeded by ``seed`` and leaves torch's generator as it was.
    """
    model = minipearl.load_model(base)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return peft().get_peft_model(model, lora_config(settings))


def train_adapter(
    mini: minipearl.MiniPearl, parent: str, settings: LoraSettings | None = None
) -> tuple[object, list[float]]:
    """Fine-tune ``parent``'s skill into a LoRA adapter of mini-Pearl's base.

    The same examples, steps, batch size and batch order as the full fine-tune of
    ``parent``; only the base is frozen and the learning rate is ``settings``'. Returns the
    PEFT model and the loss of each step.
    """
    settings = settings or LoraSettings()
    tokenizer = minipearl.load_tokenizer(mini.base)
    examples = minipearl.fine_tuning_examples(tokenizer, mini.settings.corpus(), parent)
    steps = mini.settings.generalist_steps if parent == "generalist" else mini.settings.math_steps
    model = with_adapter(mini.base, settings, seed=mini.settings.seed)
    with minipearl.torch_threads(mini.settings.threads):
        losses = minipearl.train(
            model,
            examples,
            steps=steps,
            learning_rate=settings.learning_rate,
            batch_size=mini.settings.batch_size,
            seed=mini.settings.seed + 1,
        )
    return model, losses


def cache_dir() -> Path:
    """Where trained adapters are kept: ``$PEARL_EDU_CACHE/mini-pearl-lora``."""
    return minipearl.default_cache_dir().parent / "mini-pearl-lora"


def load_or_train_adapter(
    mini: minipearl.MiniPearl, parent: str, settings: LoraSettings | None = None
) -> Path:
    """The folder of ``parent``'s adapter for ``mini``, trained once and then read back.

    The folder's name covers mini-Pearl's settings, the adapter's settings, the source of
    `minipearl` and of the functions here that train, so a change to any of them trains
    anew; the folder appears only when complete. It holds the PEFT adapter and
    ``losses.json``.
    """
    settings = settings or LoraSettings()
    key = repr((mini.settings, parent, settings)).encode()
    training = (LoraSettings, lora_config, with_adapter, train_adapter)
    source = "".join(inspect.getsource(part) for part in training).encode()
    source += Path(minipearl.__file__).read_bytes()
    fingerprint = hashlib.sha256(key + source).hexdigest()[:16]
    target = cache_dir() / f"{parent}-{fingerprint}"
    if not (target / "losses.json").is_file():
        scratch = target.parent / f".{target.name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        model, losses = train_adapter(mini, parent, settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(scratch, safe_serialization=True)
        (scratch / "losses.json").write_text(json.dumps(losses))
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    return target


def adapter_factors(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight name: (A, B)}`` of a PEFT LoRA folder, named as the base's weights."""
    from safetensors.torch import load_file

    tensors = load_file(Path(folder) / "adapter_model.safetensors")
    factors = {}
    for name, a in tensors.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            factors[f"{module}.weight"] = (a, b)
    return factors


def adapter_scale(folder: str | Path) -> float:
    r"""The scale $\alpha / r$ of a PEFT LoRA folder (one rank and alpha for every module)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise ValueError(f"{folder}: per-module ranks or rsLoRA; read each module's scale")
    return config["lora_alpha"] / config["r"]


def with_adapters(
    recipe: str | Mapping, mini: minipearl.MiniPearl, adapters: Mapping[str, str | Path]
) -> str:
    """A recipe's YAML with its words replaced by folders: ``base``, ``generalist`` and
    ``math`` by ``mini``'s models, and ``base+NAME`` by the base plus the adapter folder
    ``adapters[NAME]`` (a ``base+adapter`` reference, applied as the model is read)."""
    from pearl_edu.teaching import evaluation

    loaded = yaml.safe_load(recipe) if isinstance(recipe, str) else dict(recipe)
    models = []
    for entry in loaded["models"]:
        entry = dict(entry)
        if entry["model"].startswith("base+"):
            entry["model"] = f"{mini.base}+{adapters[entry['model'].removeprefix('base+')]}"
        models.append(entry)
    return evaluation.with_folders({**loaded, "models": models}, mini)
