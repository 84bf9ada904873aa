"""Ternary GEMV / GEMM for GPUs, W2A8 on the ``dp4a`` layout: ``y = float32(Σ code·x − Σx) · (w_scale / x_scale)``.

Weights ``W int32[M, K/16]`` (:mod:`model.ternary.layouts_gpu`), activations ``x4 int32[.., K/4]`` — the int8
activations read as int32 words, so no interleave stage — and, as in :mod:`compiler.ops.ternary_gemv`, the
activation sum and scales from ``rmsnorm_quant``. The reduction is over ``(w, s)``: word ``w`` of a row, bit-pair
plane ``s``; each term is one ``dp4a`` of the plane's four code bytes ``(W >> 2s) & 0x03030303`` with the activation
word ``x4[4w + s]``, exact in int32, so the result is bit-exact with
:func:`model.ternary.reference.ternary_matmul_i8`.

``dot4`` is ``__dp4a`` on CUDA; ``emulate=True`` spells it out with shifts (the same integer maths) so the compute
can be built and checked on a CPU (tests/test_ops_gpu.py).

    python -m compiler.ops.ternary_gpu        # builds the emulated compute for 256×512 on the CPU, checks it
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.ops.base import Arg, Op, check_k, check_positive
from compiler.ops.stacked import by_parts, check_parts, n_scales, parts_suffix, te_part_scale
from compiler.ops.ternary_gemv import _impl, random_packed
from model.ternary import reference
from model.ternary.layouts_gpu import rowmajor4_to_dp4a

PLANES = 0x03030303


def dot4(a, b, emulate: bool = False):
    """Σ_i int8(a.byte i) · int8(b.byte i) as int32: ``__dp4a(a, b, 0)``, or its shift-and-multiply spelling."""
    import tvm

    if not emulate:
        return tvm.tirx.call_pure_extern("int32", "__dp4a", a, b, tvm.tirx.const(0, "int32"))
    return sum(((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24) for i in range(4))


def te_plane(W, m, w, s):
    """The four code bytes of plane ``s`` of word ``W[m, w]``."""
    import tvm

    return (W[m, w] >> (s * 2)) & tvm.tirx.const(PLANES, "int32")


def x_words(x: np.ndarray) -> np.ndarray:
    """int8 activations ``[.., K]`` → the int32 words the kernels read (a view's copy, little-endian)."""
    return np.ascontiguousarray(x).view("<i4")


def _x_from_words(x4: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x4).astype("<i4").view(np.int8)


def _dp4a_weights(rng, M: int, K: int) -> np.ndarray:
    return rowmajor4_to_dp4a(random_packed(rng, M, K))


def reference_parts(W, x, x_scale, w_scale, parts: tuple[int, ...], impl: str):
    """The reference of a stacked matrix: each part's rows with its own scale (:func:`te_part_scale`)."""
    W = _rowmajor4(W)
    return by_parts(lambda a, b, s: reference.ternary_matmul_i8(W[a:b], x, x_scale, s, impl=impl)[1], w_scale, parts,
                    W.shape[0])  # fmt: skip


def _rowmajor4(W: np.ndarray) -> np.ndarray:
    from model.ternary.layouts import pack_rowmajor4
    from model.ternary.layouts_gpu import unpack_dp4a

    return pack_rowmajor4(unpack_dp4a(W, W.shape[1] * 16))


@dataclass(frozen=True)
class TernaryGemvDp4a(Op):
    """One token: ``y[M]``. Reduction block ``acc`` over ``(w, s)``, epilogue block ``y``.

    ``parts``: ``W`` stacks matrices of these row counts (a layer's q|k|v, or gate|up, read in one pass), with a scale
    each (``w_scale [len(parts)]``); every element is computed exactly as by its own matrix's kernel. The loops are
    the plain kernel's, so ``parts`` is not a dimension (the stacked matrix's workload ``M, K`` keys its records)."""

    M: int
    K: int
    emulate: int = field(default=0, metadata={"dim": False})  # CPU spelling of dp4a (tests); not in the key
    parts: tuple[int, ...] = field(default=(), metadata={"dim": False})
    kind = "gemv_dp4a"

    def __post_init__(self):
        check_positive(M=self.M, K=self.K)
        check_k(self.K)
        check_parts(self.parts, self.M)

    @property
    def func_name(self) -> str:
        return super().func_name + parts_suffix(self.parts)

    def args(self) -> list[Arg]:
        M, K = self.M, self.K
        return [Arg("W", (M, K // 16), "int32"), Arg("x4", (K // 4,), "int32"), Arg("x_sum", (1,), "int32"),
                Arg("x_scale", (1,), "float32"), Arg("w_scale", (n_scales(self.parts),), "float32"),
                Arg("y", (M,), "float32", output=True)]  # fmt: skip

    def compute(self):
        from tvm import te

        M, K = self.M, self.K
        W = te.placeholder((M, K // 16), "int32", name="W")
        X = te.placeholder((K // 4,), "int32", name="x4")
        Xsum = te.placeholder((1,), "int32", name="x_sum")
        Xs = te.placeholder((1,), "float32", name="x_scale")
        Ws = te.placeholder((n_scales(self.parts),), "float32", name="w_scale")
        w = te.reduce_axis((0, K // 16), name="w")
        s = te.reduce_axis((0, 4), name="s")
        acc = te.compute(
            (M,), lambda m: te.sum(dot4(te_plane(W, m, w, s), X[w * 4 + s], bool(self.emulate)), axis=[w, s]),
            name="acc",
        )  # fmt: skip
        ws = te_part_scale(Ws, self.parts)
        Y = te.compute((M,), lambda m: (acc[m] - Xsum[0]).astype("float32") * (ws(m) / Xs[0]), name="y")
        return te.create_prim_func([W, X, Xsum, Xs, Ws, Y])

    def reference(self, W, x4, x_sum, x_scale, w_scale, impl="auto"):
        x = _x_from_words(x4)
        if int(x_sum[0]) != int(x.astype(np.int64).sum()):
            raise ValueError("x_sum must equal Σx (the kernel trusts it)")
        impl = _impl(impl, self.M * self.K)
        return [reference_parts(W, x, x_scale.astype(np.float32), w_scale, self.parts, impl)]

    def random_inputs(self, rng):
        x = rng.integers(-127, 128, self.K, dtype=np.int8)
        return [_dp4a_weights(rng, self.M, self.K), x_words(x), np.array([x.astype(np.int32).sum()], np.int32),
                np.array([rng.uniform(0.5, 50)], np.float32),
                rng.uniform(0.01, 2, n_scales(self.parts)).astype(np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.M * self.K


@dataclass(frozen=True)
class TernaryGemmDp4a(Op):
    """N tokens (prefill): ``y[N, M]``, per-token ``x_sum`` and ``x_scale``; ``parts`` as :class:`TernaryGemvDp4a`'s."""

    N: int
    M: int
    K: int
    emulate: int = field(default=0, metadata={"dim": False})  # CPU spelling of dp4a (tests); not in the key
    parts: tuple[int, ...] = field(default=(), metadata={"dim": False})
    kind = "gemm_dp4a"

    def __post_init__(self):
        check_positive(N=self.N, M=self.M, K=self.K)
        check_k(self.K)
        check_parts(self.parts, self.M)

    @property
    def func_name(self) -> str:
        return super().func_name + parts_suffix(self.parts)

    def args(self) -> list[Arg]:
        N, M, K = self.N, self.M, self.K
        return [Arg("W", (M, K // 16), "int32"), Arg("x4", (N, K // 4), "int32"), Arg("x_sum", (N,), "int32"),
                Arg("x_scale", (N,), "float32"), Arg("w_scale", (n_scales(self.parts),), "float32"),
                Arg("y", (N, M), "float32", output=True)]  # fmt: skip

    def compute(self):
        from tvm import te

        N, M, K = self.N, self.M, self.K
        W = te.placeholder((M, K // 16), "int32", name="W")
        X = te.placeholder((N, K // 4), "int32", name="x4")
        Xsum = te.placeholder((N,), "int32", name="x_sum")
        Xs = te.placeholder((N,), "float32", name="x_scale")
        Ws = te.placeholder((n_scales(self.parts),), "float32", name="w_scale")
        w = te.reduce_axis((0, K // 16), name="w")
        s = te.reduce_axis((0, 4), name="s")
        acc = te.compute(
            (N, M),
            lambda n, m: te.sum(dot4(te_plane(W, m, w, s), X[n, w * 4 + s], bool(self.emulate)), axis=[w, s]),
            name="acc",
        )
        ws = te_part_scale(Ws, self.parts)
        Y = te.compute((N, M), lambda n, m: (acc[n, m] - Xsum[n]).astype("float32") * (ws(m) / Xs[n]), name="y")
        return te.create_prim_func([W, X, Xsum, Xs, Ws, Y])

    def reference(self, W, x4, x_sum, x_scale, w_scale, impl="auto"):
        x = _x_from_words(x4).reshape(self.N, self.K)
        if not np.array_equal(x_sum.astype(np.int64), x.astype(np.int64).sum(axis=1)):
            raise ValueError("x_sum must equal Σx per token (the kernel trusts it)")
        impl = _impl(impl, self.N * self.M * self.K)
        return [reference_parts(W, x, x_scale, w_scale, self.parts, impl)]

    def random_inputs(self, rng):
        x = rng.integers(-127, 128, (self.N, self.K), dtype=np.int8)
        xs = x.astype(np.int32).sum(axis=1).astype(np.int32)
        return [_dp4a_weights(rng, self.M, self.K), x_words(x), xs, rng.uniform(0.5, 50, self.N).astype(np.float32),
                rng.uniform(0.01, 2, n_scales(self.parts)).astype(np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.N * self.M * self.K


@dataclass(frozen=True)
class TernaryGemvF32Dp4a(Op):
    """The float-activation variant: ``y[M] = w_scale · Σ_k (code_k − 1) · x_k`` with float32 ``x [K]`` and
    accumulation, on the same ``dp4a`` weight words. Reduction block ``acc`` over ``(w, s)``: each term decodes the
    four codes of plane ``s`` and multiplies them with ``x[16w + 4s + 0..3]`` (summed in that order)."""

    M: int
    K: int
    kind = "gemv_f32_dp4a"

    def __post_init__(self):
        check_positive(M=self.M, K=self.K)
        check_k(self.K)

    def args(self) -> list[Arg]:
        return [Arg("W", (self.M, self.K // 16), "int32"), Arg("x", (self.K,), "float32"),
                Arg("w_scale", (1,), "float32"), Arg("y", (self.M,), "float32", output=True)]  # fmt: skip

    def compute(self):
        from tvm import te

        M, K = self.M, self.K
        W = te.placeholder((M, K // 16), "int32", name="W")
        X = te.placeholder((K,), "float32", name="x")
        Ws = te.placeholder((1,), "float32", name="w_scale")
        w = te.reduce_axis((0, K // 16), name="w")
        s = te.reduce_axis((0, 4), name="s")

        def term(m):
            plane = te_plane(W, m, w, s)
            return sum(
                (((plane >> (8 * i)) & 3).astype("float32") - 1.0) * X[w * 16 + s * 4 + i] for i in range(4)
            )  # fmt: skip

        acc = te.compute((M,), lambda m: te.sum(term(m), axis=[w, s]), name="acc")
        Y = te.compute((M,), lambda m: acc[m] * Ws[0], name="y")
        return te.create_prim_func([W, X, Ws, Y])

    def reference(self, W, x, w_scale, impl="auto"):
        impl = _impl(impl, self.M * self.K)
        return [reference.ternary_matmul_f32(_rowmajor4(W), x, float(w_scale[0]), impl=impl)]

    def random_inputs(self, rng):
        return [_dp4a_weights(rng, self.M, self.K), rng.standard_normal(self.K).astype(np.float32),
                np.array([rng.uniform(0.01, 2)], np.float32)]  # fmt: skip

    def tolerances(self, W, x, w_scale) -> list[float]:
        from compiler.ops.ternary_gemv import TernaryGemvF32

        return [TernaryGemvF32(self.M, self.K).tolerance(x, float(w_scale[0]))]

    def ops(self) -> float:
        return 2.0 * self.M * self.K


if __name__ == "__main__":
    import tvm

    from targets import get_target

    rng = np.random.default_rng(0)
    for op in (TernaryGemvDp4a(256, 512, emulate=1), TernaryGemmDp4a(3, 256, 512, emulate=1)):
        ins = op.random_inputs(rng)
        args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
        tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
        print(op, "bit-exact:", np.array_equal(args[-1].numpy(), op.reference(*ins)[0]))
