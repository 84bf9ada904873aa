"""Gated DeltaNet's graph kernels (:mod:`model.deltanet`): the gates and the recurrent state update, CPU and CUDA.

A DeltaNet layer keeps no KV cache: each sequence has a state ``S [Hk, hd, hd]`` per layer (``S[g, i, j]``: KV head
``g``, key dim ``i``, value dim ``j``), whatever its length. The state lives in a tensor ``[n_states, Hk, hd, hd]``
beside the KV caches, in the slot its first cache block's id indexes (``table[t, 0]``: every sequence owns one from
its first token on, and the runtime hands first blocks out of the ids ``[0, n_states)`` only, so the slot exists and
no other sequence holds it: :mod:`runtime.kv_cache`); position 0 starts it from zeros.

* :func:`gates`: ``gl [T, 2·Hk] = (W · q8) / a`` — the decay and write-strength logits from the layer's int8
  activations (the dequantized input the PyTorch module's gate projections read), ``W = [ssm_alpha; ssm_beta]``.
* :func:`recurrent`: per row ``t`` in order (the rows of a prefill chunk are consecutive positions of one sequence;
  a decode batch's rows are distinct sequences) and per KV head ``g``: ``k̂ = k / √(Σk² + 1e-6)``,
  ``α = exp(−exp(A_log) · softplus(gl_α + dt_bias))``, ``β = sigmoid(gl_β)``, ``S ← α S``, ``u = Sᵀ k̂``,
  ``S ← S + k̂ (β (v − u))ᵀ``, and for each of the ``H / Hk`` query heads ``o = Sᵀ q̂`` with ``q̂ = q / √(Σq² +
  1e-6) / √hd``. A padding row (``pos < 0``) outputs zeros and touches no state.

Every step's cost is the state's size, not the position: decode time per token is flat in the context. ``gpu``: a
CUDA block per KV head, a thread per value column ``j`` (the column ``S[:, j]`` is that thread's alone: the
reductions over ``i`` need no synchronisation; the norms go through shared memory); ``bind=False`` runs that form
with serial loops on the CPU (the tests). CPU: a parallel task per KV head, the column loops vectorized.

    python -c "from compiler.graph_kernels_deltanet import recurrent; print(recurrent(1, 8, 4, 64, 1024, 16).script())"
"""

from __future__ import annotations

import math

from compiler.graph_kernels import bindings, table_width

NORM_EPS = 1e-6  # inside the square root of q's and k's L2 norms (model.deltanet)


def state_shape(Hk: int, hd: int) -> tuple[tuple[int, ...], str]:
    """A DeltaNet layer's state tensor after ``n_states``."""
    return (Hk, hd, hd), "float32"


def gates(T: int, G: int, D: int):
    """``gl[t, j] = (Σ_d W[j, d] · q8[t, d]) / a[t]`` for the ``G = 2·Hk`` gate rows (TE: scheduled by the target)."""
    from tvm import te

    q8 = te.placeholder((T, D), "int8", name="q8")
    a = te.placeholder((T,), "float32", name="a")
    W = te.placeholder((G, D), "float32", name="W")
    d = te.reduce_axis((0, D), name="d")
    acc = te.compute((T, G), lambda t, j: te.sum(W[j, d] * q8[t, d].astype("float32"), axis=d), name="acc")
    gl = te.compute((T, G), lambda t, j: acc[t, j] / a[t], name="gl")
    return te.create_prim_func([q8, a, W, gl]).without_attr("global_symbol")


def recurrent(T: int, H: int, Hk: int, hd: int, ctx: int, block: int, gpu: bool = False, bind: bool = True):
    """``(q [T, H·hd], k [T, Hk·hd], v [T, Hk·hd], gl [T, 2·Hk], a_log [Hk], dt_bias [Hk], pos, table, state)`` →
    ``o [T, H·hd]``, ``state [n_states, Hk, hd, hd]`` updated in place (see the module docstring)."""
    from tvm.script import tirx as Tx

    W = table_width(ctx, block)
    G = H // Hk
    inv_sqrt = 1.0 / math.sqrt(hd)
    if gpu:
        return _recurrent_gpu(T, H, Hk, hd, ctx, W, G, inv_sqrt, bind)

    @Tx.prim_func
    def deltanet_cpu(
        q: Tx.Buffer((T, H * hd), "float32"),
        k: Tx.Buffer((T, Hk * hd), "float32"),
        v: Tx.Buffer((T, Hk * hd), "float32"),
        gl: Tx.Buffer((T, 2 * Hk), "float32"),
        a_log: Tx.Buffer((Hk,), "float32"),
        dt_bias: Tx.Buffer((Hk,), "float32"),
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        st_h: Tx.handle,
        o: Tx.Buffer((T, H * hd), "float32"),
    ):
        ns = Tx.int64()  # n_states
        st = Tx.match_buffer(st_h, (ns, Hk, hd, hd), "float32")
        for g in Tx.parallel(Hk):
            kn = Tx.alloc_buffer((hd,), "float32", scope="global")
            u = Tx.alloc_buffer((hd,), "float32", scope="global")
            sc = Tx.alloc_buffer((4,), "float32", scope="global")  # Σk², α, β, then Σq²
            for t in range(T):
                if pos[t] >= 0 and pos[t] < ctx:
                    b = Tx.Cast("int64", table[t, 0])
                    if pos[t] == 0:
                        for i in range(hd):
                            for j in Tx.vectorized(hd):
                                st[b, g, i, j] = Tx.float32(0)
                    sc[0] = Tx.float32(0)
                    for i in range(hd):
                        sc[0] = sc[0] + k[t, g * hd + i] * k[t, g * hd + i]
                    for i in range(hd):
                        kn[i] = k[t, g * hd + i] / Tx.sqrt(sc[0] + Tx.float32(NORM_EPS))
                    sc[1] = gl[t, g] + dt_bias[g]
                    sc[1] = Tx.exp(
                        -Tx.exp(a_log[g]) * (Tx.max(sc[1], Tx.float32(0)) + Tx.log1p(Tx.exp(-Tx.abs(sc[1]))))
                    )
                    sc[2] = Tx.float32(1) / (Tx.float32(1) + Tx.exp(-gl[t, Hk + g]))
                    for j in Tx.vectorized(hd):
                        u[j] = Tx.float32(0)
                    for i in range(hd):
                        for j in Tx.vectorized(hd):
                            st[b, g, i, j] = sc[1] * st[b, g, i, j]
                            u[j] = u[j] + st[b, g, i, j] * kn[i]
                    for j in Tx.vectorized(hd):
                        u[j] = sc[2] * (v[t, g * hd + j] - u[j])
                    for i in range(hd):
                        for j in Tx.vectorized(hd):
                            st[b, g, i, j] = st[b, g, i, j] + kn[i] * u[j]
                    for h in range(G):
                        sc[3] = Tx.float32(0)
                        for i in range(hd):
                            sc[3] = sc[3] + q[t, (g * G + h) * hd + i] * q[t, (g * G + h) * hd + i]
                        for i in range(hd):
                            kn[i] = (
                                q[t, (g * G + h) * hd + i]
                                / Tx.sqrt(sc[3] + Tx.float32(NORM_EPS))
                                * Tx.float32(inv_sqrt)
                            )
                        for j in Tx.vectorized(hd):
                            o[t, (g * G + h) * hd + j] = Tx.float32(0)
                        for i in range(hd):
                            for j in Tx.vectorized(hd):
                                o[t, (g * G + h) * hd + j] = o[t, (g * G + h) * hd + j] + st[b, g, i, j] * kn[i]
                else:
                    for h in range(G):
                        for j in Tx.vectorized(hd):
                            o[t, (g * G + h) * hd + j] = Tx.float32(0)

    return deltanet_cpu.without_attr("global_symbol")


def _recurrent_gpu(T: int, H: int, Hk: int, hd: int, ctx: int, W: int, G: int, inv_sqrt: float, bind: bool):
    from tvm.script import tirx as Tx

    blocks, threads = bindings(bind)
    sync = (lambda: Tx.tvm_storage_sync("shared")) if bind else (lambda: Tx.evaluate(0))
    scope = "shared" if bind else "global"

    @Tx.prim_func
    def deltanet_gpu(
        q: Tx.Buffer((T, H * hd), "float32"),
        k: Tx.Buffer((T, Hk * hd), "float32"),
        v: Tx.Buffer((T, Hk * hd), "float32"),
        gl: Tx.Buffer((T, 2 * Hk), "float32"),
        a_log: Tx.Buffer((Hk,), "float32"),
        dt_bias: Tx.Buffer((Hk,), "float32"),
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        st_h: Tx.handle,
        o: Tx.Buffer((T, H * hd), "float32"),
    ):
        ns = Tx.int64()  # n_states
        st = Tx.match_buffer(st_h, (ns, Hk, hd, hd), "float32")
        for g in blocks(Hk):
            kn = Tx.alloc_buffer((hd,), "float32", scope=scope)  # k̂, then each query head's q̂
            for t in range(T):
                for j in threads(hd):  # the raw key into shared memory
                    kn[j] = k[t, g * hd + j]
                sync()
                for j in threads(hd):  # column j of the state: decay, u[j], the delta write
                    acc = Tx.alloc_buffer((4,), "float32", scope="local")  # Σk² (then 1/norm), α, β, u
                    if pos[t] >= 0 and pos[t] < ctx:
                        acc[0] = Tx.float32(0)
                        for i in range(hd):
                            acc[0] = acc[0] + kn[i] * kn[i]
                        acc[0] = Tx.sqrt(acc[0] + Tx.float32(NORM_EPS))
                        acc[1] = gl[t, g] + dt_bias[g]
                        acc[1] = Tx.exp(
                            -Tx.exp(a_log[g]) * (Tx.max(acc[1], Tx.float32(0)) + Tx.log1p(Tx.exp(-Tx.abs(acc[1]))))
                        )
                        acc[2] = Tx.float32(1) / (Tx.float32(1) + Tx.exp(-gl[t, Hk + g]))
                        if pos[t] == 0:
                            for i in range(hd):
                                st[Tx.Cast("int64", table[t, 0]), g, i, j] = Tx.float32(0)
                        acc[3] = Tx.float32(0)
                        for i in range(hd):
                            st[Tx.Cast("int64", table[t, 0]), g, i, j] = (
                                acc[1] * st[Tx.Cast("int64", table[t, 0]), g, i, j]
                            )
                            acc[3] = acc[3] + st[Tx.Cast("int64", table[t, 0]), g, i, j] * (kn[i] / acc[0])
                        acc[3] = acc[2] * (v[t, g * hd + j] - acc[3])
                        for i in range(hd):
                            st[Tx.Cast("int64", table[t, 0]), g, i, j] = (
                                st[Tx.Cast("int64", table[t, 0]), g, i, j] + kn[i] / acc[0] * acc[3]
                            )
                sync()
                for h in range(G):
                    for j in threads(hd):  # the raw query into shared memory
                        kn[j] = q[t, (g * G + h) * hd + j]
                    sync()
                    for j in threads(hd):  # o[j] = Σ_i S[i, j] q̂[i]
                        acc = Tx.alloc_buffer((2,), "float32", scope="local")
                        if pos[t] >= 0 and pos[t] < ctx:
                            acc[0] = Tx.float32(0)
                            for i in range(hd):
                                acc[0] = acc[0] + kn[i] * kn[i]
                            acc[0] = Tx.sqrt(acc[0] + Tx.float32(NORM_EPS))
                            acc[1] = Tx.float32(0)
                            for i in range(hd):
                                acc[1] = acc[1] + st[Tx.Cast("int64", table[t, 0]), g, i, j] * (
                                    kn[i] / acc[0] * Tx.float32(inv_sqrt)
                                )
                            o[t, (g * G + h) * hd + j] = acc[1]
                        else:
                            o[t, (g * G + h) * hd + j] = Tx.float32(0)
                    sync()

    return deltanet_gpu.without_attr("global_symbol")
