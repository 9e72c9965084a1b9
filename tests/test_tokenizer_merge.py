"""Tokenizer merging against mergekit 0.1.5: the output vocabulary, the rows, the files.

Tiny models with different word-level vocabularies (built offline with ``tokenizers``) are
merged from the same YAML by mergekit's Python API and by `pearl_edu.merge`; every tensor
must have the same bits and the written tokenizers the same vocabulary. Where mergekit's
choice depends on the order of a Python set (the models after the base in a union), the
test gives mergekit the config's order, which pearl_edu always takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.tokenizer_build import TokenizerWarning
from pearl_edu.ulp import same_bits

SPECIALS = ["<unk>", "<s>", "</s>"]
BASE_WORDS = [*SPECIALS, "a", "b", "c", "d", "e"]
MATH_WORDS = [*SPECIALS, "c", "a", "x", "y", "b", "z", "w"]
CHAT_WORDS = [*SPECIALS, "e", "y", "q"]
# A BPE vocabulary whose last two tokens lie past its model's vocab_size (8): cut away.
BPE_WORDS = [*SPECIALS, "a", "b", "c", "ab", "abc", "d", "da"]
BPE_MERGES = [("a", "b"), ("ab", "c"), ("d", "a")]
CHATML = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def make_model(
    path: Path,
    words: list[str],
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    chat_template: str | None = None,
    rows: int | None = None,
    merges: list[tuple[str, str]] | None = None,
) -> Path:
    """A tiny model with its own tokenizer: a word-level one, or BPE with ``merges``.

    Its embeddings have one row per word, or ``rows`` (config.json's ``vocab_size``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    make_tiny_model(
        path,
        vocab_size=rows or len(words),
        num_layers=2,
        seed=seed,
        dtype=dtype,
        tie_embeddings=tie,
    )
    vocab = {w: i for i, w in enumerate(words)}
    if merges is None:
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    else:
        tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {
        "base": make_model(root / "base", BASE_WORDS, 1, chat_template=CHATML),
        "math": make_model(root / "math", MATH_WORDS, 2, chat_template=CHATML),
        "chat": make_model(root / "chat", CHAT_WORDS, 3, chat_template=OTHER),
        "tied": make_model(root / "tied", CHAT_WORDS, 4, tie=True),
        "same": make_model(root / "same", BASE_WORDS, 5),
        "base16": make_model(root / "base16", BASE_WORDS, 6, dtype=torch.bfloat16),
        "math16": make_model(root / "math16", MATH_WORDS, 7, dtype=torch.bfloat16),
        "padded": make_model(root / "padded", MATH_WORDS, 8, rows=16),
        "bpe": make_model(root / "bpe", BPE_WORDS, 9, rows=8, merges=BPE_MERGES),
        "notok": make_tiny_model(
            root / "notok", vocab_size=len(BASE_WORDS), num_layers=2, seed=10, dtype=torch.float32
        ),
    }


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_mergekit(config_text: str, out: Path, monkeypatch, copy_tokenizer: bool = True) -> None:
    """mergekit's merge of ``config_text``, its models and tokens taken in pearl_edu's order."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from pearl_edu.config import load_config

    order = load_config(config_text).models()
    found = MergeConfiguration.referenced_models
    base = yaml.safe_load(config_text).get("base_model")

    def in_config_order(self):
        refs = sorted(found(self), key=lambda ref: order.index(ref.model.path))
        return sorted(refs, key=lambda ref: ref.model.path != base)

    monkeypatch.setattr(MergeConfiguration, "referenced_models", in_config_order)
    # A vocabulary's get_vocab() comes from a hash map, in an order that changes from run to
    # run; mergekit's union takes its tokens in that order, pearl_edu in the order of ids.
    backend = TokenizersBackend.get_vocab
    monkeypatch.setattr(
        TokenizersBackend,
        "get_vocab",
        lambda self: dict(sorted(backend(self).items(), key=lambda kv: kv[1])),
    )
    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    options = MergeOptions(copy_tokenizer=copy_tokenizer, quiet=True, lazy_unpickle=False)
    run_merge(config, str(out), options=options)


def run_both(config_text: str, tmp_path: Path, monkeypatch, **kwargs) -> tuple[Path, Path]:
    with monkeypatch.context() as patched:
        run_mergekit(config_text, tmp_path / "mergekit", patched, **kwargs)
    merge(config_text, tmp_path / "pearl", device="cpu", progress=False, **kwargs)
    return tmp_path / "pearl", tmp_path / "mergekit"


def vocabulary(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def assert_same_merge(ours: Path, theirs: Path) -> None:
    """Every tensor bit for bit, the tokenizer's vocabulary and config.json's vocab_size."""
    mine, reference = load_state_dict(ours), load_state_dict(theirs)
    assert sorted(mine) == sorted(reference)
    for name, tensor in mine.items():
        assert tensor.dtype == reference[name].dtype, name
        assert tensor.shape == reference[name].shape, name
        assert same_bits(tensor, reference[name]), f"{name} differs from mergekit's"
    assert vocabulary(ours) == vocabulary(theirs)
    sizes = [json.loads((f / "config.json").read_text())["vocab_size"] for f in (ours, theirs)]
    assert sizes[0] == sizes[1]


def linear(zoo, *names: str, base: str = "base", extra: str = "") -> str:
    models = "".join(
        f"  - model: {zoo[n]}\n    parameters: {{weight: 0.{i + 3}}}\n" for i, n in enumerate(names)
    )
    return f"merge_method: linear\nbase_model: {zoo[base]}\nmodels:\n{models}{extra}"


# --- the output vocabulary and the rows: identical to mergekit -----------------------------


def test_union_of_two_vocabularies(zoo, tmp_path, monkeypatch):
    ours, theirs = run_both(
        linear(zoo, "base", "math", extra="tokenizer_source: union\n"), tmp_path, monkeypatch
    )
    assert_same_merge(ours, theirs)
    words = vocabulary(ours)
    assert set(words) == set(BASE_WORDS) | set(MATH_WORDS)
    embed = load_state_dict(ours)["model.embed_tokens.weight"]
    assert embed.shape[0] == len(words)


def test_union_of_three_with_the_base_left_out_of_the_models(zoo, tmp_path, monkeypatch):
    # The base is merged too (mergekit adds it); "y" is in math and chat: averaged.
    extra = "tokenizer_source: union\nparameters: {weight: 0.25}\n"
    config = linear(zoo, "math", "chat", extra=extra)
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    assert set(vocabulary(ours)) == set(BASE_WORDS) | set(MATH_WORDS) | set(CHAT_WORDS)


def test_base_vocabulary(zoo, tmp_path, monkeypatch):
    ours, theirs = run_both(
        linear(zoo, "base", "math", "chat", extra="tokenizer_source: base\n"), tmp_path, monkeypatch
    )
    assert_same_merge(ours, theirs)
    assert vocabulary(ours) == vocabulary(zoo["base"])


def test_a_models_vocabulary(zoo, tmp_path, monkeypatch):
    extra = f"tokenizer_source: {zoo['math']}\n"
    ours, theirs = run_both(linear(zoo, "base", "math", extra=extra), tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    assert vocabulary(ours) == vocabulary(zoo["math"])


def test_tokenizer_section_source_model(zoo, tmp_path, monkeypatch):
    extra = f"tokenizer:\n  source: {zoo['chat']}\n"
    ours, theirs = run_both(linear(zoo, "base", "chat", extra=extra), tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    assert vocabulary(ours) == vocabulary(zoo["chat"])


def test_token_overrides_and_padding(zoo, tmp_path, monkeypatch):
    extra = f"""tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    a: {{source: {zoo["math"]}, force: true}}
    x: {{source: {{kind: zero}}}}
    brand_new: {{source: {{kind: model_token, model: {zoo["base"]}, token: d}}}}
    other_new: {{source: {{kind: model_token, model: {zoo["math"]}, token_id: 6}}}}
    e: {{source: {zoo["chat"]}}}
"""
    config = linear(zoo, "base", "math", "chat", extra=extra)
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    words = vocabulary(ours)
    assert {"brand_new", "other_new"} <= set(words)
    embed = load_state_dict(ours)["model.embed_tokens.weight"]
    assert embed.shape[0] % 16 == 0 and embed.shape[0] > len(words)
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == embed.shape[0]


def test_tied_model_joins_the_lm_heads(zoo, tmp_path, monkeypatch):
    extra = "tokenizer_source: union\n"
    ours, theirs = run_both(linear(zoo, "base", "math", "tied", extra=extra), tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    assert "lm_head.weight" in load_state_dict(ours)


def test_bfloat16_in_a_float32_dtype(zoo, tmp_path, monkeypatch):
    extra = "dtype: float32\nout_dtype: bfloat16\ntokenizer:\n  pad_to_multiple_of: 8\n"
    config = linear(zoo, "base16", "math16", base="base16", extra=extra)
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    assert load_state_dict(ours)["lm_head.weight"].dtype == torch.bfloat16


def test_padded_embeddings_and_a_model_without_a_tokenizer(zoo, tmp_path, monkeypatch):
    # padded: 16 rows for 10 tokens; notok has no tokenizer files: taken to be the base's.
    extra = "tokenizer_source: union\n"
    config = linear(zoo, "base", "padded", "notok", extra=extra)
    run_mergekit(config, tmp_path / "mergekit", monkeypatch)
    with pytest.warns(TokenizerWarning, match="cannot load its tokenizer"):
        merge(config, tmp_path / "pearl", device="cpu", progress=False)
    assert_same_merge(tmp_path / "pearl", tmp_path / "mergekit")


def test_base_tokenizer_cut_to_its_vocab_size(zoo, tmp_path, monkeypatch):
    extra = "tokenizer_source: base\n"
    config = linear(zoo, "bpe", "same", base="bpe", extra=extra)
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    assert set(vocabulary(ours)) == set(BPE_WORDS[:8])


def test_slices_align_embeddings_and_lm_head_with_their_own_models(zoo, tmp_path, monkeypatch):
    # The embeddings come from the first slice's models, lm_head from the last slice's.
    base, math, chat = zoo["base"], zoo["math"], zoo["chat"]
    config = f"""merge_method: linear
base_model: {base}
tokenizer_source: union
parameters: {{weight: 0.5}}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 1]}}
      - {{model: {math}, layer_range: [0, 1]}}
  - sources:
      - {{model: {base}, layer_range: [1, 2]}}
      - {{model: {chat}, layer_range: [1, 2]}}
"""
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)


def test_inputs_of_two_dtypes_promote(zoo, tmp_path, monkeypatch):
    config = linear(zoo, "base16", "math", base="base16", extra="tokenizer_source: union\n")
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)


# --- which tokenizer is written ------------------------------------------------------------


def test_no_tokenizer_option_copies_the_donors_files(zoo, tmp_path, monkeypatch):
    config = linear(zoo, "base", "same")
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert_same_merge(ours, theirs)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (ours / name).read_bytes() == (zoo["base"] / name).read_bytes(), name
        assert (theirs / name).read_bytes() == (ours / name).read_bytes(), name


def test_no_copy_tokenizer_still_writes_a_built_tokenizer(zoo, tmp_path, monkeypatch):
    config = linear(zoo, "base", "math", extra="tokenizer_source: base\n")
    ours, theirs = run_both(config, tmp_path, monkeypatch, copy_tokenizer=False)
    assert (ours / "tokenizer.json").is_file() and (theirs / "tokenizer.json").is_file()
    assert vocabulary(ours) == vocabulary(theirs) == vocabulary(zoo["base"])


# --- chat templates --------------------------------------------------------------------------


def rendered(folder: Path) -> str:
    from transformers import AutoTokenizer

    conversation = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "exaone"])
def test_named_template_renders_as_mergekits(zoo, tmp_path, monkeypatch, name):
    from importlib import resources

    config = linear(zoo, "base", "math", extra=f"tokenizer_source: union\nchat_template: {name}\n")
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    shipped = resources.files("pearl_edu.data.chat_templates").joinpath(f"{name}.jinja")
    assert (ours / "chat_template.jinja").read_text() == shipped.read_text()
    assert rendered(ours) == rendered(theirs)


def test_auto_template_is_the_most_common(zoo, tmp_path, monkeypatch):
    config = linear(
        zoo, "chat", "math", "base", extra="tokenizer_source: union\nchat_template: auto\n"
    )
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert (ours / "chat_template.jinja").read_text() == CHATML
    assert (theirs / "chat_template.jinja").read_text() == CHATML


def test_jinja_text_without_a_tokenizer_option(zoo, tmp_path, monkeypatch):
    text = "{% for m in messages %}{{ m['content'] }};{% endfor %}"
    config = linear(zoo, "base", "same", extra=f"chat_template: {json.dumps(text)}\n")
    ours, theirs = run_both(config, tmp_path, monkeypatch)
    assert (ours / "chat_template.jinja").read_text() == text
    assert (theirs / "chat_template.jinja").read_text() == text
    assert vocabulary(ours) == vocabulary(theirs)


# --- bad input: one line, nothing written ------------------------------------------------------


def test_token_source_outside_the_merge(zoo, tmp_path):
    extra = f"tokenizer:\n  tokens:\n    new: {{source: {zoo['chat']}}}\n"
    with pytest.raises(
        ConfigError, match=r"tokenizer\.tokens\.new\.source: .* is not a model of this merge"
    ) as err:
        merge(
            linear(zoo, "base", "math", extra=extra), tmp_path / "out", device="cpu", progress=False
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_model_token_missing_from_its_model(zoo, tmp_path):
    extra = f"tokenizer:\n  tokens:\n    new: {{source: {{kind: model_token, model: {zoo['base']}, token: x}}}}\n"
    with pytest.raises(ConfigError, match=r"'x' is not in the tokenizer of"):
        merge(
            linear(zoo, "base", "math", extra=extra), tmp_path / "out", device="cpu", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_missing_token_without_a_source(zoo, tmp_path):
    extra = "tokenizer:\n  tokens:\n    new: {force: true}\n"
    with pytest.raises(ConfigError, match=r"tokenizer\.tokens\.new: needs a source"):
        merge(
            linear(zoo, "base", "math", extra=extra), tmp_path / "out", device="cpu", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_token_source_in_one_line(zoo, tmp_path, capsys):
    from pearl_edu.cli import main
    from pearl_edu.cli_options import EXIT_BAD_INPUT

    config = tmp_path / "config.yml"
    extra = f"tokenizer:\n  tokens:\n    new: {{source: {zoo['chat']}}}\n"
    config.write_text(linear(zoo, "base", "math", extra=extra), encoding="utf-8")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not a model of this merge" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_merges_different_vocabularies(zoo, tmp_path):
    from pearl_edu.cli import main

    config = tmp_path / "config.yml"
    config.write_text(
        linear(zoo, "base", "math", extra="tokenizer_source: union\n"), encoding="utf-8"
    )
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    words = vocabulary(tmp_path / "out")
    assert set(words) == set(BASE_WORDS) | set(MATH_WORDS)
    assert load_state_dict(tmp_path / "out")["lm_head.weight"].shape[0] == len(words)


def test_cli_plans_different_vocabularies_in_the_output_vocabulary(zoo, tmp_path, capsys):
    from pearl_edu.cli import main

    config = tmp_path / "config.yml"
    config.write_text(linear(zoo, "base", "math"), encoding="utf-8")
    assert main(["plan", str(config), "--json"]) != 0  # without an option: shapes differ
    assert "tokenizer_source" in capsys.readouterr().err
    config.write_text(
        linear(zoo, "base", "math", extra="tokenizer_source: union\n"), encoding="utf-8"
    )
    assert main(["plan", str(config), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    tensors = planned["plan"]["tensors"]
    rows = {t["name"]: t["shape"][0] for t in tensors if "embed" in t["name"]}
    assert rows == {"model.embed_tokens.weight": len(set(BASE_WORDS) | set(MATH_WORDS))}


# --- the reader wrapper wraps any reader-like object --------------------------------------------


class DoublingReader:
    """A reader wrapper of the kind an adapter adds: the same header, every tensor doubled."""

    def __init__(self, header) -> None:
        from pearl_edu.reading import ModelReader

        self.header = header
        self.inner = ModelReader(header)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self.inner.read(name) * 2
        if out is None:
            return tensor
        view = out[: tensor.numel() * tensor.element_size()].view(tensor.dtype)
        return view.view(tensor.shape).copy_(tensor)

    def can_map(self, name: str) -> bool:
        return False

    def prefetch(self, name: str) -> None:
        pass

    def close(self) -> None:
        self.inner.close()


class DoublingHeader:
    def __init__(self, header) -> None:
        self.inner = header
        self.tensors, self.config, self.files = header.tensors, header.config, header.files

    def open_reader(self) -> DoublingReader:
        return DoublingReader(self.inner)


def test_alignment_wraps_another_reader_wrapper(zoo):
    from pearl_edu.config import load_config
    from pearl_edu.reading import read_header
    from pearl_edu.tensor_plan import plan
    from pearl_edu.vocabulary import VocabularyAlignment, open_reader

    config = load_config(linear(zoo, "base", "math", "chat", extra="tokenizer_source: union\n"))
    dirs = {ref: Path(ref) for ref in config.models()}
    plain = {ref: read_header(folder) for ref, folder in dirs.items()}
    results = []
    for headers in (plain, {ref: DoublingHeader(h) for ref, h in plain.items()}):
        alignment = VocabularyAlignment(config, headers, dirs)
        alignment.use_plan(plan(config, alignment.headers))
        readers = {ref: open_reader(header) for ref, header in alignment.headers.items()}
        rows = alignment.vocabulary.rows
        for reader in readers.values():
            assert reader.header.tensors["lm_head.weight"].shape[0] == rows
        results.append({ref: r.read("lm_head.weight") for ref, r in readers.items()})
        for reader in readers.values():
            reader.close()
    for ref, tensor in results[0].items():
        assert tensor.shape[0] == rows
        assert torch.equal(results[1][ref], 2 * tensor), ref
