"""Tests of the mini-Pearl machinery: data, tokenizer, models, training, metrics, merging.

Every test trains for a handful of steps at most, so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import yaml

import pearl_edu
from pearl_edu.errors import ModelError
from pearl_edu.teaching import minipearl
from pearl_edu.ulp import same_bits

TINY = minipearl.ModelShape(
    num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
)
FEW_STEPS = minipearl.MiniPearlSettings(
    shape=TINY, pretrain_steps=4, generalist_steps=3, math_steps=3, batch_size=8
)


@pytest.fixture(scope="module")
def tokenizer():
    return minipearl.build_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return minipearl.build_mini_pearl(tmp_path_factory.mktemp("mini"), FEW_STEPS)


class FixedAnswers(torch.nn.Module):
    """A stand-in model whose next token is always the same function of the position."""

    def __init__(self, vocab_size: int, choose) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.choose = choose

    def forward(self, input_ids: torch.Tensor):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row in range(input_ids.shape[0]):
            for column in range(input_ids.shape[1]):
                logits[row, column, self.choose(input_ids[row, : column + 1])] = 1.0
        return type("Output", (), {"logits": logits})()


# --- data -------------------------------------------------------------------------------


def test_sentences_follow_the_agreement_rule():
    rng = random.Random(1)
    for _ in range(200):
        sentence = minipearl.make_sentence(rng)
        assert sentence.endswith(".")
        words = sentence.removesuffix(".").split()
        position = 2 if words[1] in minipearl.ADJECTIVES else 1
        noun, verb = words[position], words[position + 1]
        plural = noun not in minipearl.NOUNS
        assert noun.removesuffix("s") in minipearl.NOUNS
        assert words[0] in (
            minipearl.PLURAL_DETERMINERS if plural else minipearl.SINGULAR_DETERMINERS
        )
        assert verb.endswith("s") != plural  # "the cat sees", "two cats see"


def test_basic_sentences_use_only_basic_words():
    rng = random.Random(0)
    allowed = set(minipearl.BASIC_WORDS.nouns) | set(minipearl.BASIC_WORDS.adjectives)
    allowed |= set(minipearl.BASIC_WORDS.verbs) | {"the", "a", "one", "some", "two"}
    for _ in range(100):
        sentence = minipearl.make_sentence(rng, minipearl.BASIC_WORDS)
        for word in sentence.removesuffix(".").split():
            assert word in allowed or word.removesuffix("s") in allowed
        assert not minipearl.uses_new_words(sentence)


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("the cat sees two dogs.", False),
        ("some big cats chase a owl.", False),
        ("the horse sees two dogs.", True),
        ("two lazy cats see a cat.", True),
        ("a cat greets one cat.", True),
    ],
)
def test_uses_new_words(sentence, expected):
    assert minipearl.uses_new_words(sentence) is expected


def test_additions_are_zero_padded():
    assert minipearl.addition_prompt(7, 35) + minipearl.addition_answer(7, 35) == "07+35=042"
    assert minipearl.addition_answer(99, 99) == "198"


@pytest.mark.parametrize(
    ("a", "b", "expected"), [(12, 34, False), (17, 25, True), (50, 50, True), (0, 0, False)]
)
def test_carries(a, b, expected):
    assert minipearl.carries(a, b) is expected


def test_corpus_holds_out_its_tests():
    corpus = minipearl.make_corpus(sentences=300, test_sentences=50, test_problems=40, seed=3)
    assert not set(corpus.test_sentences) & set(corpus.train_sentences)
    assert not set(corpus.test_sentences) & set(corpus.pretrain_sentences)
    assert not set(corpus.test_problems) & set(corpus.train_problems)
    assert not set(corpus.validation_problems) & set(corpus.train_problems)
    assert not set(corpus.validation_sentences) & set(corpus.train_sentences)
    assert len(corpus.validation_problems) == 40 and len(corpus.validation_sentences) == 50
    held_out = len(corpus.test_problems) + len(corpus.validation_problems)
    assert len(corpus.train_problems) + held_out == 100 * 100
    assert set(corpus.pretrain_problems) <= set(corpus.train_problems)
    assert corpus == minipearl.make_corpus(
        sentences=300, test_sentences=50, test_problems=40, seed=3
    )


def test_pretraining_holds_the_shares_of_each_new_skill():
    corpus = minipearl.make_corpus(new_word_share=0.1, carry_share=0.2, seed=1)
    drawn = round(0.1 * len(corpus.pretrain_sentences))  # from all the words
    with_new_words = sum(map(minipearl.uses_new_words, corpus.pretrain_sentences))
    assert 0.8 * drawn <= with_new_words <= drawn
    carry = [p for p in corpus.train_problems if minipearl.carries(*p)]
    seeded = [p for p in corpus.pretrain_problems if minipearl.carries(*p)]
    assert len(seeded) == round(0.2 * len(carry)) and set(seeded) <= set(carry)
    no_carry = [p for p in corpus.train_problems if not minipearl.carries(*p)]
    assert set(no_carry) <= set(corpus.pretrain_problems)


def test_without_shares_pretraining_has_no_new_skill():
    corpus = minipearl.make_corpus(new_word_share=0, carry_share=0, seed=2)
    assert not any(map(minipearl.uses_new_words, corpus.pretrain_sentences))
    assert corpus.pretrain_problems
    assert not any(minipearl.carries(*p) for p in corpus.pretrain_problems)


def test_the_shares_leave_the_other_texts_alone():
    """Regimes differ in pre-training only: the same fine-tuning data and the same tests."""
    seeded = minipearl.make_corpus(seed=4)
    bare = minipearl.make_corpus(new_word_share=0, carry_share=0, seed=4)
    assert seeded.train_sentences == bare.train_sentences
    assert seeded.test_sentences == bare.test_sentences
    assert seeded.train_problems == bare.train_problems
    assert seeded.test_problems == bare.test_problems
    assert seeded.validation_sentences == bare.validation_sentences
    assert seeded.validation_problems == bare.validation_problems
    assert seeded.pretrain_sentences != bare.pretrain_sentences


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_shares_must_be_fractions(share):
    with pytest.raises(ValueError, match="carry_share must lie in"):
        minipearl.make_corpus(carry_share=share)


def test_the_two_regimes():
    siblings, far = minipearl.SIBLING_SETTINGS, minipearl.FAR_SETTINGS
    assert siblings == minipearl.MiniPearlSettings()
    assert siblings.new_word_share > 0 and siblings.carry_share > 0
    assert far.new_word_share == 0 and far.carry_share == 0
    assert far.finetune_learning_rate > siblings.finetune_learning_rate
    assert siblings.corpus() == minipearl.make_corpus(
        seed=0, new_word_share=siblings.new_word_share, carry_share=siblings.carry_share
    )


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trips_text(tokenizer):
    for text in ("two lazy dogs chase the red hen.", "07+35=042"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1  # one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_survives_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = minipearl.load_tokenizer(tmp_path)
    text = "some owls help a cow."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == tokenizer.eos_token_id


def test_encoding_masks_only_the_answer(tokenizer):
    examples = minipearl.addition_examples(tokenizer, [(7, 35), (1, 2)])
    first = examples.input_ids[0].tolist()
    predicted = [tok for tok, m in zip(first, examples.loss_mask[0].tolist(), strict=True) if m]
    assert tokenizer.decode(predicted) == "042</s>"
    assert examples.lengths.tolist() == [11, 11]


def test_sentence_examples_pad_on_the_right(tokenizer):
    examples = minipearl.sentence_examples(tokenizer, ["a cat.", "two big dogs see a cow."])
    assert examples.lengths.tolist() == [8, 25]
    assert examples.input_ids[0, 8:].eq(tokenizer.pad_token_id).all()
    assert examples.loss_mask[0].tolist() == [0] + [1] * 7 + [0] * 17


# --- models and training ----------------------------------------------------------------


def test_training_reduces_the_loss(tokenizer):
    model = minipearl.new_model(tokenizer, TINY, seed=0)
    corpus = minipearl.make_corpus(sentences=200, test_sentences=10, test_problems=10)
    examples = minipearl.sentence_examples(tokenizer, corpus.train_sentences)
    rows = torch.arange(64)
    with torch.no_grad():
        before = minipearl.language_model_loss(model, *examples.rows(rows)).item()
    with minipearl.torch_threads(1):  # a tiny model trains fastest on one thread
        minipearl.train(model, examples, steps=30, learning_rate=1e-2, batch_size=16)
    with torch.no_grad():
        after = minipearl.language_model_loss(model, *examples.rows(rows)).item()
    assert after < 0.8 * before


def test_learning_rate_warms_up_then_decays():
    factors = [minipearl.warmup_then_decay(step, steps=100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))


def test_new_model_leaves_the_global_random_state_alone(tokenizer):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    minipearl.new_model(tokenizer, TINY, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with minipearl.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_build_writes_model_folders_that_transformers_loads(built):
    import transformers

    for folder in (built.base, built.generalist, built.math):
        config = transformers.AutoConfig.from_pretrained(folder)
        assert config.model_type == "mistral" and config.num_hidden_layers == 2
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, transformers.MistralForCausalLM)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert (
            tokenizer.decode(tokenizer("07+35=")["input_ids"], skip_special_tokens=True) == "07+35="
        )
        header = pearl_edu.read_header(folder)
        assert {meta.dtype for meta in header.tensors.values()} == {torch.bfloat16}
    assert [len(built.losses[k]) for k in ("base", "generalist", "math")] == [4, 3, 3]


def test_fine_tunes_start_from_the_base_and_move_away(built):
    base = minipearl.load_weights(built.base)
    generalist = minipearl.load_weights(built.generalist)
    math = minipearl.load_weights(built.math)
    assert base.keys() == generalist.keys() == math.keys()
    assert any(not torch.equal(base[k], generalist[k]) for k in base)
    assert any(not torch.equal(generalist[k], math[k]) for k in base)
    cosines = minipearl.tensor_cosines(base, generalist)
    assert all(c > 0.9 for c in cosines.values())  # a few steps move little


def test_same_seed_gives_the_same_weights(built, tmp_path):
    again = minipearl.build_mini_pearl(tmp_path, FEW_STEPS)
    for name in ("base", "generalist", "math"):
        first = minipearl.load_weights(getattr(built, name))
        second = minipearl.load_weights(getattr(again, name))
        assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.losses == built.losses


def test_another_seed_gives_other_weights(built, tmp_path):
    other = dataclasses.replace(FEW_STEPS, seed=1)
    again = minipearl.build_mini_pearl(tmp_path, other)
    first = minipearl.load_weights(built.base)
    second = minipearl.load_weights(again.base)
    assert not all(torch.equal(first[k], second[k]) for k in first)


def test_init_seed_changes_the_initial_weights_alone(built, tmp_path):
    other = dataclasses.replace(FEW_STEPS, init_seed=7)
    assert other.corpus() == FEW_STEPS.corpus()  # the same data
    pretrain_losses = minipearl.pretrain_base(tmp_path / "base", other)
    first = minipearl.load_weights(built.base)
    second = minipearl.load_weights(tmp_path / "base")
    assert first.keys() == second.keys()
    assert not any(torch.equal(first[k], second[k]) for k in first if first[k].ndim == 2)
    assert len(pretrain_losses) == FEW_STEPS.pretrain_steps


def test_pretrain_base_gives_the_base_of_the_full_build(built, tmp_path):
    losses = minipearl.pretrain_base(tmp_path / "base", FEW_STEPS)
    alone = minipearl.load_weights(tmp_path / "base")
    full = minipearl.load_weights(built.base)
    assert all(torch.equal(alone[k], full[k]) for k in full)
    assert losses == built.losses["base"]


def counted(monkeypatch, name: str) -> list:
    """Wrap ``minipearl.<name>`` so that each call's folder is recorded; return the record."""
    calls = []
    real = getattr(minipearl, name)

    def recording(folder, settings=None):
        calls.append(folder)
        return real(folder, settings)

    monkeypatch.setattr(minipearl, name, recording)
    return calls


def test_load_or_pretrain_base_trains_once(tmp_path, monkeypatch):
    calls = counted(monkeypatch, "pretrain_base")
    first = minipearl.load_or_pretrain_base(tmp_path, FEW_STEPS)
    second = minipearl.load_or_pretrain_base(tmp_path, FEW_STEPS)
    assert len(calls) == 1 and first == second and (first / "config.json").is_file()
    other = minipearl.load_or_pretrain_base(tmp_path, dataclasses.replace(FEW_STEPS, init_seed=3))
    assert other != first and len(calls) == 2
    assert not list(tmp_path.glob(".*.partial"))


def test_fine_tune_makes_the_parents_of_the_build(built):
    for parent in minipearl.PARENTS:
        model, losses = minipearl.fine_tune(built.base, parent, FEW_STEPS)
        saved = minipearl.load_weights(getattr(built, parent))
        tuned = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
        assert all(torch.equal(tuned[k], saved[k]) for k in saved)
        assert losses == built.losses[parent]


def test_fine_tune_takes_another_learning_rate_and_length(built):
    gentle, gentle_losses = minipearl.fine_tune(built.base, "math", FEW_STEPS, steps=2)
    harsh, _ = minipearl.fine_tune(built.base, "math", FEW_STEPS, steps=2, learning_rate=0.1)
    assert len(gentle_losses) == 2
    base = minipearl.load_weights(built.base)

    def moved(model):
        return minipearl.relative_move(base, model.state_dict())

    assert moved(harsh) > 10 * moved(gentle) > 0


def test_fine_tune_names_its_parents(built):
    with pytest.raises(ValueError, match="parent must be one of"):
        minipearl.fine_tune(built.base, "poet", FEW_STEPS)


def test_relative_move():
    base = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}
    tuned = {"a": torch.tensor([3.0, 0.5]), "b": torch.tensor([[0.0, 4.0]])}
    assert minipearl.relative_move(base, tuned) == pytest.approx(0.5 / 5.0)
    assert minipearl.relative_move(base, base) == 0.0


def test_share_of_gain():
    base = minipearl.Skills(text=0.6, addition=0.4)
    parent = minipearl.Skills(text=0.8, addition=0.9)
    merged = minipearl.Skills(text=0.7, addition=0.3)
    assert minipearl.share_of_gain(merged, base, parent, "text") == pytest.approx(0.5)
    assert minipearl.share_of_gain(merged, base, parent, "addition") == pytest.approx(-0.2)
    assert minipearl.share_of_gain(parent, base, parent, "addition") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gained nothing on text"):
        minipearl.share_of_gain(merged, parent, base, "text")


def test_load_model_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        minipearl.load_model(tmp_path)


# --- metrics ----------------------------------------------------------------------------


def test_next_token_accuracy_counts_only_masked_tokens(tokenizer):
    examples = minipearl.sentence_examples(tokenizer, ["ab.", "ba."])
    ids = tokenizer.convert_tokens_to_ids(["a", "b", ".", "</s>"])
    successor = {ids[0]: ids[1], ids[1]: ids[2], ids[2]: ids[3], tokenizer.bos_token_id: ids[0]}
    model = FixedAnswers(len(tokenizer), lambda prefix: successor.get(int(prefix[-1]), 0))
    # "ab." is predicted right at every one of its 4 targets (a, b, ., </s>); of "ba.",
    # only </s> is (after "." comes </s>); the padding is never counted.
    assert minipearl.next_token_accuracy(model, examples) == pytest.approx(5 / 8)


def test_addition_accuracy_is_exact_match(tokenizer):
    problems = [(7, 35), (50, 50), (1, 1)]
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))

    def always_042(prefix: torch.Tensor) -> int:
        written = len(prefix) - 7  # <s> and the six characters of the prompt
        return digits[int("042"[written])] if 0 <= written < 3 else 0

    model = FixedAnswers(len(tokenizer), always_042)
    prompts = [minipearl.addition_prompt(a, b) for a, b in problems]
    assert minipearl.greedy_answers(model, tokenizer, prompts, 3) == ["042"] * 3
    assert minipearl.addition_accuracy(model, tokenizer, problems) == pytest.approx(1 / 3)


def test_measure_skills_of_a_trained_model(built):
    corpus = minipearl.make_corpus(sentences=10, test_sentences=20, test_problems=20)
    skills = minipearl.measure_skills(
        minipearl.load_model(built.base), minipearl.load_tokenizer(built.base), corpus
    )
    assert 0.0 <= skills.text <= 1.0 and 0.0 <= skills.addition <= 1.0


# --- merging ----------------------------------------------------------------------------


def test_scaled_recipe_keeps_pearls_rules(built):
    recipe = yaml.safe_load(minipearl.scaled_pearl_recipe(built.generalist, built.math, 2))
    pearl = yaml.safe_load(pearl_edu.recipe_text())
    assert recipe["parameters"] == pearl["parameters"]
    assert recipe["dtype"] == pearl["dtype"] and recipe["merge_method"] == "slerp"
    assert recipe["base_model"] == str(built.generalist)
    sources = recipe["slices"][0]["sources"]
    assert [s["model"] for s in sources] == [str(built.generalist), str(built.math)]
    assert [s["layer_range"] for s in sources] == [[0, 2], [0, 2]]
    config = pearl_edu.load_config(minipearl.scaled_pearl_recipe(built.generalist, built.math, 2))
    assert config.base_model == str(built.generalist)


def test_in_memory_interpolation_matches_the_merge_engine(built, tmp_path):
    recipe = minipearl.uniform_recipe(built.generalist, built.math, 2, 0.3)
    pearl_edu.merge(recipe, tmp_path / "merged", progress=False)
    merged = minipearl.load_weights(tmp_path / "merged")
    in_memory = minipearl.interpolate_weights(
        minipearl.load_weights(built.generalist), minipearl.load_weights(built.math), 0.3
    )
    assert merged.keys() == in_memory.keys()
    assert all(same_bits(merged[k], in_memory[k]) for k in merged)


def test_interpolation_ends_are_the_parents(built):
    first = minipearl.load_weights(built.generalist)
    second = minipearl.load_weights(built.math)
    for method in ("slerp", "lerp"):
        at_zero = minipearl.interpolate_weights(first, second, 0.0, method)
        at_one = minipearl.interpolate_weights(first, second, 1.0, method)
        assert all(torch.equal(at_zero[k], first[k]) for k in first)
        assert all(torch.allclose(at_one[k].float(), second[k].float(), atol=1e-2) for k in first)


def test_tensor_cosines_and_fallback():
    first = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0])}
    second = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([2.0, 2.0])}
    cosines = minipearl.tensor_cosines(first, second)
    assert cosines == pytest.approx({"a": 0.0, "b": 1.0})
    assert [minipearl.takes_linear_fallback(c) for c in (0.0, 0.9995, 0.99951, -0.9999)] == [
        False,
        False,
        True,
        True,
    ]
    assert minipearl.angle_degrees(0.0) == pytest.approx(90.0)


def test_load_or_build_trains_once_and_then_reads_back(tmp_path, monkeypatch):
    settings = minipearl.MiniPearlSettings(
        pretrain_steps=3, generalist_steps=2, math_steps=2, batch_size=4
    )
    built = counted(monkeypatch, "build_mini_pearl")
    first = minipearl.load_or_build_mini_pearl(tmp_path, settings)
    second = minipearl.load_or_build_mini_pearl(tmp_path, settings)
    assert len(built) == 1
    assert first.base == second.base and second.base.is_dir()
    assert first.losses == second.losses and len(second.losses["base"]) == 3
    assert not list(tmp_path.glob(".*.partial"))
    other = minipearl.MiniPearlSettings(
        pretrain_steps=3, generalist_steps=2, math_steps=2, batch_size=4, seed=1
    )
    assert minipearl.load_or_build_mini_pearl(tmp_path, other).base != first.base
    assert len(built) == 2
