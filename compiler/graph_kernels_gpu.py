"""CUDA twins of the graph kernels that :mod:`compiler.graph_kernels` writes as loop nests (no TE blocks, so no
schedule rule applies): causal GQA attention over the cache, and the LM head (the KV-cache write takes ``gpu=True``
in :func:`compiler.graph_kernels.kv_update`).

Same maths and buffers as the CPU versions (float32; attention's scratch ``sc``/``st`` outputs are used the same
way), with explicit thread bindings:

* ``attention``: one block per (token, query head), ``hd`` threads. Scores are computed a key per thread (strided),
  the max and the denominator are reduced by every thread over the block's scores (``__syncthreads`` between
  phases; ``n ≤ ctx`` adds each), then thread ``i`` produces output column ``i`` (coalesced over ``i``).
* ``lm_head``: on the GPU the head is stored untransposed (``[V, D]``) and is a plain TE GEMV.

    python -c "from compiler.graph_kernels_gpu import attention; print(attention(1, 8, 4, 64, 1024).script())"
"""

from __future__ import annotations

import math


def attention(T: int, H: int, Hkv: int, hd: int, ctx: int):
    from tvm.script import tirx as Tx

    g = H // Hkv
    scale = 1.0 / math.sqrt(hd)
    TH = T * H

    @Tx.prim_func
    def attn(
        q: Tx.Buffer((T, H, hd), "float32"),
        kc: Tx.Buffer((Hkv, ctx, hd), "float32"),
        vc: Tx.Buffer((Hkv, ctx, hd), "float32"),
        pos: Tx.Buffer((1,), "int32"),
        o: Tx.Buffer((T, H * hd), "float32"),
        sc: Tx.Buffer((TH, ctx), "float32"),
        st: Tx.Buffer((TH, 2), "float32"),
    ):
        for th in Tx.thread_binding(TH, thread="blockIdx.x"):
            for tx in Tx.thread_binding(hd, thread="threadIdx.x"):
                acc = Tx.alloc_buffer((2,), "float32", scope="local")
                n = Tx.min(pos[0] + th // H + 1, ctx)
                kh = (th % H) // g
                for jo in range((n + hd - 1) // hd):
                    if jo * hd + tx < n:
                        acc[0] = Tx.float32(0)
                        for i in range(hd):
                            acc[0] = acc[0] + q[th // H, th % H, i] * kc[kh, jo * hd + tx, i]
                        sc[th, jo * hd + tx] = acc[0] * Tx.float32(scale)
                Tx.tvm_storage_sync("shared")
                acc[0] = sc[th, 0]
                for j in range(n):
                    acc[0] = Tx.max(acc[0], sc[th, j])
                Tx.tvm_storage_sync("shared")
                for jo in range((n + hd - 1) // hd):
                    if jo * hd + tx < n:
                        sc[th, jo * hd + tx] = Tx.exp(sc[th, jo * hd + tx] - acc[0])
                Tx.tvm_storage_sync("shared")
                acc[0] = Tx.float32(0)
                acc[1] = Tx.float32(0)
                for j in range(n):
                    acc[0] = acc[0] + sc[th, j]
                    acc[1] = acc[1] + sc[th, j] * vc[kh, j, tx]
                o[th // H, (th % H) * hd + tx] = acc[1] / acc[0]
                if tx == 0:
                    st[th, 1] = acc[0]

    return attn.without_attr("global_symbol")


def lm_head(V: int, D: int, dtype: str = "float32"):
    """``logits[v] = Σ_d W[v, d] · h[d]`` over the untransposed head ``W [V, D]`` (float16 kept as stored): a TE
    GEMV, scheduled by :func:`schedules.cuda.rows` (a block per row, threads across ``d``, coalesced)."""
    from tvm import te

    h = te.placeholder((D,), "float32", name="h")
    W = te.placeholder((V, D), dtype, name="W")
    d = te.reduce_axis((0, D), name="d")
    out = te.compute((V,), lambda v: te.sum(W[v, d].astype("float32") * h[d], axis=d), name="logits")
    return te.create_prim_func([h, W, out]).without_attr("global_symbol")


def norm_quantize(T: int, D: int, eps: float | None = None, threads: int = 256):
    """RMSNorm (``eps`` given; else none) + int8 per-token quantize in ONE kernel: a CUDA block per token, ``threads``
    threads striding over ``D``, the three reductions (Σx², max|h|, Σq) as shared-memory trees. Same outputs and
    maths as :class:`compiler.ops.rmsnorm_quant.RmsNormQuant` (``eps`` given: parameters ``x, weight, q, scale,
    q_sum``) or :func:`compiler.graph_kernels.quantize` (``x, q, scale, q_sum``); only the order of the float sums
    differs (a tree instead of lanes), which that op's tolerances cover. Replaces the 7 (4) kernels a per-block
    schedule makes of them: the decode step is launch-bound."""
    from tvm.script import tirx as Tx

    from model.ternary.quant import ACT_QMAX, SCALE_EPS

    if D % threads:
        raise ValueError(f"D = {D} must be a multiple of {threads}")
    per, levels = D // threads, threads.bit_length() - 1
    norm = eps is not None
    epsv = float(eps or 0.0)

    @Tx.macro
    def body(X, W, Q, S, QS):
        for t in Tx.thread_binding(T, thread="blockIdx.x"):
            for tx in Tx.thread_binding(threads, thread="threadIdx.x"):
                red = Tx.alloc_buffer((threads,), "float32", scope="shared")
                redi = Tx.alloc_buffer((threads,), "int32", scope="shared")
                h = Tx.alloc_buffer((per,), "float32", scope="local")
                acc = Tx.alloc_buffer((2,), "float32", scope="local")
                isum = Tx.alloc_buffer((1,), "int32", scope="local")
                acc[1] = Tx.float32(1)
                if norm:
                    acc[0] = Tx.float32(0)
                    for i in range(per):
                        acc[0] = acc[0] + X[t, i * threads + tx] * X[t, i * threads + tx]
                    red[tx] = acc[0]
                    Tx.tvm_storage_sync("shared")
                    for s in Tx.unroll(levels):
                        if tx < Tx.shift_right(threads, s + 1):
                            red[tx] = red[tx] + red[tx + Tx.shift_right(threads, s + 1)]
                        Tx.tvm_storage_sync("shared")
                    acc[1] = Tx.float32(1) / Tx.sqrt(red[0] / Tx.float32(D) + Tx.float32(epsv))
                    Tx.tvm_storage_sync("shared")
                acc[0] = Tx.float32(0)
                for i in range(per):
                    if norm:
                        h[i] = X[t, i * threads + tx] * acc[1] * W[i * threads + tx]
                    else:
                        h[i] = X[t, i * threads + tx]
                    acc[0] = Tx.max(acc[0], Tx.fabs(h[i]))
                red[tx] = acc[0]
                Tx.tvm_storage_sync("shared")
                for s in Tx.unroll(levels):
                    if tx < Tx.shift_right(threads, s + 1):
                        red[tx] = Tx.max(red[tx], red[tx + Tx.shift_right(threads, s + 1)])
                    Tx.tvm_storage_sync("shared")
                acc[1] = Tx.float32(ACT_QMAX) / Tx.max(red[0], Tx.float32(SCALE_EPS))
                if tx == 0:
                    S[t] = acc[1]
                isum[0] = 0
                for i in range(per):
                    acc[0] = Tx.min(Tx.max(Tx.nearbyint(h[i] * acc[1]), Tx.float32(-ACT_QMAX)), Tx.float32(ACT_QMAX))
                    Q[t, i * threads + tx] = Tx.Cast("int8", acc[0])
                    isum[0] = isum[0] + Tx.Cast("int32", acc[0])
                redi[tx] = isum[0]
                Tx.tvm_storage_sync("shared")
                for s in Tx.unroll(levels):
                    if tx < Tx.shift_right(threads, s + 1):
                        redi[tx] = redi[tx] + redi[tx + Tx.shift_right(threads, s + 1)]
                    Tx.tvm_storage_sync("shared")
                if tx == 0:
                    QS[t] = redi[0]

    if norm:

        @Tx.prim_func
        def rms_quant(
            x: Tx.Buffer((T, D), "float32"),
            w: Tx.Buffer((D,), "float32"),
            q: Tx.Buffer((T, D), "int8"),
            scale: Tx.Buffer((T,), "float32"),
            q_sum: Tx.Buffer((T,), "int32"),
        ):
            body(x, w, q, scale, q_sum)

        return rms_quant.without_attr("global_symbol")

    @Tx.prim_func(check_well_formed=False)  # a root block around loop-style code: legal, but unverified
    def quant(
        x: Tx.Buffer((T, D), "float32"),
        q: Tx.Buffer((T, D), "int8"),
        scale: Tx.Buffer((T,), "float32"),
        q_sum: Tx.Buffer((T,), "int32"),
    ):
        with Tx.sblock("root"):  # a block body: Relax's reshape analysis asserts one on single-input kernels
            body(x, x, q, scale, q_sum)  # no weight: the norm branch that reads it is not generated

    return quant.without_attr("global_symbol")


def mhc_post(D: int, S: int, first: bool, last: bool, threads: int = 256):
    """The decode-time mHC site op (:class:`compiler.ops.mhc.MhcPost`) as ONE CUDA kernel: ``threads`` threads
    striding over the columns, each column's ``S`` outputs and ``u`` kept in registers (same sums in the same order
    as the op's TE), ``Σu²`` reduced as a shared-memory tree. Parameters as the op's, except that the first site's
    embedding comes as ``x [1, D]``. Replaces the 3 kernels a per-block schedule makes of it."""
    from tvm.script import tirx as Tx

    if D % threads:
        raise ValueError(f"D = {D} must be a multiple of {threads}")
    per, levels = D // threads, threads.bit_length() - 1
    rows, inv_s = (1 if first else S), 1.0 / S

    @Tx.macro
    def body(X, Y, H, HP, HPRE, XO, U, SS):
        for _b in Tx.thread_binding(1, thread="blockIdx.x"):
            for tx in Tx.thread_binding(threads, thread="threadIdx.x"):
                red = Tx.alloc_buffer((threads,), "float32", scope="shared")
                acc = Tx.alloc_buffer((S + 2,), "float32", scope="local")
                acc[S + 1] = Tx.float32(0)
                for i in range(per):
                    acc[S] = Tx.float32(0)
                    for s in Tx.unroll(S):
                        acc[s] = H[s, 0] * X[0, i * threads + tx]
                        for j in Tx.unroll(1, S):
                            acc[s] = acc[s] + H[s, j] * X[j * (rows - 1) // max(S - 1, 1), i * threads + tx]
                        acc[s] = acc[s] + HP[s] * Y[i * threads + tx]
                        if not last:
                            XO[s, i * threads + tx] = acc[s]
                        if last:
                            acc[S] = acc[S] + Tx.float32(inv_s) * acc[s]
                        else:
                            acc[S] = acc[S] + HPRE[s] * acc[s]
                    U[i * threads + tx] = acc[S]
                    acc[S + 1] = acc[S + 1] + acc[S] * acc[S]
                red[tx] = acc[S + 1]
                Tx.tvm_storage_sync("shared")
                for s in Tx.unroll(levels):
                    if tx < Tx.shift_right(threads, s + 1):
                        red[tx] = red[tx] + red[tx + Tx.shift_right(threads, s + 1)]
                    Tx.tvm_storage_sync("shared")
                if tx == 0:
                    SS[0] = red[0]

    if not last:

        @Tx.prim_func
        def site(
            x: Tx.Buffer((rows, D), "float32"),
            y: Tx.Buffer((D,), "float32"),
            h_res: Tx.Buffer((S, S), "float32"),
            h_post: Tx.Buffer((S,), "float32"),
            h_pre: Tx.Buffer((S,), "float32"),
            x_out: Tx.Buffer((S, D), "float32"),
            u: Tx.Buffer((D,), "float32"),
            ss: Tx.Buffer((1,), "float32"),
        ):
            body(x, y, h_res, h_post, h_pre, x_out, u, ss)

        return site.without_attr("global_symbol")

    @Tx.prim_func
    def last_site(
        x: Tx.Buffer((rows, D), "float32"),
        y: Tx.Buffer((D,), "float32"),
        h_res: Tx.Buffer((S, S), "float32"),
        h_post: Tx.Buffer((S,), "float32"),
        u: Tx.Buffer((D,), "float32"),
        ss: Tx.Buffer((1,), "float32"),
    ):
        body(x, y, h_res, h_post, h_post, x, u, ss)  # no h_pre, no X': their branches are not generated

    return last_site.without_attr("global_symbol")
