"""GGUF ternary tensors in the standard ggml types TQ2_0 (type 35) and TQ1_0 (type 34), packed and unpacked in numpy.

Both types cut each row into super-blocks of 256 weights with one float16 scale ``d`` per block and trits
``c = q + 1 ∈ {0, 1, 2}``; the float weight is ``d · (c − 1)``.

TQ2_0 block (66 bytes): ``qs[64]`` then ``d``. Weight ``i = 128·g + 32·j + l`` (g < 2, j < 4, l < 32) sits in bits
``2j..2j+1`` of byte ``32·g + l``.

TQ1_0 block (54 bytes): ``qs[48]``, ``qh[4]``, then ``d``. Five trits per byte for weights 0–239, four for 240–255, as
a base-3 number ``v`` (first trit most significant) stored as ``ceil(v · 256 / 243)`` so that trit ``j`` comes back as
``((byte · 3^j) mod 256 · 3) >> 8``. Bytes 0–31 hold weights ``32·j + l``; bytes 32–47 hold ``160 + 16·j + l``;
``qh`` holds ``240 + 4·j + l`` (j < 4).

:func:`quantize` reproduces ``gguf.quants.quantize`` bit for bit (absmax block scale, round half away from zero) for
any finite float32 input; :func:`pack` stores :class:`~model.ternary.quant.TernaryWeights` directly and gives the same
bytes as ``quantize(weights.dequantize())``. :func:`unpack` inverts either exactly.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from model.ternary.checks import QK, TernaryFormatError, as_array, check_finite, check_k
from model.ternary.quant import FP16_MAX, TernaryWeights


class TernaryType(IntEnum):
    """ggml type ids (mainline ggml; never invent private ids)."""

    TQ1_0 = 34
    TQ2_0 = 35


BLOCK_BYTES = {TernaryType.TQ2_0: QK // 4 + 2, TernaryType.TQ1_0: 48 + 4 + 2}

_TQ1_POW = np.array([81, 27, 9, 3, 1], dtype=np.uint16)  # weight of trit j in the base-3 byte value


def row_bytes(k: int, qtype: TernaryType) -> int:
    """Bytes one row of ``k`` weights takes in ``qtype``."""
    check_k(k)
    return k // QK * BLOCK_BYTES[TernaryType(qtype)]


# --- block codecs: trits [n, 256] (uint8 in {0,1,2}) <-> packed bytes [n, bytes-without-scale] -----------------------


def _tq2_pack(c: np.ndarray) -> np.ndarray:
    c = c.reshape(-1, 2, 4, 32)  # [block, g, j, l]
    return (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).reshape(-1, 64)


def _tq2_unpack(qs: np.ndarray) -> np.ndarray:
    qs = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs >> shifts) & 3).reshape(-1, QK)


def _tq1_encode(groups: np.ndarray, ntrits: int) -> np.ndarray:
    """groups [n, ntrits, L] trits → [n, L] bytes holding ceil(v·256/243) of the base-3 value v (first trit high)."""
    v = (groups.astype(np.uint16) * _TQ1_POW[:ntrits].reshape(1, ntrits, 1)).sum(axis=1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _tq1_decode(b: np.ndarray, ntrits: int) -> np.ndarray:
    """[n, L] bytes → [n, ntrits, L] trits: trit j = ((b·3^j) mod 256 · 3) >> 8."""
    pow3 = np.array([1, 3, 9, 27, 81][:ntrits], dtype=np.uint8).reshape(1, ntrits, 1)
    shifted = b[:, None, :] * pow3  # uint8 arithmetic wraps mod 256, as intended
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def _tq1_pack(c: np.ndarray) -> np.ndarray:
    n = c.shape[0]
    head = _tq1_encode(c[:, :160].reshape(n, 5, 32), 5)
    mid = _tq1_encode(c[:, 160:240].reshape(n, 5, 16), 5)
    tail = _tq1_encode(c[:, 240:].reshape(n, 4, 4), 4)
    return np.concatenate([head, mid, tail], axis=1)


def _tq1_unpack(qs: np.ndarray) -> np.ndarray:
    n = qs.shape[0]
    head = _tq1_decode(qs[:, :32], 5).reshape(n, 160)
    mid = _tq1_decode(qs[:, 32:48], 5).reshape(n, 80)
    tail = _tq1_decode(qs[:, 48:52], 4).reshape(n, 16)
    return np.concatenate([head, mid, tail], axis=1)


_CODECS = {TernaryType.TQ2_0: (_tq2_pack, _tq2_unpack), TernaryType.TQ1_0: (_tq1_pack, _tq1_unpack)}


def _assemble(trits: np.ndarray, d: np.ndarray, rows_shape: tuple[int, ...], qtype: TernaryType) -> np.ndarray:
    pack, _ = _CODECS[qtype]
    blocks = np.concatenate([pack(trits), d.astype(np.float16).reshape(-1, 1).view(np.uint8)], axis=1)
    return blocks.reshape(*rows_shape[:-1], -1)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize(w: np.ndarray, qtype: TernaryType = TernaryType.TQ2_0) -> np.ndarray:
    """Quantize float32 rows ``[..., K]`` the way ggml does: per 256-block absmax scale, trits round(w/d)+1."""
    qtype = TernaryType(qtype)
    w = as_array(w, "W", np.float32, (1, 2, 3))
    check_k(w.shape[-1])
    check_finite(w, "W")
    if np.abs(w).max(initial=0) > FP16_MAX:
        raise TernaryFormatError(f"W: |w| > {FP16_MAX} overflows the float16 block scale")
    blocks = w.reshape(-1, QK)
    d = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    trits = (_round_half_away(blocks * inv).astype(np.int8) + 1).astype(np.uint8)
    return _assemble(trits, d, w.shape, qtype)


def pack(weights: TernaryWeights, qtype: TernaryType = TernaryType.TQ2_0) -> np.ndarray:
    """Store ternary weights: trits ``codes + 1``; block scale = the tensor scale, or 0 for an all-zero block (a stack
    of experts: each expert's own scale in its blocks)."""
    qtype = TernaryType(qtype)
    if weights.stacked:
        if np.ndim(weights.codes) != 3 or len(weights.scale) != weights.codes.shape[0]:
            raise TernaryFormatError(f"a stack of experts needs codes [E, M, K] and E scales, got codes of shape "
                                     f"{np.shape(weights.codes)} and {len(weights.scale)} scales")  # fmt: skip
        return np.stack([pack(weights.expert(e), qtype) for e in range(len(weights.scale))])
    codes = as_array(weights.codes, "codes", np.int8, (1, 2, 3))
    check_k(codes.shape[-1])
    if codes.min(initial=0) < -1 or codes.max(initial=0) > 1:
        raise TernaryFormatError("codes: values outside {-1, 0, +1}")
    scale = np.float32(weights.scale)
    if not (np.isfinite(scale) and scale > 0 and np.float32(np.float16(scale)) == scale):
        raise TernaryFormatError(f"scale = {scale!r} must be positive, finite and exactly representable in float16")
    blocks = codes.reshape(-1, QK)
    d = np.where(blocks.any(axis=1), scale, np.float32(0))
    return _assemble((blocks + 1).astype(np.uint8), d, codes.shape, qtype)


def unpack(raw: np.ndarray, k: int, qtype: TernaryType = TernaryType.TQ2_0) -> tuple[np.ndarray, np.ndarray]:
    """Bytes ``[..., K/256·block]`` → (codes int8 ``[..., K]`` in {-1,0,+1}, block scales float32 ``[..., K/256]``).

    A trit of 3 (possible only in a corrupt TQ2_0 file) is rejected rather than read as a weight of +2.
    """
    qtype = TernaryType(qtype)
    raw = as_array(raw, "raw", np.uint8, (1, 2, 3))
    if raw.shape[-1] != row_bytes(k, qtype):
        raise TernaryFormatError(
            f"raw: rows of {raw.shape[-1]} bytes, but K = {k} in {qtype.name} needs {row_bytes(k, qtype)}"
        )
    _, unpack_trits = _CODECS[qtype]
    nb = BLOCK_BYTES[qtype]
    blocks = raw.reshape(-1, nb)
    trits = unpack_trits(blocks[:, : nb - 2])
    if trits.max(initial=0) > 2:
        raise TernaryFormatError(f"raw: {qtype.name} data holds the invalid 2-bit code 3")
    d = blocks[:, nb - 2 :].copy().view(np.float16).astype(np.float32).reshape((*raw.shape[:-1], k // QK))
    codes = (trits.astype(np.int8) - 1).reshape((*raw.shape[:-1], k))
    return codes, d


def dequantize(raw: np.ndarray, k: int, qtype: TernaryType = TernaryType.TQ2_0) -> np.ndarray:
    """Bytes → float32 weights ``d · (c − 1)`` (what ``gguf.quants.dequantize`` returns)."""
    codes, d = unpack(raw, k, qtype)
    return (codes.reshape(*d.shape, QK).astype(np.float32) * d[..., None]).reshape(codes.shape)


def to_ternary(codes: np.ndarray, block_scales: np.ndarray) -> TernaryWeights:
    """Collapse per-block scales into one tensor scale; fails unless every non-zero block has the same scale.

    BitNet b1.58 tensors have one absmean scale; a TQ2_0 tensor quantized any other way (per-block absmax of float
    weights) cannot run on the per-tensor-scale kernels, and saying so beats computing garbage.
    """
    if codes.ndim == 3:  # a stack of experts [E, M, K]: one scale per expert
        return TernaryWeights.stack([to_ternary(c, d) for c, d in zip(codes, block_scales, strict=True)])
    nonzero = codes.reshape(*block_scales.shape, QK).any(axis=-1)
    used = np.unique(block_scales[nonzero])
    if used.size > 1:
        raise TernaryFormatError(
            f"tensor has {used.size} distinct block scales (e.g. {used[:3].tolist()}); "
            "the ternary kernels need one per-tensor scale (BitNet absmean quantization)"
        )
    if used.size == 1 and not used[0] > 0:
        raise TernaryFormatError(f"non-zero blocks carry a non-positive scale {used[0]}")
    scale = np.float32(used[0]) if used.size else np.float32(np.float16(1.0))
    return TernaryWeights(codes=codes, scale=scale)
