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
