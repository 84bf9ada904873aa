"""x86 table-lookup kernel layouts ``tl{R}``: three weights per 5-bit code (4-bit index + sign), 1.67 bits/weight.

The code of three weights ``(w0, w1, w2)`` is their base-3 number ``c = 9(w0+1) + 3(w1+1) + (w2+1)`` ∈ 0..26 (13 is
all zero). Negating the three weights maps ``c`` to ``26 − c``, so a code is stored as a 4-bit *index*
``|c − 13|`` ∈ 0..13 and a *sign* bit ``c < 13`` (TL2's trick): the kernel looks the index up in a 16-entry table of
``Σ t·x`` for the positive combinations and multiplies by ±1. K is padded with zero weights to a multiple of 24.

Rows go in tiles of 16, and ``R`` tiles make a row group read as one stream. For each 24 weights (8 codes, a *block*)
a tile has one 80-byte record:

* bytes 0..63: byte ``p = 4r + j`` (row ``r`` of the tile, ``j < 4``) holds the index of code ``j`` of the block's
  first half in its low nibble and of code ``4 + j`` in its high nibble: ``vpdpbusd``'s 4-byte lane ``r`` is row
  ``r``, so the four codes of a half land in one int32 lane;
* bytes 64..79: the sign bits, bit ``p`` of the little-endian 64-bit words at 64 (first half) and 72 (second half):
  one ``kmovq`` each.

After the last block each tile has one more record whose first 64 bytes are the 16 rows' ``Σ sign`` (int32,
little-endian); the kernel's epilogue needs it (``compiler.ops.ternary_gemv_tl``).

``tl{R}`` (R ∈ {1, 2, 4, 8}): ``uint8[M/(16R), B + 1, R, 80]``, ``B = ⌈K/24⌉``, ``T[g, b, t]`` = record of block
``b`` of tile ``t`` of row group ``g``. Bits per weight: ``640·(B + 1) / (16·K)`` = 1.670 for K = 16384, 1.680 for
K = 4096 (≤ 1.7 for every K ≥ 1536; 1.875 for K = 256).

    python -c "from model.ternary import layouts_tl as L; print([round(L.bits_per_weight(k), 3) for k in (4096, 1536)])"
"""

from __future__ import annotations

import numpy as np

from model.ternary.checks import TernaryFormatError, check_k
from model.ternary.rowmajor4 import Layout, _check_codes

TL_TILES = (1, 2, 4, 8)
TILE_ROWS = 16  # rows per tile: the 16 int32 lanes of one zmm accumulator
GROUP = 3  # weights per code
HALF_CODES = 4  # codes per half block: one int32 lane of 4 bytes
BLOCK_CODES = 2 * HALF_CODES  # codes per block (two nibbles per byte)
BLOCK_K = GROUP * BLOCK_CODES  # 24 weights per block
RECORD = 80  # bytes per (tile, block): 64 index bytes + 16 sign bytes
ZERO_CODE = 13  # base-3 code of three zero weights


def blocks(k: int) -> int:
    """24-weight blocks per row for K weights (K padded up with zero weights)."""
    return -(-k // BLOCK_K)


def bits_per_weight(k: int) -> float:
    return 8.0 * RECORD * (blocks(k) + 1) / (TILE_ROWS * k)


def shape(m: int, k: int, rows: int) -> tuple[int, int, int, int]:
    return (m // (TILE_ROWS * rows), blocks(k) + 1, rows, RECORD)


def _codes3(codes: np.ndarray) -> np.ndarray:
    """int8 codes ``[M, K]`` → base-3 codes ``uint8[M, B, 2, 4]`` (block, half, j) of the zero-padded rows."""
    m, k = codes.shape
    b = blocks(k)
    t = np.ones((m, b * BLOCK_K), np.uint8)  # weight + 1; the padding weights are 0
    t[:, :k] = codes + 1
    t = t.reshape(m, b, 2, HALF_CODES, GROUP)
    return 9 * t[..., 0] + 3 * t[..., 1] + t[..., 2]


def pack_tl(codes: np.ndarray, rows: int) -> np.ndarray:
    """int8 codes ``[M, K]`` in {−1, 0, +1} → ``tl{rows}`` ``uint8[M/(16·rows), ⌈K/24⌉ + 1, rows, 80]``."""
    codes = _check_codes(codes)
    m = codes.shape[0]
    if m % (TILE_ROWS * rows):
        raise TernaryFormatError(f"tl{rows}: M = {m} must be a multiple of {TILE_ROWS * rows}")
    c = _codes3(codes)
    neg = c < ZERO_CODE
    idx = np.where(neg, ZERO_CODE - c, c - ZERO_CODE).astype(np.uint8)
    mt, b = m // TILE_ROWS, c.shape[1]
    # rows [mt, r] -> [mt, b, r, ...] so that byte p = 4r + j
    nib = (idx[:, :, 0] | idx[:, :, 1] << 4).reshape(mt, TILE_ROWS, b, HALF_CODES).transpose(0, 2, 1, 3)
    sgn = neg.reshape(mt, TILE_ROWS, b, 2, HALF_CODES).transpose(0, 2, 3, 1, 4).reshape(mt, b, 2, 64)
    sgn = np.packbits(sgn, axis=-1, bitorder="little").reshape(mt, b, 16)
    rec = np.concatenate([nib.reshape(mt, b, 64), sgn], axis=-1)
    ssum = (8 * b - 2 * neg.sum(axis=(1, 2, 3))).astype("<i4").reshape(mt, TILE_ROWS)
    tail = np.zeros((mt, 1, RECORD), np.uint8)
    tail[:, 0, :64] = ssum.view(np.uint8).reshape(mt, 64)
    out = np.concatenate([rec, tail], axis=1).reshape(mt // rows, rows, b + 1, RECORD)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


def unpack_tl(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_tl` (the tile count is read from the shape): → int8 codes ``[M, K]``. Checks what a
    corrupted array would break: index nibbles ≤ 13, the padding weights zero, the stored ``Σ sign`` per row."""
    check_k(k)
    b = blocks(k)
    if packed.dtype != np.uint8 or packed.ndim != 4 or packed.shape[1] != b + 1 or packed.shape[3] != RECORD:
        raise TernaryFormatError(f"packed: expected uint8[M/(16R), {b + 1}, R, {RECORD}] for K = {k}, got "
                                 f"{packed.dtype}{list(packed.shape)}")  # fmt: skip
    g, _, rows, _ = packed.shape
    mt = g * rows
    t = np.ascontiguousarray(packed.transpose(0, 2, 1, 3)).reshape(mt, b + 1, RECORD)
    rec, tail = t[:, :b], t[:, b]
    nib = rec[..., :64].reshape(mt, b, TILE_ROWS, HALF_CODES)
    idx = np.stack([nib & 15, nib >> 4], axis=3)  # [mt, b, r, half, j]
    sgn = np.unpackbits(rec[..., 64:].reshape(mt, b, 2, 8), axis=-1, bitorder="little")  # [mt, b, half, 64]
    neg = sgn.reshape(mt, b, 2, TILE_ROWS, HALF_CODES).transpose(0, 1, 3, 2, 4)
    if idx.max(initial=0) > ZERO_CODE:
        raise TernaryFormatError("packed: an index nibble above 13 (no such code)")
    c = np.where(neg, ZERO_CODE - idx, ZERO_CODE + idx).astype(np.uint8)
    c = c.transpose(0, 2, 1, 3, 4).reshape(mt * TILE_ROWS, b * BLOCK_CODES)
    w = np.stack([c // 9, c // 3 % 3, c % 3], axis=-1).reshape(mt * TILE_ROWS, b * BLOCK_K).view(np.int8) - 1
    if np.any(w[:, k:]):
        raise TernaryFormatError("packed: nonzero weights in the padding past K")
    ssum = np.ascontiguousarray(tail[:, :64]).view("<i4").reshape(-1)
    negs = neg.transpose(0, 2, 1, 3, 4).reshape(mt * TILE_ROWS, -1).sum(axis=1, dtype=np.int64)
    if not np.array_equal(ssum, 8 * b - 2 * negs):
        raise TernaryFormatError("packed: the stored per-row sign sums do not match the sign bits")
    return np.ascontiguousarray(w[:, :k])


def _layout(rows: int) -> Layout:
    return Layout(
        f"tl{rows}",
        lambda codes: pack_tl(codes, rows),
        unpack_tl,
        f"uint8[M/{16 * rows}, ceil(K/24)+1, {rows}, 80]: 3 weights per 4-bit index + sign bit, 16-row tiles",
        row_multiple=TILE_ROWS * rows,
    )


TL_LAYOUTS = tuple(_layout(r) for r in TL_TILES)
