"""SLERP's elementwise passes in compiled C, with torch as the fallback.

`pearl_edu.backends.cpu` spends most of a SLERP in elementwise steps around its sums: the cast
to float32 before each chunk's norm, the normalized products behind the angle's dot
product, and the weighted sum that is the result. torch runs the last two as five or six
passes over memory each (casts, divisions, products, a sum, a cast back); the C loops in
``_kernels.c`` do each step in one, to the same bits: each float32 operation is rounded on
its own, and bfloat16 is rounded to nearest even as torch rounds it. The sums themselves
stay in torch, whose order of additions is mergekit's.

Only contiguous CPU tensors of bfloat16 or float32 qualify. For anything else, when the
library is not built, or when ``PEARL_EDU_KERNELS=0`` was set as this module was imported,
the functions return ``False`` and the caller does the arithmetic with torch.

The library is an optional C extension, built when the package is installed with a C
compiler at hand. It is loaded with ctypes (its functions take raw pointers), so a call
releases the GIL and costs a few microseconds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import torch

VERSION = 2
_POINTER, _SIZE, _FLOAT, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _load() -> ctypes.CDLL | None:
    """The built library, or None when it is missing, disabled or of another version."""
    if os.environ.get("PEARL_EDU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return _open_library()


def _open_library() -> ctypes.CDLL | None:
    """The built library with its functions' signatures, or None when it is missing."""
    try:
        spec = importlib.util.find_spec("pearl_edu._kernels")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
        if library.pearl_kernels_version() != VERSION:
            return None
    except (OSError, AttributeError):
        return None
    for suffix in _SUFFIX.values():
        for name in (f"pearl_weighted_sum_{suffix}", f"pearl_normalized_products_{suffix}"):
            function = getattr(library, name)
            function.argtypes = [_POINTER, _POINTER, _POINTER, _SIZE, _FLOAT, _FLOAT, _INT]
            function.restype = None
    library.pearl_widen_bf16.argtypes = [_POINTER, _POINTER, _SIZE, _INT]
    library.pearl_widen_bf16.restype = None
    return library


_LIBRARY = _load()


def available() -> bool:
    """Whether the compiled loops are loaded (else the math runs in torch alone)."""
    return _LIBRARY is not None


def _suffix(*tensors: torch.Tensor) -> str | None:
    """The kernel suffix for these tensors, or None when they do not qualify."""
    if _LIBRARY is None:
        return None
    first = tensors[0]
    suffix = _SUFFIX.get(first.dtype)
    if suffix is None:
        return None
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
    return suffix


def weighted_sum(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, w0: float, w1: float, *, threads: int = 1
) -> bool:
    """``out = w0 * a + w1 * b`` elementwise, in float32, rounded to ``out``'s dtype.

    ``a``, ``b`` and ``out``: contiguous CPU tensors of one dtype (bfloat16 or float32)
    and one number of elements; ``w0``, ``w1``: float32 values. Returns False, touching
    nothing, when the tensors do not qualify or the library is not loaded.
    """
    suffix = _suffix(a, b, out)
    if suffix is None or not (a.dtype == b.dtype == out.dtype):
        return False
    if not (a.numel() == b.numel() == out.numel()):
        raise ValueError(f"weighted_sum: sizes differ: {a.numel()}, {b.numel()}, {out.numel()}")
    function = getattr(_LIBRARY, f"pearl_weighted_sum_{suffix}")
    function(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), w0, w1, threads)
    return True


def widen(a: torch.Tensor, out: torch.Tensor, *, threads: int = 1) -> bool:
    """``out = a`` for a bfloat16 ``a`` and a float32 ``out`` (an exact cast).

    Both contiguous CPU tensors of as many elements. Returns False, touching nothing, when
    the tensors do not qualify or the library is not loaded.
    """
    if _suffix(a, out) != "bf16" or out.dtype != torch.float32:
        return False
    if a.numel() != out.numel():
        raise ValueError(f"widen: sizes differ: {a.numel()}, {out.numel()}")
    _LIBRARY.pearl_widen_bf16(a.data_ptr(), out.data_ptr(), a.numel(), threads)
    return True


def normalized_products(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    norm_a: float,
    norm_b: float,
    *,
    threads: int = 1,
) -> bool:
    """``out = (a / norm_a) * (b / norm_b)`` elementwise, in float32.

    ``a`` and ``b``: contiguous CPU tensors of one dtype (bfloat16 or float32); ``out``: a
    contiguous float32 CPU tensor of as many elements. Returns False, touching nothing,
    when the tensors do not qualify or the library is not loaded.
    """
    suffix = _suffix(a, b, out)
    if suffix is None or a.dtype != b.dtype or out.dtype != torch.float32:
        return False
    if not (a.numel() == b.numel() == out.numel()):
        raise ValueError(
            f"normalized_products: sizes differ: {a.numel()}, {b.numel()}, {out.numel()}"
        )
    function = getattr(_LIBRARY, f"pearl_normalized_products_{suffix}")
    function(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), norm_a, norm_b, threads)
    return True
