r"""A mini-Pearl specialist whose tokenizer has more tokens than its siblings'.

Mini-Pearl's tokenizer (`minipearl.build_tokenizer`) has one token per character. A real
specialist is often fine-tuned with tokens of its own added to its vocabulary; here the
maths specialist gets 200 **number tokens**: each two-digit operand together with the
sign after it, ``00+`` to ``99+`` and ``00=`` to ``99=``, so that ``07+35=042`` is read
as ``<s> 07+ 35= 0 4 2`` (the answer is still written one digit at a time, so the
evaluation of `minipearl` scores it unchanged).

Its model is the base's with ``embed_tokens`` and ``lm_head`` grown by one row per new
token, each new row the mean of the base's rows of the token's three characters, and then
fine-tuned on the maths specialist's data (`minipearl.fine_tuning_examples`, every text
tokenized with the new tokenizer) from the same seed, but for twice the steps at twice the
learning rate (`NUMBER_STEPS`, `NUMBER_LEARNING_RATE`): its 200 new rows start from
averages and must be learnt. As a control, `build_long_character_specialist` fine-tunes
the usual one-token-per-character specialist just as long and as fast. Both are trained
once and kept in ``$PEARL_EDU_CACHE/number-specialist``, as `minipearl` keeps its models.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pearl_edu.teaching import minipearl

NUMBER_TOKENS = tuple(
    f"{n:0{minipearl.OPERAND_DIGITS}d}{sign}" for sign in "+=" for n in range(100)
)
# The specialist's fine-tune: twice mini-Pearl's maths steps and learning rate.
NUMBER_STEPS = 2 * minipearl.SIBLING_SETTINGS.math_steps
NUMBER_LEARNING_RATE = 2 * minipearl.SIBLING_SETTINGS.finetune_learning_rate
# One token per number token, or else one per character.
NUMBER_PATTERN = r"\d\d[+=]|."


def build_number_tokenizer():
    """Mini-Pearl's tokenizer with the 200 number tokens after its 44 (ids 44 to 243).

    The characters keep their ids; a two-digit number followed by ``+`` or ``=`` is one
    token, any other character one token, as before.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    transformers = minipearl._transformers()
    characters = minipearl.SPECIAL_TOKENS + tuple(minipearl.CHARACTERS)
    vocab = {token: index for index, token in enumerate(characters + NUMBER_TOKENS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=minipearl.UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(NUMBER_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    bos = minipearl.BOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=minipearl.EOS,
        pad_token=minipearl.PAD,
        unk_token=minipearl.UNK,
    )


def grow_vocabulary(model, tokenizer) -> None:
    """Give ``model`` one row of ``embed_tokens`` and ``lm_head`` per token of ``tokenizer``.

    Its old rows stay; a new token's row is the mean of the rows of its characters, in
    each of the two matrices.
    """
    old_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        old = {
            "embed": model.get_input_embeddings().weight.detach().clone(),
            "head": model.get_output_embeddings().weight.detach().clone(),
        }
        model.resize_token_embeddings(len(vocab), mean_resizing=False)
        matrices = {
            "embed": model.get_input_embeddings().weight,
            "head": model.get_output_embeddings().weight,
        }
        for token, index in vocab.items():
            if index < old_vocab:
                continue
            characters = [vocab[c] for c in token]
            for key, matrix in matrices.items():
                matrix[index] = old[key][characters].mean(dim=0)


def build_number_specialist(folder: str | Path, mini: minipearl.MiniPearl) -> list[float]:
    """Fine-tune ``mini``'s base, vocabulary grown, on additions; save it in ``folder``.

    Returns the loss of each step.
    """
    settings = mini.settings
    tokenizer = build_number_tokenizer()
    examples = minipearl.fine_tuning_examples(tokenizer, settings.corpus(), "math")
    model = minipearl.load_model(mini.base)
    grow_vocabulary(model, tokenizer)
    with minipearl.torch_threads(settings.threads):
        losses = minipearl.train(
            model,
            examples,
            steps=NUMBER_STEPS,
            learning_rate=NUMBER_LEARNING_RATE,
            batch_size=settings.batch_size,
            seed=settings.seed + 1,
        )
    minipearl.save_model(model, tokenizer, folder)
    return losses


def cache_dir() -> Path:
    """``$PEARL_EDU_CACHE/number-specialist`` (``~/.cache/pearl-edu`` by default)."""
    root = os.environ.get("PEARL_EDU_CACHE") or Path.home() / ".cache" / "pearl-edu"
    return Path(root) / "number-specialist"


def _cached(kind: str, mini: minipearl.MiniPearl, build) -> Path:
    """The folder of a model that ``build(scratch)`` trains and saves, built the first time.

    Its name covers ``kind``, ``mini``'s settings and the source of this module and of
    `minipearl`, so a change to any of them trains anew; the folder appears only when
    complete (`minipearl`'s own cache, in a folder of its own).
    """
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return minipearl._cached(cache_dir(), kind + repr(mini.settings) + source, build)


def load_or_build_number_specialist(mini: minipearl.MiniPearl) -> Path:
    """The folder of ``mini``'s number-token specialist, trained once and then read back."""
    return _cached("numbers", mini, lambda scratch: build_number_specialist(scratch, mini))


def build_long_character_specialist(folder: str | Path, mini: minipearl.MiniPearl) -> list[float]:
    """The control: ``mini``'s maths specialist fine-tuned as long and as fast as the
    number-token one (`NUMBER_STEPS`, `NUMBER_LEARNING_RATE`), with mini-Pearl's own
    one-token-per-character tokenizer. Saved in ``folder``; returns the loss of each step.
    """
    model, losses = minipearl.fine_tune(
        mini.base, "math", mini.settings, learning_rate=NUMBER_LEARNING_RATE, steps=NUMBER_STEPS
    )
    minipearl.save_model(model, minipearl.load_tokenizer(mini.base), folder)
    return losses


def load_or_build_long_character_specialist(mini: minipearl.MiniPearl) -> Path:
    """The folder of the control specialist (`build_long_character_specialist`), cached."""
    return _cached(
        "characters", mini, lambda scratch: build_long_character_specialist(scratch, mini)
    )


def losses(folder: str | Path) -> list[float]:
    """The training losses kept beside a number-token specialist."""
    return json.loads((Path(folder) / "losses.json").read_text())
