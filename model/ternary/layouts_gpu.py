"""GPU kernel layout ``dp4a``: the 2-bit codes of 16 weights in one int32 word, arranged for ``__dp4a``.

``int32[M, K/16]``; in word ``w`` of row ``m``, the 2 bits at ``8i + 2s`` hold the code of weight
``k = 16w + 4s + i``. So ``(word >> 2s) & 0x03030303`` is four bytes holding the codes {0, 1, 2} of weights
``16w + 4s + 0..3`` — which line up with the activation word ``x4[4w + s]`` (the int8 activations read as int32):
one shift, one AND and one ``dp4a`` per 4 weights, and no activation interleave at all. It is ``rowmajor4`` with the
4×4 (byte, bit-pair) fields of every word transposed: the same size (2 bits a weight), repacked once at build time.
Listed in :data:`model.ternary.layouts.LAYOUTS`.

    python -c "import model.ternary.layouts_gpu as g, numpy as np; print(g.pack_dp4a(np.ones((2, 256), np.int8)).shape)"
"""

from __future__ import annotations

import numpy as np

from model.ternary.checks import TernaryFormatError
from model.ternary.rowmajor4 import Layout, pack_rowmajor4, unpack_rowmajor4


def _transpose_fields(codes: np.ndarray) -> np.ndarray:
    """Swap (i, s) in each group of 16: the field order of ``dp4a`` ↔ that of ``rowmajor4`` (an involution)."""
    m, k = codes.shape
    return np.ascontiguousarray(codes.reshape(m, k // 16, 4, 4).swapaxes(-1, -2).reshape(m, k))


def pack_dp4a(codes: np.ndarray) -> np.ndarray:
    """int8 codes ``[M, K]`` in {-1, 0, 1} → ``int32[M, K/16]`` (little-endian words)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise TernaryFormatError(f"codes: expected [M, K], got shape {codes.shape}")
    return pack_rowmajor4(_transpose_fields(codes)).view("<i4")


def unpack_dp4a(packed: np.ndarray, k: int) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.int32 or packed.ndim != 2:
        raise TernaryFormatError(f"dp4a weights: expected int32[M, K/16], got {packed.dtype}{list(packed.shape)}")
    return _transpose_fields(unpack_rowmajor4(np.ascontiguousarray(packed).astype("<i4").view(np.uint8), k))


def rowmajor4_to_dp4a(w: np.ndarray) -> np.ndarray:
    """``rowmajor4 uint8[M, K/4]`` → ``dp4a int32[M, K/16]``."""
    return pack_dp4a(unpack_rowmajor4(w, w.shape[1] * 4))


DP4A = Layout("dp4a", pack_dp4a, unpack_dp4a, "int32[M, K/16]: bits 8i+2s of word w = code of weight 16w+4s+i")
