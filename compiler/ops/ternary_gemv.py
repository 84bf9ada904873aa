"""Ternary GEMV (decode, one token): packed 2-bit weights × activations → float32 outputs.

Two variants, both on the ``rowmajor4`` weight layout ``W uint8[M, K/4]`` (code k of row m at bits 2·(k%4) of
``W[m, k//4]``, codes {0, 1, 2} = {−1, 0, +1}):

* ``gemv_i8`` (W2A8): int8 activations ``x`` with their per-token ``Σx`` and scale (from ``rmsnorm_quant``);
  ``acc[m] = Σ_k code·x − Σx`` in int32 (exact), ``y[m] = float32(acc) · (w_scale / x_scale)`` in float32 —
  bit-exact with :func:`model.ternary.reference.ternary_matmul_i8`.
* ``gemv_f32``: float32 activations, ``y[m] = Σ_k (code − 1)·x_k · w_scale`` accumulated in float32 (the
  reference sums in float64; see the tolerance in tests/test_ops_gemv.py).

The compute first copies x into the *k-interleaved* layout ``Xt[c, j, b] = x[256c + 4b + j]`` (a cheap K-element
stage) so that byte ``b`` of a 64-byte weight chunk lines up with ``Xt[c, j, b]`` for each of its four codes ``j``:
the SIMD kernels (schedules/intrin_x86.py) then decode all four code planes of 64 bytes with one shift + AND each and
need no shuffles. The reduction is written over ``(c, b, j)`` so the tensorized block matches the intrinsic exactly.

    python -m compiler.ops.ternary_gemv        # builds the untuned TE for 256×512 and checks it against numpy
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.ops.base import Arg, Op, OpShapeError, check_k, check_positive
from compiler.ops.stacked import by_parts, check_parts, n_scales, parts_suffix, te_part_scale
from model.ternary import reference
from model.ternary.layouts_x86 import TILES, tile_rowmajor4, untile_rowmajor4

CHUNK = 256  # codes per interleave chunk (= 64 packed bytes = one intrinsic call)


def check_tile(M: int, tile: int) -> None:
    if tile and (tile not in TILES or M % tile):
        raise OpShapeError(f"tile = {tile}: must be one of {TILES} and divide M = {M}")


def weight_shape(M: int, K: int, tile: int) -> tuple[int, ...]:
    """The packed weights' shape: ``rowmajor4 [M, K/4]`` (tile 0) or ``tile{R} [M/R, K/256, R, 64]``."""
    return (M // tile, K // CHUNK, tile, 64) if tile else (M, K // 4)


def te_code(W, m, kb, j):
    """The storage code {0,1,2} (uint8) of weight ``(m, 4·kb + j)``."""
    import tvm

    return (W[m, kb] >> (j * 2).astype("uint8")) & tvm.tirx.const(3, "uint8")


def te_interleave(X, K: int, lead: tuple = ()):
    """``Xt[..., c, j, b] = X[..., 256c + 4b + j]``."""
    from tvm import te

    if lead:
        return te.compute(
            (*lead, K // CHUNK, 4, 64), lambda n, c, j, b: X[n, c * CHUNK + b * 4 + j], name="Xt"
        )  # fmt: skip
    return te.compute((K // CHUNK, 4, 64), lambda c, j, b: X[c * CHUNK + b * 4 + j], name="Xt")


@dataclass(frozen=True)
class TernaryGemvI8(Op):
    """``y[M] = float32(Σ code·x − Σx) · (w_scale / x_scale)``; the reduction block is named ``acc``.

    ``tile=0``: weights in ``rowmajor4 [M, K/4]``; ``tile=R``: in the ``tile{R}`` layout ``[M/R, K/256, R, 64]`` of
    :mod:`model.ternary.layouts_x86` (one linear stream per row tile; the schedule's row tile is then R).

    ``E > 0`` (mixture of experts): ``W`` stacks ``E`` experts' matrices ``[E, ...]`` with a scale each (``w_scale
    [E]``), and an int64 scalar ``e`` after them (a Relax call's ``PrimValue`` argument) picks the expert: the kernel
    reads only that expert's bytes. ``P`` > 1: each expert's rows are ``P`` matrices of ``M / P`` rows stacked (an
    expert's gate and up, read in one pass), with a scale each (``w_scale [E, P]``); every element is still computed
    exactly as for its own matrix. ``X`` > 0: the activations are ``X`` rows (``x [X, K]``, ``x_sum``/``x_scale
    [X]``) and a second scalar ``r`` after ``e`` picks the row (no slice of it is made per call). The loops are the
    dense kernel's, so ``E``, ``P`` and ``X`` are not dimensions: the expert kernel takes the dense workload's tuning
    record (:meth:`Op.canonical`).

    ``parts`` (dense only): ``W`` stacks a layer's matrices of these row counts (q|k|v, gate|up), a scale each
    (``w_scale [len(parts)]``, :mod:`compiler.ops.stacked`).
    """

    M: int
    K: int
    tile: int = 0
    E: int = field(default=0, metadata={"dim": False})
    P: int = field(default=1, metadata={"dim": False})
    X: int = field(default=0, metadata={"dim": False})
    parts: tuple[int, ...] = field(default=(), metadata={"dim": False})
    kind = "gemv_i8"

    def __post_init__(self):
        check_positive(M=self.M, K=self.K, P=self.P)
        check_k(self.K)
        check_tile(self.M, self.tile)
        if self.P > 1 and (not self.E or self.M % (self.P * max(self.tile, 1))):
            raise OpShapeError(f"P = {self.P} stacked matrices need experts (E > 0) and M = {self.M} in whole tiles")
        if self.X and not self.E:
            raise OpShapeError(f"X = {self.X} activation rows: an expert kernel's (E > 0) only")
        if self.parts and self.E:
            raise OpShapeError(f"parts = {self.parts}: a dense stacked matrix's (experts stack with P)")
        check_parts(self.parts, self.M)

    def w_shape(self) -> tuple[int, ...]:
        return ((self.E,) if self.E else ()) + weight_shape(self.M, self.K, self.tile)

    def ws_shape(self) -> tuple[int, ...]:
        return (self.E, self.P) if self.E else (n_scales(self.parts),)

    @property
    def func_name(self) -> str:
        experts = (f"_E{self.E}" if self.E else "") + (f"_P{self.P}" if self.P > 1 else "")
        return super().func_name + experts + (f"_X{self.X}" if self.X else "") + parts_suffix(self.parts)

    def args(self) -> list[Arg]:
        """The arrays, in order (an expert kernel's scalars ``e`` [and ``r``] come between ``w_scale`` and ``y``)."""
        rows = (self.X,) if self.X else ()
        return [Arg("W", self.w_shape(), "uint8"), Arg("x", (*rows, self.K), "int8"),
                Arg("x_sum", rows or (1,), "int32"), Arg("x_scale", rows or (1,), "float32"),
                Arg("w_scale", self.ws_shape(), "float32"), Arg("y", (self.M,), "float32", output=True)]  # fmt: skip

    def compute(self):
        import tvm
        from tvm import te

        M, K, R = self.M, self.K, self.tile
        W = te.placeholder(self.w_shape(), "uint8", name="W")
        rows = (self.X,) if self.X else ()
        X = te.placeholder((*rows, K), "int8", name="x")
        Xsum = te.placeholder(rows or (1,), "int32", name="x_sum")
        Xs = te.placeholder(rows or (1,), "float32", name="x_scale")
        Ws = te.placeholder(self.ws_shape(), "float32", name="w_scale")
        e = te.var("e", "int64") if self.E else None
        r = te.var("r", "int64") if self.X else None
        if e is not None:  # the expert's matrix: W[e] (a scalar index keeps the block tensorizable)
            Wall, W = W, _ExpertView(W, e)
        at = 0 if r is None else r  # the activation row
        if r is not None:
            Xt = te.compute((K // CHUNK, 4, 64), lambda c, j, b: X[r, c * CHUNK + b * 4 + j], name="Xt")
        else:
            Xt = te_interleave(X, K)
        c = te.reduce_axis((0, K // CHUNK), name="c")
        b = te.reduce_axis((0, 64), name="b")
        j = te.reduce_axis((0, 4), name="j")
        if R:
            three = tvm.tirx.const(3, "uint8")
            code = lambda m: (W[m // R, c, m % R, b] >> (j * 2).astype("uint8")) & three  # noqa: E731
        else:
            code = lambda m: te_code(W, m, c * 64 + b, j)  # noqa: E731
        acc = te.compute(
            (M,),
            lambda m: te.sum(code(m).astype("int32") * Xt[c, j, b].astype("int32"), axis=[c, b, j]),
            name="acc",
        )
        part = M // self.P
        ws = (lambda m: Ws[e, m // part]) if e is not None else te_part_scale(Ws, self.parts)
        Y = te.compute((M,), lambda m: (acc[m] - Xsum[at]).astype("float32") * (ws(m) / Xs[at]), name="y")
        if e is not None:
            return te.create_prim_func([Wall, X, Xsum, Xs, Ws, e, *([r] if r is not None else []), Y])
        return te.create_prim_func([W, X, Xsum, Xs, Ws, Y])

    def reference(self, W, x, x_sum, x_scale, w_scale, e=None, r=None, impl="auto"):
        impl = _impl(impl, self.M * self.K)
        if self.X:
            x, x_sum, x_scale = x[r], x_sum[r : r + 1], x_scale[r : r + 1]
        if int(x_sum[0]) != int(x.astype(np.int64).sum()):
            raise ValueError("x_sum must equal Σx (the kernel trusts it)")
        if self.tile:
            W = untile_rowmajor4(W[e] if self.E else W)
        elif self.E:
            W = W[e]
        xs = x_scale.astype(np.float32)
        if self.E:
            part = self.M // self.P
            parts, w_scale = (part,) * self.P if self.P > 1 else (), w_scale[e]
        else:
            parts = self.parts
        return [by_parts(lambda a, b, s: reference.ternary_matmul_i8(W[a:b], x, xs, s, impl=impl)[1], w_scale, parts,
                         self.M)]  # fmt: skip

    def random_inputs(self, rng):
        W = random_packed(rng, self.M, self.K)
        if self.tile:
            W = tile_rowmajor4(W, self.tile)
        x = rng.integers(-127, 128, self.K, dtype=np.int8)
        return [W, x, np.array([x.astype(np.int32).sum()], np.int32), np.array([rng.uniform(0.5, 50)], np.float32),
                rng.uniform(0.01, 2, n_scales(self.parts)).astype(np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.M * self.K


class _ExpertView:
    """``W[e]`` of a stacked TE placeholder: ``view[i, ...]`` reads ``W[e, i, ...]``."""

    def __init__(self, W, e) -> None:
        self.W, self.e = W, e

    def __getitem__(self, idx):
        return self.W[(self.e, *(idx if isinstance(idx, tuple) else (idx,)))]


@dataclass(frozen=True)
class TernaryGemvF32(Op):
    """``y[M] = Σ (code − 1)·x · w_scale`` with float32 activations and accumulation; reduction block ``y_acc``."""

    M: int
    K: int
    kind = "gemv_f32"

    def __post_init__(self):
        check_positive(M=self.M, K=self.K)
        check_k(self.K)

    def args(self) -> list[Arg]:
        return [Arg("W", (self.M, self.K // 4), "uint8"), Arg("x", (self.K,), "float32"),
                Arg("w_scale", (1,), "float32"), Arg("y", (self.M,), "float32", output=True)]  # fmt: skip

    def compute(self):
        from tvm import te

        M, K = self.M, self.K
        W = te.placeholder((M, K // 4), "uint8", name="W")
        X = te.placeholder((K,), "float32", name="x")
        Ws = te.placeholder((1,), "float32", name="w_scale")
        Xt = te_interleave(X, K)
        c = te.reduce_axis((0, K // CHUNK), name="c")
        b = te.reduce_axis((0, 64), name="b")
        j = te.reduce_axis((0, 4), name="j")
        acc = te.compute(
            (M,),
            lambda m: te.sum((te_code(W, m, c * 64 + b, j).astype("float32") - 1.0) * Xt[c, j, b], axis=[c, b, j]),
            name="y_acc",
        )
        Y = te.compute((M,), lambda m: acc[m] * Ws[0], name="y")
        return te.create_prim_func([W, X, Ws, Y])

    def reference(self, W, x, w_scale, impl="auto"):
        impl = _impl(impl, self.M * self.K)
        return [reference.ternary_matmul_f32(W, x, float(w_scale[0]), impl=impl)]

    def random_inputs(self, rng):
        return [random_packed(rng, self.M, self.K), rng.standard_normal(self.K).astype(np.float32),
                np.array([rng.uniform(0.01, 2)], np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.M * self.K

    def tolerances(self, W, x, w_scale) -> list[float]:
        return [self.tolerance(x, float(w_scale[0]))]

    def tolerance(self, x: np.ndarray, w_scale: float) -> float:
        """Absolute error bound of a float32 sum of K terms of |x| vs the float64 reference: ``γ_K·Σ|x|·w_scale``.

        Worst case (any summation order) is ``(K−1)·u·Σ|x|`` with ``u = 2⁻²⁴``; the blocked/lane sums of the kernels
        do much better, so the bound is safe and still catches a wrong code or a dropped chunk (error ≥ min|x|).
        """
        return float(self.K * 2.0**-24 * np.abs(x).astype(np.float64).sum() * w_scale) + 1e-30


def _impl(impl: str, size: int) -> str:
    """``auto``: numpy for small matrices, the C++ scalar loops for large ones (numpy unpacks to int32: 16 B/weight)."""
    if impl != "auto":
        return impl
    return "scalar" if size > 1 << 24 and reference.scalar_available() else "numpy"


def random_packed(rng: np.random.Generator, M: int, K: int) -> np.ndarray:
    """Random ``rowmajor4`` weights (codes 0..2 only, never the invalid 3)."""
    c = rng.integers(0, 3, (M, K // 4, 4), dtype=np.uint8)
    return (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).astype(np.uint8)


if __name__ == "__main__":
    import tvm

    from targets import get_target

    rng = np.random.default_rng(0)
    for op in (TernaryGemvI8(256, 512), TernaryGemvF32(256, 512)):
        ins = op.random_inputs(rng)
        args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]  # TVM-allocated: 64-byte aligned
        ex = tvm.compile(op.compute(), target=get_target("auto"))
        ex["main"](*args)
        ref = op.reference(*ins)[0]
        print(op, "max |err| =", float(np.abs(args[-1].numpy() - ref).max()))
