"""mergekit's own published configs, merged by mergekit 0.1.5 and by pearl_edu.

Every case is a YAML published in mergekit's repository (commit
a6e402884ba9bc30da7f23e8304a35f19485de95 of arcee-ai/mergekit): each ``examples/*.yml``,
the YAML snippets of README.md's "Tokenizer Configuration" and "Chat Template
Configuration" sections, and docs/moe.md's configs. The text is kept as published; only the
model names are replaced, by tiny local stand-ins made here (fine-tuned siblings of a base,
as deep as the YAML's layer ranges need). README snippets that are fragments (a
``tokenizer:`` or ``chat_template:`` block) are appended, as published, to a small linear
merge of the stand-ins, since a fragment alone is not a config.

What the repository does not publish, and so is not a case here: README.md's "Merge
Configuration" and "Parameter Specification" sections list keys without a YAML snippet;
docs/merge_methods.md describes each method without an example config; README.md has no
``base+adapter`` snippet at this commit (the syntax is documented only in
``mergekit/common.py``, ``ModelReference.parse``: ``<MODEL_PATH>(+<LORA_PATH>)?``), so
the LoRA case takes examples/linear.yml and names one model ``base+adapter``.

Each case runs mergekit in-process and pearl_edu on the same text; every output tensor
must have the same bits (`pearl_edu.ulp.same_bits`), and the written vocabulary and chat
template where the snippet is about them. mergekit-moe's ``random`` gates are draws, so
there the properties that do not depend on the draw are checked. A published snippet that
mergekit itself refuses is tested to be refused by both.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.engine import merge
from pearl_edu.errors import ConfigError
from pearl_edu.moe import build_moe
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

MERGEKIT_COMMIT = "a6e402884ba9bc30da7f23e8304a35f19485de95"

# Llama-2-13B's stand-ins: 40 layers (the examples' layer ranges reach 40), hidden size 16.
LLAMA_SHAPE = {
    "arch": "llama",
    "num_layers": 40,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_heads": 4,
    "num_kv_heads": 4,
    "vocab_size": 32,
}
MISTRAL_SHAPE = {
    "num_layers": 2,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 128,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Model references are local folders; make sure nothing tries the Hub instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def localize(text: str, names: dict[str, Path | str]) -> str:
    """``text`` with each model name that is a YAML value replaced by its stand-in's path.

    Only values (after ``: ``, quoted or not) are replaced: a name inside a prompt stays.
    """
    replaced = 0
    for name in sorted(names, key=len, reverse=True):
        pattern = r'(?:(?<=: )|(?<=: "))' + re.escape(name) + r'(?=["\s]|$)'
        path = str(names[name])
        text, count = re.subn(pattern, lambda _, path=path: path, text)
        replaced += count
    assert replaced, "no model name of the published text was replaced"
    return text


def family(root: Path, base_name: str, siblings: list[str], shape: dict, dtype) -> dict:
    """A base model and fine-tuned siblings of it, keyed by the published names."""
    base = make_tiny_model(root / "base", seed=1, dtype=dtype, **shape)
    models: dict[str, Path | str] = {base_name: base}
    for seed, name in enumerate(siblings, start=2):
        models[name] = make_tiny_model(
            root / f"m{seed}", base=base, noise=0.5, seed=seed, dtype=dtype
        )
    return models


@pytest.fixture(scope="module")
def llama13(tmp_path_factory) -> dict:
    return family(
        tmp_path_factory.mktemp("llama13"),
        "TheBloke/Llama-2-13B-fp16",
        [
            "psmathur/orca_mini_v3_13b",
            "garage-bAInd/Platypus2-13B",
            "WizardLM/WizardLM-13B-V1.2",
            "WizardLM/WizardMath-13B-V1.0",
        ],
        LLAMA_SHAPE,
        torch.float16,
    )


@pytest.fixture(scope="module")
def mistral7(tmp_path_factory) -> dict:
    return family(
        tmp_path_factory.mktemp("mistral7"),
        "mistralai/Mistral-7B-v0.1",
        ["mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B", "model_a", "model_b"],
        MISTRAL_SHAPE,
        torch.bfloat16,
    )


def run_mergekit(text: str, out: Path, **options) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    settings = {"copy_tokenizer": False, "quiet": True, "lazy_unpickle": False}
    settings.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(config, str(out), options=MergeOptions(**settings))


def run_both(text: str, tmp_path: Path, **options) -> tuple[dict, dict]:
    run_mergekit(text, tmp_path / "mergekit", **options)
    merge(text, tmp_path / "pearl", device="cpu", progress=False, copy_tokenizer=False)
    return load_state_dict(tmp_path / "pearl"), load_state_dict(tmp_path / "mergekit")


def assert_identical(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert tensor.shape == theirs[name].shape, name
        assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"


def layers(state: dict) -> int:
    return len({name.split(".")[2] for name in state if name.startswith("model.layers.")})


# --- examples/*.yml -------------------------------------------------------------------------

# examples/arcee_fusion.yml
ARCEE_FUSION = """\
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
"""

# examples/bio-merge.yml
BIO_MERGE = """\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""

# examples/gradient-slerp.yml
GRADIENT_SLERP = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

# examples/linear.yml
LINEAR = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

# examples/orcamini-platy-44layer.yml
ORCAMINI_PLATY_44LAYER = """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""

# examples/ties.yml
TIES = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_examples_arcee_fusion(mistral7, tmp_path):
    # Under a million entries per tensor, mergekit's arcee_fusion draws nothing.
    ours, theirs = run_both(localize(ARCEE_FUSION, mistral7), tmp_path)
    assert_identical(ours, theirs)
    # The fusion takes some of model_b's changes into model_a, not all of them.
    name = "model.layers.1.mlp.up_proj.weight"
    a, b = (load_state_dict(mistral7[m])[name] for m in ("model_a", "model_b"))
    assert not same_bits(ours[name].to(a.dtype), a) and not same_bits(ours[name].to(b.dtype), b)


def test_examples_bio_merge(mistral7, tmp_path):
    ours, theirs = run_both(localize(BIO_MERGE, mistral7), tmp_path)
    assert_identical(ours, theirs)
    assert ours["lm_head.weight"].dtype == torch.float16


def test_examples_gradient_slerp(llama13, tmp_path):
    ours, theirs = run_both(localize(GRADIENT_SLERP, llama13), tmp_path)
    assert_identical(ours, theirs)
    assert layers(ours) == 40
    # t is 0 at the first layer's attention: the base model's (orca's) tensor, exactly.
    orca = load_state_dict(llama13["psmathur/orca_mini_v3_13b"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert same_bits(ours[q], orca[q])


def test_examples_gradient_slerp_in_its_models_syntax(llama13, tmp_path):
    # The file's commented alternative, "the equivalent models: syntax", in place of slices.
    start = GRADIENT_SLERP.index("slices:")
    end = GRADIENT_SLERP.index("# or, the equivalent")
    text = GRADIENT_SLERP[:start] + GRADIENT_SLERP[end:]
    text = text.replace("# models:", "models:").replace("#   - model:", "  - model:")
    assert yaml.safe_load(text)["models"] and "slices" not in yaml.safe_load(text)
    ours, theirs = run_both(localize(text, llama13), tmp_path)
    assert_identical(ours, theirs)
    merge(localize(GRADIENT_SLERP, llama13), tmp_path / "slices", device="cpu", progress=False)
    assert_identical(ours, load_state_dict(tmp_path / "slices"))  # equivalent indeed


def test_examples_linear(llama13, tmp_path):
    ours, theirs = run_both(localize(LINEAR, llama13), tmp_path)
    assert_identical(ours, theirs)
    assert layers(ours) == 40


def test_examples_orcamini_platy_44layer(llama13, tmp_path):
    ours, theirs = run_both(localize(ORCAMINI_PLATY_44LAYER, llama13), tmp_path)
    assert_identical(ours, theirs)
    assert layers(ours) == 44
    for folder in ("pearl", "mergekit"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["num_hidden_layers"] == 44, folder
    # Output layer 24 is Platypus2's layer 20, copied.
    platypus = load_state_dict(llama13["garage-bAInd/Platypus2-13B"])
    name = "model.layers.{}.mlp.down_proj.weight"
    assert same_bits(ours[name.format(24)], platypus[name.format(20)])


def test_examples_ties(llama13, tmp_path):
    ours, theirs = run_both(localize(TIES, llama13), tmp_path)
    assert_identical(ours, theirs)
    assert layers(ours) == 40


# --- LoRA references: mergekit/common.py's '<MODEL_PATH>(+<LORA_PATH>)?' ------------------


def make_adapter(base: Path, out: Path) -> Path:
    """A PEFT LoRA adapter of ``base`` with non-zero factors, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    settings = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, settings).save_pretrained(out)
    return out


def test_examples_linear_with_a_base_plus_adapter_reference(llama13, tmp_path):
    # examples/linear.yml with its first model named as mergekit's ModelReference reads a
    # LoRA: the base model's path, '+', the adapter's path.
    base = llama13["TheBloke/Llama-2-13B-fp16"]
    adapter = make_adapter(base, tmp_path / "adapter")
    names = {**llama13, "psmathur/orca_mini_v3_13b": f"{base}+{adapter}"}
    text = localize(LINEAR, names)
    ours, theirs = run_both(text, tmp_path, lora_merge_cache=str(tmp_path / "lora-cache"))
    assert_identical(ours, theirs)
    merge(text.replace(f"+{adapter}", ""), tmp_path / "plain", device="cpu", progress=False)
    plain = load_state_dict(tmp_path / "plain")
    q = "model.layers.3.self_attn.q_proj.weight"
    assert not same_bits(plain[q], ours[q])  # the adapter acts on q_proj
    assert same_bits(plain["model.norm.weight"], ours["model.norm.weight"])


# --- README.md, "Tokenizer Configuration" and "Chat Template Configuration" ------------------

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = {
    "host/base": [*SPECIALS, "a", "b", "c", "d"],
    "path/to/chatml/model": [*SPECIALS, "a", "<|im_start|>", "<|im_end|>", "x"],
    "path/to/model": [*SPECIALS, "b", "<|special|>", "<|original_token|>", "<token_name>"],
    "chatml_model": [*SPECIALS, "c", "<|im_start|>", "<|im_end|>", "z"],
    "llama3_model": [*SPECIALS, "d", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ m['content'] }}{% endfor %}"
LLAMA3 = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
TEMPLATES = {"path/to/chatml/model": CHATML, "chatml_model": CHATML, "llama3_model": LLAMA3}


def make_vocab_model(path: Path, words: list[str], seed: int, template: str | None) -> Path:
    """A tiny float32 model with its own word-level tokenizer, one embedding row a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    make_tiny_model(
        path,
        vocab_size=len(words),
        num_layers=1,
        hidden_size=8,
        intermediate_size=16,
        num_heads=2,
        num_kv_heads=1,
        seed=seed,
        dtype=torch.float32,
    )
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocabs")
    return {
        name: make_vocab_model(root / f"v{seed}", words, seed, TEMPLATES.get(name))
        for seed, (name, words) in enumerate(WORDS.items(), start=1)
    }


def host(*names: str) -> str:
    """A linear merge of the stand-ins ``names`` (the first the base) to hold a fragment."""
    models = "".join(f"  - model: {name}\n" for name in names)
    return f"merge_method: linear\nbase_model: {names[0]}\nparameters:\n  weight: 0.5\nmodels:\n{models}"


def run_mergekit_in_config_order(text: str, out: Path, monkeypatch) -> None:
    """mergekit's merge, its models and tokens taken in the config's order.

    Where mergekit's choice depends on the order of a Python set (the models after the base
    in a union) or of a hash map (a vocabulary's ``get_vocab()``), it is given the config's
    order and the order of ids, which pearl_edu always takes (as tests/test_tokenizer_merge.py
    does).
    """
    from mergekit.config import MergeConfiguration
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from pearl_edu.config import load_config

    order = load_config(text).models()
    found = MergeConfiguration.referenced_models
    base = yaml.safe_load(text).get("base_model")

    def in_config_order(self):
        refs = sorted(found(self), key=lambda ref: order.index(ref.model.path))
        return sorted(refs, key=lambda ref: ref.model.path != base)

    backend = TokenizersBackend.get_vocab
    with monkeypatch.context() as patched:
        patched.setattr(MergeConfiguration, "referenced_models", in_config_order)
        patched.setattr(
            TokenizersBackend,
            "get_vocab",
            lambda self: dict(sorted(backend(self).items(), key=lambda kv: kv[1])),
        )
        run_mergekit(text, out, copy_tokenizer=True)


def vocabulary(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def run_both_with_tokenizers(text: str, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    run_mergekit_in_config_order(text, tmp_path / "mergekit", monkeypatch)
    merge(text, tmp_path / "pearl", device="cpu", progress=False)
    ours, theirs = tmp_path / "pearl", tmp_path / "mergekit"
    assert_identical(load_state_dict(ours), load_state_dict(theirs))
    assert vocabulary(ours) == vocabulary(theirs)
    sizes = [json.loads((f / "config.json").read_text())["vocab_size"] for f in (ours, theirs)]
    assert sizes[0] == sizes[1]
    return ours, theirs


# README.md, "Tokenizer Configuration" > "Modern Configuration (tokenizer)"
MODERN_TEMPLATE = """\
tokenizer:
  source: "union"  # or "base" or a specific model path
  tokens:          # Optional: configure specific tokens
    <token_name>:
      source: ...  # Specify embedding source
      force: false # Optional: force this embedding for all models
  pad_to_multiple_of: null  # Optional: pad vocabulary size
"""

# README.md, "Tokenizer Configuration" > "Modern Configuration (tokenizer)" >
# "Token Embedding Handling"
TOKEN_OVERRIDES = """\
tokenizer:
  source: union
  tokens:
    # Use embedding from a specific model
    <|im_start|>:
      source: "path/to/chatml/model"

    # Force a specific embedding for all models
    <|special|>:
      source: "path/to/model"
      force: true

    # Map a token to another model's token embedding
    <|renamed_token|>:
      source:
        kind: "model_token"
        model: "path/to/model"
        token: "<|original_token|>"  # or use token_id: 1234

    # Use a zero embedding
    <|unused|>:
      source:
        kind: "zero"
"""

# README.md, "Tokenizer Configuration" > "Modern Configuration (tokenizer)" >
# "Practical Example"
PRACTICAL_EXAMPLE = """\
tokenizer:
  source: union
  tokens:
    # ChatML tokens
    <|im_start|>:
      source: "chatml_model"
    <|im_end|>:
      source: "chatml_model"

    # Llama 3 tokens - force original embeddings
    <|start_header_id|>:
      source: "llama3_model"
      force: true
    <|end_header_id|>:
      source: "llama3_model"
      force: true
    <|eot_id|>:
      source: "llama3_model"
      force: true
"""

# README.md, "Tokenizer Configuration" > "Legacy Configuration (tokenizer_source)"
LEGACY = """\
tokenizer_source: "union"  # or "base" or a model path
"""

# README.md, "Chat Template Configuration"
CHAT_TEMPLATE = """\
chat_template: "auto"  # or a template name or Jinja2 template
"""


def test_readme_modern_tokenizer_template_as_published_is_refused(vocabs, tmp_path, monkeypatch):
    # As published, the token's `source: ...` is the string '...', read as a model path:
    # mergekit 0.1.5 fails on it, and pearl_edu refuses it in one line.
    text = host("host/base", "path/to/model") + MODERN_TEMPLATE
    text = localize(
        text, {"host/base": vocabs["host/base"], "path/to/model": vocabs["path/to/model"]}
    )
    with pytest.raises(ValueError, match=r"requires a vocabulary weight from model \.\.\."):
        run_mergekit_in_config_order(text, tmp_path / "mergekit", monkeypatch)
    with pytest.raises(
        ConfigError, match=r"tokenizer\.tokens\.<token_name>\.source: \.\.\. "
    ) as err:
        merge(text, tmp_path / "pearl", device="cpu", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pearl").exists()


def test_readme_modern_tokenizer_template_with_a_model_as_the_source(vocabs, tmp_path, monkeypatch):
    # The placeholder `...` replaced by a model's name: that model's row of '<token_name>'.
    template = MODERN_TEMPLATE.replace("source: ...", "source: path/to/model")
    text = host("host/base", "path/to/model") + template
    names = {"host/base": vocabs["host/base"], "path/to/model": vocabs["path/to/model"]}
    ours, _ = run_both_with_tokenizers(localize(text, names), tmp_path, monkeypatch)
    assert "<token_name>" in vocabulary(ours)


def test_readme_modern_tokenizer_template_with_a_source_lacking_the_token(vocabs, tmp_path):
    # A model as a token's source must have the token: mergekit asserts it, pearl_edu
    # refuses it in one line.
    template = MODERN_TEMPLATE.replace("source: ...", "source: path/to/chatml/model")
    text = host("host/base", "path/to/chatml/model") + template
    names = {
        "host/base": vocabs["host/base"],
        "path/to/chatml/model": vocabs["path/to/chatml/model"],
    }
    text = localize(text, names)
    with pytest.raises(AssertionError, match="not found in model"):
        run_mergekit(text, tmp_path / "mergekit", copy_tokenizer=True)
    with pytest.raises(ConfigError, match="has no token '<token_name>'") as err:
        merge(text, tmp_path / "pearl", device="cpu", progress=False)
    assert "<token_name>" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "pearl").exists()


def test_readme_token_overrides(vocabs, tmp_path, monkeypatch):
    text = host("host/base", "path/to/chatml/model", "path/to/model") + TOKEN_OVERRIDES
    ours, _ = run_both_with_tokenizers(localize(text, vocabs), tmp_path, monkeypatch)
    words = vocabulary(ours)
    assert {"<|renamed_token|>", "<|unused|>", "<|special|>", "<|im_start|>"} <= set(words)
    embed = load_state_dict(ours)["model.embed_tokens.weight"]
    assert not embed[words["<|unused|>"]].any()


def test_readme_tokenizer_practical_example(vocabs, tmp_path, monkeypatch):
    text = host("host/base", "chatml_model", "llama3_model") + PRACTICAL_EXAMPLE
    ours, _ = run_both_with_tokenizers(localize(text, vocabs), tmp_path, monkeypatch)
    words = vocabulary(ours)
    assert {"<|im_start|>", "<|im_end|>", "<|eot_id|>", "a", "c", "d"} <= set(words)
    # A forced token takes llama3_model's row in every model: a linear merge returns it.
    embed = load_state_dict(ours)["model.embed_tokens.weight"]
    llama3 = load_state_dict(vocabs["llama3_model"])["model.embed_tokens.weight"]
    row = WORDS["llama3_model"].index("<|eot_id|>")
    assert torch.allclose(embed[words["<|eot_id|>"]], llama3[row], atol=1e-6)


# The comment's alternatives ("base", a model path) as well as the published "union".
@pytest.mark.parametrize("source", ['"union"', '"base"', "path/to/chatml/model"])
def test_readme_legacy_tokenizer_source(vocabs, tmp_path, monkeypatch, source):
    snippet = LEGACY if source == '"union"' else LEGACY.replace('"union"', source)
    text = host("host/base", "path/to/chatml/model") + snippet
    ours, _ = run_both_with_tokenizers(localize(text, vocabs), tmp_path, monkeypatch)
    expected = {
        '"union"': set(WORDS["host/base"]) | set(WORDS["path/to/chatml/model"]),
        '"base"': set(WORDS["host/base"]),
        "path/to/chatml/model": set(WORDS["path/to/chatml/model"]),
    }[source]
    assert set(vocabulary(ours)) == expected


@pytest.mark.parametrize("template", ['"auto"', "alpaca", "chatml", "llama3", "mistral", "exaone"])
def test_readme_chat_template(vocabs, tmp_path, monkeypatch, template):
    # The published "auto", and the built-in names the section lists in its place.
    snippet = CHAT_TEMPLATE if template == '"auto"' else CHAT_TEMPLATE.replace('"auto"', template)
    text = host("host/base", "chatml_model", "path/to/chatml/model", "llama3_model") + snippet
    ours, theirs = run_both_with_tokenizers(localize(text, vocabs), tmp_path, monkeypatch)
    # pearl_edu writes the built-in templates in its own words (pearl_edu.data.chat_templates);
    # they render as mergekit's. "auto" copies the most common model template verbatim.
    assert rendered(ours) == rendered(theirs)
    if template == '"auto"':
        assert (ours / "chat_template.jinja").read_text() == CHATML
        assert (theirs / "chat_template.jinja").read_text() == CHATML


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


# --- docs/moe.md -------------------------------------------------------------------------------

# docs/moe.md, "Configuration"
MOE_CONFIGURATION = """\
base_model: path/to/self_attn_donor
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
## (optional)
# experts_per_token: 2
experts:
  - source_model: expert_model_1
    positive_prompts:
      - "This is a prompt that is demonstrative of what expert_model_1 excels at"
    ## (optional)
    # negative_prompts:
    #   - "This is a prompt expert_model_1 should not be used for"
  - source_model: expert_model_2
  # ... and so on
"""

# docs/moe.md, "Configuration" (shared experts)
MOE_SHARED_EXPERTS = """\
base_model: path/to/self_attn_donor
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
experts:
  ...
shared_experts:
  - source_model: model_name
    positive_prompts: # required by Qwen MoE for "hidden" gate mode, otherwise not allowed
      - "blah blah"
    # (optional, but recommended:)
    residual_scale: 0.1 # downweight output from shared expert to prevent overcooking the model
"""

# docs/moe.md, "Configuration" (architecture)
MOE_ARCHITECTURE = """\
base_model: path/to/self_attn_donor
architecture: qwen
# ... and so on
"""

# docs/moe.md, "Example Configurations": sparse upcycling of smol_llama into a 8x220M MoE
MOE_SMOL_LLAMA = """\
base_model: BEE-spoke-data/smol_llama-220M-GQA
gate_mode: random
dtype: bfloat16
experts:
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
# and then train the sucker!
"""

# docs/moe.md, "Example Configurations": shove some Mistral models in a clown car
MOE_CLOWN_CAR = """\
base_model: NousResearch/Hermes-2-Pro-Mistral-7B
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: NousResearch/Hermes-2-Pro-Mistral-7B
    positive_prompts:
      - "<|im_start|>user\\nHello, who are you?<|im_end|>"
      - "<|im_start|>user\\nI need help with"
  - source_model: BioMistral/BioMistral-7B-DARE
    positive_prompts:
      - "As a doctor of medicine,"
  - source_model: PocketDoc/Dans-AdventurousWinds-7b
    positive_prompts:
      - "[Genres: Science Fiction]\\n[Tags: humor, old school, sci fi]"
      - "> get ye flask"
      - "[Mode: Interactive Storyteller]"
  - source_model: VAGOsolutions/SauerkrautLM-7b-HerO
    positive_prompts:
      - "<|im_start|>user\\nWie geht es dir?<|im_end|>"
      - "Das ist ein Satz auf Deutsch."
"""


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    shape = {**MISTRAL_SHAPE, "with_tokenizer": True}
    donor = make_tiny_model(root / "donor", seed=1, **shape)
    models: dict[str, Path | str] = {"path/to/self_attn_donor": donor}
    names = ["expert_model_1", "expert_model_2", "model_name"]
    names += [
        "BioMistral/BioMistral-7B-DARE",
        "PocketDoc/Dans-AdventurousWinds-7b",
        "VAGOsolutions/SauerkrautLM-7b-HerO",
    ]
    for seed, name in enumerate(names, start=2):
        models[name] = make_tiny_model(root / f"e{seed}", base=donor, noise=0.5, seed=seed)
    models["NousResearch/Hermes-2-Pro-Mistral-7B"] = donor
    llama = {**shape, "arch": "llama", "num_heads": 4, "num_kv_heads": 2}
    models["BEE-spoke-data/smol_llama-220M-GQA"] = make_tiny_model(root / "smol", seed=9, **llama)
    return models


def run_mergekit_moe(text: str, out: Path) -> dict:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    config = MoEMergeConfig.model_validate(yaml.safe_load(text))
    build(config, str(out), MergeOptions(quiet=True, device="cpu"), device="cpu")
    return load_state_dict(out)


def test_moe_configuration_as_published_is_refused(moe_models, tmp_path):
    # gate_mode hidden and expert_model_2 has no positive_prompts: mergekit-moe logs
    # "Expert 1 has no positive prompts." and exits with status 1; pearl_edu refuses it.
    text = localize(MOE_CONFIGURATION, moe_models)
    with pytest.raises(SystemExit) as code:
        run_mergekit_moe(text, tmp_path / "mergekit")
    assert code.value.code == 1
    with pytest.raises(ConfigError, match=r"experts\[1\]\.positive_prompts") as err:
        build_moe(text, tmp_path / "pearl", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pearl").exists()


@pytest.mark.parametrize("snippet", [MOE_SHARED_EXPERTS, MOE_ARCHITECTURE], ids=["shared", "arch"])
def test_moe_fragments_as_published_are_refused(moe_models, tmp_path, snippet):
    # `experts: ...` is the string '...', and the architecture snippet has no experts:
    # mergekit's schema rejects both; so does pearl_edu's, in one line.
    import pydantic

    text = localize(snippet, moe_models)
    with pytest.raises(pydantic.ValidationError):
        run_mergekit_moe(text, tmp_path / "mergekit")
    with pytest.raises(ConfigError, match="experts: expected a list of experts") as err:
        build_moe(text, tmp_path / "pearl", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pearl").exists()


def test_moe_clown_car_is_mergekits(moe_models, tmp_path):
    text = localize(MOE_CLOWN_CAR, moe_models)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit")
    build_moe(text, tmp_path / "pearl", progress=False)
    ours = load_state_dict(tmp_path / "pearl")
    assert_identical(ours, theirs)
    config = (tmp_path / "pearl" / "config.json").read_text()
    assert config == (tmp_path / "mergekit" / "config.json").read_text()
    assert json.loads(config)["num_local_experts"] == 4


def test_moe_smol_llama_sparse_upcycling(moe_models, tmp_path):
    # Random gates: mergekit's draws are its own; everything else must be its bits, and
    # each of the eight experts is smol_llama's own MLP.
    text = localize(MOE_SMOL_LLAMA, moe_models)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit")
    build_moe(text, tmp_path / "pearl", progress=False)
    ours = load_state_dict(tmp_path / "pearl")
    assert sorted(ours) == sorted(theirs)
    routers = [name for name in ours if name.endswith("mlp.gate.weight")]
    assert len(routers) == MISTRAL_SHAPE["num_layers"]
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.dtype == theirs[name].dtype, name
        if name not in routers:
            assert same_bits(tensor, theirs[name]), f"{name} differs from mergekit's"
    for name in routers:
        assert ours[name].shape == (8, MISTRAL_SHAPE["hidden_size"])
        assert torch.isfinite(ours[name].float()).all()
    smol = load_state_dict(moe_models["BEE-spoke-data/smol_llama-220M-GQA"])
    down = ours["model.layers.1.mlp.experts.down_proj"]
    for expert in range(8):
        assert same_bits(down[expert], smol["model.layers.1.mlp.down_proj.weight"])
    config = json.loads((tmp_path / "pearl" / "config.json").read_text())
    assert config == json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
