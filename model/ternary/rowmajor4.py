"""The plain kernel layout ``rowmajor4`` and the :class:`Layout` record every layout module builds on.

``rowmajor4``: ``uint8[M, K/4]``, four 2-bit codes ``c = q + 1`` per byte,
``code(m, k) = (W[m, k // 4] >> 2·(k % 4)) & 3``. The registry of all layouts is :data:`model.ternary.layouts.LAYOUTS`.

    python -c "from model.ternary.rowmajor4 import ROWMAJOR4; print(ROWMAJOR4.doc)"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model.ternary.checks import TernaryFormatError, as_array, check_k


@dataclass(frozen=True)
class Layout:
    name: str
    pack: Callable[[np.ndarray], np.ndarray]
    unpack: Callable[[np.ndarray, int], np.ndarray]  # (packed, K) -> int8 codes [M, K]
    doc: str
    row_multiple: int = 1  # M must be a multiple of this (row-tiled layouts)


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = as_array(codes, "codes", np.int8, (2,))
    check_k(codes.shape[1])
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise TernaryFormatError("codes: values outside {-1, 0, +1}")
    return codes


def pack_rowmajor4(codes: np.ndarray) -> np.ndarray:
    c = (_check_codes(codes) + 1).astype(np.uint8).reshape(codes.shape[0], -1, 4)
    return c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6


def unpack_rowmajor4(packed: np.ndarray, k: int) -> np.ndarray:
    packed = as_array(packed, "packed", np.uint8, (2,))
    check_k(k)
    if packed.shape[1] * 4 != k:
        raise TernaryFormatError(f"packed: {packed.shape[1]} bytes per row, but K = {k} needs {k // 4}")
    c = (packed[..., None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    if c.max(initial=0) > 2:
        raise TernaryFormatError("packed: holds the invalid 2-bit code 3")
    return (c.astype(np.int8) - 1).reshape(packed.shape[0], k)


ROWMAJOR4 = Layout("rowmajor4", pack_rowmajor4, unpack_rowmajor4, "uint8[M, K/4], code k at bits 2·(k%4)")
