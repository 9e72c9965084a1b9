"""What the plan checks of one output tensor before any weight is read, and its dtypes.

From the config and the inputs' headers alone: the inputs' shapes must agree, a normalized
linear merge's weights must not sum to 0, float8 inputs need a ``dtype`` to compute in;
and the dtype a method returns and the one the tensor is written in follow mergekit's rules.
Each refusal is one line naming the tensor (and the model) it is about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pearl_edu.config import MergeConfig, torch_dtype
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.layout import TensorInfo, TensorInput


def check_shapes(name: str, inputs: Sequence[TensorInput], metas: Sequence[TensorInfo]) -> None:
    """Refuse inputs of different shapes, before any weight is read."""
    first = tuple(metas[0].shape)
    for tensor_input, meta in zip(inputs[1:], metas[1:], strict=True):
        if tuple(meta.shape) != first:
            shape = tuple(meta.shape)
            # Embeddings and lm_head have one row per token: only the rows differing means
            # the vocabularies differ (mergekit 0.1.5 refuses too; older versions cropped).
            vocabulary_only = len(shape) == len(first) and shape[1:] == first[1:]
            hint = (
                "the vocabularies differ; give tokenizer_source (union, base or a model) "
                "so that the rows are aligned to one vocabulary"
                if vocabulary_only and ("embed" in name or "lm_head" in name)
                else "merge only models of the same architecture and size"
            )
            raise ModelError(
                f"{name}: shapes differ: {inputs[0].model} {first} vs "
                f"{tensor_input.model} {shape}; {hint}"
            )


def check_weights(
    config: MergeConfig, name: str, params: Mapping[str, float], inputs: Sequence[Mapping]
) -> None:
    """Refuse a normalized linear merge whose weights sum to 0 (it would divide by 0)."""
    if config.merge_method != "linear" or not params.get("normalize"):
        return
    if sum(values["weight"] for values in inputs) == 0:
        raise ConfigError(
            f"{config.source}: parameters.weight: the weights for tensor {name} sum to 0, and "
            "linear with normalize: true divides by their sum; change a weight or set "
            "normalize: false"
        )


def check_float8(
    config: MergeConfig,
    inputs: Sequence[TensorInput],
    metas: Sequence[TensorInfo],
    input_params: Sequence[Mapping],
) -> None:
    """Refuse float8 inputs to the math when the config gives no ``dtype`` to compute in.

    torch has no arithmetic in float8, and mergekit 0.1.5 computes in the stored dtype when
    ``dtype`` is not set: its linear and TIES then fail inside torch. Here they, and every
    other method, refuse before anything is written, except two that work as in mergekit:
    SLERP (which computes in float32 and gives mergekit's bits on float8 inputs) and a
    passthrough without ``scale``, a copy.
    """
    if config.dtype or config.merge_method == "slerp":
        return
    for tensor_input, meta, values in zip(inputs, metas, input_params, strict=True):
        dtype = meta.dtype
        copy = config.merge_method == "passthrough" and "scale" not in values
        if dtype.is_floating_point and dtype.itemsize == 1 and not copy:
            raise ConfigError(
                f"{config.source}: {tensor_input.model}: tensor {tensor_input.tensor} is "
                f"{str(dtype).removeprefix('torch.')}, and torch cannot compute in float8; set "
                f"'dtype: bfloat16' (or float16, float32) in the config so that "
                f"{config.merge_method} computes in that type"
            )


def result_dtype(config: MergeConfig, metas: Sequence[TensorInfo], base: int) -> torch.dtype:
    """The dtype a method returns: the base's for SLERP, else all inputs' common dtype.

    ramplus_tl and arcee_fusion (`FLOAT32_RESULT`) return at least float32 from two inputs
    or more, as in mergekit.

    Linear, task arithmetic, TIES and DARE promote their inputs to a common dtype before
    the math (bfloat16 and float16 give float32), and return that dtype, as in mergekit.
    With ``dtype`` the inputs are cast to it first (float8 ones too, which torch cannot
    promote).
    """
    if config.dtype:
        dtype = torch_dtype(config.dtype, where=config.source, key="dtype")
    elif config.merge_method == "slerp":
        return metas[base].dtype
    else:
        dtype = metas[0].dtype
        for meta in metas[1:]:
            dtype = torch.promote_types(dtype, meta.dtype)
    if config.merge_method in FLOAT32_RESULT and len(metas) > 1:
        return torch.promote_types(dtype, torch.float32)
    return dtype


# Methods whose result is at least float32 (a float32 mask or factor multiplies the
# inputs), which mergekit writes so unless out_dtype is given, whatever ``dtype`` says.
FLOAT32_RESULT = frozenset({"ramplus_tl", "arcee_fusion"})


def output_dtype(config: MergeConfig, base_dtype: torch.dtype) -> torch.dtype:
    """``out_dtype``, else the config's ``dtype``, else the base tensor's dtype.

    For the methods of `FLOAT32_RESULT`, ``out_dtype``, else ``base_dtype`` (their result's).
    """
    dtype_name = None if config.merge_method in FLOAT32_RESULT else config.dtype
    name = config.out_dtype or dtype_name
    return (
        torch_dtype(name, where=config.source, key="out_dtype" if config.out_dtype else "dtype")
        if name
        else base_dtype
    )
