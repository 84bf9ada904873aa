"""Ternary GEMV on base-3 packed weights (1.6 bits/weight): ``gemv_i8_b3``, W1.6A8, bit-exact with ``gemv_i8``.

Weights in the ``b3tile{R}`` layout of :mod:`compiler.layouts_x86_b3` (``uint8[M/R, C, R, 64]``, C = ⌈K/320⌉; byte
``b`` of chunk ``c`` holds codes ``320c + 64j + b``, trit ``d_j = ⌊3·q_j/256⌋`` with ``q_j = byte·3^j mod 256``).

The compute does not extract digits. Since ``3·q_j = 256·d_j + q_{j+1}`` exactly (that is the definition of the
digit), ``256·Σ_j d_j·x_j = 3·Σ_j q_j·x_j − Σ_j q_{j+1}·x_j``: two dot products of *bytes* ``q`` (unsigned) with int8
activations — exactly ``vpdpbusd``'s operands — where ``q_{j+1} = 3·q_j mod 256`` costs two byte adds. The reduction
``acc2[m, s] = Σ_{c,b} Σ_j q_{j+s}·x_j`` (s = 0: A, s = 1: B) accumulates both in int32, and the epilogue computes
``acc = (3A − B) >> 8`` in wrapping uint32 arithmetic: the intermediate sums may wrap, the result is exact while
``|256·Σ d·x| < 2³¹``, i.e. K ≤ 32512 (checked: :data:`K_MAX_B3`). Then ``y = float32(acc − Σx)·(w_scale/x_scale)``,
the float epilogue of ``gemv_i8``, so y is bit-exact with :func:`model.ternary.reference.ternary_matmul_i8`.

Activations are zero-padded to ``320·C`` in the ``Xt[c, j, b] = x[320c + 64j + b]`` stage (a K-element copy).

    python -m compiler.ops.ternary_gemv_b3     # builds the untuned TE for 40×1024 and checks it against numpy
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.layouts_x86_b3 import B3_CHUNK, B3_TILES, TRITS, chunks, pack_b3, unpack_b3
from compiler.ops.base import Arg, Op, OpShapeError, check_k, check_positive
from model.ternary import reference
from model.ternary.layouts import pack_rowmajor4

K_MAX_B3 = 32512  # 256·256·K < 2³¹: the (3A − B) >> 8 epilogue is exact


def te_q(w, j: int, s):
    """``q_{j+s} = w·3^(j+s) mod 256`` (uint8 arithmetic wraps) for a uint8 byte ``w``, plane j, s ∈ {0, 1}.

    Shared by the TE compute and the tensor intrinsic's description (schedules/intrin_x86_b3.py): tensorize matches
    the two structurally, so they must build the very same expression."""
    import tvm

    u8 = lambda v: tvm.tirx.const(v, "uint8")  # noqa: E731
    return w * u8(3**j) * (u8(1) + u8(2) * s.astype("uint8"))


def te_terms(w, xt_j, s):
    """``Σ_j int32(q_{j+s}) · int32(x_j)`` over the five planes (``xt_j(j)`` returns the plane-j activation)."""
    out = None
    for j in range(TRITS):
        t = te_q(w, j, s).astype("int32") * xt_j(j).astype("int32")
        out = t if out is None else out + t
    return out


@dataclass(frozen=True)
class TernaryGemvI8B3(Op):
    """``y[M] = float32(Σ code·x − Σx) · (w_scale / x_scale)`` on ``b3tile{tile}`` weights; reduction block ``acc2``."""

    M: int
    K: int
    tile: int = 1
    kind = "gemv_i8_b3"

    def __post_init__(self):
        check_positive(M=self.M, K=self.K)
        check_k(self.K)
        if self.K > K_MAX_B3:
            raise OpShapeError(f"K = {self.K}: the base-3 kernel is exact up to K = {K_MAX_B3}")
        if self.tile not in B3_TILES or self.M % self.tile:
            raise OpShapeError(f"tile = {self.tile}: must be one of {B3_TILES} and divide M = {self.M}")

    @property
    def C(self) -> int:
        return chunks(self.K)

    def w_shape(self) -> tuple[int, ...]:
        return (self.M // self.tile, self.C, self.tile, 64)

    def weight_bytes(self) -> float:
        return float(self.M * self.C * 64)

    def args(self) -> list[Arg]:
        return [Arg("W", self.w_shape(), "uint8"), Arg("x", (self.K,), "int8"), Arg("x_sum", (1,), "int32"),
                Arg("x_scale", (1,), "float32"), Arg("w_scale", (1,), "float32"),
                Arg("y", (self.M,), "float32", output=True)]  # fmt: skip

    def compute(self):
        import tvm
        from tvm import te

        M, K, R, C = self.M, self.K, self.tile, self.C
        W = te.placeholder(self.w_shape(), "uint8", name="W")
        X = te.placeholder((K,), "int8", name="x")
        Xsum = te.placeholder((1,), "int32", name="x_sum")
        Xs = te.placeholder((1,), "float32", name="x_scale")
        Ws = te.placeholder((1,), "float32", name="w_scale")
        zero = tvm.tirx.const(0, "int8")

        def xt(c, j, b):
            k = c * B3_CHUNK + j * 64 + b
            return tvm.tirx.if_then_else(k < K, X[tvm.tirx.min(k, K - 1)], zero)

        Xt = te.compute((C, TRITS, 64), xt, name="Xt")
        c = te.reduce_axis((0, C), name="c")
        b = te.reduce_axis((0, 64), name="b")
        acc2 = te.compute(
            (M, 2),
            lambda m, s: te.sum(te_terms(W[m // R, c, m % R, b], lambda j: Xt[c, j, b], s), axis=[c, b]),
            name="acc2",
        )
        s2 = te.reduce_axis((0, 2), name="s")
        u32 = lambda v: tvm.tirx.Cast("uint32", v)  # noqa: E731  (wrapping arithmetic: the sums may wrap)
        acc = te.compute(  # 3A − B as Σ_s acc2[m, s]·(3 − 4s) mod 2³²: a reduction, so schedules can compute it at
            (M,),  # the row tile (a consumer reading acc2[m, 0] and acc2[m, 1] cannot be reverse_compute_at'ed)
            lambda m: te.sum(u32(acc2[m, s2]) * (u32(3) - u32(4) * u32(s2)), axis=s2),
            name="acc",
        )

        def y(m):
            return ((acc[m].astype("int32") >> 8) - Xsum[0]).astype("float32") * (Ws[0] / Xs[0])

        Y = te.compute((M,), y, name="y")
        return te.create_prim_func([W, X, Xsum, Xs, Ws, Y])

    def reference(self, W, x, x_sum, x_scale, w_scale, impl="auto"):
        if impl == "auto":
            impl = "scalar" if self.M * self.K > 1 << 24 and reference.scalar_available() else "numpy"
        if int(x_sum[0]) != int(x.astype(np.int64).sum()):
            raise ValueError("x_sum must equal Σx (the kernel trusts it)")
        w2 = pack_rowmajor4(unpack_b3(W, self.K))
        _, y = reference.ternary_matmul_i8(w2, x, x_scale.astype(np.float32), float(w_scale[0]), impl=impl)
        return [y]

    def random_inputs(self, rng):
        codes = rng.integers(-1, 2, (self.M, self.K), dtype=np.int8)
        x = rng.integers(-127, 128, self.K, dtype=np.int8)
        return [pack_b3(codes, self.tile), x, np.array([x.astype(np.int32).sum()], np.int32),
                np.array([rng.uniform(0.5, 50)], np.float32), np.array([rng.uniform(0.01, 2)], np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.M * self.K


if __name__ == "__main__":
    import tvm

    from schedules.targets import get_target

    op = TernaryGemvI8B3(40, 1024, tile=4)
    ins = op.random_inputs(np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
    print(op, "bit-exact:", np.array_equal(args[-1].numpy(), op.reference(*ins)[0]))
