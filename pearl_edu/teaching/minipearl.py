r"""Mini-Pearl: Pearl-7B-slerp's story re-enacted with models small enough to train on a laptop.

Pearl-7B-slerp merges a generalist (OmniBeagle-7B) with a maths specialist
(WizardMath-7B), both fine-tuned from one pre-trained model (Mistral-7B). This module
plays the whole story at toy scale, offline and deterministically:

1. **data**: sentences from a small English-like grammar (the "general" skill) and
   two-digit additions written ``07+35=042`` (the "maths" skill), split into training and
   held-out sets;
2. **tokenizer**: one token per character, built with `tokenizers` and saved as the
   ``tokenizer.json`` that `transformers.PreTrainedTokenizerFast` loads;
3. **models**: a few-layer Mistral from `transformers`, pre-trained on simple sentences
   and additions, with a little of each new skill mixed in (a few sentences with new words,
   some carries), then fine-tuned twice from the same weights: on sentences with all the
   words (the generalist) and on all additions (the specialist). `FAR_SETTINGS` builds the
   contrast, fine-tunes that must create their skills from nothing;
4. **evaluation**: next-token accuracy on held-out sentences, and exact-match accuracy of
   the greedy answers to held-out additions;
5. **merging**: Pearl's own recipe with the models and layer count replaced, so that
   `pearl_edu.merge` merges the two parents exactly as mergekit merged the real ones.

Every random choice comes from an explicit seed, so the same settings give the same weights
on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import yaml

from pearl_edu.core.interpolation import DOT_THRESHOLD
from pearl_edu.errors import ModelError
from pearl_edu.functions import lerp, slerp
from pearl_edu.recipes import pearl_recipe


def _transformers():
    """`transformers`, imported on first use: importing `pearl_edu` stays light.

    Its first import loads tqdm, which warns in a notebook without widget support; the
    warning says nothing about the lesson, so it is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import transformers
        import transformers.utils.logging
        from tqdm import auto  # noqa: F401  (the module that warns)
    return transformers


# ---------------------------------------------------------------------------------------
# Data: a tiny grammar and two-digit additions

NOUNS = ("cat", "dog", "bird", "owl", "frog", "duck", "goat", "horse", "cow", "hen", "pig", "bear")
ADJECTIVES = ("small", "big", "red", "young", "quick", "lazy", "brown", "happy")
VERBS = ("see", "chase", "like", "find", "follow", "help", "watch", "greet")  # plural forms
SINGULAR_DETERMINERS = ("the", "a", "one")
PLURAL_DETERMINERS = ("the", "some", "two")


@dataclass(frozen=True)
class Vocabulary:
    """The words a grammar may use."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]


# Pre-training sees a third of the nouns and half of the other words; the generalist's
# fine-tuning (and the held-out test) uses them all, so that its skill is one the base
# model does not already have.
BASIC_WORDS = Vocabulary(NOUNS[:4], ADJECTIVES[:4], VERBS[:4])
ALL_WORDS = Vocabulary(NOUNS, ADJECTIVES, VERBS)

# Operands have two digits and answers three, zero-padded, so every problem has the same
# shape and the answer is always three tokens long.
OPERAND_DIGITS = 2
ANSWER_DIGITS = 3


def noun_phrase(rng: random.Random, words: Vocabulary) -> tuple[str, bool]:
    """A noun phrase such as ``"two lazy dogs"`` and whether it is plural."""
    plural = rng.random() < 0.5
    phrase = [rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)]
    if rng.random() < 0.5:
        phrase.append(rng.choice(words.adjectives))
    phrase.append(rng.choice(words.nouns) + ("s" if plural else ""))
    return " ".join(phrase), plural


def make_sentence(rng: random.Random, words: Vocabulary = ALL_WORDS) -> str:
    """One sentence of the grammar: subject, verb agreeing with it, object, full stop.

    The verb takes an ``s`` after a singular subject (``the cat sees``) and none after a
    plural one (``two cats see``): a rule a model can only follow by looking back.
    """
    subject, plural = noun_phrase(rng, words)
    verb = rng.choice(words.verbs) + ("" if plural else "s")
    obj, _ = noun_phrase(rng, words)
    return f"{subject} {verb} {obj}."


def uses_new_words(sentence: str) -> bool:
    """Whether a sentence of the grammar uses any word beyond `BASIC_WORDS`.

    Plural nouns and singular verbs end in an ``s`` that the basic words lack, so each word
    is compared without it.
    """
    basic = set(BASIC_WORDS.nouns + BASIC_WORDS.adjectives + BASIC_WORDS.verbs)
    basic |= set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS)
    words = sentence.removesuffix(".").split()
    return any(word not in basic and word.removesuffix("s") not in basic for word in words)


def addition_prompt(a: int, b: int) -> str:
    """The question part of an addition, e.g. ``addition_prompt(7, 35) == "07+35="``."""
    return f"{a:0{OPERAND_DIGITS}d}+{b:0{OPERAND_DIGITS}d}="


def addition_answer(a: int, b: int) -> str:
    """The answer part of an addition, zero-padded: ``addition_answer(7, 35) == "042"``."""
    return f"{a + b:0{ANSWER_DIGITS}d}"


def carries(a: int, b: int) -> bool:
    """Whether adding ``a`` and ``b`` carries a one in any column (``17 + 25`` does)."""
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


@dataclass(frozen=True)
class Corpus:
    """The texts of every stage, and held-out data for both skills.

    Pre-training mixes sentences with the basic words and the additions that need no
    carry (``12+34=046``), plus a small share of each new skill: sentences with all the
    words and additions with a carry (the "seeds" of the two skills, see `make_corpus`).
    The generalist is fine-tuned on sentences with all the words, the specialist on all
    additions, carries included. Two held-out splits are kept apart from training and from
    each other: **validation**, on which a recipe's settings are chosen, and **test**, on
    which the chosen recipe is reported. Their sentences are not among the training ones,
    and their problems are operand pairs that no training problem uses, so they measure
    skills, not memory.
    """

    pretrain_sentences: tuple[str, ...]
    pretrain_problems: tuple[tuple[int, int], ...]
    train_sentences: tuple[str, ...]
    test_sentences: tuple[str, ...]
    train_problems: tuple[tuple[int, int], ...]
    test_problems: tuple[tuple[int, int], ...]
    validation_sentences: tuple[str, ...] = ()
    validation_problems: tuple[tuple[int, int], ...] = ()

    def held_out(self, split: str) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
        """The sentences and problems of a held-out split, ``"validation"`` or ``"test"``."""
        if split == "test":
            return self.test_sentences, self.test_problems
        if split == "validation":
            return self.validation_sentences, self.validation_problems
        raise ValueError(f"split must be 'validation' or 'test', not {split!r}")


def make_corpus(
    *,
    sentences: int = 4000,
    test_sentences: int = 300,
    test_problems: int = 300,
    validation_sentences: int | None = None,
    validation_problems: int | None = None,
    seed: int = 0,
    new_word_share: float = 0.01,
    carry_share: float = 0.15,
) -> Corpus:
    """Every text of the mini-Pearl story, deterministic from ``seed``.

    ``new_word_share`` of the pre-training sentences use all the words instead of the basic
    ones, and ``carry_share`` of the training additions that carry are pre-training
    problems too: the base model then knows a little of both skills, as a real base model
    does some of what its fine-tunes are later trained for. With both shares 0 the
    fine-tunes must create their skills from nothing.

    All ``100 * 100`` operand pairs are shuffled; the first ``test_problems`` of them are
    the test split, the next ``validation_problems`` the validation split (as many as the
    test's unless given), and the rest are for training. The held-out sentences and problems
    depend on ``seed`` only, not on the shares, so models built with different shares are
    measured on the same tests.
    """
    if validation_sentences is None:
        validation_sentences = test_sentences
    if validation_problems is None:
        validation_problems = test_problems
    for name, share in (("new_word_share", new_word_share), ("carry_share", carry_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    rng = random.Random(seed)
    train = [make_sentence(rng, ALL_WORDS) for _ in range(sentences)]
    seen = set(train)
    test: list[str] = []
    validation: list[str] = []
    for split, size in ((test, test_sentences), (validation, validation_sentences)):
        while len(split) < size:
            sentence = make_sentence(rng, ALL_WORDS)
            if sentence not in seen:
                split.append(sentence)
                seen.add(sentence)
    held_out = set(test) | set(validation)
    limit = 10**OPERAND_DIGITS
    pairs = [(a, b) for a in range(limit) for b in range(limit)]
    random.Random(seed).shuffle(pairs)
    validation_end = test_problems + validation_problems
    train_pairs = pairs[validation_end:]

    # The pre-training mix has its own generator, so the shares change nothing above.
    mix = random.Random(f"pretrain-{seed}")
    with_new_words = round(new_word_share * sentences)
    pretrain: list[str] = []
    while len(pretrain) < sentences:
        words = BASIC_WORDS if len(pretrain) < sentences - with_new_words else ALL_WORDS
        sentence = make_sentence(mix, words)
        if sentence not in held_out:
            pretrain.append(sentence)
    mix.shuffle(pretrain)
    with_carry = [pair for pair in train_pairs if carries(*pair)]
    seeded = set(with_carry[: round(carry_share * len(with_carry))])
    return Corpus(
        pretrain_sentences=tuple(pretrain),
        pretrain_problems=tuple(p for p in train_pairs if not carries(*p) or p in seeded),
        train_sentences=tuple(train),
        test_sentences=tuple(test),
        train_problems=tuple(train_pairs),
        test_problems=tuple(pairs[:test_problems]),
        validation_sentences=tuple(validation),
        validation_problems=tuple(pairs[test_problems:validation_end]),
    )


# ---------------------------------------------------------------------------------------
# The tokenizer: one token per character

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = " .+=0123456789abcdefghijklmnopqrstuvwxyz"


def build_tokenizer():
    """A character-level tokenizer that starts every text with ``<s>``, like Mistral's.

    Returns a `transformers.PreTrainedTokenizerFast`; ``save_pretrained`` writes the
    ``tokenizer.json`` that any Hugging Face loader reads back.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    PreTrainedTokenizerFast = _transformers().PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character, spaces included, is a token of its own...
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # ...so decoding glues them back together without adding spaces.
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


# ---------------------------------------------------------------------------------------
# Training examples: token ids and which of them the loss is computed on


@dataclass(frozen=True)
class Examples:
    """Right-padded token ids and a mask of the tokens the model is asked to predict.

    ``loss_mask[i, j]`` is 1 when token ``j`` of example ``i`` counts in the loss (and in
    the accuracy): every character of a sentence, but only the answer of an addition,
    since its operands are random and cannot be predicted.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``index``, cut after the longest of them (no all-padding columns)."""
        width = int(self.lengths[index].max())
        return self.input_ids[index, :width], self.loss_mask[index, :width]


def encode(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> Examples:
    """Encode ``prompt + target + </s>`` per example; only the target and ``</s>`` count."""
    # One call per list: the tokenizer encodes a whole batch at once, much faster.
    prompt_ids = tokenizer(list(prompts))["input_ids"]  # each starts with <s>
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    sequences, masks = [], []
    for prompt, target in zip(prompt_ids, target_ids, strict=True):
        target = [*target, tokenizer.eos_token_id]
        sequences.append(prompt + target)
        masks.append([0] * len(prompt) + [1] * len(target))
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(sequences, masks, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        loss_mask[row, : len(mask)] = torch.tensor(mask)
    lengths = torch.tensor([len(ids) for ids in sequences])
    return Examples(input_ids=input_ids, loss_mask=loss_mask, lengths=lengths)


def sentence_examples(tokenizer, sentences: Sequence[str]) -> Examples:
    """Sentences as examples: every character after ``<s>`` is predicted."""
    return encode(tokenizer, [""] * len(sentences), sentences)


def addition_examples(tokenizer, problems: Sequence[tuple[int, int]]) -> Examples:
    """Additions as examples: only the answer digits (and ``</s>``) are predicted."""
    prompts = [addition_prompt(a, b) for a, b in problems]
    answers = [addition_answer(a, b) for a, b in problems]
    return encode(tokenizer, prompts, answers)


def concatenate(first: Examples, second: Examples) -> Examples:
    """Both sets of examples in one, padded to the longer width."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def widen(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))

    # The pad id is 0 (SPECIAL_TOKENS[0]), so zero-padding the ids pads them correctly.
    return Examples(
        input_ids=torch.cat([widen(first.input_ids), widen(second.input_ids)]),
        loss_mask=torch.cat([widen(first.loss_mask), widen(second.loss_mask)]),
        lengths=torch.cat([first.lengths, second.lengths]),
    )


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a mini Mistral (Mistral-7B: 32 layers, hidden 4096, 32/8 heads)."""

    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 64


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the enclosed block on ``count`` CPU threads, then restore the caller's setting.

    Matrices this small gain nothing from several threads, and on a busy machine threads
    that wait for each other burn CPU time without doing work: training on one thread is
    several times cheaper than on two.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide `transformers`' progress bars in the enclosed block, then restore them.

    Loading or saving a model this small takes no time; a progress bar would only add noise
    to a notebook.
    """
    logging = _transformers().utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def new_model(tokenizer, shape: ModelShape, *, seed: int):
    """A freshly initialised `transformers.MistralForCausalLM` of the given shape.

    The initialisation draws from torch's global generator; it is forked here, so the
    caller's random state is left as it was.
    """
    transformers = _transformers()
    config = transformers.MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,  # as in Mistral-7B: embed_tokens and lm_head differ
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.MistralForCausalLM(config)
    return model.eval()


def language_model_loss(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    r"""Mean cross-entropy of the masked next tokens.

    $$ \mathcal{L} = -\frac{1}{\sum_j m_j} \sum_j m_j \log p_\theta(x_j \mid x_{<j}) $$
    """
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].float()
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return (losses * weights.reshape(-1)).sum() / weights.sum()


def train(
    model,
    examples: Examples,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place with AdamW on random batches; return the loss of each step.

    The learning rate rises linearly over the first tenth of the steps (Adam's first
    updates, from empty statistics, are the largest) and then decays linearly to zero,
    which lets a short run settle at the end. Batches are drawn from a generator seeded
    with ``seed``, so a run is reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_then_decay, steps=steps))
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(len(examples), (batch_size,), generator=generator)
        loss = language_model_loss(model, *examples.rows(index))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def warmup_then_decay(step: int, *, steps: int) -> float:
    """The learning-rate factor at ``step``: a linear rise over 10% of the steps, then decay."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / (steps - warmup))


# ---------------------------------------------------------------------------------------
# Measuring the two skills


@torch.no_grad()
def next_token_accuracy(model, examples: Examples) -> float:
    """Fraction of the masked tokens that are the model's most likely next token."""
    predicted = model(input_ids=examples.input_ids).logits[:, :-1].argmax(-1)
    mask = examples.loss_mask[:, 1:].bool()
    return (predicted == examples.input_ids[:, 1:])[mask].float().mean().item()


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], length: int) -> list[str]:
    """Continue each prompt with ``length`` greedily chosen tokens, decoded to text.

    All prompts must encode to the same number of tokens (true of the additions), so the
    whole batch is decoded in lockstep without padding.
    """
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"] for prompt in prompts])
    start = input_ids.shape[1]
    for _ in range(length):
        next_ids = model(input_ids=input_ids).logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_ids], dim=1)
    return tokenizer.batch_decode(input_ids[:, start:])


def addition_accuracy(model, tokenizer, problems: Sequence[tuple[int, int]]) -> float:
    """Fraction of additions whose greedy three-digit answer is exactly right."""
    prompts = [addition_prompt(a, b) for a, b in problems]
    answers = greedy_answers(model, tokenizer, prompts, ANSWER_DIGITS)
    right = sum(
        answer == addition_answer(a, b) for answer, (a, b) in zip(answers, problems, strict=True)
    )
    return right / len(problems)


@dataclass(frozen=True)
class Skills:
    """The two skills of a model, each a fraction in [0, 1]."""

    text: float  # next-token accuracy on held-out sentences
    addition: float  # exact-match accuracy of greedy answers to held-out additions


def measure_skills(
    model, tokenizer, corpus: Corpus, *, threads: int = 1, split: str = "test"
) -> Skills:
    """Both skills of ``model`` on a held-out split of ``corpus`` (on ``threads`` threads).

    ``split`` is ``"test"`` (what a chapter reports) or ``"validation"`` (what a choice of
    recipe is made on).
    """
    sentences, problems = corpus.held_out(split)
    with torch_threads(threads):
        return Skills(
            text=next_token_accuracy(model, sentence_examples(tokenizer, sentences)),
            addition=addition_accuracy(model, tokenizer, problems),
        )


# ---------------------------------------------------------------------------------------
# Building the three models: base, generalist, maths specialist


@dataclass(frozen=True)
class MiniPearlSettings:
    """Everything that decides the three models: sizes, steps, learning rates, data, seeds.

    The defaults are the **sibling regime**: the base is pre-trained for longer, and it
    saw a little of both
    new skills (``new_word_share`` of its sentences use the new words, ``carry_share`` of
    the carry problems are in its data), so it half-knows them; the fine-tunes are gentle
    and sharpen those skills rather than create them. `FAR_SETTINGS` is the contrast.

    ``seed`` decides the data, the initial weights and the order of the batches;
    ``init_seed``, when given, decides the initial weights alone, so that two bases can be
    trained from different starting points on the very same data.
    """

    shape: ModelShape = ModelShape()
    pretrain_steps: int = 1500
    pretrain_learning_rate: float = 3e-3
    generalist_steps: int = 300
    math_steps: int = 600
    finetune_learning_rate: float = 5e-4
    batch_size: int = 32
    new_word_share: float = 0.01
    carry_share: float = 0.15
    seed: int = 0
    init_seed: int | None = None
    threads: int = 1

    def corpus(self) -> Corpus:
        """The corpus these settings train and measure on."""
        return make_corpus(
            seed=self.seed, new_word_share=self.new_word_share, carry_share=self.carry_share
        )


SIBLING_SETTINGS = MiniPearlSettings()
"""The default regime: gentle fine-tunes that sharpen skills their base already has a little of."""

FAR_SETTINGS = MiniPearlSettings(
    pretrain_steps=700, finetune_learning_rate=1e-3, new_word_share=0.0, carry_share=0.0
)
"""The far regime: a shorter pre-training that never shows the new words or a carry, and
fine-tunes twice as fast, which must create their skills from nothing."""


@dataclass(frozen=True)
class MiniPearl:
    """The folders of the three models and the training losses that made them."""

    base: Path
    generalist: Path
    math: Path
    losses: dict[str, list[float]]
    settings: MiniPearlSettings


def build_mini_pearl(folder: str | Path, settings: MiniPearlSettings | None = None) -> MiniPearl:
    """Pre-train a base, fine-tune a generalist and a maths specialist, save all three.

    Writes Hugging Face model folders ``base``, ``generalist`` and ``math`` under
    ``folder``, in bfloat16 like the real parents of Pearl, each with its tokenizer. Both
    parents are fine-tuned from the base as saved (its bfloat16 weights), as a fine-tune
    starts from a published model.
    """
    settings = settings or MiniPearlSettings()
    folder = Path(folder)
    losses = {"base": pretrain_base(folder / "base", settings)}
    tokenizer = load_tokenizer(folder / "base")
    for parent in PARENTS:
        model, losses[parent] = fine_tune(folder / "base", parent, settings)
        save_model(model, tokenizer, folder / parent)
    return MiniPearl(
        base=folder / "base",
        generalist=folder / "generalist",
        math=folder / "math",
        losses=losses,
        settings=settings,
    )


PARENTS = ("generalist", "math")


def fine_tuning_examples(tokenizer, corpus: Corpus, parent: str) -> Examples:
    """What a parent is fine-tuned on: its new data, and the pre-training mix again.

    The generalist learns from the sentences with all the words, the specialist from all
    the additions. Each also revisits the pre-training mix ("replay"), so that it keeps
    what the base could do.
    """
    if parent == "generalist":
        new = sentence_examples(tokenizer, corpus.train_sentences)
    elif parent == "math":
        new = addition_examples(tokenizer, corpus.train_problems)
    else:
        raise ValueError(f"parent must be one of {PARENTS}, not {parent!r}")
    return concatenate(new, _pretraining_examples(tokenizer, corpus))


def fine_tune(
    base: str | Path,
    parent: str,
    settings: MiniPearlSettings | None = None,
    *,
    learning_rate: float | None = None,
    steps: int | None = None,
):
    """Fine-tune a copy of the saved base into one parent (``"generalist"`` or ``"math"``).

    Returns the model, in float32, and the loss of each step. ``learning_rate`` and
    ``steps`` replace those of ``settings`` (``finetune_learning_rate`` and the parent's
    number of steps), to try gentler or harsher fine-tunes of the same base.
    """
    settings = settings or MiniPearlSettings()
    tokenizer = load_tokenizer(base)
    examples = fine_tuning_examples(tokenizer, settings.corpus(), parent)
    default_steps = settings.generalist_steps if parent == "generalist" else settings.math_steps
    model = load_model(base)
    with torch_threads(settings.threads):
        losses = train(
            model,
            examples,
            steps=default_steps if steps is None else steps,
            learning_rate=(
                settings.finetune_learning_rate if learning_rate is None else learning_rate
            ),
            batch_size=settings.batch_size,
            seed=settings.seed + 1,
        )
    return model, losses


def default_cache_dir() -> Path:
    """Where trained mini-Pearls are kept for later chapters: ``$PEARL_EDU_CACHE/mini-pearl``.

    ``PEARL_EDU_CACHE`` defaults to ``~/.cache/pearl-edu``.
    """
    root = os.environ.get("PEARL_EDU_CACHE") or Path.home() / ".cache" / "pearl-edu"
    return Path(root) / "mini-pearl"


def _cached(folder: str | Path | None, key: str, build) -> Path:
    """The folder of a build named by ``key``, built by ``build(scratch)`` the first time.

    The name also covers this module's source, so a change to it builds anew; the folder
    appears only when complete.
    """
    folder = Path(folder) if folder is not None else default_cache_dir()
    fingerprint = hashlib.sha256(key.encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    target = folder / fingerprint
    if not (target / "losses.json").is_file():
        scratch = folder / f".{fingerprint}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        losses = build(scratch)
        (scratch / "losses.json").write_text(json.dumps(losses))
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    return target


def load_or_build_mini_pearl(
    folder: str | Path | None = None, settings: MiniPearlSettings | None = None
) -> MiniPearl:
    """The mini-Pearl of ``settings``, trained once and then read back from ``folder``.

    Each build lives in a subfolder named after the settings and this module's source, so a
    change to either trains anew; the subfolder appears only when complete.
    """
    settings = settings or MiniPearlSettings()
    target = _cached(
        folder, repr(settings), lambda scratch: build_mini_pearl(scratch, settings).losses
    )
    return MiniPearl(
        base=target / "base",
        generalist=target / "generalist",
        math=target / "math",
        losses=json.loads((target / "losses.json").read_text()),
        settings=settings,
    )


def pretrain_base(folder: str | Path, settings: MiniPearlSettings | None = None) -> list[float]:
    """Pre-train the base of ``settings`` alone and save it in ``folder``; return its losses."""
    settings = settings or MiniPearlSettings()
    tokenizer = build_tokenizer()
    mixed = _pretraining_examples(tokenizer, settings.corpus())
    with torch_threads(settings.threads):
        model, losses = _pretrained(tokenizer, settings, mixed)
    save_model(model, tokenizer, folder)
    return losses


def load_or_pretrain_base(
    folder: str | Path | None = None, settings: MiniPearlSettings | None = None
) -> Path:
    """The folder of the base of ``settings``, pre-trained once and then read back.

    The same base as `load_or_build_mini_pearl`'s, without the two fine-tunes: for
    comparing bases pre-trained from different initial weights (``init_seed``).
    """
    settings = settings or MiniPearlSettings()
    target = _cached(
        folder,
        "base only " + repr(settings),
        lambda scratch: {"base": pretrain_base(scratch / "base", settings)},
    )
    return target / "base"


def _pretraining_examples(tokenizer, corpus: Corpus) -> Examples:
    """The pre-training mix: sentences and additions together."""
    return concatenate(
        sentence_examples(tokenizer, corpus.pretrain_sentences),
        addition_examples(tokenizer, corpus.pretrain_problems),
    )


def _pretrained(tokenizer, settings: MiniPearlSettings, mixed: Examples):
    """A new model pre-trained on ``mixed``, and the loss of each step."""
    init_seed = settings.seed if settings.init_seed is None else settings.init_seed
    model = new_model(tokenizer, settings.shape, seed=init_seed)
    losses = train(
        model,
        mixed,
        steps=settings.pretrain_steps,
        learning_rate=settings.pretrain_learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    return model, losses


def save_model(model, tokenizer, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save ``model`` and ``tokenizer`` as a Hugging Face folder, weights in ``dtype``."""
    folder = Path(folder)
    original = next(model.parameters()).dtype
    with quiet_transformers():
        model.to(dtype).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    model.to(original)
    return folder


def load_model(folder: str | Path):
    """Load a model folder with `transformers`, in float32 for evaluation."""
    transformers = _transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder}: no config.json; expected a Hugging Face model")
    with quiet_transformers():
        model = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def load_tokenizer(folder: str | Path):
    """Load the tokenizer saved in a model folder."""
    return _transformers().PreTrainedTokenizerFast.from_pretrained(Path(folder))


# ---------------------------------------------------------------------------------------
# Merging the parents


def scaled_pearl_recipe(base: str | Path, other: str | Path, num_layers: int) -> str:
    """Pearl-7B-slerp's recipe with its two models and its 32 layers replaced.

    ``base`` takes OmniBeagle's place (``t = 0``), ``other`` WizardMath's; see
    `pearl_edu.recipes.pearl_recipe`.
    """
    return pearl_recipe(base, other, num_layers=num_layers)


def uniform_recipe(base: str | Path, other: str | Path, num_layers: int, t: float) -> str:
    """The same merge with one ``t`` for every tensor."""
    recipe = yaml.safe_load(scaled_pearl_recipe(base, other, num_layers))
    recipe["parameters"] = {"t": float(t)}
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a small model folder, in their stored dtype."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"model folder {folder}: no *.safetensors weight files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def interpolate_weights(
    base: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    t: float,
    method: Literal["slerp", "lerp"] = "slerp",
) -> dict[str, torch.Tensor]:
    """Every tensor interpolated with one ``t``, in memory, with `pearl_edu`'s math.

    The same arithmetic as `pearl_edu.merge` with ``parameters: {t: ...}``, without
    writing a folder: quick enough to sweep ``t`` on small models.
    """
    interpolate = slerp if method == "slerp" else lerp
    return {name: interpolate(base[name], other[name], t) for name in base}


def along_task_vector(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    r"""The base plus a fraction of one fine-tuning's change, in float32.

    $$ \theta(s) = \theta_{\text{base}} + s\,(\theta_{\text{tuned}} - \theta_{\text{base}}) $$
    """
    return {
        name: base[name].float() + scale * (tuned[name].float() - base[name].float())
        for name in base
    }


def relative_move(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> float:
    r"""How far a fine-tune moved, as the norm of its task vector over the base's norm.

    All tensors are taken together as one long vector:

    $$ \frac{\lVert \theta_{\text{tuned}} - \theta_{\text{base}} \rVert}
             {\lVert \theta_{\text{base}} \rVert} $$
    """
    moved = sum((tuned[name].double() - base[name].double()).pow(2).sum() for name in base)
    size = sum(tensor.double().pow(2).sum() for tensor in base.values())
    return math.sqrt(float(moved) / float(size))


def share_of_gain(model: Skills, base: Skills, parent: Skills, skill: str) -> float:
    r"""The share of a parent's gain over the base, on one skill, that ``model`` keeps.

    $$ \frac{s_{\text{model}} - s_{\text{base}}}{s_{\text{parent}} - s_{\text{base}}} $$

    1 keeps the whole gain, 0 none of it; a negative share is a loss below the base.
    """
    gain = getattr(parent, skill) - getattr(base, skill)
    if gain <= 0:
        raise ValueError(f"the parent gained nothing on {skill} ({gain:+.3f}): no share to take")
    return (getattr(model, skill) - getattr(base, skill)) / gain


def model_from_weights(folder: str | Path, weights: dict[str, torch.Tensor]):
    """The model of ``folder``'s architecture with ``weights`` loaded, in float32."""
    model = load_model(folder)
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    return model


def tensor_cosines(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
) -> dict[str, float]:
    r"""The cosine between the two versions of every tensor, each taken as one flat vector.

    $$ \cos\theta = \frac{\langle a, b \rangle}{\lVert a \rVert\, \lVert b \rVert} $$
    """
    cosines = {}
    for name, a in first.items():
        x = a.reshape(-1).double()
        y = second[name].reshape(-1).double()
        cosines[name] = (x @ y / (x.norm() * y.norm())).item()
    return cosines


def takes_linear_fallback(cosine: float) -> bool:
    """Whether SLERP falls back to linear interpolation for a pair at this cosine."""
    return abs(cosine) > DOT_THRESHOLD


def angle_degrees(cosine: float) -> float:
    """The angle, in degrees, whose cosine is ``cosine``."""
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
