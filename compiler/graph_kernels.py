"""The whole-model graph's own small kernels (TE / TVMScript), next to the tuned operators of :mod:`compiler.ops`.

These are the parts the issue lets TVM handle itself: embedding-side pre-aggregate, per-token int8 quantize (for the
o/down projections, whose input has no RMSNorm), SwiGLU gate, RoPE, the in-place KV-cache write, causal GQA attention
over the cache, the final RMSNorm, the LM head, and a token-batched mHC post for prefill. Every function follows the
PyTorch reference's maths (``model/``) in float32; the integer steps (round half to even, clip, Σq) are exact.

Each builder returns a ``tvm.tirx.PrimFunc`` without ``global_symbol``; :func:`schedule` applies a simple CPU
schedule (parallel chunks) to the ones the lowering asks it for (SwiGLU); the CPU LM head comes scheduled.
"""

from __future__ import annotations

import math

import numpy as np

from model.sampling import FMIX, GOLDEN, GUMBEL_SPAN
from model.ternary.quant import ACT_QMAX, SCALE_EPS

HEAD_LANES = 16  # the LM head's partial sums per dot product (folded in halves: see lm_head)


def _prim(tensors):
    from tvm import te

    return te.create_prim_func(tensors).without_attr("global_symbol")


def pre_expand(T: int, D: int, S: int):
    """``u[t] = Σ_s h_pre[s] · x[t]`` (the first site's aggregate of the expanded embedding), summed in stream order."""
    from tvm import te

    x = te.placeholder((T, D), "float32", name="x")
    h = te.placeholder((S,), "float32", name="h_pre")

    def f(t, d):
        acc = h[0] * x[t, d]
        for s in range(1, S):
            acc = acc + h[s] * x[t, d]
        return acc

    return _prim([x, h, te.compute((T, D), f, name="u")])


def quantize(T: int, K: int):
    """Per-token int8 absmax: ``a = 127 / max(max|x|, 1e-5)``, ``q = clip(rint(x·a))``, ``Σq`` (BitLinear's input)."""
    import tvm
    from tvm import te

    x = te.placeholder((T, K), "float32", name="x")
    k = te.reduce_axis((0, K), name="k")
    amax = te.compute((T,), lambda t: te.max(te.abs(x[t, k]), axis=k), name="amax")
    scale = te.compute(
        (T,), lambda t: tvm.tirx.const(ACT_QMAX, "float32") / te.max(amax[t], float(SCALE_EPS)), name="scale"
    )
    q = te.compute(
        (T, K),
        lambda t, i: te.min(te.max(tvm.tirx.nearbyint(x[t, i] * scale[t]), -float(ACT_QMAX)), float(ACT_QMAX)).astype(
            "int8"
        ),
        name="q",
    )
    k2 = te.reduce_axis((0, K), name="k2")
    qs = te.compute((T,), lambda t: te.sum(q[t, k2].astype("int32"), axis=k2), name="q_sum")
    return _prim([x, q, scale, qs])


def _gated(T: int, F: int, halves: bool, act):
    """``act(g) · u`` over ``g, u [T, F]``, or (``halves``) over the rows ``[g | u]`` ``[T, 2F]`` of a stacked
    gate|up matmul: the same float expression either way."""
    from tvm import te

    if halves:
        gu = te.placeholder((T, 2 * F), "float32", name="gu")
        return _prim([gu, te.compute((T, F), lambda t, i: act(gu[t, i]) * gu[t, F + i], name="y")])
    g = te.placeholder((T, F), "float32", name="g")
    u = te.placeholder((T, F), "float32", name="u")
    return _prim([g, u, te.compute((T, F), lambda t, i: act(g[t, i]) * u[t, i], name="y")])


def silu_mul(T: int, F: int, halves: bool = False):
    """``silu(g) · u`` with ``silu(g) = g / (1 + exp(-g))`` (``exp`` is a scalar libm call: on CPUs the build runs it
    in parallel chunks through :func:`schedule`); ``halves``: of the rows ``[g | u]`` (:func:`_gated`)."""
    from tvm import te

    return _gated(T, F, halves, lambda g: g / (1.0 + te.exp(-g)))


def relu2_mul(T: int, F: int, halves: bool = False):
    """``relu(g)² · u`` (BitNet b1.58's gate, :func:`model.transformer.relu2`): ``(r · r) · u``, ``r = max(g, 0)``;
    ``halves``: of the rows ``[g | u]`` (:func:`_gated`)."""
    from tvm import te

    return _gated(T, F, halves, lambda g: te.max(g, 0.0) * te.max(g, 0.0))


GATED = {"silu": silu_mul, "relu2": relu2_mul}  # ModelConfig.ffn_act → the gate kernel


def scale_columns(B: int, V: int):
    """``y[b, v] = x[b, v] · s[v]``: an int8 LM head's row scales applied to its raw logits."""
    from tvm import te

    x = te.placeholder((B, V), "float32", name="x")
    s = te.placeholder((V,), "float32", name="s")
    y = te.compute((B, V), lambda b, v: x[b, v] * s[v], name="y")
    return _prim([x, s, y])


def mtp_residual(T: int, D: int):
    """A draft step's new hidden state ``g + silu(a + b)`` (``a = P g``, ``b = Q norm(e)``;
    :class:`model.transformer.MTPHead`), ``silu`` as in :func:`silu_mul`."""
    from tvm import te

    g = te.placeholder((T, D), "float32", name="g")
    a = te.placeholder((T, D), "float32", name="a")
    b = te.placeholder((T, D), "float32", name="b")
    u = te.compute((T, D), lambda t, i: g[t, i] + (a[t, i] + b[t, i]) / (1.0 + te.exp(-(a[t, i] + b[t, i]))), name="u")
    return _prim([g, a, b, u])


def copy(shape: tuple[int, ...], dtype: str):
    """``out = x``: a function's result written into the destination the caller passed (``call_tir_inplace``; see
    :meth:`compiler.lower.Lowering.function`)."""
    from tvm import te

    x = te.placeholder(shape, dtype, name="x")
    return _prim([x, te.compute(shape, lambda *i: x[i], name="out")])


def bindings(gpu: bool):
    """(blocks, threads) loop constructors: CUDA thread bindings, or serial loops (``gpu=False``: a CPU twin)."""
    from tvm.script import tirx as Tx

    if not gpu:
        return Tx.serial, Tx.serial
    return (lambda n: Tx.thread_binding(n, thread="blockIdx.x")), (lambda n: Tx.thread_binding(n, thread="threadIdx.x"))


def chain_advance(R: int, gpu: bool = False):
    """The device side of a greedy chain step (``compiler.lower``'s ``chain_b1``), in place and in one thread: the
    step's pick ``at[0]`` becomes the next step's token (``toks[0]``) at the next position (``pos[0] + 1``) and is
    appended to the ring (``ring[ring[R] % R]``; ``ring[R]`` counts the steps since the host last zeroed it)."""
    from tvm.script import tirx as Tx

    outer, inner = bindings(gpu)

    @Tx.prim_func
    def advance(
        at: Tx.Buffer((1,), "int32"),
        toks: Tx.Buffer((1,), "int32"),
        pos: Tx.Buffer((1,), "int32"),
        ring: Tx.Buffer((R + 1,), "int32"),
    ):
        for _b in outer(1):
            for _t in inner(1):
                ring[Tx.floormod(ring[R], R)] = at[0]
                ring[R] = ring[R] + 1
                toks[0] = at[0]
                pos[0] = pos[0] + 1

    return advance.without_attr("global_symbol")


def spec_advance(T: int, R: int, gpu: bool = False):
    """The device side of a speculative chain step (``compiler.lower``'s ``spec_chain_b{T}``), in place and in one
    thread. The step verified ``toks = [t, d_1 .. d_K]`` (``K = T - 1``) at positions ``pos``, and ``at[j]`` is row
    ``j``'s pick (the token after ``t, d_1 .. d_j``). The drafts are accepted while ``at[j] == d_{j+1}``: ``n`` of
    them. Then ``at[0 .. n]`` (every accepted draft, and the pick after the last) are appended to the ring (``ring[R]``
    counts the tokens), ``at[n]`` becomes the next step's ``toks[0]``, every position moves on by ``n + 1``, and
    ``sel[0] = n``: the row whose hidden state the next drafts start from."""
    from tvm.script import tirx as Tx

    K = T - 1
    outer, inner = bindings(gpu)

    @Tx.prim_func
    def advance(
        at: Tx.Buffer((T,), "int32"),
        toks: Tx.Buffer((T,), "int32"),
        pos: Tx.Buffer((T,), "int32"),
        ring: Tx.Buffer((R + 1,), "int32"),
        sel: Tx.Buffer((1,), "int32"),
    ):
        for _b in outer(1):
            for _t in inner(1):
                n = Tx.alloc_buffer((1,), "int32", scope="local")
                n[0] = 0
                for j in Tx.serial(K):
                    if n[0] == j and at[j] == toks[j + 1]:
                        n[0] = j + 1
                for j in Tx.serial(T):
                    if j <= n[0]:
                        ring[Tx.floormod(ring[R] + j, R)] = at[j]
                ring[R] = ring[R] + n[0] + 1
                toks[0] = at[n[0]]
                for j in Tx.serial(T):
                    pos[j] = pos[j] + n[0] + 1
                sel[0] = n[0]

    return advance.without_attr("global_symbol")


def spec_drafts(T: int, gpu: bool = False):
    """``toks[1 + k] = drafts[k, 0]``, in place: a speculative chain step's new drafts become the next step's rows."""
    from tvm.script import tirx as Tx

    K = T - 1
    outer, inner = bindings(gpu)

    @Tx.prim_func
    def put(drafts: Tx.Buffer((K, 1), "int32"), toks: Tx.Buffer((T,), "int32")):
        for _b in outer(1):
            for k in inner(K):
                toks[1 + k] = drafts[k, 0]

    return put.without_attr("global_symbol")


def _let(value, body):
    """``body(v)`` with ``v`` bound to ``value`` once (a TIR ``Let``: the expression is not copied into each use)."""
    from tvm import tirx

    v = tirx.Var("h", value.ty)
    return tirx.Let(v, value, body(v))


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (a bijection whose every output bit depends on every input bit)."""
    from tvm import tirx

    def c(k):
        return tirx.const(k, "uint32")

    def xs(n):  # h ^ (h >> n), h bound once
        return lambda h: h ^ (h >> c(n))

    return _let(_let(_let(h, xs(16)) * c(FMIX[0]), xs(13)) * c(FMIX[1]), xs(16))


def gumbel(seed, pos, v):
    """Standard Gumbel noise ``-log(-log u)`` for id ``v`` at position ``pos`` of the stream ``seed`` (integer
    expressions): ``u = (k + 1/2) / 2^23`` from 23 bits ``k`` of a counter hash (so ``2^-24 ≤ u ≤ 1 - 2^-24``, both
    exact in float32: 24 bits would round the top ``u`` to 1, an infinite draw), ``fmix32(fmix32(fmix32(seed) + pos·φ)
    + v·φ)`` (:func:`_fmix32`, φ = :data:`model.sampling.GOLDEN`). ``argmax_v (x_v / T + gumbel)`` is a draw from
    ``softmax(x / T)`` (the Gumbel-max trick), so a chain samples on the device with nothing but the seed from the
    host. Builds a TIR expression (TE and TVMScript kernels alike); ``runtime.decoding.gumbel_noise`` is its numpy
    twin, which the host's sampler draws with, so sampling gives the same tokens chained or step by step."""
    from tvm import tirx

    def u32(e):
        return tirx.Cast("uint32", e)

    phi = tirx.const(GOLDEN, "uint32")
    h = _fmix32(_fmix32(_fmix32(u32(seed)) + u32(pos) * phi) + u32(v) * phi)
    u = (tirx.Cast("float32", h >> tirx.const(9, "uint32")) + tirx.const(0.5, "float32")) * tirx.const(
        2.0**-23, "float32"
    )
    return -tirx.log(-tirx.log(u))


def argmax(B: int, V: int, sampled: bool = False):
    """Each row's first maximum and its value, ``(at int32[B], best float32[B])`` (the MTP heads' greedy drafts): a
    reduction over ``v`` in order that moves only on a strictly larger value (NaN never wins). Two outputs: Relax
    would take a one-in, one-out kernel for a possible reshape and analyse it as one.

    ``sampled`` (a chain's pick, ``compiler.lower``'s ``chain_b1``): three more inputs, ``bias [V]`` (``-inf`` at ids
    never to be picked), ``sampling float32[2]`` (the inverse temperature ``s``, 0 for greedy; the seed, an integer
    below 2^24) and ``pos int32[B]``: the maximum of ``x + bias`` (``s = 0``), else of ``x·s + bias + gumbel(seed,
    pos[b], v)`` (:func:`gumbel`), a draw from ``softmax(x·s)`` over the ids the bias allows. The noise is computed
    only for ids within :data:`model.sampling.GUMBEL_SPAN` of the largest ``x·s + bias`` (the others cannot win; a
    first pass finds it)."""
    import tvm
    from tvm import te

    x = te.placeholder((B, V), "float32", name="x")
    bias = te.placeholder((V,), "float32", name="bias")
    samp = te.placeholder((2,), "float32", name="sampling")
    pos = te.placeholder((B,), "int32", name="pos")

    def combine(a, b):
        take = b[1] > a[1]
        return tvm.tirx.Select(take, b[0], a[0]), tvm.tirx.Select(take, b[1], a[1])

    def identity(t0, t1):
        return tvm.tirx.const(0, t0), te.min_value(t1)

    def scaled(b, v):
        return x[b, v] * samp[0] + bias[v]

    if sampled:  # the largest scaled logit: ids more than GUMBEL_SPAN below it cannot win, their noise is skipped
        u = te.reduce_axis((0, V), name="u")
        top = te.compute((B,), lambda b: te.max(scaled(b, u), axis=u), name="top")

    def value(b, v):
        if not sampled:
            return x[b, v]
        noisy = tvm.tirx.if_then_else(  # lazily: no hash, no logs for an id that cannot win
            scaled(b, v) >= top[b] - GUMBEL_SPAN,
            scaled(b, v) + gumbel(samp[1].astype("int32"), pos[b], v),
            tvm.tirx.const(-math.inf, "float32"),
        )
        return tvm.tirx.if_then_else(samp[0] > 0, noisy, x[b, v] + bias[v])  # greedy: no noise at all

    first_max = te.comm_reducer(combine, identity, name="first_max")
    v = te.reduce_axis((0, V), name="v")
    at, best = te.compute((B,), lambda b: first_max((v.astype("int32"), value(b, v)), axis=v), name="argmax")
    return _prim([x, *([bias, samp, pos] if sampled else []), at, best])


def router_logits(T: int, D: int, E: int):
    """A mixture of experts' router logits ``l[t, e] = Σ_d h[t, d]·R[e, d]`` in float64 (``d`` in order on the CPU; a
    tree on CUDA, where the build's row schedule runs it): float64 keeps the choice of experts from hanging on float32
    rounding."""
    from tvm import te

    h = te.placeholder((T, D), "float32", name="h")
    R = te.placeholder((E, D), "float32", name="R")
    d = te.reduce_axis((0, D), name="d")
    lg = te.compute(
        (T, E), lambda t, e: te.sum(h[t, d].astype("float64") * R[e, d].astype("float64"), axis=d), name="logits"
    )
    return _prim([h, R, lg])


def router_topk(T: int, E: int, k: int, gpu: bool = False):
    """Each row's ``k`` largest router logits (descending; on a tie the lower index first) → ``ids int32[T, k]``, and
    their softmax ``w float32[T, k]`` (float64, then rounded): :class:`model.moe.MoEFFN`'s routing. A thread per row
    (``gpu``: CUDA threads; else a serial loop)."""
    from tvm.script import tirx as Tx

    bind = (lambda n: Tx.thread_binding(n, thread="threadIdx.x")) if gpu else Tx.serial

    @Tx.macro
    def rows(logits, ids, w):
        for t in bind(T):
            taken = Tx.alloc_buffer((E,), "int32", scope="local")
            top = Tx.alloc_buffer((k,), "float64", scope="local")
            best = Tx.alloc_buffer((1,), "int32", scope="local")
            denom = Tx.alloc_buffer((1,), "float64", scope="local")
            for e in range(E):
                taken[e] = 0
            for j in range(k):
                best[0] = -1
                for e in range(E):
                    if taken[e] == 0:
                        if best[0] < 0:
                            best[0] = e
                        elif logits[t, e] > logits[t, best[0]]:
                            best[0] = e
                taken[best[0]] = 1
                ids[t, j] = best[0]
                top[j] = logits[t, best[0]]
            denom[0] = Tx.float64(0)
            for j in range(k):
                denom[0] = denom[0] + Tx.exp(top[j] - top[0])
            for j in range(k):
                w[t, j] = Tx.Cast("float32", Tx.exp(top[j] - top[0]) / denom[0])

    @Tx.prim_func(check_well_formed=False)  # a root block around loop-style code: legal, but unverified
    def topk(logits: Tx.Buffer((T, E), "float64"), ids: Tx.Buffer((T, k), "int32"), w: Tx.Buffer((T, k), "float32")):
        with Tx.sblock("root"):  # a block body: Relax's pattern analysis asserts one on single-input kernels
            rows(logits, ids, w)

    return topk.without_attr("global_symbol")


def moe_combine(T: int, k: int, D: int):
    """``y[t] = Σ_j w[t, j] · Y[t, j]`` over a row's ``k`` experts in slot order (an FMA chain)."""
    from tvm import te

    Y = te.placeholder((T, k, D), "float32", name="Y")
    w = te.placeholder((T, k), "float32", name="w")
    j = te.reduce_axis((0, k), name="j")
    return _prim([Y, w, te.compute((T, D), lambda t, d: te.sum(w[t, j] * Y[t, j, d], axis=j), name="y")])


def rope_q(T: int, H: int, hd: int, ctx: int, width: int | None = None):
    """RoPE (GPT-NeoX rotate-half) of ``q [T, H·hd]``, row ``t`` at position ``pos[t]`` → ``[T, H, hd]`` (a padding
    row, ``pos < 0``, is rotated as position 0 and never read). ``width``: ``q`` is the first ``H·hd`` columns of rows
    of that width (a stacked q|k|v matmul's output)."""
    import tvm
    from tvm import te

    half = hd // 2
    q = te.placeholder((T, width or H * hd), "float32", name="q")
    pos = te.placeholder((T,), "int32", name="pos")
    cos = te.placeholder((ctx, half), "float32", name="cos")
    sin = te.placeholder((ctx, half), "float32", name="sin")

    def f(t, h, i):
        p = te.min(te.max(pos[t], 0), ctx - 1)
        j = tvm.tirx.indexmod(i, half)
        a, b = q[t, h * hd + j], q[t, h * hd + j + half]
        return tvm.tirx.Select(i < half, a * cos[p, j] - b * sin[p, j], b * cos[p, j] + a * sin[p, j])

    return _prim([q, pos, cos, sin, te.compute((T, H, hd), f, name="q_rot")])


def table_width(ctx: int, block: int) -> int:
    """Entries of a sequence's block table: enough blocks of ``block`` tokens for the whole context."""
    return -(-ctx // block)


def kv_update(T: int, Hkv: int, hd: int, ctx: int, block: int, gpu: bool = False, width: int | None = None,
              k_at: int = 0, v_at: int = 0):  # fmt: skip
    """In place, into the paged cache ``kc, vc [n_blocks, Hkv, block, hd]`` (``n_blocks`` is the runtime's choice):
    row ``t``'s key (RoPE'd) and value at position ``p = pos[t]`` go to block ``table[t, p // block]``, slot
    ``p % block``. Rows with ``pos`` outside ``[0, ctx)`` (padding) write nothing. ``gpu``: a CUDA block per (row,
    KV head), a thread per rotated pair (same body). ``k`` and ``v`` are ``[T, width]`` (default ``Hkv·hd``) with
    the key at column ``k_at``, the value at ``v_at``: a stacked q|k|v output passed as both."""
    from tvm.script import tirx as Tx

    half = hd // 2
    KV = Hkv * hd
    width = width or KV
    if max(k_at, v_at) + KV > width:
        raise ValueError(f"k at {k_at}, v at {v_at}: {KV} columns each do not fit rows of {width}")
    W = table_width(ctx, block)
    rows = (lambda n: Tx.thread_binding(n, thread="blockIdx.x")) if gpu else Tx.serial
    cols = (lambda n: Tx.thread_binding(n, thread="threadIdx.x")) if gpu else Tx.serial

    @Tx.prim_func
    def kv_write(
        k: Tx.Buffer((T, width), "float32"),
        v: Tx.Buffer((T, width), "float32"),
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        cos: Tx.Buffer((ctx, half), "float32"),
        sin: Tx.Buffer((ctx, half), "float32"),
        kc_h: Tx.handle,
        vc_h: Tx.handle,
    ):
        nb = Tx.int64()
        kc = Tx.match_buffer(kc_h, (nb, Hkv, block, hd), "float32")
        vc = Tx.match_buffer(vc_h, (nb, Hkv, block, hd), "float32")
        for th in rows(T * Hkv):
            for j in cols(half):
                t = th // Hkv
                h = th % Hkv
                p = pos[t]
                if p >= 0 and p < ctx:
                    b = Tx.Cast("int64", table[t, p // block])
                    s = p % block
                    x0 = k[t, k_at + h * hd + j]
                    x1 = k[t, k_at + h * hd + j + half]
                    kc[b, h, s, j] = x0 * cos[p, j] - x1 * sin[p, j]
                    kc[b, h, s, j + half] = x1 * cos[p, j] + x0 * sin[p, j]
                    vc[b, h, s, j] = v[t, v_at + h * hd + j]
                    vc[b, h, s, j + half] = v[t, v_at + h * hd + j + half]

    return kv_write.without_attr("global_symbol")


def attention_scratch(T: int, H: int, hd: int, ctx: int) -> list[tuple]:
    """Shapes of :func:`attention`'s scratch outputs ``sc`` and ``st``."""
    return [(T * H, ctx), (T * H, 2)]


def _lane_sum(part, k, L: int):
    """``part[k, 0] + part[k, 1] + … + part[k, L - 1]``, left to right (one float32 rounding per add)."""
    acc = part[k, 0]
    for ln in range(1, L):
        acc = acc + part[k, ln]
    return acc


def attention(T: int, H: int, Hkv: int, hd: int, ctx: int, block: int):
    """Causal GQA softmax attention of ``q [T, H, hd]`` over the paged cache → ``o [T, H·hd]``: row ``t`` reads its
    own sequence's keys ``0 .. pos[t]`` through its block table ``table[t]`` (rows of one prefill chunk share a
    table, rows of a decode batch each have their sequence's); a padding row (``pos < 0``) outputs zeros.

    Query head ``h`` reads KV head ``h // (H / Hkv)``; the loop bound is data-dependent (the cost grows with the
    position, not the context size). A parallel task takes ``G`` query heads of one KV group (2 when the group size
    is even, else 1), so each cached key and value row is read once for ``G`` heads and their ``G`` independent sums
    overlap; ``G = 2`` keeps 10 tasks for one decode row of a 20-head model, so two threads split it evenly (a whole
    group per task reads the cache least but leaves 5 tasks). The task walks its keys block by block: a key is a
    fixed row of its block, no table lookup, division or remainder per key. ``sc [T·H, C]`` and ``st [T·H, 2]``
    (max, denominator) are scratch outputs; the task's partial sums live in small stack arrays, kept in registers.

    Order of the sums (:func:`model.exact_reference.attention` mirrors it): a score ``q·k`` is ``L`` vector lanes of
    products summed over ``hd / L`` chunks (lane ``l`` takes ``i = l, l + L, …``), then the lanes in order:
    independent FMA chains, where one chain over ``hd`` was latency-bound (docs/architecture.md, "Measurements
    behind the code"); ``exp`` is libm's ``expf``; the output is ``Σ_j e_j · v_j`` in key order, an FMA per key,
    over ``hd`` columns in vector lanes, then divided by ``Σ_j e_j``.
    """
    from tvm.script import tirx as Tx

    g = H // Hkv
    G = 2 if g % 2 == 0 else 1  # query heads per task
    NG = H // G
    scale = 1.0 / math.sqrt(hd)
    TH = T * H
    W = table_width(ctx, block)
    L = next(n for n in (16, 8, 4, 2, 1) if hd % n == 0)
    NO = hd // L

    @Tx.prim_func
    def attn(
        q: Tx.Buffer((T, H, hd), "float32"),
        kc_h: Tx.handle,
        vc_h: Tx.handle,
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        o: Tx.Buffer((T, H * hd), "float32"),
        sc: Tx.Buffer((TH, ctx), "float32"),
        st: Tx.Buffer((TH, 2), "float32"),
    ):
        nb = Tx.int64()
        kc = Tx.match_buffer(kc_h, (nb, Hkv, block, hd), "float32")
        vc = Tx.match_buffer(vc_h, (nb, Hkv, block, hd), "float32")
        for tg in Tx.parallel(T * NG):  # (row, G query heads of one KV group)
            part = Tx.alloc_buffer((G, L), "float32", scope="global")  # stack arrays, kept in registers
            acc = Tx.alloc_buffer((G, hd), "float32", scope="global")
            red = Tx.alloc_buffer((2,), "float32", scope="global")
            t: Tx.let = tg // NG
            h0: Tx.let = tg % NG * G
            kh: Tx.let = h0 // g
            n: Tx.let = Tx.min(pos[t] + 1, ctx)
            nbk: Tx.let = (n + block - 1) // block  # cache blocks holding keys 0 .. n - 1
            if n <= 0:
                for i in Tx.vectorized(G * hd):
                    o[t, h0 * hd + i] = Tx.float32(0)
            else:
                for bi in range(nbk):  # the scores, block by block (a key: row jj of block b)
                    b: Tx.let = Tx.Cast("int64", table[t, bi])
                    for jj in range(Tx.min(block, n - bi * block)):
                        for k in Tx.unroll(G):
                            for ln in Tx.vectorized(L):
                                part[k, ln] = q[t, h0 + k, ln] * kc[b, kh, jj, ln]
                        for io in Tx.unroll(1, NO):
                            for k in Tx.unroll(G):
                                for ln in Tx.vectorized(L):
                                    part[k, ln] = part[k, ln] + q[t, h0 + k, io * L + ln] * kc[b, kh, jj, io * L + ln]
                        for k in Tx.unroll(G):
                            sc[t * H + h0 + k, bi * block + jj] = _lane_sum(part, k, L) * Tx.float32(scale)
                for k in range(G):  # per head: the max, then exp and its sum in key order
                    th: Tx.let = t * H + h0 + k
                    red[0] = sc[th, 0]
                    for j in range(n):
                        red[0] = Tx.max(red[0], sc[th, j])
                    red[1] = Tx.float32(0)
                    for j in range(n):
                        sc[th, j] = Tx.exp(sc[th, j] - red[0])
                        red[1] = red[1] + sc[th, j]
                    st[th, 0] = red[0]
                    st[th, 1] = red[1]
                for k in Tx.unroll(G):
                    for i in Tx.vectorized(hd):
                        acc[k, i] = Tx.float32(0)
                for bi in range(nbk):  # Σ e_j · v_j in key order, each value row read once for the G heads
                    b: Tx.let = Tx.Cast("int64", table[t, bi])
                    for jj in range(Tx.min(block, n - bi * block)):
                        for io in Tx.unroll(NO):
                            for k in Tx.unroll(G):
                                for ln in Tx.vectorized(L):
                                    acc[k, io * L + ln] = (
                                        acc[k, io * L + ln]
                                        + sc[t * H + h0 + k, bi * block + jj] * vc[b, kh, jj, io * L + ln]
                                    )
                for k in Tx.unroll(G):
                    for i in Tx.vectorized(hd):
                        o[t, (h0 + k) * hd + i] = acc[k, i] / st[t * H + h0 + k, 1]

    return attn.without_attr("global_symbol")


def rmsnorm(T: int, D: int, eps: float):
    """``x · rsqrt(mean(x²) + eps) · w`` (the final norm; float32 in, float32 out)."""
    from tvm import te

    x = te.placeholder((T, D), "float32", name="x")
    w = te.placeholder((D,), "float32", name="w")
    k = te.reduce_axis((0, D), name="k")
    ss = te.compute((T,), lambda t: te.sum(x[t, k] * x[t, k], axis=k), name="ss")
    r = te.compute((T,), lambda t: te.rsqrt(ss[t] / float(D) + float(eps)), name="r")
    return _prim([x, w, te.compute((T, D), lambda t, d: x[t, d] * r[t] * w[d], name="h")])


HEAD_BLOCK = 16  # CPU LM heads: head rows per block of the blocked layout (tile_head)
HEAD_PREFETCH = 2048  # the float CPU LM head prefetches its rows this many bytes of their block ahead, into L2
HEAD_I8_PREFETCH = 1024  # the int8 head's distance (each measured best on an Intel VM; 0: no prefetch)


def head_blocks(V: int) -> int:
    """Blocks of :data:`HEAD_BLOCK` head rows in a blocked CPU head of ``V`` rows (the last block zero-padded)."""
    return -(-V // HEAD_BLOCK)


def tile_head(E: np.ndarray, step: int) -> np.ndarray:
    """A CPU LM head ``[V, D]`` in the blocked layout its kernels stream: ``[⌈V / 16⌉, D / step, 16, step]``, block
    ``b`` holding head rows ``16·b .. 16·b + 15`` chunk by chunk (``step`` columns of each row in turn; rows past
    ``V`` are zeros). A kernel tile of up to 16 head rows then reads one sequential stream instead of one stream per
    head row (why and what it gains: docs/foreign_models.md, "The blocked LM head").
    ``step``: :data:`HEAD_LANES` for :func:`lm_head`, :data:`HEAD_I8_CHUNK` for :func:`lm_head_i8`."""
    V, D = E.shape
    if D % step:
        raise ValueError(f"d_model {D} must be a multiple of the head's step ({step})")
    pad = head_blocks(V) * HEAD_BLOCK - V
    if pad:
        E = np.concatenate([E, np.zeros((pad, D), E.dtype)])
    return np.ascontiguousarray(E.reshape(-1, HEAD_BLOCK, D // step, step).transpose(0, 2, 1, 3))


def embed_blocked(T: int, V: int, D: int, step: int, dtype: str):
    """``x[t] = E[tok[t]]``: the token rows of a tied embedding read from the LM head's blocked layout
    (:func:`tile_head`, ``step`` columns per chunk), so a tied model keeps one copy of the table. Ids outside
    ``0 .. V - 1`` are clipped to it, as ``relax.op.take(..., mode="clip")`` does for the row layout."""
    from tvm import te, tirx

    W = te.placeholder((head_blocks(V), D // step, HEAD_BLOCK, step), dtype, name="W")
    tok = te.placeholder((T,), "int32", name="tok")

    def row(t, d):
        v = tirx.max(tirx.min(tok[t], V - 1), 0)
        return W[v // HEAD_BLOCK, d // step, v % HEAD_BLOCK, d % step]

    return _prim([W, tok, te.compute((T, D), row, name="x")])


def _head_tiling(V: int, D: int, rows: int | None, step: int, BT: int, what: str) -> tuple[int, int, int]:
    """An LM head kernel's tiling: ``(D / step, the head rows computed R, head rows per tile VT)``; a tile holds ``VT ·
    BT ≤ 16`` (head row, row) pairs."""
    if D % step:
        raise ValueError(f"d_model {D} must be a multiple of the {what} ({step})")
    R = V if rows is None else rows
    if not 0 < R <= V:
        raise ValueError(f"rows={rows}: the head has {V} rows")
    return D // step, R, next(t for t in (16, 8, 4, 2, 1) if R % t == 0 and t * BT <= 16)  # each divides HEAD_BLOCK


def _head_prefetch_plan(VT: int, row_bytes: int, distance: int) -> tuple[int, int, int]:
    """How a head tile of ``VT`` head rows, ``row_bytes`` of each per chunk, prefetches ``distance`` bytes of its
    block ahead: ``(chunks ahead (0: no prefetch), cache lines per chunk, head rows per line)``."""
    per_line = max(1, 64 // row_bytes)
    ahead = -(-distance // (HEAD_BLOCK * row_bytes))  # a block's chunk holds 16 head rows
    return ahead, -(-VT // per_line), per_line


def _head_prefetch(E, block, chunk, row):
    """Prefetch ``E[block, chunk, row, 0]``'s cache line into L2 (``prefetcht1``). Past the last chunk of a block
    that is the next block, the tile's successor in memory; past the array's end nothing (a prefetch never faults)."""
    from tvm import tirx

    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(E[block, chunk, row, 0]), 0, 2, 1)


def _head_blocks(V: int, VT: int, BT: int):
    """The blocked layout's block count and, for pair ``k`` of tile ``vo`` (head row ``vo·VT + k // BT``), its block
    and row in the block (``VT`` divides :data:`HEAD_BLOCK`, so a tile never straddles two blocks)."""
    per = HEAD_BLOCK // VT  # tiles per block (TIR folds vo // 1 and vo % 1)
    return head_blocks(V), lambda vo, k: vo // per, lambda vo, k: (vo % per) * VT + k // BT


def lm_head(B: int, V: int, D: int, dtype: str = "float32", rows: int | None = None):
    """``logits[b, v] = Σ_d h[b, d] · E[v, d]`` for ``B`` rows over the head as the GGUF stores it (float16 when the
    GGUF has it: exact, half the bytes), in the blocked layout :func:`tile_head` (``step`` :data:`HEAD_LANES`), each
    head row streamed once for all ``B`` rows. ``rows``: only the first ``rows`` head rows (``logits [B, rows]``; the
    MTP heads' draft vocabulary), default all.

    Order of the sums (:func:`model.exact_reference.lm_head` mirrors it, so a row's logits do not depend on ``B`` or
    on the other rows): per (row, head row) :data:`HEAD_LANES` float32 partial sums, lane ``l`` taking ``d = l,
    l + 16, …`` in order, an FMA each; then the lanes folded in halves (lane ``l`` += lane ``l + 8``, ``+ 4``, ``+ 2``,
    ``+ 1``).

    Register tiling: a tile of 16 (head row, row) pairs — ``VT`` head rows × ``BT`` rows — runs over ``D`` together,
    fully unrolled, its 16 partial-sum vectors in registers; a head chunk is loaded and converted once for ``BT`` rows
    and a row chunk once for ``VT`` head rows, so ``h`` is read ``V / VT`` times instead of ``V`` (at ``B = 8`` on
    ``nano-1b`` that re-read, 64 KiB per head row from L2, was the head's bottleneck). Tiles of head rows run in
    parallel. The partial sums are two small ``"global"`` buffers, which TVM places on the stack (each under its 1 KiB
    limit); a ``"local"`` buffer is heap workspace, allocated per tile and stored back at every step.

    Each chunk step prefetches the tile's head rows :data:`HEAD_PREFETCH` bytes of its block further on into L2
    (:func:`_head_prefetch`). Without it the head streamed at 85–88 % of the read roof on an Intel VM
    (docs/foreign_models.md, "Prefetching into L2")."""
    from tvm.script import tirx as Tx

    L = HEAD_LANES
    BT = next(t for t in (4, 2, 3, 1) if B % t == 0)  # 3: the draft rows of three MTP heads
    NO, R, VT = _head_tiling(V, D, rows, L, BT, "head's lanes")
    P = VT * BT  # pairs per tile: pa holds 0..7, pb 8..15
    NB, vb, vr = _head_blocks(V, VT, BT)
    ahead, lines, per_line = _head_prefetch_plan(VT, L * (2 if dtype == "float16" else 4), HEAD_PREFETCH)

    @Tx.prim_func
    def head(h: Tx.Buffer((B, D), "float32"), E: Tx.Buffer((NB, NO, HEAD_BLOCK, L), dtype),
             logits: Tx.Buffer((B, R), "float32")):  # fmt: skip
        for vo in Tx.parallel(R // VT):
            for bo in range(B // BT):
                pa = Tx.alloc_buffer((8, L), "float32", scope="global")  # a stack array
                pb = Tx.alloc_buffer((8, L), "float32", scope="global")
                for k in Tx.unroll(P):
                    for ln in Tx.vectorized(L):
                        if k < 8:
                            pa[k, ln] = Tx.float32(0)
                        else:
                            pb[k - 8, ln] = Tx.float32(0)
                for io in range(NO):
                    if ahead > 0:  # a Python bool: the parser drops the branch when it is off
                        for j in Tx.unroll(lines):
                            Tx.evaluate(_head_prefetch(E, vb(vo, 0), io + ahead, vr(vo, 0) + j * per_line))
                    for k in Tx.unroll(P):  # pair k: head row vo·VT + k // BT, row bo·BT + k % BT
                        for ln in Tx.vectorized(L):
                            if k < 8:
                                pa[k, ln] = pa[k, ln] + h[bo * BT + k % BT, io * L + ln] * Tx.Cast(
                                    "float32", E[vb(vo, k), io, vr(vo, k), ln]
                                )
                            else:
                                pb[k - 8, ln] = pb[k - 8, ln] + h[bo * BT + k % BT, io * L + ln] * Tx.Cast(
                                    "float32", E[vb(vo, k), io, vr(vo, k), ln]
                                )
                for k in Tx.unroll(P):
                    if k < 8:
                        for ln in Tx.vectorized(8):
                            pa[k, ln] = pa[k, ln] + pa[k, ln + 8]
                        for ln in Tx.vectorized(4):
                            pa[k, ln] = pa[k, ln] + pa[k, ln + 4]
                        for ln in Tx.vectorized(2):
                            pa[k, ln] = pa[k, ln] + pa[k, ln + 2]
                        logits[bo * BT + k % BT, vo * VT + k // BT] = pa[k, 0] + pa[k, 1]
                    else:
                        for ln in Tx.vectorized(8):
                            pb[k - 8, ln] = pb[k - 8, ln] + pb[k - 8, ln + 8]
                        for ln in Tx.vectorized(4):
                            pb[k - 8, ln] = pb[k - 8, ln] + pb[k - 8, ln + 4]
                        for ln in Tx.vectorized(2):
                            pb[k - 8, ln] = pb[k - 8, ln] + pb[k - 8, ln + 2]
                        logits[bo * BT + k % BT, vo * VT + k // BT] = pb[k - 8, 0] + pb[k - 8, 1]

    return head.without_attr("global_symbol")


HEAD_I8_CHUNK = 64  # int8 head: bytes of a head row (and of the quantized hidden row) per VNNI dot


def lm_head_i8(B: int, V: int, D: int, rows: int | None = None):
    """An int8 LM head (:func:`compiler.lower.quantize_head`: ``E [V, D]`` int8, a float32 scale ``s [V]`` per row;
    ``E`` in the blocked layout :func:`tile_head`, ``step`` :data:`HEAD_I8_CHUNK`)
    against the hidden rows quantized like every BitLinear input (:func:`quantize`: ``h8 [B, D]``, its scale ``a [B]``
    and ``Σh8 [B]``), in integers: ``logits[b, v] = float32(Σ_d E[v, d]·h8[b, d]) · (s[v] / a[b])``, the sum exact in
    int32, so a row's logits do not depend on ``B`` or on the order of the sums (AVX-512 VNNI; ``D`` a multiple of
    64). ``rows``: only the first ``rows`` head rows, as :func:`lm_head`.

    Why: converting every int8 weight to float32 (:func:`lm_head` over an int8 ``E``) costs about three times the
    instructions per byte of the F16 head's conversion, so that head was compute-bound where the F16 one streams
    (figures: docs/foreign_models.md, "The LM head"). ``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed ones
    per instruction; the signed weights become unsigned by flipping their sign bit (``E ^ 0x80 = E + 128``),
    corrected by ``128·Σh8``.
    Register tiling as :func:`lm_head`: a tile of 16 (head row, row) pairs, each an int32x16 accumulator (two
    512-byte stack arrays, kept in registers), over ``D`` in chunks of 64; the lanes summed at the end; and its
    prefetch into L2, :data:`HEAD_I8_PREFETCH` bytes ahead."""
    import tvm
    from tvm import tirx
    from tvm.script import tirx as Tx

    C = HEAD_I8_CHUNK
    BT = 1  # a tile of head rows is read from DRAM once, then from L2 for the other rows
    NO, R, VT = _head_tiling(V, D, rows, C, BT, "int8 head's byte chunks")
    P = VT * BT
    flip = tirx.Broadcast(tvm.tirx.const(-128, "int8"), C)

    NB, vb, vr = _head_blocks(V, VT, BT)
    ahead, lines, per_line = _head_prefetch_plan(VT, C, HEAD_I8_PREFETCH)

    def dot(acc, E, h, vo, k, b, io):  # acc + (E[head row, chunk] ^ 0x80) · h[b, chunk], 16 int32 lanes
        e = tirx.bitwise_xor(E.vload([vb(vo, k), io, vr(vo, k), 0], f"int8x{C}"), flip)
        return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, e,
                                          h.vload([b, io * C], f"int8x{C}"))  # fmt: skip

    @Tx.prim_func
    def head(h8: Tx.Buffer((B, D), "int8"), a: Tx.Buffer((B,), "float32"), hsum: Tx.Buffer((B,), "int32"),
             E: Tx.Buffer((NB, NO, HEAD_BLOCK, C), "int8"), s: Tx.Buffer((V,), "float32"),
             logits: Tx.Buffer((B, R), "float32")):  # fmt: skip
        for vo in Tx.parallel(R // VT):
            for bo in range(B // BT):
                # two stack arrays of 8 accumulators: each under TVM's 1 KiB stack limit (docs/tvm.md), so LLVM keeps
                # them in registers (one 1 KiB array was heap workspace, stored back at every step)
                pa = Tx.alloc_buffer((8, 16), "int32", scope="global")
                pb = Tx.alloc_buffer((8, 16), "int32", scope="global")
                for k in Tx.unroll(P):
                    if k < 8:
                        pa[k, Tx.ramp(0, 1, 16)] = Tx.Broadcast(Tx.int32(0), 16)
                    else:
                        pb[k - 8, Tx.ramp(0, 1, 16)] = Tx.Broadcast(Tx.int32(0), 16)
                for io in range(NO):
                    if ahead > 0:  # a Python bool: the parser drops the branch when it is off
                        for j in Tx.unroll(lines):
                            Tx.evaluate(_head_prefetch(E, vb(vo, 0), io + ahead, vr(vo, 0) + j * per_line))
                    for k in Tx.unroll(P):  # pair k: head row vo·VT + k // BT, row bo·BT + k % BT
                        if k < 8:
                            pa[k, Tx.ramp(0, 1, 16)] = dot(pa.vload([k, 0], "int32x16"), E, h8, vo, k,
                                                           bo * BT + k % BT, io)  # fmt: skip
                        else:
                            pb[k - 8, Tx.ramp(0, 1, 16)] = dot(pb.vload([k - 8, 0], "int32x16"), E, h8, vo, k,
                                                               bo * BT + k % BT, io)  # fmt: skip
                for k in Tx.unroll(P):
                    tot = Tx.alloc_buffer((1,), "int32", scope="global")
                    tot[0] = Tx.int32(0)
                    for ln in range(16):
                        if k < 8:
                            tot[0] = tot[0] + pa[k, ln]
                        else:
                            tot[0] = tot[0] + pb[k - 8, ln]
                    logits[bo * BT + k % BT, vo * VT + k // BT] = Tx.Cast(
                        "float32", tot[0] - 128 * hsum[bo * BT + k % BT]
                    ) * (s[vo * VT + k // BT] / a[bo * BT + k % BT])

    return head.without_attr("global_symbol")


def mhc_post_tokens(T: int, D: int, S: int, first: bool, last: bool):
    """Token-batched twin of ``compiler.ops.mhc.MhcPost`` (same unrolled sums): ``X [T, S, D]`` (or ``x [T, D]`` when
    ``first``), ``y [T, D]`` → ``X' [T, S, D]`` (not when ``last``) and the next site's ``u [T, D]``."""
    import tvm
    from tvm import te

    X = te.placeholder((T, D) if first else (T, S, D), "float32", name="X")
    y = te.placeholder((T, D), "float32", name="y")
    H = te.placeholder((S, S), "float32", name="h_res")
    hpost = te.placeholder((S,), "float32", name="h_post")
    hpre = None if last else te.placeholder((S,), "float32", name="h_pre")
    xin = (lambda t, j, d: X[t, d]) if first else (lambda t, j, d: X[t, j, d])

    def mix(t, s, d):
        acc = H[s, 0] * xin(t, 0, d)
        for j in range(1, S):
            acc = acc + H[s, j] * xin(t, j, d)
        return acc + hpost[s] * y[t, d]

    Xp = te.compute((T, S, D), mix, name="X_out")
    inv_s = tvm.tirx.const(1.0 / S, "float32")
    rs = te.reduce_axis((0, S), name="rs")
    u = te.compute(
        (T, D), lambda t, d: te.sum((inv_s if last else hpre[rs]) * Xp[t, rs, d], axis=rs), name="u"
    )  # fmt: skip
    params = [X, y, H, hpost] + ([] if last else [hpre, Xp]) + [u]
    return _prim(params)


def schedule(func, target, chunk: int = 256):
    """A cheap, safe CPU schedule: per block, its loops fused and cut into chunks of ``chunk`` iterations that run in
    parallel (one token's SwiGLU on one thread was slow enough to matter: docs/architecture.md, "Measurements behind
    the code"). Blocks whose loops do not fuse
    (a reduction, a non-affine loop) are left as they are; the arithmetic of an element never changes."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        if not loops:
            continue
        try:
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            n = int(sch.get(fused).extent)
            sch.parallel(sch.split(fused, [None, chunk])[0] if n % chunk == 0 and n > chunk else fused)
        except Exception:  # a reduction or non-affine loop nest: leave it serial
            pass
    return sch.mod["main"]


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of :func:`model.attention.rope_tables` (angles in float64, stored float32)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
