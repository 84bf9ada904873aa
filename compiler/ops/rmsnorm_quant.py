"""Fused RMSNorm + int8 per-token quantize: float32 ``x[N, D]`` → int8 ``q``, float32 ``scale``, int32 ``Σq``.

    h     = x · (1 / sqrt(Σx²/D + eps)) · weight                    # model.attention.RMSNorm, float32
    scale = 127 / max(max|h|, 1e-5)                                 # model.ternary.quant.quantize_activations
    q     = clip(round_half_even(h · scale), −127, 127),  Σq        # the W2A8 GEMV's x, x_scale and x_sum

One pass over the token for ``Σx²``, one for ``max|h|``, one to quantize (``h`` is recomputed, never stored).
Rounding: TVM's ``round`` lowers to LLVM ``nearbyint`` — half to even under the default rounding mode, like numpy
and torch; the compute calls ``tvm.tirx.nearbyint`` to make that explicit, and a test pins it on exact .5 cases.

Exactness: ``q``/``scale``/``Σq`` equal the numpy reference bit for bit whenever ``Σx²`` is exact in float32 (the
only order-dependent step: the kernel sums in vector lanes, numpy pairwise), which the tests arrange; for general
inputs ``scale`` agrees to a few ulps and a ``q`` can differ by 1 where ``h·scale`` lies within rounding error of a
half-integer (the tests bound both).

    python -m compiler.ops.rmsnorm_quant        # untuned TE for 2×512 vs numpy
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.ops.base import Arg, Op, check_positive
from model.ternary.quant import ACT_QMAX, SCALE_EPS, quantize_activations

NORM_EPS = 1e-5  # model.config.ModelConfig.norm_eps default


def rmsnorm_numpy(x: np.ndarray, weight: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """float32 RMSNorm in the kernel's order: ``(x · (1/sqrt(Σx²/D + eps))) · weight``."""
    x = x.astype(np.float32)
    ms = (np.square(x).sum(axis=-1, dtype=np.float32) / np.float32(x.shape[-1])).astype(np.float32)
    inv = (np.float32(1.0) / np.sqrt(ms + np.float32(eps))).astype(np.float32)
    return ((x * inv[..., None]).astype(np.float32) * weight.astype(np.float32)).astype(np.float32)


@dataclass(frozen=True)
class RmsNormQuant(Op):
    D: int
    N: int = 1
    eps: float = field(
        default=NORM_EPS, metadata={"dim": False}
    )  # the model's norm_eps: not in the key (same schedule)
    kind = "rmsnorm_quant"

    def __post_init__(self):
        check_positive(D=self.D, N=self.N)

    def args(self) -> list[Arg]:
        N, D = self.N, self.D
        return [Arg("x", (N, D), "float32"), Arg("weight", (D,), "float32"), Arg("q", (N, D), "int8", True),
                Arg("scale", (N,), "float32", True), Arg("q_sum", (N,), "int32", True)]  # fmt: skip

    def compute(self, eps: float | None = None):
        import tvm
        from tvm import te

        N, D = self.N, self.D
        eps = self.eps if eps is None else eps
        X = te.placeholder((N, D), "float32", name="x")
        Wt = te.placeholder((D,), "float32", name="weight")
        d = te.reduce_axis((0, D), name="d")
        ss = te.compute((N,), lambda n: te.sum(X[n, d] * X[n, d], axis=d), name="ss")
        inv = te.compute(
            (N,), lambda n: tvm.tirx.const(1.0, "float32") / te.sqrt(ss[n] / float(D) + float(eps)), name="inv"
        )  # fmt: skip
        h = te.compute((N, D), lambda n, i: X[n, i] * inv[n] * Wt[i], name="h")
        d2 = te.reduce_axis((0, D), name="d2")
        amax = te.compute((N,), lambda n: te.max(te.abs(h[n, d2]), axis=d2), name="amax")
        scale = te.compute(
            (N,), lambda n: tvm.tirx.const(ACT_QMAX, "float32") / te.max(amax[n], float(SCALE_EPS)), name="scale"
        )  # fmt: skip
        q = te.compute(
            (N, D),
            lambda n, i: te.min(te.max(tvm.tirx.nearbyint(h[n, i] * scale[n]), -float(ACT_QMAX)), float(ACT_QMAX)
                                ).astype("int8"),
            name="q",
        )  # fmt: skip
        d3 = te.reduce_axis((0, D), name="d3")
        qsum = te.compute((N,), lambda n: te.sum(q[n, d3].astype("int32"), axis=d3), name="q_sum")
        return te.create_prim_func([X, Wt, q, scale, qsum])

    def reference(self, x, weight):
        a = quantize_activations(rmsnorm_numpy(x, weight))
        return [a.q, a.scale, a.total]

    def random_inputs(self, rng):
        return [rng.standard_normal((self.N, self.D)).astype(np.float32) * np.float32(rng.uniform(0.1, 10)),
                rng.uniform(0.5, 1.5, self.D).astype(np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 8.0 * self.N * self.D

    def tolerances(self, x, weight) -> list[float]:
        """q: ±1 (a half-integer tie decided by rounding error, see the module doc); scale: 8 ulps; Σq: ±D."""
        scale = self.reference(x, weight)[1]
        return [1.0, float(8 * np.spacing(scale.max())), float(self.D)]


if __name__ == "__main__":
    import tvm

    from targets import get_target

    op = RmsNormQuant(D=512, N=2)
    ins = op.random_inputs(np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
    for a, r in zip(args[2:], op.reference(*ins), strict=True):
        print(a.numpy().dtype, "max |diff| =", float(np.abs(a.numpy().astype(np.float64) - r).max()))
