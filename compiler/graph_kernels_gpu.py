"""CUDA twins of the graph kernels that :mod:`compiler.graph_kernels` writes as loop nests (no TE blocks, so dlight
cannot schedule them): the in-place KV-cache write, causal GQA attention over the cache, and the LM head.

Same maths and buffers as the CPU versions (float32; attention's scratch ``sc``/``st`` outputs are used the same
way), with explicit thread bindings:

* ``kv_update``: one block per (token, KV head), one thread per rotated pair.
* ``attention``: one block per (token, query head), ``hd`` threads. Scores are computed a key per thread (strided),
  the max and the denominator are reduced by every thread over the block's scores (``__syncthreads`` between
  phases; ``n ≤ ctx`` adds each), then thread ``i`` produces output column ``i`` (coalesced over ``i``).
* ``lm_head``: one thread per vocabulary entry (``ET [D, V]`` is read coalesced along ``v``), ``d`` in order.

    python -c "from compiler.graph_kernels_gpu import attention; print(attention(1, 8, 4, 64, 1024).script())"
"""

from __future__ import annotations

import math


def kv_update(T: int, Hkv: int, hd: int, ctx: int):
    from tvm.script import tirx as Tx

    half = hd // 2
    KV = Hkv * hd

    @Tx.prim_func
    def kv_write(
        k: Tx.Buffer((T, KV), "float32"),
        v: Tx.Buffer((T, KV), "float32"),
        pos: Tx.Buffer((1,), "int32"),
        cos: Tx.Buffer((ctx, half), "float32"),
        sin: Tx.Buffer((ctx, half), "float32"),
        kc: Tx.Buffer((Hkv, ctx, hd), "float32"),
        vc: Tx.Buffer((Hkv, ctx, hd), "float32"),
    ):
        for th in Tx.thread_binding(T * Hkv, thread="blockIdx.x"):
            for j in Tx.thread_binding(half, thread="threadIdx.x"):
                t = th // Hkv
                h = th % Hkv
                if pos[0] + t < ctx:
                    a = k[t, h * hd + j]
                    b = k[t, h * hd + j + half]
                    kc[h, pos[0] + t, j] = a * cos[pos[0] + t, j] - b * sin[pos[0] + t, j]
                    kc[h, pos[0] + t, j + half] = b * cos[pos[0] + t, j] + a * sin[pos[0] + t, j]
                    vc[h, pos[0] + t, j] = v[t, h * hd + j]
                    vc[h, pos[0] + t, j + half] = v[t, h * hd + j + half]

    return kv_write.without_attr("global_symbol")


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
    from tvm.script import tirx as Tx

    B = next(b for b in (128, 64, 32, 16, 8, 4, 2, 1) if V % b == 0)

    @Tx.prim_func
    def head(h: Tx.Buffer((D,), "float32"), ET: Tx.Buffer((D, V), dtype), out: Tx.Buffer((V,), "float32")):
        for vo in Tx.thread_binding(V // B, thread="blockIdx.x"):
            for vi in Tx.thread_binding(B, thread="threadIdx.x"):
                acc = Tx.alloc_buffer((1,), "float32", scope="local")
                acc[0] = Tx.float32(0)
                for d in range(D):
                    acc[0] = acc[0] + h[d] * Tx.Cast("float32", ET[d, vo * B + vi])
                out[vo * B + vi] = acc[0]

    return head.without_attr("global_symbol")
