"""The router of each MoE layer, from the experts' prompts, as mergekit 0.1.5 computes it.

A Mixtral layer sends each token to the ``experts_per_token`` experts whose router rows
score it highest: the router of layer :math:`\\ell` is a matrix
:math:`G_\\ell \\in \\mathbb{R}^{E \\times d}` (one row per expert), and a token whose hidden
state entering the layer is :math:`h` gets the scores :math:`G_\\ell h`. mergekit-moe makes
row :math:`e` the direction of what expert :math:`e`'s prompts look like at that layer:

.. math::

    g_{\\ell e} = \\frac{v_\\ell(P_e) - v_\\ell(N_e)}{\\max(\\lVert v_\\ell(P_e) - v_\\ell(N_e)\\rVert_2,\\ 10^{-8})}

where :math:`P_e` and :math:`N_e` are the expert's positive and negative prompts
(:math:`v(N_e) = 0` without negative prompts) and :math:`v_\\ell` is, by ``gate_mode``:

- ``hidden`` (and ``hidden_last``): the base model's hidden state entering layer
  :math:`\\ell` at each prompt's last token, averaged over the prompts
  (`hidden_state_means`); ``hidden_avg`` averages over each prompt's tokens first. The
  forward pass runs in bfloat16 on the CPU with transformers, as mergekit's does, so the
  vectors are bfloat16 and the arithmetic above is bfloat16 arithmetic.
- ``cheap_embed``: the sum of the prompts' token embeddings, normalised, the same for
  every layer (`cheap_embedding`), in float32.
- ``random``: :math:`N(0, 1)` entries; ``uniform_random``: uniform on
  :math:`[-1/\\sqrt{d}, 1/\\sqrt{d}]`, the default initialisation of ``torch.nn.Linear``.
  Both are float32 and are not normalised.

Each prompt is tokenized as mergekit does (`tokenize_prompts`): the BOS token's text put
in front, no other special tokens, padded on the left with the BOS token.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pearl_edu.errors import ModelError, PearlEduWarning
from pearl_edu.methods import tensor_seed
from pearl_edu.moe.config import HIDDEN_MODES, Expert


class DegenerateRouterWarning(PearlEduWarning):
    """Some layers' router rows are nearly dependent: the prompts may be too similar."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def prompt_tokenizer(base_dir: Path) -> Any:
    """The base model's tokenizer, set up as mergekit-moe sets it up for the prompts.

    Left padding, with the BOS token as the padding token (the EOS token where there is
    no BOS), so that the last position of every row is the prompt's last token.
    """
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as err:  # transformers raises many kinds for a missing or bad file
        raise ModelError(
            f"{base_dir}: cannot load the base model's tokenizer, which the prompts are "
            f"tokenized with ({_one_line(err)})"
        ) from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, vocab_size: int) -> dict:
    """``input_ids`` and ``attention_mask`` of the prompts, each led by the BOS token's text."""
    tokens = tokenizer(
        [(tokenizer.bos_token or "") + prompt for prompt in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    largest = int(tokens["input_ids"].max())
    if largest >= vocab_size:
        raise ModelError(
            f"base model: its tokenizer gives token id {largest} for a prompt, past its "
            f"vocab_size {vocab_size}"
        )
    return dict(tokens)


def cheap_embedding(embed: torch.Tensor, tokens: dict, num_layers: int) -> torch.Tensor:
    """The prompts' summed token embeddings, normalised, repeated for each layer: (L, d).

    mergekit multiplies a one-hot matrix of the token ids by the embedding matrix; a
    one-hot product picks rows exactly, so indexing gives the same numbers without the
    (prompts, tokens, vocabulary) one-hot tensor. Adding ``+0.0`` turns a ``-0.0`` entry
    into ``+0.0``, as the product's sum of zeros does (finite embeddings assumed: a
    product would also spread an infinite entry's ``0 * inf = nan``).
    """
    rows = embed.float()[tokens["input_ids"]] + 0.0  # (prompts, tokens, d)
    mask = tokens["attention_mask"].unsqueeze(-1)
    summed = (rows * mask).sum(dim=1).sum(dim=0, keepdim=True)  # (1, d)
    unit = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return unit.repeat(num_layers, 1)


def hidden_state_means(model: Any, tokens: dict, *, average: bool) -> torch.Tensor:
    """The hidden state entering each layer, averaged over the prompts: (L, d).

    transformers returns L + 1 hidden states (the embeddings, then each layer's output, the
    last one after the final norm); the first L are the layers' inputs. For each prompt
    the state at its last token is taken (left padding puts it last), or with
    ``average`` the mean over every position, padding included, as mergekit's is.
    """
    with torch.no_grad():
        output = model(**tokens, output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # (L, prompts, tokens, d)
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def load_base_for_prompts(base_dir: Path, progress: bool | None = None) -> Any:
    """The base model in bfloat16 on the CPU, loaded once, for the ``hidden`` modes.

    With ``progress=False`` transformers' loading bar is hidden, and shown again after."""
    import transformers
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    if progress is False:
        transformers_logging.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=torch.bfloat16, device_map="cpu", low_cpu_mem_usage=True
        )
    except Exception as err:
        raise ModelError(
            f"{base_dir}: cannot load the base model with transformers to compute the "
            f"prompts' hidden states ({_one_line(err)})"
        ) from None
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def random_gates(mode: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``random``: N(0, 1); ``uniform_random``: U(-1/sqrt(d), 1/sqrt(d)); float32, (L, E, d).

    mergekit draws from torch's global generator; pearl_edu from a generator seeded with
    the run's seed, so the same seed gives the same routers.
    """
    generator = torch.Generator().manual_seed(tensor_seed(seed, "moe.router"))
    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def gate_vectors(
    mode: str,
    experts: Sequence[Expert],
    *,
    base_dir: Path,
    embed: torch.Tensor | None,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """Every layer's router rows, (L, E, d), by ``mode`` (see the module's docstring).

    ``embed`` is the base's ``model.embed_tokens.weight`` (needed by ``cheap_embed`` only);
    ``progress=False`` hides transformers' bar while the base loads (``hidden`` modes).
    """
    if mode not in HIDDEN_MODES and mode != "cheap_embed":
        return random_gates(mode, (num_layers, len(experts), hidden_size), seed)
    tokenizer = prompt_tokenizer(base_dir)
    if mode == "cheap_embed":

        def vector(prompts: Sequence[str]) -> torch.Tensor:
            tokens = tokenize_prompts(prompts, tokenizer, vocab_size)
            return cheap_embedding(embed, tokens, num_layers)

    else:
        model = load_base_for_prompts(base_dir, progress)

        def vector(prompts: Sequence[str]) -> torch.Tensor:
            tokens = tokenize_prompts(prompts, tokenizer, vocab_size)
            return hidden_state_means(model, tokens, average=mode == "hidden_avg")

    rows = []
    for expert in experts:
        row = vector(expert.positive_prompts)
        if expert.negative_prompts:
            row = row - vector(expert.negative_prompts)
        rows.append(row / row.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=0).permute(1, 0, 2)  # (E, L, d) -> (L, E, d)


def warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> None:
    """Warn, as mergekit does, when a layer's router rows have a condition number above 5."""
    layers = [
        index
        for index in range(gates.shape[0])
        if torch.linalg.cond(gates[index].float()) > threshold
    ]
    if layers:
        which = "all layers" if len(layers) == gates.shape[0] else f"layers {layers}"
        warnings.warn(
            f"{which}: the router rows are nearly dependent (condition number above "
            f"{threshold}): the prompts may be too similar, and some experts will be "
            "underused",
            DegenerateRouterWarning,
            stacklevel=2,
        )
