"""x86 kernel layouts: row tiles of the 2-bit codes stored contiguously, so a row-tile GEMV reads ONE linear stream.

``tile{R}`` (R ∈ {4, 8, 16}): ``uint8[M/R, K/256, R, 64]`` with ``T[mo, c, mi, b] = rowmajor4[mo·R + mi, 64c + b]``
— the 64 packed bytes (256 codes) of each of the R rows of a tile, chunk after chunk. The ``rowmajor4`` GEMV with
``rows=R`` reads the same bytes as R streams 4·K/… bytes apart; with ``tile{R}`` the hardware prefetcher sees one
sequential stream per thread, which is what keeps a DRAM-resident GEMV near the read bandwidth. Listed in
:data:`model.ternary.layouts.LAYOUTS` (``pack`` takes int8 codes ``[M, K]``, ``unpack`` inverts it).

    python -c "from model.ternary.layouts_x86 import TILE_LAYOUTS; print([t.name for t in TILE_LAYOUTS])"
"""

from __future__ import annotations

import numpy as np

from model.ternary.checks import TernaryFormatError
from model.ternary.rowmajor4 import Layout, pack_rowmajor4, unpack_rowmajor4

TILES = (4, 8, 16)


def tile_rowmajor4(w: np.ndarray, rows: int) -> np.ndarray:
    """``rowmajor4 uint8[M, K/4]`` → ``tile{rows} uint8[M/rows, K/256, rows, 64]`` (M must be a multiple of rows)."""
    m, kb = w.shape
    if m % rows or kb % 64:
        raise TernaryFormatError(f"tile{rows}: M = {m} must be a multiple of {rows} and K/4 = {kb} of 64")
    return np.ascontiguousarray(w.reshape(m // rows, rows, kb // 64, 64).transpose(0, 2, 1, 3))


def untile_rowmajor4(t: np.ndarray) -> np.ndarray:
    """Inverse of :func:`tile_rowmajor4`."""
    mo, c, r, b = t.shape
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3).reshape(mo * r, c * b))


def _layout(rows: int) -> Layout:
    return Layout(
        f"tile{rows}",
        lambda codes: tile_rowmajor4(pack_rowmajor4(codes), rows),
        lambda packed, k: unpack_rowmajor4(untile_rowmajor4(packed), k),
        f"uint8[M/{rows}, K/256, {rows}, 64]: rowmajor4 row tiles of {rows}, one linear stream per tile",
        row_multiple=rows,
    )


TILE_LAYOUTS = tuple(_layout(r) for r in TILES)
