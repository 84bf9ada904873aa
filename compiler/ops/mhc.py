"""Fused mHC-lite site epilogue: post+mix of the streams and the next site's pre-aggregate, in one pass (docs/mhc.md).

Per token, with ``S`` streams of width ``D`` (float32) and the static coefficients of this site (``h_res [S, S]``,
``h_post [S]``) and of the next one (``h_pre [S]``)::

    X'[s, d] = Σ_j h_res[s, j] · X[j, d] + h_post[s] · y[d]      # X' = H_res·X + h_post ⊗ y  (mHC eq. 3 order)
    u[d]     = Σ_s h_pre[s] · X'[s, d]                           # the next site's sublayer input
    ss       = Σ_d u[d]²                                         # for the next RMSNorm

Each column ``d`` is read once (S values of X and one of y), kept in registers, and written once (S values of X'
and one of u): ``(S+1)·D`` floats in, ``(S+1)·D`` out, no temporaries. Because a column is fully read before it is
written, the kernel may be called with ``X'`` aliasing ``X`` (in place); a test does that.

Variants folded in (fields ``first``/``last``):

* ``first=1`` — *expand* folded in: the input is the embedding ``x [D]`` standing for every stream (``X[j] = x``).
* ``last=1`` — *collapse* folded in: no ``X'`` is written and ``u`` is the mean of the streams (``h_pre = 1/S``,
  exact for S ∈ {1, 2, 4}: scaling by a power of two commutes with rounding), ``ss`` feeds the final norm.

Reference: :func:`mhc_reference` (float64, then rounded); the float32 kernel stays within ``(S+2)·2⁻²⁴·Σ|terms|``.

    python -m compiler.ops.mhc                  # untuned TE for D=512, S=4 vs numpy
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.ops.base import Arg, Op, OpShapeError, check_positive

STREAMS = (1, 2, 4)


def mhc_reference(X, y, h_res, h_post, h_pre, last: bool = False):
    """float64 maths, float32 results: ``(X' or None, u, ss)`` for ``X [S, D]``, ``y [D]``."""
    X = np.asarray(X, np.float64)
    Xp = np.asarray(h_res, np.float64) @ X + np.asarray(h_post, np.float64)[:, None] * np.asarray(y, np.float64)
    w = np.full(X.shape[0], 1.0 / X.shape[0]) if last else np.asarray(h_pre, np.float64)
    u = w @ Xp
    return (None if last else Xp.astype(np.float32)), u.astype(np.float32), np.float32((u * u).sum())


@dataclass(frozen=True)
class MhcPost(Op):
    D: int
    S: int
    first: int = 0
    last: int = 0
    kind = "mhc_post"

    def __post_init__(self):
        check_positive(D=self.D, S=self.S)
        if self.S not in STREAMS:
            raise OpShapeError(f"S = {self.S}: mHC-lite uses 1, 2 or 4 streams")

    def args(self) -> list[Arg]:
        S, D = self.S, self.D
        x = Arg("x", (D,), "float32") if self.first else Arg("X", (S, D), "float32")
        ins = [x, Arg("y", (D,), "float32"), Arg("h_res", (S, S), "float32"), Arg("h_post", (S,), "float32")]
        if not self.last:
            ins.append(Arg("h_pre", (S,), "float32"))
        outs = [] if self.last else [Arg("X_out", (S, D), "float32", True)]
        return ins + outs + [Arg("u", (D,), "float32", True), Arg("ss", (1,), "float32", True)]

    def compute(self):
        import tvm
        from tvm import te

        S, D = self.S, self.D
        X = te.placeholder((D,) if self.first else (S, D), "float32", name="x" if self.first else "X")
        y = te.placeholder((D,), "float32", name="y")
        H = te.placeholder((S, S), "float32", name="h_res")
        hpost = te.placeholder((S,), "float32", name="h_post")
        hpre = None if self.last else te.placeholder((S,), "float32", name="h_pre")
        xin = (lambda j, d: X[d]) if self.first else (lambda j, d: X[j, d])

        def mix(s, d):  # unrolled sum in a fixed order: H[s,0]·X[0] + H[s,1]·X[1] + ... + h_post[s]·y
            acc = H[s, 0] * xin(0, d)
            for j in range(1, S):
                acc = acc + H[s, j] * xin(j, d)
            return acc + hpost[s] * y[d]

        Xp = te.compute((S, D), mix, name="X_out")
        inv_s = tvm.tirx.const(1.0 / S, "float32")

        rs = te.reduce_axis((0, S), name="rs")  # sequential over s: ((h0·X'0) + h1·X'1) + ...
        u = te.compute((D,), lambda d: te.sum((inv_s if self.last else hpre[rs]) * Xp[rs, d], axis=rs), name="u")
        k = te.reduce_axis((0, D), name="k")
        ss = te.compute((1,), lambda _: te.sum(u[k] * u[k], axis=k), name="ss")
        params = [X, y, H, hpost] + ([] if self.last else [hpre, Xp]) + [u, ss]
        return te.create_prim_func(params)

    def reference(self, *ins):
        X = np.broadcast_to(ins[0], (self.S, self.D)) if self.first else ins[0]
        y, h_res, h_post = ins[1], ins[2], ins[3]
        h_pre = None if self.last else ins[4]
        Xp, u, ss = mhc_reference(X, y, h_res, h_post, h_pre, last=bool(self.last))
        return ([] if self.last else [Xp]) + [u, np.array([ss], np.float32)]

    def tolerances(self, *ins) -> list[float]:
        """Per-output absolute bounds: ``(S+2)·u·Σ|terms|`` per element (``ss``: relative, ``2(D+S)·u``)."""
        X = np.abs(np.broadcast_to(ins[0], (self.S, self.D)) if self.first else ins[0]).astype(np.float64)
        y, H, hp = (np.abs(a).astype(np.float64) for a in ins[1:4])
        eps = (self.S + 2) * 2.0**-24
        terms = H @ X + hp[:, None] * y
        pre = np.full(self.S, 1.0 / self.S) if self.last else np.abs(ins[4]).astype(np.float64)
        u_bound = eps * (pre @ terms) * 2
        u = self.reference(*ins)[-2].astype(np.float64)
        ss_bound = (2 * (self.D + self.S) * 2.0**-24 * (u * u).sum() + 2 * (np.abs(u) * u_bound).sum()) * 1.01
        out = [] if self.last else [float(eps * terms.max())]
        return [*out, float(u_bound.max()), float(ss_bound)]

    def random_inputs(self, rng):
        S, D = self.S, self.D
        x = rng.standard_normal((D,) if self.first else (S, D)).astype(np.float32)
        p = rng.random((S, S)) + 0.1
        for _ in range(50):  # Sinkhorn: a (nearly) doubly stochastic H_res, like the model's
            p /= p.sum(axis=1, keepdims=True)
            p /= p.sum(axis=0, keepdims=True)
        ins = [x, rng.standard_normal(D).astype(np.float32), p.astype(np.float32),
               rng.uniform(0, 2, S).astype(np.float32)]  # fmt: skip
        if not self.last:
            ins.append(rng.uniform(0, 1, S).astype(np.float32))
        return ins

    def ops(self) -> float:
        return float((2 * self.S * self.S + 2 * self.S) * self.D + 2 * self.S * self.D + 2 * self.D)

    def bytes_moved(self) -> float:
        S, D = self.S, self.D
        reads = (D if self.first else S * D) + D
        writes = (0 if self.last else S * D) + D
        return 4.0 * (reads + writes)


if __name__ == "__main__":
    import tvm

    from targets import get_target

    for op in (MhcPost(512, 4), MhcPost(512, 2, first=1), MhcPost(512, 4, last=1)):
        ins = op.random_inputs(np.random.default_rng(0))
        args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
        tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
        errs = [float(np.abs(a.numpy() - r).max()) for a, r in zip(args[len(ins) :], op.reference(*ins), strict=True)]
        print(op, "max |err| per output:", errs, "bounds:", op.tolerances(*ins))
