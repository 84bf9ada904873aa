"""x86 base-3 kernel layouts: 5 trits per byte (TQ1_0's byte code), 1.6 bits/weight, row-tiled like ``tile{R}``.

A row is cut into chunks of 320 codes (K is padded with zero weights to ``Kp = 320·⌈K/320⌉``); a chunk is 64 bytes,
and byte ``b`` of chunk ``c`` holds the five codes ``k = 320c + 64j + b`` (``j < 5``) as one base-3 number, first
trit most significant, stored exactly like ggml's TQ1_0 (``ceil(v·256/243)``, :func:`model.ternary.ggml._tq1_encode`)
so that trit ``j`` is ``d_j = ⌊3·q_j / 256⌋`` with ``q_j = byte·3^j mod 256``. Planes are contiguous 64-byte runs of
k (``64j + b``), so the activations line up with the byte vector with a plain reshape (no interleave, no shuffle).

``b3tile{R}`` (R ∈ {1, 4, 8, 16}): ``uint8[M/R, Kp/320, R, 64]`` with ``T[mo, c, mi, b]`` = byte ``b`` of chunk ``c``
of row ``mo·R + mi``: the R rows of a tile chunk after chunk, one linear stream per row tile (R = 1 is plain
row-major). Bits per weight: ``8·64·⌈K/320⌉ / K`` = 1.625 for K = 4096 or 16384, ≤ 1.7 for every K ≥ 4096
(padding), 2.0 for K = 256.

    python -c "import compiler.layouts_x86_b3; from model.ternary.layouts import LAYOUTS; print(sorted(LAYOUTS))"
"""

from __future__ import annotations

import numpy as np

from model.ternary.checks import TernaryFormatError, check_k
from model.ternary.ggml import _tq1_decode, _tq1_encode
from model.ternary.layouts import LAYOUTS, Layout, _check_codes

B3_TILES = (1, 4, 8, 16)
TRITS = 5  # codes per byte
CHUNK_BYTES = 64
B3_CHUNK = TRITS * CHUNK_BYTES  # 320 codes per 64-byte chunk


def chunks(k: int) -> int:
    """64-byte chunks per row for K codes (K padded up to a multiple of 320)."""
    return -(-k // B3_CHUNK)


def bits_per_weight(k: int) -> float:
    return 8.0 * CHUNK_BYTES * chunks(k) / k


def pack_b3(codes: np.ndarray, rows: int) -> np.ndarray:
    """int8 codes ``[M, K]`` in {−1, 0, +1} → ``b3tile{rows}`` ``uint8[M/rows, ⌈K/320⌉, rows, 64]``."""
    codes = _check_codes(codes)
    m, k = codes.shape
    if m % rows:
        raise TernaryFormatError(f"b3tile{rows}: M = {m} must be a multiple of {rows}")
    c = chunks(k)
    trits = np.ones((m, c * B3_CHUNK), np.uint8)  # padding: trit 1 = weight 0
    trits[:, :k] = codes + 1
    packed = _tq1_encode(trits.reshape(m * c, TRITS, CHUNK_BYTES), TRITS).reshape(m // rows, rows, c, CHUNK_BYTES)
    return np.ascontiguousarray(packed.transpose(0, 2, 1, 3))


def unpack_b3(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_b3` (the tile size is read from the shape): → int8 codes ``[M, K]``."""
    check_k(k)
    if packed.dtype != np.uint8 or packed.ndim != 4 or packed.shape[1] != chunks(k) or packed.shape[3] != 64:
        raise TernaryFormatError(f"packed: expected uint8[M/R, {chunks(k)}, R, 64] for K = {k}, got "
                                 f"{packed.dtype}{list(packed.shape)}")  # fmt: skip
    mo, c, r, _ = packed.shape
    rows = np.ascontiguousarray(packed.transpose(0, 2, 1, 3)).reshape(mo * r * c, CHUNK_BYTES)
    trits = _tq1_decode(rows, TRITS).reshape(mo * r, c * B3_CHUNK)
    return (trits[:, :k].astype(np.int8) - 1).reshape(mo * r, k)


def _layout(rows: int) -> Layout:
    return Layout(
        f"b3tile{rows}",
        lambda codes: pack_b3(codes, rows),
        unpack_b3,
        f"uint8[M/{rows}, ceil(K/320), {rows}, 64]: 5 trits per byte (TQ1_0 byte code), planes of 64 codes, row tiles",
        row_multiple=rows,
    )


for _r in B3_TILES:
    LAYOUTS.setdefault(f"b3tile{_r}", _layout(_r))
