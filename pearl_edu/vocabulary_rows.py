r"""The rows of one vocabulary tensor moved into the output vocabulary: mergekit's math.

mergekit 0.1.5's ``PermutedVocabulary``, for the tensors of one output tensor (one per
model, one row per token). For output token $i$ and model $m$ with permutation $p_m$
(`pearl_edu.tokenizer_build.OutputVocabulary`):

$$E'_m[i] = E_m[p_m(i)] \quad\text{when } p_m(i) \ge 0 \text{ and } i \text{ is not forced,}$$

and otherwise the token's default row: the row of the only model that has it, else the
base's, else the average $\frac{1}{|M_i|}\sum_{m \in M_i} E_m[p_m(i)]$ over the models
$M_i$ that have it (summed from zero in the plan's order, in the dtype the inputs promote
to); a ``tokenizer.tokens`` entry gives its own source (a model's row of the same token,
a ``model_token``'s row, or zero). Rows past the vocabulary (``pad_to_multiple_of``) are
the mean of the others. `pearl_edu.vocabulary` reads the tensors and hands the results out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pearl_edu.config import MergeConfig
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.tokenizer_build import OutputVocabulary
from pearl_edu.tokenizer_config import TokenEmbedding, TokenSource


def align_rows(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    vocabulary: OutputVocabulary,
    config: MergeConfig,
    base: str | None,
) -> dict[str, torch.Tensor]:
    """Each model's tensor with one row per output token, its missing rows filled.

    ``tensors`` are the inputs of one output tensor, by model, in the plan's order (the
    order the averages add them in). Rows are copied in the dtype the inputs promote to;
    an average is a sum in that dtype, from zero, divided by the count.
    """
    models = list(tensors)
    shapes = {model: tuple(t.shape) for model, t in tensors.items()}
    if len({shape[1:] for shape in shapes.values()}) > 1:
        listed = ", ".join(f"{model} {list(shape)}" for model, shape in shapes.items())
        raise ModelError(f"{name}: shapes differ beyond the vocabulary ({listed})")
    dtype = tensors[models[0]].dtype
    for tensor in tensors.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    row_shape = tensors[models[0]].shape[1:]
    vocab = vocabulary.vocab
    perms = {model: vocabulary.permutations[model] for model in models}
    configs = dict(config.tokenizer.tokens) if config.tokenizer is not None else {}
    averaged = assign_sources(perms, models, vocab, configs, base)

    defaults: dict[str, torch.Tensor] = {}
    for token, token_id in vocab.items():
        entry = configs.get(token)
        forced = entry is not None and entry.force
        if not forced and all(perms[model][token_id] >= 0 for model in models):
            continue
        if token in averaged:
            total = torch.zeros(row_shape, dtype=dtype)
            count = 0
            for model in models:
                row = perms[model][token_id]
                if row >= 0:
                    total = total + tensors[model][row]
                    count += 1
            total /= count
            defaults[token] = total
        elif entry is not None:
            defaults[token] = source_row(token, token_id, entry, tensors, perms, vocabulary, config)

    size = len(vocab)
    forced_tokens = {token for token, entry in configs.items() if entry.force}
    result = {}
    for model in models:
        perm = perms[model]
        aligned = torch.zeros((vocabulary.rows, *row_shape), dtype=dtype)
        own = [
            (token_id, perm[token_id])
            for token, token_id in vocab.items()
            if perm[token_id] >= 0 and token not in forced_tokens
        ]
        if own:
            new_ids, old_ids = (
                torch.tensor(ids, dtype=torch.long) for ids in zip(*own, strict=True)
            )
            aligned[new_ids] = tensors[model][old_ids].to(dtype)
        for token, row in defaults.items():
            if perm[vocab[token]] < 0 or token in forced_tokens:
                aligned[vocab[token]] = row
        if vocabulary.rows > size:
            aligned[size:] = torch.mean(aligned[:size], dim=0)
        result[model] = aligned
    return result


def assign_sources(
    perms: Mapping[str, Sequence[int]],
    models: Sequence[str],
    vocab: Mapping[str, int],
    configs: dict[str, TokenEmbedding],
    base: str | None,
) -> set[str]:
    """Give a source to each token some model lacks; return the tokens to average.

    A token only one model has comes from it; a token none has is zero; a token the base
    has comes from the base; the others are averaged. Tokens named in the config keep
    their entry. ``configs`` is completed in place.
    """
    averaged = set()
    for token, token_id in vocab.items():
        if token in configs:
            continue
        has = [perms[model][token_id] >= 0 for model in models]
        if sum(has) == 1:
            configs[token] = TokenEmbedding(TokenSource("model", model=models[has.index(True)]))
        elif sum(has) == 0:
            configs[token] = TokenEmbedding(TokenSource("zero"))
        elif base is not None and perms[base][token_id] >= 0:
            configs[token] = TokenEmbedding(TokenSource("model", model=base))
        else:
            averaged.add(token)
    return averaged


def source_row(
    token: str,
    token_id: int,
    entry: TokenEmbedding,
    tensors: Mapping[str, torch.Tensor],
    perms: Mapping[str, Sequence[int]],
    vocabulary: OutputVocabulary,
    config: MergeConfig,
) -> torch.Tensor:
    """The row a ``tokens`` entry (or an assigned source) gives ``token``."""
    source = entry.source
    key = f"{config.source}: tokenizer.tokens.{token}"
    if source is None:
        raise ConfigError(
            f"{key}: needs a source (a model, or {{kind: zero}}), as some model lacks it"
        )
    if source.kind == "zero":
        first = next(iter(tensors.values()))
        return first.new_zeros(first.shape[1:])
    if source.model not in tensors:
        raise ConfigError(
            f"{key}.source: {source.model} is not merged into this tensor "
            f"(its models: {', '.join(tensors)})"
        )
    weights = tensors[source.model]
    if source.kind == "model_token":
        row = source.token_id
        if row is None:
            row = vocabulary.original_vocabs[source.model][source.token]
        if not 0 <= row < weights.shape[0]:
            raise ConfigError(
                f"{key}.source.token_id: {row} is past {source.model}'s {weights.shape[0]} rows"
            )
        return weights[row]
    row = perms[source.model][token_id]
    if row < 0:
        raise ConfigError(f"{key}.source: {source.model} has no token {token!r}")
    return weights[row]
