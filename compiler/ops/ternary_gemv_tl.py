"""Ternary GEMV by table lookup on 1.67-bit weights: ``gemv_i8_tl``, W1.67A8, bit-exact with ``gemv_i8``.

Weights in the ``tl{R}`` layout of :mod:`model.ternary.layouts_tl`: three weights per code, stored as a 4-bit index
``|c − 13|`` and a sign bit. The stages (after ``xp``, x zero-padded to a multiple of 24):

1. ``lut``: for every group of three activations ``(x0, x1, x2)``, the 16-entry table of ``v(i) = Σ t·x`` over the
   positive combinations ``t`` of code ``13 + i`` (entries 14, 15 are 0), split into bytes: ``lo = v & 255``
   (unsigned) and ``hi = (v >> 8) + 2`` ∈ 0..3 (|v| ≤ 381). Stored as
   ``LUT[b, half, h, 16j + i]`` for code ``j`` of half ``half`` of block ``b``: one 64-byte ``vpermb`` table per
   (block, half, byte). K/24 · 256 bytes, built once per call and read by every row.
2. ``acc[h, m] = Σ_{b, half, j} LUT[b, half, h] byte (16j + index) · sign`` (int32), the row's lookups times ±1, for
   both bytes h. Then ``dot = acc[0] + 256·acc[1]`` and ``Σ w·x = dot − 512·Σ sign``, with the row's ``Σ sign``
   stored in the layout, and ``y = float32(Σ w·x) · (w_scale / x_scale)``: the float epilogue of ``gemv_i8``, so y is
   bit-exact with :func:`model.ternary.reference.ternary_matmul_i8`. The kernel does not need Σx (no offset codes).

The AVX-512 kernel (:mod:`schedules.intrin_x86_tl`) does the lookups with ``vpermb`` (AVX-512 VBMI) and the
multiply-accumulate with ``vpdpbusd`` (table byte unsigned, sign ±1 signed): no weight is ever decoded.

    python -m compiler.ops.ternary_gemv_tl     # builds the untuned TE for 64×1024 and checks it against numpy
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.ops.base import Arg, Op, OpShapeError, check_k, check_positive
from compiler.ops.stacked import by_parts, check_parts, n_scales, parts_suffix, te_part_scale
from model.ternary import reference
from model.ternary.layouts import pack_rowmajor4
from model.ternary.layouts_tl import (
    BLOCK_K,
    GROUP,
    HALF_CODES,
    TILE_ROWS,
    TL_TILES,
    ZERO_CODE,
    blocks,
    pack_tl,
    shape,
    unpack_tl,
)
from schedules.tl_exprs import te_lut_word, te_term


def lut_numpy(x: np.ndarray, k: int) -> np.ndarray:
    """numpy twin of the ``lut`` stage: int8 ``x[K]`` → ``uint64[B, 2, 2, 4, 2]`` (bytes of ``uint8[B, 2, 2, 64]``)."""
    b = blocks(k)
    xp = np.zeros(b * BLOCK_K, np.int64)
    xp[:k] = x
    xg = xp.reshape(b, 2, HALF_CODES, GROUP)
    c = ZERO_CODE + np.arange(16)
    t = np.stack([c // 9, c // 3 % 3, c % 3], axis=-1) - 1  # [16, 3]
    v = np.einsum("bhjg,ig->bhji", xg, t) * (np.arange(16) <= ZERO_CODE)  # [b, half, j, i]
    out = np.stack([v & 255, (v >> 8) + 2], axis=2).astype(np.uint8)  # [b, half, h, j, i]
    return np.ascontiguousarray(out).view("<u8").reshape(b, 2, 2, HALF_CODES, 2)


def te_tl_matmul(op, n: int | None = None):
    """The PrimFunc of ``op`` (:class:`TernaryGemvI8TL`, or the GEMM of :mod:`compiler.ops.ternary_gemm_tl` with
    ``n`` tokens: every buffer but ``W`` and ``w_scale`` gains a leading token axis, ``x_scale`` is ``[n]``). One
    definition for both, so their tables, lookups and epilogue are the same expressions (the intrinsics match
    either)."""
    import tvm
    from tvm import te

    M, K, R, B = op.M, op.K, op.tile, blocks(op.K)
    lead = () if n is None else (n,)
    W = te.placeholder(op.w_shape(), "uint8", name="W")
    X = te.placeholder((*lead, K), "int8", name="x")
    Xs = te.placeholder(lead or (1,), "float32", name="x_scale")
    Ws = te.placeholder((n_scales(op.parts),), "float32", name="w_scale")
    ws = te_part_scale(Ws, op.parts)

    def xp(*i):  # x zero-padded to the 24-weight blocks
        t, k = i[:-1], i[-1]
        return tvm.tirx.if_then_else(k < K, X[(*t, tvm.tirx.min(k, K - 1))], tvm.tirx.const(0, "int8"))

    Xp = te.compute((*lead, B * BLOCK_K), xp, name="xp")

    def lut(*i):
        t, (b, half, h, j, w) = i[:-5], i[-5:]
        return te_lut_word(lambda g: Xp[(*t, (b * 2 + half) * (HALF_CODES * GROUP) + j * GROUP + g)], h, w)

    L = te.compute((*lead, B, 2, 2, HALF_CODES, 2), lut, name="lut")
    b = te.reduce_axis((0, B), name="b")
    half = te.reduce_axis((0, 2), name="half")
    j = te.reduce_axis((0, HALF_CODES), name="j")

    def acc(*i):
        t, (h, m) = i[:-2], i[-2:]
        g, tt, r = m // (TILE_ROWS * R), m // TILE_ROWS % R, m % TILE_ROWS
        return te.sum(
            te_term(
                lambda w: L[(*t, b, half, h, j, w)],
                W[g, b, tt, r * 4 + j],
                W[g, b, tt, 64 + half * 8 + r // 2],
                half,
                r % 2 * 4 + j,
            ),
            axis=[b, half, j],
        )

    A = te.compute((*lead, 2, M), acc, name="acc")
    h2 = te.reduce_axis((0, 2), name="h")
    D = te.compute(  # acc[0] + 256·acc[1] as a reduction, so schedules can compute it at the row group (a
        (*lead, M),  # consumer reading acc[0, m] and acc[1, m] cannot be reverse_compute_at'ed)
        lambda *i: te.sum(A[(*i[:-1], h2, i[-1])] << (h2 * 8), axis=h2),
        name="dot",
    )

    def y(*i):
        t, m = i[:-1], i[-1]
        g, tt, r = m // (TILE_ROWS * R), m // TILE_ROWS % R, m % TILE_ROWS
        s = W[g, B, tt, r * 4].astype("int32")
        for byte in range(1, 4):
            s = s | (W[g, B, tt, r * 4 + byte].astype("int32") << byte * 8)
        xs = Xs[t] if t else Xs[0]
        return (D[i] - (s << 9)).astype("float32") * (ws(m) / xs)  # 256·(acc[1] − 2·Σ sign)

    Y = te.compute((*lead, M), y, name="y")
    return te.create_prim_func([W, X, Xs, Ws, Y])


class TLMatrix(Op):
    """What the GEMV and the GEMM of one ``tl{tile}`` matrix share: its weight array and the kernel's name."""

    M: int
    K: int
    tile: int
    parts: tuple[int, ...]

    @property
    def func_name(self) -> str:
        return super().func_name + parts_suffix(self.parts)

    @property
    def B(self) -> int:
        return blocks(self.K)

    def w_shape(self) -> tuple[int, ...]:
        return shape(self.M, self.K, self.tile)

    def weight_bytes(self) -> float:
        return float(np.prod(self.w_shape()))

    def reference(self, W, x, x_scale, w_scale, impl="auto"):
        """The 2-bit reference on the unpacked weights (``x`` ``[K]`` or ``[N, K]``); ``auto``: the C++ scalar one
        above 2^24 multiply-adds."""
        if impl == "auto":
            impl = "scalar" if self.ops() / 2 > 1 << 24 and reference.scalar_available() else "numpy"
        w2, xs = pack_rowmajor4(unpack_tl(W, self.K)), x_scale.astype(np.float32)
        rows = lambda a, b, s: reference.ternary_matmul_i8(w2[a:b], x, xs, s, impl=impl)[1]  # noqa: E731
        return [by_parts(rows, w_scale, self.parts, self.M)]


@dataclass(frozen=True)
class TernaryGemvI8TL(TLMatrix):
    """``y[M] = float32(Σ w·x) · (w_scale / x_scale)`` on ``tl{tile}`` weights; stages ``lut``, ``acc``, ``y``.
    ``parts``: a stacked matrix (q|k|v, gate|up), a scale each (:mod:`compiler.ops.stacked`)."""

    M: int
    K: int
    tile: int = 8
    parts: tuple[int, ...] = field(default=(), metadata={"dim": False})
    kind = "gemv_i8_tl"
    cpu_flags = ("avx512vbmi",)  # vpermb: a machine without it must not run the kernel (see compiler.kernels)

    def __post_init__(self):
        check_positive(M=self.M, K=self.K)
        check_k(self.K)
        if self.tile not in TL_TILES or self.M % (TILE_ROWS * self.tile):
            raise OpShapeError(f"tile = {self.tile}: must be one of {TL_TILES}, and M = {self.M} a multiple of "
                               f"{TILE_ROWS}·tile")  # fmt: skip
        check_parts(self.parts, self.M)

    def args(self) -> list[Arg]:
        return [Arg("W", self.w_shape(), "uint8"), Arg("x", (self.K,), "int8"), Arg("x_scale", (1,), "float32"),
                Arg("w_scale", (n_scales(self.parts),), "float32"),
                Arg("y", (self.M,), "float32", output=True)]  # fmt: skip

    def compute(self):
        return te_tl_matmul(self)

    def random_inputs(self, rng):
        codes = rng.integers(-1, 2, (self.M, self.K), dtype=np.int8)
        x = rng.integers(-127, 128, self.K, dtype=np.int8)
        return [pack_tl(codes, self.tile), x, np.array([rng.uniform(0.5, 50)], np.float32),
                rng.uniform(0.01, 2, n_scales(self.parts)).astype(np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.M * self.K

    def two_bit_twin(self):
        """The 2-bit ``gemv_i8`` of the same shape (tile8 weights): the kernel this layout must beat."""
        from compiler.ops.ternary_gemv import TernaryGemvI8

        return TernaryGemvI8(self.M, self.K, tile=8)


if __name__ == "__main__":
    import tvm

    from targets import get_target

    op = TernaryGemvI8TL(64, 1024, tile=2)
    ins = op.random_inputs(np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
    print(op, "bit-exact:", np.array_equal(args[-1].numpy(), op.reference(*ins)[0]))
