"""Input checks shared by the ternary formats and references: every bad input gets a clear error, never a crash.

Every public function of :mod:`model.ternary` validates through these helpers, so the messages read the same.
"""

from __future__ import annotations

import numpy as np

QK = 256  # ggml super-block size: every ternary matrix's input dimension is a multiple of it


class TernaryFormatError(ValueError):
    """Raised for malformed ternary data (bad shapes, dtypes, sizes or values)."""


def as_array(x, name: str, dtype, ndims: tuple[int, ...]) -> np.ndarray:
    """Return ``x`` as a C-contiguous numpy array of exactly ``dtype``; reject other dtypes and ranks.

    No silent casts: an int64 array where int8 is expected is a bug in the caller, not something to paper over.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of {np.dtype(dtype).name}, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {x.dtype.name}")
    if x.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise TernaryFormatError(f"{name}: expected a {want} array, got shape {x.shape}")
    return np.ascontiguousarray(x)


def check_k(k: int, name: str = "K") -> None:
    """The input dimension of a ternary matrix must be a positive multiple of 256 (the TQ2_0/TQ1_0 block)."""
    if k <= 0 or k % QK:
        raise TernaryFormatError(f"{name} = {k} must be a positive multiple of {QK} (the TQ2_0/TQ1_0 block size)")


def check_finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise TernaryFormatError(f"{name}: {bad} non-finite value(s) (NaN or inf)")


def check_scale(scale, name: str) -> np.float32:
    """A scale must be a finite, positive float32 (a zero scale would divide by zero in the rescale)."""
    s = np.float32(scale)
    if not np.isfinite(s) or s <= 0:
        raise TernaryFormatError(f"{name} = {scale!r} must be finite and > 0")
    return s
