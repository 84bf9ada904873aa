"""Multi-head latent attention's graph kernels (:mod:`model.mla`), in the absorbed form, for the CPU and CUDA.

A layer's KV cache holds per position only what the ternary ``attn_kv_b`` reads: the int8 latent ``c8 [c]`` that
its BitLinear input quantization makes (``lc [n_blocks, block, c]``), and a float32 row ``pc [n_blocks, block, 1 +
r]`` with ``s_kvb / a`` (the matrix's scale over the latent's activation scale: the factor BitLinear multiplies the
integer dot product by) and the rotated shared key ``k_pe [r]``. Keys and values are never materialised: with
``W_kb[h]``, ``W_vb[h]`` head ``h``'s key and value rows of ``attn_kv_b`` (ternary codes),

* :func:`absorb`: ``qa[h] = W_kb[h]ᵀ · q_nope[h]`` (``[c]``) and ``q_pe[h]`` rotated;
* :func:`kv_update`: the row's ``c8``, ``s_kvb / a`` and rotated ``k_pe`` into its cache slot, in place;
* :func:`attention`: ``score(p) = ((qa[h] · c8(p)) · (s_kvb / a(p)) + q_pe[h] · k_pe(p)) / √(hd + r)`` over the
  row's positions, softmax, and ``ctx[h] = Σ_p prob(p) · (s_kvb / a(p)) · c8(p)`` (``[c]``);
* :func:`v_up`: ``o[h] = W_vb[h] · ctx[h]``;
* :func:`prep` (CUDA, after ``q | kv_a`` as one stacked GEMV): the latent's RMSNorm + quantize, :func:`kv_update`
  and :func:`absorb` in one kernel; the CUDA attention does :func:`v_up` in its combine.

That is the PyTorch module's ``q_nope · (W_kb c8 · s/a)`` and ``Σ_p prob · (W_vb c8 · s/a)`` with the sums
reassociated: the same numbers up to float32 rounding, while a position costs ``c + 4 (1 + r)`` bytes instead of
GQA's ``8 · n_kv_heads · hd``. ``W_kb`` is stored ``int8 [H, hd, c]`` and ``W_vb`` ``int8 [H, c, hd]`` (codes in
{-1, 0, 1}: unpacked, 4× the 2-bit bytes, so each kernel reads them with unit stride).

The CUDA build runs :func:`prep` and :func:`attention`'s CUDA form (``gpu=True``: CUDA blocks per (row, head), per
row, per (row, key chunk)); the CPU build runs :func:`absorb`, :func:`kv_update`, :func:`attention` and :func:`v_up`
(parallel loops with vector lanes: over (row, head), or for the attention over (row, key chunk)). ``bind=False``
turns the CUDA forms' thread bindings into serial loops, phase after phase: the same kernels, runnable on the CPU,
which is how the tests check them. A row's result depends only on that row, on both.

    python -c "from compiler.graph_kernels_mla import attention; print(attention(1, 8, 64, 32, 256, 1024, 16).script())"
"""

from __future__ import annotations

import math

from compiler.graph_kernels import _let, bindings, table_width

LANES = 16  # CPU partial sums per latent dot product (absorb)
CPU_LANES = {"avx2": 8, "avx512": 16}  # the attention's: float32 lanes of a vector register (its accumulators,
# one register per head, stay in registers; 16 lanes on AVX2 spilled them)
GPU_CHUNK = 32  # keys per CUDA block of the split (flash-decoding) attention
COMBINE_UNROLL = 16  # chunks a step of the CUDA combine's loop: their loads are independent, so in flight together
CPU_SPLIT = 16  # CPU tasks per row: every head over 1/16 of the row's keys, each latent row converted once


def exp_poly(x):
    """``exp(x)`` for a float32 TIR expression as arithmetic LLVM vectorizes (``Tx.exp`` is a libm call per lane):
    ``2^n · p(x - n·ln 2)``, ``n = round(x / ln 2)``, ``p`` Cephes' degree-7 polynomial (within 2 ulp of ``expf``
    for ``x`` in ``[-87.3, 88.3]``; ``x`` is clamped to that range, so ``exp(-inf)`` is ``~1e-38``, not 0)."""
    from tvm import tirx

    def f(v):
        return tirx.const(v, "float32")

    def body(xc):
        def with_n(n):
            def with_r(r):
                p = f(1.9875691500e-4)
                for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
                    p = p * r + f(k)
                two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
                return (p * r * r + r + f(1.0)) * two_n

            return _let(xc - n * f(0.693359375) - n * f(-2.12194440e-4), with_r)

        return _let(tirx.floor(xc * f(1.44269504088896341) + f(0.5)), with_n)

    return _let(tirx.max(tirx.min(x, f(88.3762626647949)), f(-87.33654)), body)


def i8_to_f32(x):
    """An int8 TIR expression as float32 without a conversion instruction: ``x + 2^23 + 128`` (an int32) has the
    float32 bits of ``2^23 + 128 + x`` exactly, so subtracting ``2^23 + 128`` gives ``float(x)`` exactly. The GPU
    kernels convert each latent and weight code this way (an integer add and a float add at full rate; on Hopper a
    conversion issues at an eighth of the float rate, and the attention converts every latent once per head)."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.Cast("int32", x) + tirx.const(0x4B000080, "int32")) - tirx.const(
        8388736.0, "float32"
    )


def cache_shapes(c: int, r: int, block: int) -> list[tuple[tuple[int, ...], str]]:
    """A layer's two cache tensors after ``n_blocks``: the int8 latent and the float32 ``(s/a, k_pe)`` rows."""
    return [((block, c), "int8"), ((block, 1 + r), "float32")]


def _absorb_head(H: int, hd: int, r: int, c: int, ctx: int, bind: bool):
    """The CUDA form of :func:`absorb` for (row, head) ``th`` (a block of ``c`` threads, thread ``j`` latent column
    ``j``), as a macro: :func:`absorb` and :func:`prep` run it."""
    from tvm.script import tirx as Tx

    half, Q = r // 2, hd + r
    _, threads = bindings(bind)

    @Tx.macro
    def head(q, kb, pos, cos, sin, qa, qpe, th):
        for j in threads(c):
            acc = Tx.alloc_buffer((1,), "float32", scope="local")
            acc[0] = Tx.float32(0)
            for i in Tx.unroll(hd):  # (unrolled: every load issued before the sums wait on them)
                acc[0] = acc[0] + q[th // H, th % H * Q + i] * i8_to_f32(kb[th % H, i, j])
            qa[th // H, th % H, j] = acc[0]
            if j < half:
                p = Tx.min(Tx.max(pos[th // H], 0), ctx - 1)
                x0 = q[th // H, th % H * Q + hd + j]
                x1 = q[th // H, th % H * Q + hd + j + half]
                qpe[th // H, th % H, j] = x0 * cos[p, j] - x1 * sin[p, j]
                qpe[th // H, th % H, j + half] = x1 * cos[p, j] + x0 * sin[p, j]

    return head


def absorb(T: int, H: int, hd: int, r: int, c: int, ctx: int):
    """``q [T, H·(hd + r)]`` (per head ``[nope | pe]``), ``kb int8 [H, hd, c]``, ``pos [T]``, the RoPE tables →
    ``qa [T, H, c]`` (``Σ_i q_nope[i] · kb[h, i, :]``, over ``i`` in order) and ``qpe [T, H, r]`` (rotated at
    ``pos``; a padding row as position 0). CPU (the CUDA build does this inside :func:`prep`)."""
    from tvm.script import tirx as Tx

    half, Q = r // 2, hd + r
    L = LANES if c % LANES == 0 else 1

    @Tx.prim_func
    def absorb_cpu(
        q: Tx.Buffer((T, H * Q), "float32"),
        kb: Tx.Buffer((H, hd, c), "int8"),
        pos: Tx.Buffer((T,), "int32"),
        cos: Tx.Buffer((ctx, half), "float32"),
        sin: Tx.Buffer((ctx, half), "float32"),
        qa: Tx.Buffer((T, H, c), "float32"),
        qpe: Tx.Buffer((T, H, r), "float32"),
    ):
        for th in Tx.parallel(T * H):
            for jo in range(c // L):
                for ln in Tx.vectorized(L):
                    qa[th // H, th % H, jo * L + ln] = q[th // H, th % H * Q] * Tx.Cast(
                        "float32", kb[th % H, 0, jo * L + ln]
                    )
                for i in range(1, hd):
                    for ln in Tx.vectorized(L):
                        qa[th // H, th % H, jo * L + ln] = qa[th // H, th % H, jo * L + ln] + q[
                            th // H, th % H * Q + i
                        ] * Tx.Cast("float32", kb[th % H, i, jo * L + ln])
            for j in range(half):
                p = Tx.min(Tx.max(pos[th // H], 0), ctx - 1)
                a = q[th // H, th % H * Q + hd + j]
                b = q[th // H, th % H * Q + hd + j + half]
                qpe[th // H, th % H, j] = a * cos[p, j] - b * sin[p, j]
                qpe[th // H, th % H, j + half] = b * cos[p, j] + a * sin[p, j]

    return absorb_cpu.without_attr("global_symbol")


def kv_update(T: int, c: int, r: int, ctx: int, block: int):
    """In place into ``lc int8 [n_blocks, block, c]`` and ``pc [n_blocks, block, 1 + r]``: row ``t``'s latent
    ``c8 [T, c]`` (the RMSNorm+quantize of ``kva[t, :c]``, scale ``a [T]``), ``s_kvb / a`` (``kvb_scale [1]``) and
    ``kva[t, c:]`` rotated at ``p = pos[t]``, into block ``table[t, p // block]``, slot ``p % block``; a row with
    ``pos`` outside ``[0, ctx)`` writes nothing. CPU (the CUDA build does this inside :func:`prep`)."""
    from tvm.script import tirx as Tx

    half = r // 2
    W = table_width(ctx, block)
    rows, cols = bindings(False)

    @Tx.prim_func
    def mla_kv_write(
        c8: Tx.Buffer((T, c), "int8"),
        a: Tx.Buffer((T,), "float32"),
        kva: Tx.Buffer((T, c + r), "float32"),
        kvb_scale: Tx.Buffer((1,), "float32"),
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        cos: Tx.Buffer((ctx, half), "float32"),
        sin: Tx.Buffer((ctx, half), "float32"),
        lc_h: Tx.handle,
        pc_h: Tx.handle,
    ):
        nb = Tx.int64()
        lc = Tx.match_buffer(lc_h, (nb, block, c), "int8")
        pc = Tx.match_buffer(pc_h, (nb, block, 1 + r), "float32")
        for t in rows(T):
            for j in cols(c):
                p = pos[t]
                if p >= 0 and p < ctx:
                    b = Tx.Cast("int64", table[t, p // block])
                    lc[b, p % block, j] = c8[t, j]
                    if j < half:
                        x0 = kva[t, c + j]
                        x1 = kva[t, c + j + half]
                        pc[b, p % block, 1 + j] = x0 * cos[p, j] - x1 * sin[p, j]
                        pc[b, p % block, 1 + j + half] = x1 * cos[p, j] + x0 * sin[p, j]
                    if j == 0:
                        pc[b, p % block, 0] = kvb_scale[0] / a[t]

    return mla_kv_write.without_attr("global_symbol")


def prep(T: int, H: int, hd: int, r: int, c: int, ctx: int, block: int, width: int, eps: float, bind: bool = True):
    """CUDA: everything between the stacked ``q | kv_a`` GEMV and the attention in one kernel (a GPU decode step is
    bound by its kernel count; this replaces four: the latent's slice, its RMSNorm+quantize, :func:`kv_update` and
    :func:`absorb`). ``qk [T, width]`` holds per row ``q [H·(hd + r)] | latent [c] | k_pe [r]``.

    * Blocks ``0 .. T·H − 1``, one per (row, head): :func:`absorb`'s work, the same sums in the same order.
    * Blocks ``T·H .. T·H + T − 1``, one per row: the latent's RMSNorm (weight ``norm [c]``) and int8 quantize as
      ``rmsnorm_quant`` computes them (``x · (1 / √(Σx² / c + eps)) · w``, codes ``round(h · a)`` clamped, ``a =
      127 / max|h|``; ``Σx²`` and ``max|h|`` by :func:`compiler.graph_kernels_gpu.block_reduce` over ``c`` threads),
      then :func:`kv_update`'s write of ``c8``, ``s_kvb / a`` and the rotated ``k_pe`` (a row with ``pos`` outside
      ``[0, ctx)`` writes nothing).

    Outputs ``qa [T, H, c]`` and ``qpe [T, H, r]``; ``lc`` and ``pc`` in place. No block reads what another writes.
    ``bind=False``: the same kernel with serial loops, phase after phase (the tests' CPU twin)."""
    from tvm.script import tirx as Tx

    from compiler.graph_kernels_gpu import block_reduce
    from model.ternary.quant import ACT_QMAX, SCALE_EPS

    half, Q = r // 2, hd + r
    at = H * Q  # the latent's first column in a stacked row
    if width < at + c + r:
        raise ValueError(f"a stacked q|kv_a row of {width} columns; the layer needs {at + c + r}")
    W = table_width(ctx, block)
    blocks, threads = bindings(bind)
    scope = "shared" if bind else "global"
    add_part, add_finish, _ = block_reduce(c, lambda x, y: x + y, Tx.float32(0), bind)
    max_part, max_finish, _ = block_reduce(c, Tx.max, Tx.float32(0), bind)
    head = _absorb_head(H, hd, r, c, ctx, bind)

    @Tx.prim_func
    def mla_prep(
        qk: Tx.Buffer((T, width), "float32"),
        kb: Tx.Buffer((H, hd, c), "int8"),
        norm: Tx.Buffer((c,), "float32"),
        kvb_scale: Tx.Buffer((1,), "float32"),
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        cos: Tx.Buffer((ctx, half), "float32"),
        sin: Tx.Buffer((ctx, half), "float32"),
        lc_h: Tx.handle,
        pc_h: Tx.handle,
        qa: Tx.Buffer((T, H, c), "float32"),
        qpe: Tx.Buffer((T, H, r), "float32"),
    ):
        nb = Tx.int64()
        lc = Tx.match_buffer(lc_h, (nb, block, c), "int8")
        pc = Tx.match_buffer(pc_h, (nb, block, 1 + r), "float32")
        for b in blocks(T * H + T):
            red = Tx.alloc_buffer((c,), "float32", scope=scope)
            fin = Tx.alloc_buffer((1,), "float32", scope=scope)  # Σx²
            top = Tx.alloc_buffer((1,), "float32", scope=scope)  # max |h|
            if b < T * H:  # absorb (row, head)
                head(qk, kb, pos, cos, sin, qa, qpe, b)
            else:  # row b - T·H: the latent's norm and quantize, and the cache write
                for tx in threads(c):
                    v = Tx.alloc_buffer((1,), "float32", scope="local")
                    v[0] = qk[b - T * H, at + tx] * qk[b - T * H, at + tx]
                    add_part(v, red, tx)
                add_finish(red, fin)
                for tx in threads(c):
                    v = Tx.alloc_buffer((1,), "float32", scope="local")
                    rs = Tx.float32(1) / Tx.sqrt(fin[0] / Tx.float32(c) + Tx.float32(eps))
                    v[0] = Tx.fabs(qk[b - T * H, at + tx] * rs * norm[tx])
                    max_part(v, red, tx)
                max_finish(red, top)
                for tx in threads(c):
                    p = pos[b - T * H]
                    if p >= 0 and p < ctx:
                        rs = Tx.float32(1) / Tx.sqrt(fin[0] / Tx.float32(c) + Tx.float32(eps))
                        a = Tx.float32(ACT_QMAX) / Tx.max(top[0], Tx.float32(SCALE_EPS))
                        code = Tx.min(Tx.max(Tx.nearbyint(qk[b - T * H, at + tx] * rs * norm[tx] * a),
                                             Tx.float32(-ACT_QMAX)), Tx.float32(ACT_QMAX))  # fmt: skip
                        blk = Tx.Cast("int64", table[b - T * H, p // block])
                        lc[blk, p % block, tx] = Tx.Cast("int8", code)
                        if tx < half:
                            x0 = qk[b - T * H, at + c + tx]
                            x1 = qk[b - T * H, at + c + tx + half]
                            pc[blk, p % block, 1 + tx] = x0 * cos[p, tx] - x1 * sin[p, tx]
                            pc[blk, p % block, 1 + tx + half] = x1 * cos[p, tx] + x0 * sin[p, tx]
                        if tx == 0:
                            pc[blk, p % block, 0] = kvb_scale[0] / a

    return mla_prep.without_attr("global_symbol")


def attention_scratch(T: int, H: int, c: int, ctx: int, gpu: bool = False) -> list[tuple]:
    """Shapes of :func:`attention`'s scratch outputs. CPU: every head's score per (row, key) ``[T·ctx, H]``, and per
    (row, key chunk, head) the chunk's (max, Σ exp) ``[T·NC·H, 2]`` and partial ``ctx`` ``[T·NC·H, c]``; CUDA: each
    (row, key chunk, head)'s partial ``ctx`` ``[T·NC·H, c]`` and (max, Σ exp)."""
    if gpu:
        nc = -(-ctx // GPU_CHUNK)
        return [(T * H * nc, c), (T * H * nc, 2)]
    return [(T * ctx, H), (T * CPU_SPLIT * H, 2), (T * CPU_SPLIT * H, c)]


def attention(
    T: int, H: int, hd: int, r: int, c: int, ctx: int, block: int, gpu: bool = False, bind: bool = True, lanes: int = 16
):
    """Causal softmax attention over the latent cache → ``ctx [T, H, c]`` (see the module docstring): row ``t``
    reads its sequence's positions ``0 .. pos[t]`` through ``table[t]``; a padding row (``pos < 0``) gives zeros.
    The CUDA form's combine also does :func:`v_up`'s sums (``vb int8 [H, c, hd]`` after ``table``; its output is
    ``o [T, H·hd]``): one kernel fewer per layer.

    CPU: split over the keys like the CUDA form, but with every head in one task, so each cached latent row is
    converted to float32 once for all heads. A parallel task per (row, :data:`CPU_SPLIT`-th of its cache blocks)
    computes every head's scores (the latent dot product in ``lanes`` lanes, lane ``l`` taking ``l, l + lanes, …``,
    one vector register per head: :data:`CPU_LANES`; times ``s/a``, plus the rope part in the same lanes, then the
    lanes folded in halves) and their max, then per key ``exp`` (:func:`exp_poly`, vectorized over the heads: the
    scores are stored ``[key, head]``) and ``Σ exp`` in key order, and its partial ``ctx`` (keys in order, ``lanes``
    latent columns at a time for every head). The task walks its keys block by block, so a key's row is a fixed
    offset in its block: no table lookup, division or remainder per key. Then a
    task per (row, head) combines the chunks in order. CUDA: split over the keys (flash decoding), a block per
    (row, chunk of :data:`GPU_CHUNK` keys) with a warp per head, so each latent row is read once for all heads: the
    block stages the chunk's int8 latents, its ``(s/a, k_pe)`` rows and every head's queries in shared memory (rows
    padded so that a warp's keys fall in distinct banks); lane ``k`` of warp ``h`` computes key ``k``'s score for head
    ``h`` (the latent dims in order), the head's max and ``Σ exp`` are register shuffles over the warp, and each lane
    then sums ``c / 32`` latent columns over the chunk's keys (8 independent sums, every key: a key past the row
    weighs 0); a block per (row, head) combines the chunks in order (its first warp weighs the chunks once, each
    thread sums one latent column over them) and does ``v_up`` by groups of latent rows added in order. The CUDA
    kernels convert int8 codes with :func:`i8_to_f32`.
    """
    from tvm.script import tirx as Tx

    scale = 1.0 / math.sqrt(hd + r)
    W = table_width(ctx, block)
    TH = T * H
    if gpu:
        return _attention_gpu(T, H, hd, r, c, ctx, block, scale, bind)
    if lanes not in (8, 16):  # the lane fold below halves 16 → 8 → 4 → 2 → 1
        raise ValueError(f"MLA attention lanes {lanes}: 8 (AVX2) or 16 (AVX-512)")
    L = lanes if c % lanes == 0 else 1
    NO = c // L
    RL = L if r % L == 0 else 0  # the rope part in the same lanes (else serially, after the fold)
    NC = CPU_SPLIT

    @Tx.prim_func
    def mla_attn(
        qa: Tx.Buffer((T, H, c), "float32"),
        qpe: Tx.Buffer((T, H, r), "float32"),
        lc_h: Tx.handle,
        pc_h: Tx.handle,
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        o: Tx.Buffer((T, H, c), "float32"),
        sc: Tx.Buffer((T * ctx, H), "float32"),
        st: Tx.Buffer((T * NC * H, 2), "float32"),
        po: Tx.Buffer((T * NC * H, c), "float32"),
    ):
        nb = Tx.int64()
        lc = Tx.match_buffer(lc_h, (nb, block, c), "int8")
        pc = Tx.match_buffer(pc_h, (nb, block, 1 + r), "float32")
        for tk in Tx.parallel(T * NC):  # (row, key chunk): every head over the chunk's cache blocks
            part = Tx.alloc_buffer((H, L), "float32", scope="global")  # stack arrays, kept in registers
            lat = Tx.alloc_buffer((L,), "float32", scope="global")
            mx = Tx.alloc_buffer((H,), "float32", scope="global")
            sm = Tx.alloc_buffer((H,), "float32", scope="global")
            t: Tx.let = tk // NC
            n: Tx.let = Tx.min(pos[t] + 1, ctx)
            kb: Tx.let = ((n + NC - 1) // NC + block - 1) // block  # cache blocks per chunk
            blk0: Tx.let = tk % NC * kb
            if blk0 * block < n:
                blk1: Tx.let = Tx.min((n + block - 1) // block, blk0 + kb)
                for h in Tx.vectorized(H):
                    mx[h] = Tx.float32(-3.0e38)
                for bi in range(blk0, blk1):  # scores, block by block (a key: row jj of block b), and their max
                    b: Tx.let = Tx.Cast("int64", table[t, bi])
                    for jj in range(Tx.min(block, n - bi * block)):
                        for h in Tx.unroll(H):
                            for ln in Tx.vectorized(L):
                                part[h, ln] = Tx.float32(0)
                        for io in range(NO):
                            for ln in Tx.vectorized(L):
                                lat[ln] = Tx.Cast("float32", lc[b, jj, io * L + ln])
                            for h in Tx.unroll(H):
                                for ln in Tx.vectorized(L):
                                    part[h, ln] = part[h, ln] + qa[t, h, io * L + ln] * lat[ln]
                        for h in Tx.unroll(H):
                            for ln in Tx.vectorized(L):
                                part[h, ln] = part[h, ln] * pc[b, jj, 0]
                            if RL > 0:
                                for ko in range(r // L):
                                    for ln in Tx.vectorized(L):
                                        part[h, ln] = part[h, ln] + qpe[t, h, ko * L + ln] * pc[b, jj, 1 + ko * L + ln]
                            if L >= 8:  # the lanes folded in halves
                                if L == 16:
                                    for ln in Tx.vectorized(8):
                                        part[h, ln] = part[h, ln] + part[h, ln + 8]
                                for ln in Tx.vectorized(4):
                                    part[h, ln] = part[h, ln] + part[h, ln + 4]
                                for ln in Tx.vectorized(2):
                                    part[h, ln] = part[h, ln] + part[h, ln + 2]
                                part[h, 0] = part[h, 0] + part[h, 1]
                            else:
                                for ln in range(1, L):
                                    part[h, 0] = part[h, 0] + part[h, ln]
                            if RL == 0:
                                for k in range(r):
                                    part[h, 0] = part[h, 0] + qpe[t, h, k] * pc[b, jj, 1 + k]
                            sc[t * ctx + bi * block + jj, h] = part[h, 0] * Tx.float32(scale)
                            mx[h] = Tx.max(mx[h], part[h, 0] * Tx.float32(scale))
                for h in Tx.vectorized(H):
                    sm[h] = Tx.float32(0)
                for bi in range(blk0, blk1):  # Σ exp per head in key order; the weights prob · s/a, unnormalised
                    b: Tx.let = Tx.Cast("int64", table[t, bi])
                    for jj in range(Tx.min(block, n - bi * block)):
                        k: Tx.let = t * ctx + bi * block + jj  # the key's score row
                        for h in Tx.vectorized(H):
                            sc[k, h] = exp_poly(sc[k, h] - mx[h])
                            sm[h] = sm[h] + sc[k, h]
                            sc[k, h] = sc[k, h] * pc[b, jj, 0]
                for h in Tx.vectorized(H):
                    st[tk * H + h, 0] = mx[h]
                    st[tk * H + h, 1] = sm[h]
                for vo in range(NO):  # the chunk's partial ctx, L latent columns at a time, keys in order
                    for h in Tx.unroll(H):
                        for ln in Tx.vectorized(L):
                            part[h, ln] = Tx.float32(0)
                    for bi in range(blk0, blk1):
                        b: Tx.let = Tx.Cast("int64", table[t, bi])
                        for jj in range(Tx.min(block, n - bi * block)):
                            for ln in Tx.vectorized(L):
                                lat[ln] = Tx.Cast("float32", lc[b, jj, vo * L + ln])
                            for h in Tx.unroll(H):
                                for ln in Tx.vectorized(L):
                                    part[h, ln] = part[h, ln] + sc[t * ctx + bi * block + jj, h] * lat[ln]
                    for h in Tx.unroll(H):
                        for ln in Tx.vectorized(L):
                            po[tk * H + h, vo * L + ln] = part[h, ln]
        for th in Tx.parallel(TH):  # per (row, head): the chunks combined in order
            mx = Tx.alloc_buffer((2,), "float32", scope="global")
            t: Tx.let = th // H
            h = th % H
            n: Tx.let = Tx.min(pos[t] + 1, ctx)
            for i in range(c):
                o[t, h, i] = Tx.float32(0)
            if n > 0:
                # keys per chunk (whole blocks); the chunks from (n + kc - 1) // kc on are empty
                kc: Tx.let = ((n + NC - 1) // NC + block - 1) // block * block
                mx[0] = st[t * NC * H + h, 0]
                for ch in range(1, (n + kc - 1) // kc):
                    mx[0] = Tx.max(mx[0], st[(t * NC + ch) * H + h, 0])
                mx[1] = Tx.float32(0)
                for ch in range((n + kc - 1) // kc):
                    f = Tx.exp(st[(t * NC + ch) * H + h, 0] - mx[0])
                    mx[1] = mx[1] + st[(t * NC + ch) * H + h, 1] * f
                    for i in Tx.vectorized(c):
                        o[t, h, i] = o[t, h, i] + po[(t * NC + ch) * H + h, i] * f
                for i in Tx.vectorized(c):
                    o[t, h, i] = o[t, h, i] / mx[1]

    return mla_attn.without_attr("global_symbol")


def _attention_gpu(T: int, H: int, hd: int, r: int, c: int, ctx: int, block: int, scale: float, bind: bool):
    from tvm.script import tirx as Tx

    from compiler.graph_kernels_gpu import WARP, warp_tree

    W = table_width(ctx, block)
    TH = T * H
    K = GPU_CHUNK  # keys per block: one per lane of a warp
    NT = H * K  # a warp per head
    CP, RP = c + 4, r + 1  # staged rows padded (a word, a float) so that a warp's keys fall in distinct banks
    if K != WARP or c % K or c % H or NT > 1024:
        raise ValueError(f"MLA CUDA attention: {H} heads × {K} keys must fit a block (≤ 1024 threads), and "
                         f"kv_lora_rank {c} must be a multiple of {K} and of the head count")  # fmt: skip
    shared = K * CP + 4 * (H * c + H * r + K * RP + NT + K)
    if shared > 48 * 1024:
        raise ValueError(f"MLA CUDA attention: {shared} bytes of staged rows exceed 48 KiB ({H} heads, c {c}, r {r})")
    if hd > c:
        raise ValueError(f"head_dim {hd} > kv_lora_rank {c}: the combine's threads (one per latent column) do v_up")
    NC = -(-ctx // K)
    P = T * NC * H  # partial results per (row, chunk, head)
    blocks, threads = bindings(bind)
    sync = (lambda: Tx.tvm_storage_sync("shared")) if bind else (lambda: Tx.evaluate(0))
    scope = "shared" if bind else "global"
    FULL = Tx.uint32(0xFFFFFFFF)
    warp_max, warp_sum = warp_tree(K, Tx.max, FULL), warp_tree(K, lambda x, y: x + y, FULL)
    neg = -3.4028234663852886e38
    NJ = -(-NC // WARP)  # the chunk weights' steps per lane
    U = COMBINE_UNROLL
    SU = next(n for n in (8, 4, 2, 1) if c % n == 0)  # the score's latent dims a step
    G = c // hd if c % hd == 0 else 1  # v_up's groups of latent rows, summed by separate threads, then in order

    def n_of(pos, t):  # the row's keys
        return Tx.min(pos[t] + 1, ctx)

    def n_ch(pos, t):  # the row's chunks
        return (n_of(pos, t) + K - 1) // K

    @Tx.macro
    def split(qa, qpe, lc, pc, pos, table, part, st):
        """Phase 1: a block per (row, chunk of K keys), every head in it (a warp each), so the chunk's latent rows
        are read once for all heads."""
        for b in blocks(T * NC):  # (row, chunk) = (b // NC, b % NC); its partials at rows b·H + head
            lat = Tx.alloc_buffer((K * CP,), "int8", scope=scope)  # the chunk's int8 latents
            qs = Tx.alloc_buffer((H * c,), "float32", scope=scope)  # every head's absorbed query
            qp = Tx.alloc_buffer((H * r,), "float32", scope=scope)  # every head's rotated rope query
            pe = Tx.alloc_buffer((K * RP,), "float32", scope=scope)  # the keys' (s/a, k_pe) rows
            w = Tx.alloc_buffer((NT,), "float32", scope=scope)  # per (head, key): score, then exp(score - max)·s/a
            if b % NC * K < n_of(pos, b // NC):
                for tx in threads(NT):  # stage: consecutive threads load consecutive columns
                    for i in Tx.unroll(K * c // NT):  # (unrolled: every load in flight together)
                        if b % NC * K + (i * NT + tx) // c < n_of(pos, b // NC):
                            lat[(i * NT + tx) // c * CP + (i * NT + tx) % c] = lc[
                                Tx.Cast("int64", table[b // NC, (b % NC * K + (i * NT + tx) // c) // block]),
                                (b % NC * K + (i * NT + tx) // c) % block, (i * NT + tx) % c]  # fmt: skip
                    for i in Tx.unroll(c // K):
                        qs[i * NT + tx] = qa[b // NC, (i * NT + tx) // c, (i * NT + tx) % c]
                    for i in Tx.unroll((H * r + NT - 1) // NT):
                        if i * NT + tx < H * r:
                            qp[i * NT + tx] = qpe[b // NC, (i * NT + tx) // r, (i * NT + tx) % r]
                    for i in Tx.unroll((K * RP + NT - 1) // NT):
                        if i * NT + tx < K * RP:
                            if b % NC * K + (i * NT + tx) // RP < n_of(pos, b // NC):
                                pe[i * NT + tx] = pc[
                                    Tx.Cast("int64", table[b // NC, (b % NC * K + (i * NT + tx) // RP) // block]),
                                    (b % NC * K + (i * NT + tx) // RP) % block, (i * NT + tx) % RP]  # fmt: skip
                sync()
                for tx in threads(NT):  # thread (head tx // K, key tx % K): the score, latent dims in order
                    acc = Tx.alloc_buffer((1,), "float32", scope="local")
                    if b % NC * K + tx % K < n_of(pos, b // NC):
                        acc[0] = Tx.float32(0)
                        for io in range(c // SU):  # SU dims a step: their loads issued together
                            for ii in Tx.unroll(SU):
                                acc[0] = acc[0] + qs[tx // K * c + io * SU + ii] * i8_to_f32(
                                    lat[tx % K * CP + io * SU + ii])  # fmt: skip
                        acc[0] = acc[0] * pe[tx % K * RP]
                        for j in range(r):
                            acc[0] = acc[0] + qp[tx // K * r + j] * pe[tx % K * RP + 1 + j]
                        acc[0] = acc[0] * Tx.float32(scale)
                    else:
                        acc[0] = Tx.float32(neg)
                    if bind:  # the head's max and Σ exp over its warp: register shuffles
                        top = Tx.alloc_buffer((1,), "float32", scope="local")
                        tot = Tx.alloc_buffer((1,), "float32", scope="local")
                        top[0] = acc[0]
                        warp_max(top)
                        top[0] = Tx.tvm_warp_shuffle(FULL, top[0], 0, K, WARP)  # lane 0's, to every lane
                        if b % NC * K + tx % K < n_of(pos, b // NC):
                            acc[0] = Tx.exp(acc[0] - top[0])
                        else:
                            acc[0] = Tx.float32(0)
                        tot[0] = acc[0]
                        warp_sum(tot)
                        if b % NC * K + tx % K < n_of(pos, b // NC):
                            w[tx] = acc[0] * pe[tx % K * RP]
                        else:  # (its pe row is not staged)
                            w[tx] = Tx.float32(0)
                        if tx % K == 0:
                            st[b * H + tx // K, 0] = top[0]
                            st[b * H + tx // K, 1] = tot[0]
                    else:
                        w[tx] = acc[0]
                if not bind:  # the CPU twin: each head's max and Σ exp over its keys in order
                    for h in range(H):
                        red = Tx.alloc_buffer((2,), "float32", scope="local")
                        red[0] = w[h * K]
                        for k in range(1, K):
                            red[0] = Tx.max(red[0], w[h * K + k])
                        red[1] = Tx.float32(0)
                        for k in range(K):
                            if b % NC * K + k < n_of(pos, b // NC):
                                w[h * K + k] = Tx.exp(w[h * K + k] - red[0])
                                red[1] = red[1] + w[h * K + k]
                                w[h * K + k] = w[h * K + k] * pe[k * RP]
                            else:
                                w[h * K + k] = Tx.float32(0)
                        st[b * H + h, 0] = red[0]
                        st[b * H + h, 1] = red[1]
                sync()
                for tx in threads(NT):  # head tx // K's latent columns i·K + tx % K over the chunk's keys, in order
                    acc = Tx.alloc_buffer((c // K,), "float32", scope="local")  # a sum per column: independent
                    for i in Tx.unroll(c // K):
                        acc[i] = Tx.float32(0)
                    for kk in Tx.unroll(K):  # every key: a key past the row's end has weight 0 (its row unstaged)
                        for i in Tx.unroll(c // K):
                            acc[i] = acc[i] + w[tx // K * K + kk] * i8_to_f32(lat[kk * CP + i * K + tx % K])
                    for i in Tx.unroll(c // K):
                        part[b * H + tx // K, i * K + tx % K] = acc[i]

    @Tx.macro
    def weights(th, tx, ew, tot, pos, st):
        """(row, head) ``th``'s chunk weights ``ew[ci] = exp(max_ci - max)`` and ``tot = Σ ew[ci] · Σexp_ci``: the
        first warp, lane ``l`` taking chunks ``l, l + 32, …``, then shuffles (the CPU twin: thread 0, chunks in
        order)."""
        if bind:
            if tx < WARP:
                m = Tx.alloc_buffer((1,), "float32", scope="local")
                sm = Tx.alloc_buffer((1,), "float32", scope="local")
                e = Tx.alloc_buffer((1,), "float32", scope="local")  # (never read back from shared memory here)
                m[0] = Tx.float32(neg)
                for j in range(NJ):
                    if j * WARP + tx < n_ch(pos, th // H):
                        m[0] = Tx.max(m[0], st[(th // H * NC + j * WARP + tx) * H + th % H, 0])
                warp_max(m)
                m[0] = Tx.tvm_warp_shuffle(FULL, m[0], 0, WARP, WARP)
                sm[0] = Tx.float32(0)
                for j in range(NJ):
                    if j * WARP + tx < n_ch(pos, th // H):
                        e[0] = Tx.exp(st[(th // H * NC + j * WARP + tx) * H + th % H, 0] - m[0])
                        ew[j * WARP + tx] = e[0]
                        sm[0] = sm[0] + e[0] * st[(th // H * NC + j * WARP + tx) * H + th % H, 1]
                warp_sum(sm)
                if tx == 0:
                    tot[0] = sm[0]
        else:
            if tx == 0:
                m = Tx.alloc_buffer((1,), "float32", scope="local")
                m[0] = Tx.float32(neg)
                for ci in range(n_ch(pos, th // H)):
                    m[0] = Tx.max(m[0], st[(th // H * NC + ci) * H + th % H, 0])
                tot[0] = Tx.float32(0)
                for ci in range(n_ch(pos, th // H)):
                    ew[ci] = Tx.exp(st[(th // H * NC + ci) * H + th % H, 0] - m[0])
                    tot[0] = tot[0] + ew[ci] * st[(th // H * NC + ci) * H + th % H, 1]

    @Tx.prim_func
    def mla_attn_v_up_gpu(
        qa: Tx.Buffer((T, H, c), "float32"),
        qpe: Tx.Buffer((T, H, r), "float32"),
        lc_h: Tx.handle,
        pc_h: Tx.handle,
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        vb: Tx.Buffer((H, c, hd), "int8"),
        o: Tx.Buffer((T, H * hd), "float32"),
        part: Tx.Buffer((P, c), "float32"),
        st: Tx.Buffer((P, 2), "float32"),
    ):
        nb = Tx.int64()
        lc = Tx.match_buffer(lc_h, (nb, block, c), "int8")
        pc = Tx.match_buffer(pc_h, (nb, block, 1 + r), "float32")
        split(qa, qpe, lc, pc, pos, table, part, st)
        for th in blocks(TH):  # per (row, head): the chunks combined into the head's latent context, then v_up
            ew = Tx.alloc_buffer((NC,), "float32", scope=scope)  # the chunks' weights
            tot = Tx.alloc_buffer((1,), "float32", scope=scope)
            cv = Tx.alloc_buffer((c,), "float32", scope=scope)
            red = Tx.alloc_buffer((G * hd,), "float32", scope=scope)  # v_up's sums per (group of rows, column)
            for tx in threads(c):
                weights(th, tx, ew, tot, pos, st)
            sync()
            for tx in threads(c):  # latent column tx: Σ over the chunks in order, U loads in flight
                acc = Tx.alloc_buffer((1,), "float32", scope="local")
                acc[0] = Tx.float32(0)
                for g in range((n_ch(pos, th // H) + U - 1) // U):
                    for u in Tx.unroll(U):
                        if g * U + u < n_ch(pos, th // H):
                            acc[0] = acc[0] + ew[g * U + u] * part[(th // H * NC + g * U + u) * H + th % H, tx]
                if pos[th // H] >= 0:
                    cv[tx] = acc[0] / tot[0]
                else:
                    cv[tx] = Tx.float32(0)
            sync()
            for tx in threads(c):  # v_up: thread (group g, column i) sums latent rows g·c/G .. in order
                if tx < G * hd:
                    acc = Tx.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = Tx.float32(0)
                    for j in Tx.unroll(c // G):
                        acc[0] = acc[0] + cv[tx // hd * (c // G) + j] * i8_to_f32(
                            vb[th % H, tx // hd * (c // G) + j, tx % hd])  # fmt: skip
                    red[tx] = acc[0]
            sync()
            for tx in threads(c):  # output column tx of the head: the groups' sums in order
                if tx < hd:
                    acc = Tx.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = red[tx]
                    for g in range(1, G):
                        acc[0] = acc[0] + red[g * hd + tx]
                    o[th // H, th % H * hd + tx] = acc[0]

    return mla_attn_v_up_gpu.without_attr("global_symbol")


def v_up(T: int, H: int, hd: int, c: int):
    """``o [T, H·hd]``: head ``h``'s output ``Σ_l ctx[t, h, l] · vb[h, l, :]`` (over ``l`` in order) from the
    attention's ``ctx [T, H, c]`` and ``vb int8 [H, c, hd]``. CPU (the CUDA attention's combine does it)."""
    from tvm.script import tirx as Tx

    @Tx.prim_func
    def v_up_cpu(ctxv: Tx.Buffer((T, H, c), "float32"), vb: Tx.Buffer((H, c, hd), "int8"),
                 o: Tx.Buffer((T, H * hd), "float32")):  # fmt: skip
        for th in Tx.parallel(T * H):
            for i in Tx.vectorized(hd):
                o[th // H, th % H * hd + i] = ctxv[th // H, th % H, 0] * Tx.Cast("float32", vb[th % H, 0, i])
            for j in range(1, c):
                for i in Tx.vectorized(hd):
                    o[th // H, th % H * hd + i] = o[th // H, th % H * hd + i] + ctxv[th // H, th % H, j] * Tx.Cast(
                        "float32", vb[th % H, j, i]
                    )

    return v_up_cpu.without_attr("global_symbol")
