"""The number-token specialist of chapter 14: its tokenizer, its grown rows, its cache."""

from __future__ import annotations

import torch

from pearl_edu.teaching import minipearl, numbertokens


def test_the_number_tokenizer_adds_200_tokens_after_the_characters():
    characters = minipearl.build_tokenizer()
    numbers = numbertokens.build_number_tokenizer()
    assert len(numbers) == len(characters) + 200
    vocab = numbers.get_vocab()
    assert all(vocab[token] == index for token, index in characters.get_vocab().items())
    assert [vocab[t] for t in numbertokens.NUMBER_TOKENS] == list(range(44, 244))
    ids = numbers("07+35=042")["input_ids"]
    assert numbers.convert_ids_to_tokens(ids) == ["<s>", "07+", "35=", "0", "4", "2"]
    assert numbers.decode(ids, skip_special_tokens=True) == "07+35=042"
    sentence = "the cat sees two dogs."
    assert numbers(sentence)["input_ids"] == characters(sentence)["input_ids"]


def test_grown_rows_are_the_means_of_their_characters():
    characters = minipearl.build_tokenizer()
    numbers = numbertokens.build_number_tokenizer()
    model = minipearl.new_model(characters, minipearl.ModelShape(num_layers=1), seed=0)
    embed = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    numbertokens.grow_vocabulary(model, numbers)
    vocab = numbers.get_vocab()
    grown_embed = model.get_input_embeddings().weight
    grown_head = model.get_output_embeddings().weight
    assert grown_embed.shape[0] == grown_head.shape[0] == 244
    assert torch.equal(grown_embed[:44], embed) and torch.equal(grown_head[:44], head)
    rows = [vocab[c] for c in "07+"]
    assert torch.allclose(grown_embed[vocab["07+"]], embed[rows].mean(dim=0))
    assert torch.allclose(grown_head[vocab["07+"]], head[rows].mean(dim=0))


def test_the_cache_key_covers_the_kind_and_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("PEARL_EDU_CACHE", str(tmp_path))
    built = []

    def build(scratch):
        scratch.mkdir(parents=True)
        built.append(scratch)
        return [1.0]

    mini = minipearl.MiniPearl(tmp_path, tmp_path, tmp_path, {}, minipearl.SIBLING_SETTINGS)
    first = numbertokens._cached("numbers", mini, build)
    again = numbertokens._cached("numbers", mini, build)
    other = numbertokens._cached("characters", mini, build)
    assert first == again != other and len(built) == 2
    assert first.parent == tmp_path / "number-specialist"
    assert numbertokens.losses(first) == [1.0]
