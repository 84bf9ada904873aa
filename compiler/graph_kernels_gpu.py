"""CUDA twins of the graph kernels that :mod:`compiler.graph_kernels` writes as loop nests (no TE blocks, so no
schedule rule applies): causal GQA attention over the paged KV cache, the batched LM head, and the fused
RMSNorm+quantize and mHC site kernels (the KV-cache write takes ``gpu=True`` in
:func:`compiler.graph_kernels.kv_update`).

Same arguments, maths and buffers as the CPU versions (float32; attention's scratch ``sc``/``st`` outputs are used
the same way), with explicit thread bindings. A row's result never depends on the other rows or on the batch size:
each output is summed by one thread (or one block) in an order fixed by the shapes of that row alone, so a
sequence's greedy tokens are the same alone (``decode_b1``) or in any batch (``decode_b{B}``).

* ``attention``: split over chunks of keys (flash decoding), then the chunks combined; see :func:`attention`. Each
  phase is its own thread loop, so ``gpu=False`` turns the bindings into serial loops that run the phases one after
  another: the same kernel, runnable on the CPU (``tests/test_cuda_batch.py`` checks it there).
* Block-wide sums and maxima (:func:`block_reduce`): warp shuffles, then one shuffle tree over the warps, two block
  barriers each; the CPU twin runs the same trees in the same order.
* ``lm_head``: a warp per head row (two from 16 rows on), its lanes reading the row's 16-byte chunks side by side
  and keeping all ``B`` rows' sums in registers, then adding their partial sums by register shuffles: each head row
  is read once for the whole batch, and each logit's order of sums is fixed by ``D`` whatever ``B`` is.

    python -c "from compiler.graph_kernels_gpu import attention; print(attention(2, 8, 4, 64, 1024, 16).script())"
"""

from __future__ import annotations

import math

from compiler.graph_kernels import bindings

WARP = 32


def _levels(n: int) -> list[int]:
    """The strides of a reduction tree over ``n`` (a power of two) values: n/2, n/4, .., 1."""
    return [n >> (i + 1) for i in range(n.bit_length() - 1)]


def warp_tree(width: int, combine, mask):
    """A macro ``tree(v)``: ``v[0]`` (a local buffer) combined over ``width`` lanes of a warp by register shuffles,
    lane ``l`` taking lane ``l + s`` for ``s = width/2 .. 1``; lane 0 ends with the whole tree's result. ``mask``:
    the lanes that take part (all of them must reach the call)."""
    from tvm.script import tirx as Tx

    levels = _levels(width)

    @Tx.macro
    def tree(v):
        for lv in Tx.unroll(len(levels)):
            v[0] = combine(v[0], Tx.tvm_warp_shuffle_down(mask, v[0], Tx.shift_right(width // 2, lv), width, WARP))

    return tree


def block_reduce(threads: int, combine, identity, gpu: bool = True):
    """A block-wide reduction of one value per thread, as two macros for a kernel's phases (each phase its own ``for
    tx in threads(...)`` loop, see :func:`~compiler.graph_kernels.bindings`): ``part(v, red, tx)`` inside the phase
    that computes thread ``tx``'s value ``v[0]`` (a local buffer), then ``finish(red, fin)`` as the next phases,
    after which ``fin[0]`` holds the result. ``red`` is a ``[threads]`` scratch buffer, ``fin`` ``[1]``, both
    shared.

    The order is fixed: a tree within each warp (strides 16, 8, .., 1: lane ``l`` combines lane ``l + s``), then a
    tree over the warps' results (strides ``threads/64``, .., 1). On the GPU the warp trees are register shuffles
    and the whole reduction costs two block barriers instead of one per level. ``gpu=False``: the same trees as
    serial phases over ``red`` (the CPU twin: the same result, bit for bit). A third macro, ``finish_in(red, fin,
    tx)``, is ``finish`` inside the caller's own thread loop (GPU only: None for the twin)."""
    from tvm.script import tirx as Tx

    if threads % WARP or threads > WARP * WARP:
        raise ValueError(f"a block reduction takes a multiple of {WARP} threads up to {WARP * WARP}; got {threads}")
    nw = threads // WARP
    _, thr = bindings(gpu)
    FULL = Tx.uint32(0xFFFFFFFF)  # every lane takes part (the whole block, then all of warp 0)

    if gpu:
        in_warp, over_warps = warp_tree(WARP, combine, FULL), warp_tree(nw, combine, FULL)

        @Tx.macro
        def part(v, red, tx):
            in_warp(v)
            if tx % WARP == 0:
                red[tx // WARP] = v[0]

        @Tx.macro
        def finish_in(red, fin, tx):  # inside the caller's thread loop (a kernel with no CPU twin)
            Tx.tvm_storage_sync("shared")
            if tx < WARP:
                w = Tx.alloc_buffer((1,), red.dtype, scope="local")
                if tx < nw:
                    w[0] = red[tx]
                else:
                    w[0] = identity
                over_warps(w)
                if tx == 0:
                    fin[0] = w[0]
            Tx.tvm_storage_sync("shared")

        @Tx.macro
        def finish(red, fin):
            for tx in thr(threads):
                finish_in(red, fin, tx)

        return part, finish, finish_in

    inner, outer = _levels(WARP), _levels(nw)

    @Tx.macro
    def part_cpu(v, red, tx):
        red[tx] = v[0]

    @Tx.macro
    def finish_cpu(red, fin):
        for lv in Tx.unroll(len(inner)):
            for tx in thr(threads):
                if tx % WARP < Tx.shift_right(WARP // 2, lv):
                    red[tx] = combine(red[tx], red[tx + Tx.shift_right(WARP // 2, lv)])
        for lv in Tx.unroll(len(outer)):
            for tx in thr(nw):
                if tx < Tx.shift_right(nw // 2, lv):
                    red[tx * WARP] = combine(red[tx * WARP], red[(tx + Tx.shift_right(nw // 2, lv)) * WARP])
        fin[0] = red[0]

    return part_cpu, finish_cpu, None


ATTN_CHUNK = 32  # keys per CUDA block of the split attention (fewer when hd is smaller)
ATTN_STAGE_BYTES = 40960  # the most shared memory a block's staged keys and values take (48 KiB static in all)
ATTN_COMBINE_UNROLL = 8  # chunks a step of the combine's loops: their loads are independent, so in flight together


def attention_chunk(hd: int) -> int:
    """Keys per block: ``ATTN_CHUNK``, fewer where ``hd`` is smaller or the staged keys and values (two ``c × (hd +
    1)`` float32 tiles) would not fit ``ATTN_STAGE_BYTES``."""
    c = min(ATTN_CHUNK, hd)
    while c > 1 and 2 * c * (hd + 1) * 4 > ATTN_STAGE_BYTES:
        c //= 2
    return c


def attention_scratch(T: int, H: int, hd: int, ctx: int) -> list[tuple]:
    """Shapes of :func:`attention`'s scratch outputs: each (row, head, chunk)'s partial output ``[T·H·NC, hd]`` and
    its (max, sum of exponentials) ``[T·H·NC, 2]``, ``NC = ⌈ctx / chunk⌉``."""
    nc = -(-ctx // attention_chunk(hd))
    return [(T * H * nc, hd), (T * H * nc, 2)]


QUANT_COMBINE_COLUMNS = 1024  # the widest row (H·hd) whose quantized combine (one CUDA block per row) pays


def quantized_combine_pays(H: int, hd: int) -> bool:
    """Whether :func:`attention` with ``quant=True`` beats the plain combine + a quantize kernel: its combine is one
    CUDA block per row, so it pays while a thread combines one column (``H·hd ≤ 1024``; on an H200 it wins on the
    shipped model and loses on ``nano-1b``: ``docs/bench/cuda/README.md``)."""
    return H * hd <= QUANT_COMBINE_COLUMNS


def attention(T: int, H: int, Hkv: int, hd: int, ctx: int, block: int, gpu: bool = True, quant: bool = False,
              q_width: int | None = None, write_kv: bool = False):  # fmt: skip
    """Causal GQA softmax attention of ``q [T, H, hd]`` over the paged cache ``kc, vc [n_blocks, Hkv, block, hd]``
    → ``o [T, H·hd]``, as :func:`compiler.graph_kernels.attention` (same parameters): row ``t`` reads its sequence's
    keys ``0 .. pos[t]`` through ``table[t]``; a padding row (``pos < 0``) outputs zeros. Split over the keys (flash
    decoding), so its time follows the position over many CUDA blocks, not one block per head:

    1. a CUDA block per (row, query head, chunk of ``c`` keys; :func:`attention_chunk`), ``hd`` threads; the
       blocks of every (row, head)'s first chunk come first, then the second chunks, and so on. The block stages its
       chunk's keys and values in shared memory (rows padded to ``hd + 1`` floats, so that the keys a warp reads
       fall in distinct banks; every load coalesced and independent of the others), then computes each key's score
       (``hd / c`` threads per key, each over its share of ``hd`` in order, the shares then added in order), the
       chunk's max and ``Σ exp`` (one warp, trees of register shuffles; the CPU twin: the same trees in shared
       memory), and the chunk's unnormalised output (thread ``i``: column ``i`` over the chunk's keys in order) into
       the scratch outputs ``part``/``st``; a block whose chunk starts past the position does nothing;
    2. a block per (row, head), a thread per column: the chunks combined in order, rescaled to their common max
       (the loads of ``ATTN_COMBINE_UNROLL`` chunks in flight together);
       ``quant=True``: a block per row instead, which also quantizes the row for the o projection exactly as
       :func:`norm_quantize` (outputs ``o int8 [T, H·hd]``, ``o_scale [T]``, ``o_sum [T]``; see
       :func:`quantized_combine_pays`).

    The query comes unrotated, ``q [T, H·hd]``, with the RoPE tables ``cos, sin [ctx, hd/2]`` after ``table``: each
    block rotates its row's query into shared memory first, exactly as :func:`compiler.graph_kernels.rope_q` (a
    padding row is never read), one kernel fewer per layer than the CPU build's. ``q_width``: the query is the first
    ``H·hd`` columns of rows that wide (a stacked q|k|v output, :func:`compiler.lower.stacked`).

    ``write_kv`` (one row, ``T = 1``, and the stacked ``q | k | v`` row): the kernel also does
    :func:`compiler.graph_kernels.kv_update`'s work, one kernel fewer per layer. The blocks whose chunk holds the
    new position rotate its key (the same expressions) into shared memory and use it and its value from there instead
    of reading the cache slot; the first query head of each KV group writes both to the cache. No block reads the
    slot being written, so the one launch has no race (with several rows of one sequence it would: prefill and the
    verify rows keep the separate cache write).

    One PrimFunc, two kernels. A row's result depends only on that row (the batch-invariance of
    ``tests/test_cuda_batch.py``). ``gpu=False``: the same body with serial loops instead of thread bindings, each
    phase run after the other (runs on the CPU)."""
    from tvm.script import tirx as Tx

    from compiler.graph_kernels import table_width
    from model.ternary.quant import ACT_QMAX, SCALE_EPS

    g = H // Hkv
    QW = q_width or H * hd
    if QW < H * hd:
        raise ValueError(f"q_width {QW}: the query has {H * hd} columns")
    kat, vat = H * hd, (H + Hkv) * hd  # write_kv: the new key's and value's columns of the stacked row
    if write_kv and (T != 1 or QW != (H + 2 * Hkv) * hd):
        raise ValueError(f"write_kv takes one stacked q|k|v row of {(H + 2 * Hkv) * hd}; got T={T}, width {QW}")
    nw = int(write_kv)  # write_kv: the new key (the last valid one) is not read from the cache
    hp = hd + 1  # a staged key's or value's row: padded so that the keys of a warp's lanes fall in distinct banks
    scale = 1.0 / math.sqrt(hd)
    TH = T * H
    W = table_width(ctx, block)
    c = attention_chunk(hd)
    if c & (c - 1) or hd % c:
        raise ValueError(f"head_dim {hd}: the attention chunk {c} must be a power of two dividing it")
    NC = -(-ctx // c)
    r = hd // c  # threads per key in the scores
    U = ATTN_COMBINE_UNROLL
    lanes = Tx.uint32((1 << c) - 1)  # the warp's lanes that hold a key (c ≤ 32)
    chunk_max, chunk_sum = warp_tree(c, Tx.max, lanes), warp_tree(c, lambda x, y: x + y, lanes)
    (P, _), _ = attention_scratch(T, H, hd, ctx)
    blocks, threads = bindings(gpu)
    sync = (lambda: Tx.tvm_storage_sync("shared")) if gpu else (lambda: Tx.evaluate(0))
    scope = "shared" if gpu else "global"
    steps = _levels(c)  # the chunk's trees (max, Σ exp)
    neg = -3.4028234663852886e38

    half = hd // 2
    nt = _threads_for(H * hd)  # quant: the combine's threads per row
    per = H * hd // nt
    if quant:
        max_part, max_finish, _ = block_reduce(nt, Tx.max, Tx.float32(0), gpu)
        sum_part, sum_finish, _ = block_reduce(nt, lambda x, y: x + y, Tx.int32(0), gpu)

    @Tx.macro
    def combined(th, d, res, pos, st, part):  # (row, head) th's column d: its chunks combined, rescaled to their max
        acc = Tx.alloc_buffer((3,), "float32", scope="local")  # max, Σ weight·sum, Σ weight·part
        if pos[th // H] >= 0:
            n = (Tx.min(pos[th // H] + 1, ctx) + c - 1) // c  # the row's chunks
            acc[0] = st[th * NC, 0]
            for co in range((n + U - 1) // U):  # U chunks a step: their loads independent, each chunk in order
                for cu in Tx.unroll(U):
                    if 0 < co * U + cu and co * U + cu < n:  # (the first chunk is the max's start)
                        acc[0] = Tx.max(acc[0], st[th * NC + co * U + cu, 0])
            acc[1] = Tx.float32(0)
            acc[2] = Tx.float32(0)
            for co in range((n + U - 1) // U):
                for cu in Tx.unroll(U):
                    if co * U + cu < n:
                        ci = th * NC + co * U + cu
                        acc[1] = acc[1] + Tx.exp(st[ci, 0] - acc[0]) * st[ci, 1]
                        acc[2] = acc[2] + Tx.exp(st[ci, 0] - acc[0]) * part[ci, d]
            res[0] = acc[2] / acc[1]
        else:
            res[0] = Tx.float32(0)

    @Tx.macro
    def body(q, kc_h, vc_h, pos, table, cos, sin, o, o_scale, o_sum, part, st):
        nb = Tx.int64()
        kc = Tx.match_buffer(kc_h, (nb, Hkv, block, hd), "float32")
        vc = Tx.match_buffer(vc_h, (nb, Hkv, block, hd), "float32")
        for b in blocks(P):  # chunk b // TH of (row, head) b % TH: every (row, head)'s first chunks dispatched first
            qs = Tx.alloc_buffer((hd,), "float32", scope=scope)  # the row's query (rotated here with rope)
            dot = Tx.alloc_buffer((hd,), "float32", scope=scope)  # partial dot products, r per key
            ks = Tx.alloc_buffer((c * hp,), "float32", scope=scope)  # the chunk's keys, rows padded to hd + 1
            vs = Tx.alloc_buffer((c * hp,), "float32", scope=scope)  # the chunk's values, likewise
            p = Tx.alloc_buffer((c,), "float32", scope=scope)  # scores, then exp(score - max)
            mx = Tx.alloc_buffer((c,), "float32", scope=scope)
            sm = Tx.alloc_buffer((c,), "float32", scope=scope)
            if b // TH * c < Tx.min(pos[b % TH // H] + 1, ctx):
                for tx in threads(hd):  # the query rotated as rope_q (element tx), and the chunk's keys and values
                    t = b % TH // H
                    kvh = b % H // g
                    c0 = b // TH * c
                    pc = Tx.min(pos[t], ctx - 1)
                    h0 = b % H * hd
                    if tx < half:
                        qs[tx] = q[t, h0 + tx] * cos[pc, tx] - q[t, h0 + tx + half] * sin[pc, tx]
                    else:
                        qs[tx] = q[t, h0 + tx] * cos[pc, tx - half] + q[t, h0 + tx - half] * sin[pc, tx - half]
                    for j in Tx.unroll(c):  # column tx of each valid key: coalesced, every load independent
                        if c0 + j < Tx.min(pos[t] + 1, ctx) - nw:  # write_kv: not the new key (it comes below)
                            ks[j * hp + tx] = kc[Tx.Cast("int64", table[t, (c0 + j) // block]), kvh, (c0 + j) % block,
                                                 tx]  # fmt: skip
                            vs[j * hp + tx] = vc[Tx.Cast("int64", table[t, (c0 + j) // block]), kvh, (c0 + j) % block,
                                                 tx]  # fmt: skip
                    if write_kv:
                        if pos[0] < c0 + c:  # this chunk holds the new position: its key as kv_update's, its value
                            kv = Tx.alloc_buffer((2,), "float32", scope="local")
                            k0 = kat + kvh * hd
                            if tx < half:
                                kv[0] = q[0, k0 + tx] * cos[pc, tx] - q[0, k0 + tx + half] * sin[pc, tx]
                            else:
                                kv[0] = q[0, k0 + tx] * cos[pc, tx - half] + q[0, k0 + tx - half] * sin[pc, tx - half]
                            kv[1] = q[0, vat + kvh * hd + tx]
                            ks[(pos[0] - c0) * hp + tx] = kv[0]
                            vs[(pos[0] - c0) * hp + tx] = kv[1]
                            if b % H % g == 0:  # the group's first query head writes the cache
                                kc[Tx.Cast("int64", table[0, pos[0] // block]), kvh, pos[0] % block, tx] = kv[0]
                                vc[Tx.Cast("int64", table[0, pos[0] // block]), kvh, pos[0] % block, tx] = kv[1]
                sync()
                for tx in threads(hd):  # r threads per key: key tx % c, dims [tx // c · hd / r, ...) in order
                    acc = Tx.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = Tx.float32(0)
                    if b // TH * c + tx % c < Tx.min(pos[b % TH // H] + 1, ctx):
                        for i in Tx.unroll(hd // r):
                            acc[0] = acc[0] + qs[tx // c * (hd // r) + i] * ks[tx % c * hp + tx // c * (hd // r) + i]
                    dot[tx] = acc[0]
                sync()
                if gpu:  # one warp: the scores, their max and Σ exp as register shuffles (the trees below)
                    for tx in threads(hd):
                        if tx < c:
                            sc = Tx.alloc_buffer((1,), "float32", scope="local")  # the score, then its exp
                            top = Tx.alloc_buffer((1,), "float32", scope="local")
                            tot = Tx.alloc_buffer((1,), "float32", scope="local")
                            if b // TH * c + tx < Tx.min(pos[b % TH // H] + 1, ctx):
                                sc[0] = dot[tx]
                                for j in range(1, r):
                                    sc[0] = sc[0] + dot[j * c + tx]
                                sc[0] = sc[0] * Tx.float32(scale)
                            else:
                                sc[0] = Tx.float32(neg)
                            top[0] = sc[0]
                            chunk_max(top)
                            top[0] = Tx.tvm_warp_shuffle(lanes, top[0], 0, c, WARP)  # lane 0's, to every lane
                            if b // TH * c + tx < Tx.min(pos[b % TH // H] + 1, ctx):
                                sc[0] = Tx.exp(sc[0] - top[0])
                            else:
                                sc[0] = Tx.float32(0)
                            p[tx] = sc[0]
                            tot[0] = sc[0]
                            chunk_sum(tot)
                            if tx == 0:
                                mx[0] = top[0]
                                sm[0] = tot[0]
                    sync()
                else:
                    for tx in threads(hd):  # the key's score: its r partial sums in order
                        acc = Tx.alloc_buffer((1,), "float32", scope="local")
                        if tx < c:
                            if b // TH * c + tx < Tx.min(pos[b % TH // H] + 1, ctx):
                                acc[0] = dot[tx]
                                for j in range(1, r):
                                    acc[0] = acc[0] + dot[j * c + tx]
                                p[tx] = acc[0] * Tx.float32(scale)
                            else:
                                p[tx] = Tx.float32(neg)
                            mx[tx] = p[tx]
                    sync()
                    for s in Tx.unroll(len(steps)):  # the chunk's max: a tree
                        for tx in threads(hd):
                            if tx < Tx.shift_right(c, s + 1):
                                mx[tx] = Tx.max(mx[tx], mx[tx + Tx.shift_right(c, s + 1)])
                        sync()
                    for tx in threads(hd):  # exp(score - max); 0 past the position
                        if tx < c:
                            if b // TH * c + tx < Tx.min(pos[b % TH // H] + 1, ctx):
                                p[tx] = Tx.exp(p[tx] - mx[0])
                            else:
                                p[tx] = Tx.float32(0)
                            sm[tx] = p[tx]
                    sync()
                    for s in Tx.unroll(len(steps)):  # Σ exp: a tree
                        for tx in threads(hd):
                            if tx < Tx.shift_right(c, s + 1):
                                sm[tx] = sm[tx] + sm[tx + Tx.shift_right(c, s + 1)]
                        sync()
                for tx in threads(hd):  # column tx over the chunk's valid keys, in order
                    acc = Tx.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = Tx.float32(0)
                    for jj in Tx.unroll(c):
                        if b // TH * c + jj < Tx.min(pos[b % TH // H] + 1, ctx):
                            acc[0] = acc[0] + p[jj] * vs[jj * hp + tx]
                    part[b % TH * NC + b // TH, tx] = acc[0]
                    if tx == 0:
                        st[b % TH * NC + b // TH, 0] = mx[0]
                        st[b % TH * NC + b // TH, 1] = sm[0]
        if quant:
            for t in blocks(T):  # a row's heads combined, then quantized as its o projection's input
                hs = Tx.alloc_buffer((H * hd,), "float32", scope=scope)  # the row's attention output
                red = Tx.alloc_buffer((nt,), "float32", scope=scope)
                redi = Tx.alloc_buffer((nt,), "int32", scope=scope)
                top = Tx.alloc_buffer((1,), "float32", scope=scope)
                fini = Tx.alloc_buffer((1,), "int32", scope=scope)
                for tx in threads(nt):  # column i·nt + tx of the row: its head's chunks combined, as below
                    res = Tx.alloc_buffer((1,), "float32", scope="local")
                    big = Tx.alloc_buffer((1,), "float32", scope="local")
                    big[0] = Tx.float32(0)
                    for i in Tx.unroll(per):
                        combined(t * H + (i * nt + tx) // hd, (i * nt + tx) % hd, res, pos, st, part)
                        hs[i * nt + tx] = res[0]
                        big[0] = Tx.max(big[0], Tx.fabs(res[0]))
                    max_part(big, red, tx)
                max_finish(red, top)  # max |o|
                for tx in threads(nt):  # int8 codes as graph_kernels_gpu.norm_quantize's, and their row sum
                    sc = Tx.alloc_buffer((1,), "float32", scope="local")
                    qv = Tx.alloc_buffer((1,), "float32", scope="local")
                    isum = Tx.alloc_buffer((1,), "int32", scope="local")
                    sc[0] = Tx.float32(ACT_QMAX) / Tx.max(top[0], Tx.float32(SCALE_EPS))
                    isum[0] = 0
                    for i in Tx.unroll(per):
                        qv[0] = Tx.min(Tx.max(Tx.nearbyint(hs[i * nt + tx] * sc[0]), Tx.float32(-ACT_QMAX)),
                                       Tx.float32(ACT_QMAX))  # fmt: skip
                        o[t, i * nt + tx] = Tx.Cast("int8", qv[0])
                        isum[0] = isum[0] + Tx.Cast("int32", qv[0])
                    sum_part(isum, redi, tx)
                    if tx == 0:
                        o_scale[t] = sc[0]
                sum_finish(redi, fini)  # Σq
                for tx in threads(nt):
                    if tx == 0:
                        o_sum[t] = fini[0]
        else:
            for th in blocks(TH):  # combine the row's chunks, in order
                for tx in threads(hd):
                    res = Tx.alloc_buffer((1,), "float32", scope="local")
                    combined(th, tx, res, pos, st, part)
                    o[th // H, th % H * hd + tx] = res[0]

    if not quant:

        @Tx.prim_func
        def attn(
            q: Tx.Buffer((T, QW), "float32"),
            kc_h: Tx.handle,
            vc_h: Tx.handle,
            pos: Tx.Buffer((T,), "int32"),
            table: Tx.Buffer((T, W), "int32"),
            cos: Tx.Buffer((ctx, half), "float32"),
            sin: Tx.Buffer((ctx, half), "float32"),
            o: Tx.Buffer((T, H * hd), "float32"),
            part: Tx.Buffer((P, hd), "float32"),
            st: Tx.Buffer((P, 2), "float32"),
        ):
            body(q, kc_h, vc_h, pos, table, cos, sin, o, o, o, part, st)  # no quantize: its branch is not generated

        return attn.without_attr("global_symbol")

    @Tx.prim_func
    def attn_quant(
        q: Tx.Buffer((T, QW), "float32"),
        kc_h: Tx.handle,
        vc_h: Tx.handle,
        pos: Tx.Buffer((T,), "int32"),
        table: Tx.Buffer((T, W), "int32"),
        cos: Tx.Buffer((ctx, half), "float32"),
        sin: Tx.Buffer((ctx, half), "float32"),
        o: Tx.Buffer((T, H * hd), "int8"),
        o_scale: Tx.Buffer((T,), "float32"),
        o_sum: Tx.Buffer((T,), "int32"),
        part: Tx.Buffer((P, hd), "float32"),
        st: Tx.Buffer((P, 2), "float32"),
    ):
        body(q, kc_h, vc_h, pos, table, cos, sin, o, o_scale, o_sum, part, st)

    return attn_quant.without_attr("global_symbol")


def head_lanes(D: int, dtype: str) -> int:
    """The lanes :func:`lm_head` gives a head row: the most, up to a warp, that split the row's 16-byte loads
    evenly (a power of two)."""
    chunks = D // (16 // {"float16": 2, "int8": 1}.get(dtype, 4))
    return min(WARP, chunks & -chunks)


def lm_head(B: int, V: int, D: int, dtype: str = "float32", gpu: bool = True, threads: int = 128):
    """``logits[b, v] = Σ_d h[b, d] · E[v, d]`` for ``B`` rows over the head as the GGUF stores it, ``E [V, D]``
    (float16 kept as stored), as :func:`compiler.graph_kernels.lm_head`. ``L`` lanes of a warp
    (:func:`head_lanes`: 32 on every real model) share ``R`` head rows (``R = 2`` from 16 rows on, when ``V`` is
    even; else 1): lane ``l`` reads 16 bytes of each row at a time, chunks ``l, l + L, l + 2L, ..``, so the ``L``
    lanes together read ``16 L`` contiguous bytes, and keeps the ``B · R`` sums of its chunks in registers (``h`` read
    4 floats per load, each value serving ``R`` rows). The ``L`` partial sums of a logit are then added by a tree of
    register shuffles (lane ``l`` takes ``l + s``, ``s = L/2 .. 1``). The order of every logit's sum is fixed by
    ``D`` and ``dtype`` alone, so it does not depend on the batch. ``gpu=False``: serial loops (runs on the CPU), the
    same tree over a scratch buffer."""
    from tvm.script import tirx as Tx

    step = 16 // {"float16": 2, "int8": 1}.get(dtype, 4)  # elements of a 16-byte load
    if D % step:
        raise ValueError(f"d_model {D} must be a multiple of the head's step {step}")
    L = head_lanes(D, dtype)
    n = D // step // L  # chunks per lane
    R = 2 if B >= 16 and V % 2 == 0 else 1
    G = threads // L  # row groups per CUDA block
    nblk = -(-(V // R) // G)
    blocks, thr = bindings(gpu)
    levels = _levels(L)
    FULL = Tx.uint32(0xFFFFFFFF)  # every lane of the warp takes part: a row past V reads row V - R, writes nothing

    def row(bx, tx, r):
        return Tx.min(bx * G + tx // L, V // R - 1) * R + r

    @Tx.macro
    def sums(h, E, acc, e, hv, bx, tx):  # lane tx % L's share of its rows' sums, over its chunks in order
        for i in Tx.unroll(B * R):
            acc[i] = Tx.float32(0)
        for j in range(n):  # chunk j · L + lane, written out: a name bound here hides its alignment from the loads
            for r in Tx.unroll(R):
                for k in Tx.vectorized(step):
                    e[r * step + k] = E[row(bx, tx, r), (j * L + tx % L) * step + k]
            for k4 in Tx.unroll(step // 4):
                for b in Tx.unroll(B):
                    for kk in Tx.vectorized(4):
                        hv[kk] = h[b, (j * L + tx % L) * step + k4 * 4 + kk]
                    for kk in Tx.unroll(4):
                        for r in Tx.unroll(R):
                            acc[b * R + r] = acc[b * R + r] + hv[kk] * Tx.Cast("float32", e[r * step + k4 * 4 + kk])

    if gpu:

        @Tx.prim_func
        def head(h: Tx.Buffer((B, D), "float32"), E: Tx.Buffer((V, D), dtype), logits: Tx.Buffer((B, V), "float32")):
            for bx in blocks(nblk):
                for tx in thr(threads):
                    acc = Tx.alloc_buffer((B * R,), "float32", scope="local")
                    e = Tx.alloc_buffer((R * step,), dtype, scope="local")
                    hv = Tx.alloc_buffer((4,), "float32", scope="local")
                    sums(h, E, acc, e, hv, bx, tx)
                    for i in Tx.unroll(B * R):
                        for lv in Tx.unroll(len(levels)):
                            acc[i] = acc[i] + Tx.tvm_warp_shuffle_down(
                                FULL, acc[i], Tx.shift_right(L // 2, lv), L, WARP
                            )
                    if tx % L == 0 and bx * G + tx // L < V // R:
                        for b in Tx.unroll(B):
                            for r in Tx.unroll(R):
                                logits[b, row(bx, tx, r)] = acc[b * R + r]

        return head.without_attr("global_symbol")

    @Tx.prim_func
    def head_cpu(h: Tx.Buffer((B, D), "float32"), E: Tx.Buffer((V, D), dtype), logits: Tx.Buffer((B, V), "float32")):
        part = Tx.alloc_buffer((threads, B * R), "float32")
        for bx in blocks(nblk):
            for tx in thr(threads):
                acc = Tx.alloc_buffer((B * R,), "float32", scope="local")
                e = Tx.alloc_buffer((R * step,), dtype, scope="local")
                hv = Tx.alloc_buffer((4,), "float32", scope="local")
                sums(h, E, acc, e, hv, bx, tx)
                for i in range(B * R):
                    part[tx, i] = acc[i]
            for lv in Tx.unroll(len(levels)):  # the shuffles' tree, level by level
                for tx in thr(threads):
                    if tx % L < Tx.shift_right(L // 2, lv):
                        for i in range(B * R):
                            part[tx, i] = part[tx, i] + part[tx + Tx.shift_right(L // 2, lv), i]
            for tx in thr(threads):
                if tx % L == 0 and bx * G + tx // L < V // R:
                    for b in range(B):
                        for r in range(R):
                            logits[b, row(bx, tx, r)] = part[tx, b * R + r]

    return head_cpu.without_attr("global_symbol")


def argmax(B: int, V: int, threads: int = 1024, sampled: bool = False):
    """Each row's first maximum and its value, ``(at int32[B], best float32[B])``, as
    :func:`compiler.graph_kernels.argmax`: a CUDA block per row, each thread scanning its strided share in order, then
    trees of register shuffles that keep the larger value (the smaller index on a tie), within each warp and then over
    the warps' bests in warp 0 (one block barrier). ``sampled``: the inputs ``bias
    [V]``, ``sampling [2]`` and ``pos [B]``, and the maximum of ``x + bias`` or, with an inverse temperature
    ``sampling[0] > 0``, of ``x·s + bias + gumbel`` as the CPU kernel's (the same hash,
    :func:`compiler.graph_kernels.gumbel`)."""
    from tvm import tirx
    from tvm.script import tirx as Tx

    from compiler.graph_kernels import gumbel

    if threads % WARP or threads > WARP * WARP:
        raise ValueError(f"argmax takes a multiple of {WARP} threads up to {WARP * WARP}; got {threads}")
    nw, steps, per = threads // WARP, _levels(WARP), -(-V // threads)
    FULL = Tx.uint32(0xFFFFFFFF)  # every lane takes part (the whole block, then all of warp 0)

    def load(x, bias, b, v, samp=None, pos=None):  # evaluated as the kernel is parsed: the value entry v competes with
        if not sampled:
            return x.vload([b, v])
        plain = x.vload([b, v]) + bias.vload([v])
        s = samp.vload([0])
        noise = gumbel(tirx.Cast("int32", samp.vload([1])), pos.vload([b]), v)
        return tirx.if_then_else(s > Tx.float32(0), x.vload([b, v]) * s + bias.vload([v]) + noise, plain)

    @Tx.macro
    def warp_best(best, at, mine, mine_at):  # the warp's best (value, id): lane l takes lane l + s's if larger or tied
        for lv in Tx.unroll(len(steps)):  # with a smaller id, s = 16 .. 1; lane 0 ends with it
            mine[0] = Tx.tvm_warp_shuffle_down(FULL, best[0], Tx.shift_right(WARP // 2, lv), WARP, WARP)
            mine_at[0] = Tx.tvm_warp_shuffle_down(FULL, at[0], Tx.shift_right(WARP // 2, lv), WARP, WARP)
            if mine[0] > best[0] or (mine[0] == best[0] and mine_at[0] < at[0]):
                best[0] = mine[0]
                at[0] = mine_at[0]

    @Tx.macro
    def body(x, bias, out, top, samp, pos):
        for b in Tx.thread_binding(B, thread="blockIdx.x"):
            for tx in Tx.thread_binding(threads, thread="threadIdx.x"):
                val = Tx.alloc_buffer((nw,), "float32", scope="shared")  # each warp's best
                idx = Tx.alloc_buffer((nw,), "int32", scope="shared")
                best = Tx.alloc_buffer((1,), "float32", scope="local")
                at = Tx.alloc_buffer((1,), "int32", scope="local")
                mine = Tx.alloc_buffer((1,), "float32", scope="local")
                mine_at = Tx.alloc_buffer((1,), "int32", scope="local")
                cand = Tx.alloc_buffer((1,), "float32", scope="local")  # the entry's value, computed once
                best[0] = Tx.min_value("float32")
                at[0] = V
                for i in range(per):
                    if i * threads + tx < V:
                        cand[0] = load(x, bias, b, i * threads + tx, samp, pos)
                        if cand[0] > best[0] or at[0] == V:
                            best[0] = cand[0]
                            at[0] = i * threads + tx
                warp_best(best, at, mine, mine_at)
                if tx % WARP == 0:
                    val[tx // WARP] = best[0]
                    idx[tx // WARP] = at[0]
                Tx.tvm_storage_sync("shared")
                if tx < WARP:  # warp 0: the warps' bests the same way
                    if tx < nw:
                        best[0] = val[tx]
                        at[0] = idx[tx]
                    else:
                        best[0] = Tx.min_value("float32")
                        at[0] = V
                    warp_best(best, at, mine, mine_at)
                    if tx == 0:
                        out[b] = Tx.min(at[0], V - 1)
                        top[b] = best[0]

    if sampled:

        @Tx.prim_func(check_well_formed=False)
        def pick(x: Tx.Buffer((B, V), "float32"), bias: Tx.Buffer((V,), "float32"),
                 samp: Tx.Buffer((2,), "float32"), pos: Tx.Buffer((B,), "int32"),
                 out: Tx.Buffer((B,), "int32"), top: Tx.Buffer((B,), "float32")):  # fmt: skip
            with Tx.sblock("root"):
                body(x, bias, out, top, samp, pos)

    else:

        @Tx.prim_func(check_well_formed=False)  # a root block around loop-style code, as norm_quantize's quantize
        def pick(x: Tx.Buffer((B, V), "float32"), out: Tx.Buffer((B,), "int32"), top: Tx.Buffer((B,), "float32")):
            with Tx.sblock("root"):  # Relax's reshape analysis asserts a block on single-input kernels
                body(x, x, out, top, None, None)

    return pick.without_attr("global_symbol")


def swiglu_quantize(T: int, F: int, threads: int | None = None, halves: bool = False):
    """``silu(g) · u`` (:func:`compiler.graph_kernels.silu_mul`, the same float expression) and its int8 per-token
    quantize in ONE kernel: parameters ``g, u, q, scale, q_sum``, outputs as :func:`norm_quantize`'s. The FFN's
    SwiGLU and the down projection's input quantize, one kernel fewer per layer, bit-identical to the two.
    ``halves``: one input ``[T, 2F]`` holding ``g | u`` (a mixture of experts' gate|up, :func:`experts_dp4a`)."""
    return norm_quantize(T, F, threads=threads or _threads_for(F), glu=True, halves=halves)


def experts_dp4a(S: int, M: int, K: int, E: int, P: int, X: int, gpu: bool = True, threads: int = 128):
    """A mixture of experts' ternary matmul on the ``dp4a`` layout, every slot in one kernel: slot ``s`` (a (token,
    chosen expert) pair) multiplies expert ``ids[s]``'s matrix ``W [E, M, K/16]`` (``P`` matrices of ``M / P`` rows
    stacked, e.g. gate|up, a scale each: ``w_scale [E, P]``) by activation row ``s // (S / X)`` of ``x4 [X, K/4]``
    (int8 as int32 words) → ``y [S, M]``, each element as :class:`compiler.ops.ternary_gpu.TernaryGemvDp4a`
    computes it for that expert's matrix alone: ``float32(Σ dp4a − Σx) · (w_scale / x_scale)``, the integer sum
    exact, so bit-exact. The expert index is read on the device (no host round trip: the step stays one CUDA graph),
    and a slot reads only its expert's rows.

    Layout: ``L`` threads per row (the most, up to 32, that divide a row's ``K/16`` words), each loading ``v`` words
    at a time (16 bytes when they divide evenly), ``threads / L`` rows per CUDA block, the ``L`` partial sums added
    by a shared-memory tree. ``gpu=False``: serial loops and ``__dp4a`` spelt out (the same kernel on the CPU)."""
    from tvm.script import tirx as Tx

    from compiler.ops.ternary_gpu import PLANES, dot4

    words = K // 16
    L = next(n for n in (32, 16, 8, 4, 2, 1) if words % n == 0)
    v = next(n for n in (4, 2, 1) if words % (L * n) == 0)
    steps = words // (L * v)
    while threads // L > 1 and M % (threads // L):
        threads //= 2
    RB = threads // L
    if M % RB or M % P or S % X:
        raise ValueError(f"experts_dp4a: M = {M} rows in groups of {RB} and {P} parts, S = {S} slots over X = {X} rows")
    groups, part, per = M // RB, M // P, S // X
    levels = L.bit_length() - 1
    blocks, thr = bindings(gpu)
    sync = (lambda: Tx.tvm_storage_sync("shared")) if gpu else (lambda: Tx.evaluate(0))
    scope = "shared" if gpu else "global"
    emulate = not gpu

    @Tx.prim_func
    def experts(
        W: Tx.Buffer((E, M, words), "int32"),
        x4: Tx.Buffer((X, K // 4), "int32"),
        x_sum: Tx.Buffer((X,), "int32"),
        x_scale: Tx.Buffer((X,), "float32"),
        w_scale: Tx.Buffer((E, P), "float32"),
        ids: Tx.Buffer((S,), "int32"),
        y: Tx.Buffer((S, M), "float32"),
    ):
        for b in blocks(S * groups):  # slot b // groups, rows (b % groups)·RB ..
            red = Tx.alloc_buffer((threads,), "int32", scope=scope)
            for tx in thr(threads):  # row tx // L of the group, lane tx % L
                acc = Tx.alloc_buffer((1,), "int32", scope="local")
                wv = Tx.alloc_buffer((v,), "int32", scope="local")
                acc[0] = 0
                for st in range(steps):
                    for k in Tx.vectorized(v):
                        wv[k] = W[Tx.Cast("int64", ids[b // groups]), b % groups * RB + tx // L,
                                  (st * L + tx % L) * v + k]  # fmt: skip
                    for k in Tx.unroll(v):
                        for pl in Tx.unroll(4):
                            acc[0] = acc[0] + dot4(
                                Tx.bitwise_and(Tx.shift_right(wv[k], pl * 2), PLANES),
                                x4[b // groups // per, ((st * L + tx % L) * v + k) * 4 + pl],
                                emulate,
                            )
                red[tx] = acc[0]
            sync()
            for lv in Tx.unroll(levels):  # the L partial sums of each row: a tree
                for tx in thr(threads):
                    if tx % L < Tx.shift_right(L, lv + 1):
                        red[tx] = red[tx] + red[tx + Tx.shift_right(L, lv + 1)]
                sync()
            for tx in thr(threads):
                if tx % L == 0:
                    y[b // groups, b % groups * RB + tx // L] = Tx.Cast(
                        "float32", red[tx] - x_sum[b // groups // per]
                    ) * (
                        w_scale[Tx.Cast("int64", ids[b // groups]), (b % groups * RB + tx // L) // part]
                        / x_scale[b // groups // per]
                    )

    return experts.without_attr("global_symbol")


def _threads_for(n: int, most: int = 1024) -> int:
    """The largest power of two up to ``most`` that divides ``n``: one CUDA block per token works through a row with
    as many threads as divide it evenly."""
    t = most
    while n % t:
        t //= 2
    return t


def norm_quantize(T: int, D: int, eps: float | None = None, threads: int = 256, glu: bool = False,
                  halves: bool = False):  # fmt: skip
    """RMSNorm (``eps`` given; else none) + int8 per-token quantize in ONE kernel: a CUDA block per token, ``threads``
    threads striding over ``D``, the three reductions (Σx², max|h|, Σq) by :func:`block_reduce`. Same outputs and
    maths as :class:`compiler.ops.rmsnorm_quant.RmsNormQuant` (``eps`` given: parameters ``x, weight, q, scale,
    q_sum``) or :func:`compiler.graph_kernels.quantize` (``x, q, scale, q_sum``); only the order of the float sums
    differs (a tree instead of lanes), which that op's tolerances cover. Replaces the 7 (4) kernels a per-block
    schedule makes of them: the decode step is launch-bound."""
    from tvm.script import tirx as Tx

    from model.ternary.quant import ACT_QMAX, SCALE_EPS

    if D % threads:
        raise ValueError(f"D = {D} must be a multiple of {threads}")
    per = D // threads
    add_part, _, add_finish = block_reduce(threads, lambda a, b: a + b, Tx.float32(0))
    max_part, _, max_finish = block_reduce(threads, Tx.max, Tx.float32(0))
    sum_part, _, sum_finish = block_reduce(threads, lambda a, b: a + b, Tx.int32(0))
    norm = eps is not None
    woff = D if halves else 0  # glu on [T, 2D] = g | u: u starts at column D
    epsv = float(eps or 0.0)

    @Tx.macro
    def body(X, W, Q, S, QS):
        for t in Tx.thread_binding(T, thread="blockIdx.x"):
            for tx in Tx.thread_binding(threads, thread="threadIdx.x"):
                red = Tx.alloc_buffer((threads,), "float32", scope="shared")
                redi = Tx.alloc_buffer((threads,), "int32", scope="shared")
                fin = Tx.alloc_buffer((1,), "float32", scope="shared")  # Σx²
                top = Tx.alloc_buffer((1,), "float32", scope="shared")  # max |h|
                fini = Tx.alloc_buffer((1,), "int32", scope="shared")  # Σq
                h = Tx.alloc_buffer((per,), "float32", scope="local")
                acc = Tx.alloc_buffer((2,), "float32", scope="local")
                isum = Tx.alloc_buffer((1,), "int32", scope="local")
                acc[1] = Tx.float32(1)
                if norm:
                    acc[0] = Tx.float32(0)
                    for i in range(per):
                        acc[0] = acc[0] + X[t, i * threads + tx] * X[t, i * threads + tx]
                    add_part(acc, red, tx)
                    add_finish(red, fin, tx)
                    acc[1] = Tx.float32(1) / Tx.sqrt(fin[0] / Tx.float32(D) + Tx.float32(epsv))
                acc[0] = Tx.float32(0)
                for i in range(per):
                    if norm:
                        h[i] = X[t, i * threads + tx] * acc[1] * W[i * threads + tx]
                    elif glu:
                        h[i] = X[t, i * threads + tx] / (Tx.float32(1) + Tx.exp(-X[t, i * threads + tx])) * W[
                            t, woff + i * threads + tx]  # fmt: skip
                    else:
                        h[i] = X[t, i * threads + tx]
                    acc[0] = Tx.max(acc[0], Tx.fabs(h[i]))
                max_part(acc, red, tx)
                max_finish(red, top, tx)
                acc[1] = Tx.float32(ACT_QMAX) / Tx.max(top[0], Tx.float32(SCALE_EPS))
                if tx == 0:
                    S[t] = acc[1]
                isum[0] = 0
                for i in range(per):
                    acc[0] = Tx.min(Tx.max(Tx.nearbyint(h[i] * acc[1]), Tx.float32(-ACT_QMAX)), Tx.float32(ACT_QMAX))
                    Q[t, i * threads + tx] = Tx.Cast("int8", acc[0])
                    isum[0] = isum[0] + Tx.Cast("int32", acc[0])
                sum_part(isum, redi, tx)
                sum_finish(redi, fini, tx)
                if tx == 0:
                    QS[t] = fini[0]

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

    if glu and halves:

        @Tx.prim_func(check_well_formed=False)  # a root block around loop-style code (one input: see quant)
        def glu_halves_quant(
            gu: Tx.Buffer((T, 2 * D), "float32"),
            q: Tx.Buffer((T, D), "int8"),
            scale: Tx.Buffer((T,), "float32"),
            q_sum: Tx.Buffer((T,), "int32"),
        ):
            with Tx.sblock("root"):
                body(gu, gu, q, scale, q_sum)

        return glu_halves_quant.without_attr("global_symbol")

    if glu:

        @Tx.prim_func
        def glu_quant(
            g: Tx.Buffer((T, D), "float32"),
            u: Tx.Buffer((T, D), "float32"),
            q: Tx.Buffer((T, D), "int8"),
            scale: Tx.Buffer((T,), "float32"),
            q_sum: Tx.Buffer((T,), "int32"),
        ):
            body(g, u, q, scale, q_sum)

        return glu_quant.without_attr("global_symbol")

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
    as the op's TE), ``Σu²`` reduced by :func:`block_reduce`. Parameters as the op's, except that the first site's
    embedding comes as ``x [1, D]``. Replaces the 3 kernels a per-block schedule makes of it."""
    from tvm.script import tirx as Tx

    if D % threads:
        raise ValueError(f"D = {D} must be a multiple of {threads}")
    per = D // threads
    add_part, _, add_finish = block_reduce(threads, lambda a, b: a + b, Tx.float32(0))
    rows, inv_s = (1 if first else S), 1.0 / S

    @Tx.macro
    def body(X, Y, H, HP, HPRE, XO, U, SS):
        for _b in Tx.thread_binding(1, thread="blockIdx.x"):
            for tx in Tx.thread_binding(threads, thread="threadIdx.x"):
                red = Tx.alloc_buffer((threads,), "float32", scope="shared")
                fin = Tx.alloc_buffer((1,), "float32", scope="shared")
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
                tot = Tx.alloc_buffer((1,), "float32", scope="local")
                tot[0] = acc[S + 1]
                add_part(tot, red, tx)
                add_finish(red, fin, tx)
                if tx == 0:
                    SS[0] = fin[0]

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


def mhc_post_norm(D: int, S: int, first: bool, eps: float, threads: int = 256, gpu: bool = True, T: int = 1):
    """A decode-time mHC site that is not the last (:func:`mhc_post`) fused with the next block's RMSNorm + int8
    quantize (:func:`norm_quantize`) in ONE kernel, for ``T`` rows (a CUDA block each: a decode batch, or a verify
    step's rows): parameters ``x [T, 1 or S, D], y [T, D], h_res, h_post, h_pre, w`` (``w`` the next norm's weight),
    outputs ``x_out [T, S, D]``, ``u [T, D]`` and the next block's ``q int8 [T, D]``, ``scale [T]``, ``q_sum [T]``.
    Each row's arithmetic is the one-row kernel's, so a row's results do not depend on ``T`` or on the other rows.
    The site already sums ``Σu²`` with the norm kernel's thread count and order, and ``u`` stays in shared memory,
    so the result is bit-identical to the two kernels; two kernels fewer per layer.

    Phases, each its own thread loop, with a :func:`block_reduce` between them: the site (``u`` into shared memory,
    each thread's ``Σu²``); the norm (``h = u · r · w``, into a second shared buffer) and each thread's ``max |h|``;
    the codes and each thread's ``Σq``. ``gpu=False``: the same phases as serial loops (runs on the CPU)."""
    from tvm.script import tirx as Tx

    from model.ternary.quant import ACT_QMAX, SCALE_EPS

    if D % threads:
        raise ValueError(f"D = {D} must be a multiple of {threads}")
    per = D // threads
    rows = 1 if first else S
    blocks, thr = bindings(gpu)
    add_part, add_finish, _ = block_reduce(threads, lambda a, b: a + b, Tx.float32(0), gpu)
    max_part, max_finish, _ = block_reduce(threads, Tx.max, Tx.float32(0), gpu)
    sum_part, sum_finish, _ = block_reduce(threads, lambda a, b: a + b, Tx.int32(0), gpu)
    scope = "shared" if gpu else "global"

    @Tx.prim_func
    def site_norm(
        x: Tx.Buffer((T, rows, D), "float32"),
        y: Tx.Buffer((T, D), "float32"),
        h_res: Tx.Buffer((S, S), "float32"),
        h_post: Tx.Buffer((S,), "float32"),
        h_pre: Tx.Buffer((S,), "float32"),
        w: Tx.Buffer((D,), "float32"),
        x_out: Tx.Buffer((T, S, D), "float32"),
        u: Tx.Buffer((T, D), "float32"),
        q: Tx.Buffer((T, D), "int8"),
        scale: Tx.Buffer((T,), "float32"),
        q_sum: Tx.Buffer((T,), "int32"),
    ):
        for b in blocks(T):
            us = Tx.alloc_buffer((D,), "float32", scope=scope)  # u
            hs = Tx.alloc_buffer((D,), "float32", scope=scope)  # the normed h
            red = Tx.alloc_buffer((threads,), "float32", scope=scope)  # Σu², then max |h|
            redi = Tx.alloc_buffer((threads,), "int32", scope=scope)  # Σq
            fin = Tx.alloc_buffer((1,), "float32", scope=scope)  # Σu²
            top = Tx.alloc_buffer((1,), "float32", scope=scope)  # max |h|
            fini = Tx.alloc_buffer((1,), "int32", scope=scope)  # Σq
            for tx in thr(threads):  # the site, as mhc_post: column i·threads + tx
                acc = Tx.alloc_buffer((S + 2,), "float32", scope="local")
                tot = Tx.alloc_buffer((1,), "float32", scope="local")
                acc[S + 1] = Tx.float32(0)
                for i in Tx.unroll(per):
                    acc[S] = Tx.float32(0)
                    for s in Tx.unroll(S):
                        acc[s] = h_res[s, 0] * x[b, 0, i * threads + tx]
                        for j in Tx.unroll(1, S):
                            acc[s] = acc[s] + h_res[s, j] * x[b, j * (rows - 1) // max(S - 1, 1), i * threads + tx]
                        acc[s] = acc[s] + h_post[s] * y[b, i * threads + tx]
                        x_out[b, s, i * threads + tx] = acc[s]
                        acc[S] = acc[S] + h_pre[s] * acc[s]
                    u[b, i * threads + tx] = acc[S]
                    us[i * threads + tx] = acc[S]
                    acc[S + 1] = acc[S + 1] + acc[S] * acc[S]
                tot[0] = acc[S + 1]
                add_part(tot, red, tx)
            add_finish(red, fin)  # Σu²
            for tx in thr(threads):  # the norm, as norm_quantize's, and each thread's max |h|
                r = Tx.alloc_buffer((2,), "float32", scope="local")  # 1/rms, then each h
                m = Tx.alloc_buffer((1,), "float32", scope="local")
                r[0] = Tx.float32(1) / Tx.sqrt(fin[0] / Tx.float32(D) + Tx.float32(eps))
                m[0] = Tx.float32(0)
                for i in Tx.unroll(per):  # h from a register: a shared read after the write would need a barrier
                    r[1] = us[i * threads + tx] * r[0] * w[i * threads + tx]
                    hs[i * threads + tx] = r[1]
                    m[0] = Tx.max(m[0], Tx.fabs(r[1]))
                max_part(m, red, tx)
            max_finish(red, top)  # max |h|
            for tx in thr(threads):  # the int8 codes and each thread's Σq
                c = Tx.alloc_buffer((2,), "float32", scope="local")
                isum = Tx.alloc_buffer((1,), "int32", scope="local")
                c[0] = Tx.float32(ACT_QMAX) / Tx.max(top[0], Tx.float32(SCALE_EPS))
                if tx == 0:
                    scale[b] = c[0]
                isum[0] = 0
                for i in Tx.unroll(per):
                    c[1] = Tx.min(Tx.max(Tx.nearbyint(hs[i * threads + tx] * c[0]), Tx.float32(-ACT_QMAX)),
                                  Tx.float32(ACT_QMAX))  # fmt: skip
                    q[b, i * threads + tx] = Tx.Cast("int8", c[1])
                    isum[0] = isum[0] + Tx.Cast("int32", c[1])
                sum_part(isum, redi, tx)
            sum_finish(redi, fini)  # Σq
            for tx in thr(threads):
                if tx == 0:
                    q_sum[b] = fini[0]

    return site_norm.without_attr("global_symbol")
