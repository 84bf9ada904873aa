"""Ternary GEMM for prefill (N tokens at once), W2A8: ``y[n, m] = float32(Σ_k code·x[n] − Σx[n]) · (w_s/x_s[n])``.

Same weight layouts (``tile=0``: ``rowmajor4``; ``tile=R``: the ``tile{R}`` row tiles of
:mod:`model.ternary.layouts_x86`, so prefill can read the very array the decode GEMV streams), activation interleave
and integer maths as ``gemv_i8`` (see :mod:`compiler.ops.ternary_gemv`), with per-token ``x_sum`` and ``x_scale``;
bit-exact with :func:`model.ternary.reference.ternary_matmul_i8` on ``[N, K]`` activations. The x86 schedules decode
each 64-byte weight chunk once and reuse it for a tile of tokens.

    python -m compiler.ops.ternary_gemm        # builds the untuned TE for 4×256×512 and checks it against numpy
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.ops.base import Arg, Op, check_k, check_positive
from compiler.ops.stacked import by_parts, check_parts, n_scales, parts_suffix, te_part_scale
from compiler.ops.ternary_gemv import CHUNK, _impl, check_tile, random_packed, te_code, te_interleave, weight_shape
from model.ternary import reference
from model.ternary.layouts_x86 import tile_rowmajor4, untile_rowmajor4


@dataclass(frozen=True)
class TernaryGemmI8(Op):
    """``parts``: a stacked matrix (q|k|v, gate|up), a scale each (:mod:`compiler.ops.stacked`)."""

    N: int
    M: int
    K: int
    tile: int = 0
    parts: tuple[int, ...] = field(default=(), metadata={"dim": False})
    kind = "gemm_i8"

    def __post_init__(self):
        check_positive(N=self.N, M=self.M, K=self.K)
        check_k(self.K)
        check_tile(self.M, self.tile)
        check_parts(self.parts, self.M)

    @property
    def func_name(self) -> str:
        return super().func_name + parts_suffix(self.parts)

    def w_shape(self) -> tuple[int, ...]:
        return weight_shape(self.M, self.K, self.tile)

    def args(self) -> list[Arg]:
        N, M, K = self.N, self.M, self.K
        return [Arg("W", self.w_shape(), "uint8"), Arg("x", (N, K), "int8"), Arg("x_sum", (N,), "int32"),
                Arg("x_scale", (N,), "float32"), Arg("w_scale", (n_scales(self.parts),), "float32"),
                Arg("y", (N, M), "float32", output=True)]  # fmt: skip

    def compute(self):
        import tvm
        from tvm import te

        N, M, K, R = self.N, self.M, self.K, self.tile
        W = te.placeholder(self.w_shape(), "uint8", name="W")
        X = te.placeholder((N, K), "int8", name="x")
        Xsum = te.placeholder((N,), "int32", name="x_sum")
        Xs = te.placeholder((N,), "float32", name="x_scale")
        Ws = te.placeholder((n_scales(self.parts),), "float32", name="w_scale")
        Xt = te_interleave(X, K, lead=(N,))
        c = te.reduce_axis((0, K // CHUNK), name="c")
        b = te.reduce_axis((0, 64), name="b")
        j = te.reduce_axis((0, 4), name="j")
        if R:
            three = tvm.tirx.const(3, "uint8")
            code = lambda m: (W[m // R, c, m % R, b] >> (j * 2).astype("uint8")) & three  # noqa: E731
        else:
            code = lambda m: te_code(W, m, c * 64 + b, j)  # noqa: E731
        acc = te.compute(
            (N, M),
            lambda n, m: te.sum(code(m).astype("int32") * Xt[n, c, j, b].astype("int32"), axis=[c, b, j]),
            name="acc",
        )
        ws = te_part_scale(Ws, self.parts)
        Y = te.compute((N, M), lambda n, m: (acc[n, m] - Xsum[n]).astype("float32") * (ws(m) / Xs[n]), name="y")
        return te.create_prim_func([W, X, Xsum, Xs, Ws, Y])

    def reference(self, W, x, x_sum, x_scale, w_scale, impl="auto"):
        impl = _impl(impl, self.N * self.M * self.K)
        if not np.array_equal(x_sum.astype(np.int64), x.astype(np.int64).sum(axis=1)):
            raise ValueError("x_sum must equal Σx per token (the kernel trusts it)")
        if self.tile:
            W = untile_rowmajor4(W)
        rows = lambda a, b, s: reference.ternary_matmul_i8(W[a:b], x, x_scale, s, impl=impl)[1]  # noqa: E731
        return [by_parts(rows, w_scale, self.parts, self.M)]

    def random_inputs(self, rng):
        x = rng.integers(-127, 128, (self.N, self.K), dtype=np.int8)
        xs = x.astype(np.int32).sum(axis=1).astype(np.int32)
        scales = rng.uniform(0.5, 50, self.N).astype(np.float32)
        W = random_packed(rng, self.M, self.K)
        if self.tile:
            W = tile_rowmajor4(W, self.tile)
        return [W, x, xs, scales, rng.uniform(0.01, 2, n_scales(self.parts)).astype(np.float32)]

    def ops(self) -> float:
        return 2.0 * self.N * self.M * self.K


if __name__ == "__main__":
    import tvm

    from targets import get_target

    op = TernaryGemmI8(4, 256, 512)
    ins = op.random_inputs(np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
    print(op, "bit-exact:", np.array_equal(args[-1].numpy(), op.reference(*ins)[0]))
