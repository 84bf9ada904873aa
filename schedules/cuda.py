"""CUDA schedules (sm_90: H100/H200) for the ternary GEMV/GEMM on the ``dp4a`` layout.

GEMV (``gemv_dp4a``, one token; memory-bound: the packed weights are read once). A row's ``K/16`` weight words are
split ``w = (wo, tx, v)``: thread ``tx`` of a row group loads ``v`` consecutive words per step — ``v = 4`` is one
16-byte load, and the ``tx`` threads of a row read one contiguous, coalesced segment — and keeps its partial sums in
registers for ``rows`` rows at once, so each activation word it loads (``x4``, from L1/L2; ``v·4`` words a step) is
reused ``rows`` times. Each 16-code word is decoded in int32 registers (``(W >> 2s) & 0x03030303``, s = 0..3) and
fed to ``__dp4a`` with the activation word: no byte unpacking. The ``tx`` partial sums of a row are combined by a
warp-shuffle reduction (rfactor + ``threadIdx.x``), then the ``Σx`` correction and float rescale. ``ty`` row groups
share a block. With few rows (M small) and long rows, ``split`` > 1 splits K across ``threadIdx.y`` as well
(more parallelism for tall-thin shapes) — a second reduction level through shared memory.

GEMM (``gemm_dp4a``, prefill): the same, with the decoded weight planes reused across ``tokens`` tokens.

Knobs (``schedules.knobs``): ``tx`` threads per row, ``v`` words per load, ``rows`` rows per thread, ``ty`` row
groups per block, ``unroll`` of the step loop (and ``tokens`` for the GEMM).

    python -m compiler.schedule --target cuda --op gemv_dp4a:M=4096:K=4096 --trace   # this schedule of one GEMV
"""

from __future__ import annotations

from schedules.knobs import Knob, choose, knob


def _k_defaults(words: int) -> tuple[int, int]:
    """(tx, v): the widest thread row and load that split ``words`` evenly (K is a multiple of 256: words of 16)."""
    for tx in (32, 16, 8):
        for v in (4, 2):
            if words % (tx * v) == 0:
                return tx, v
    raise ValueError(f"{words} weight words per row cannot be split")


def space(op) -> list[Knob]:
    kind = op.kind
    words = op.K // 16
    tx, v = _k_defaults(words)
    if kind in ("gemv_dp4a", "gemv_f32_dp4a"):
        un = max(u for u in (1, 2, 4) if words % (tx * v * u) == 0)
        return [knob("v", words, (2, 4), v), knob("tx", words, (8, 16, 32, 64), tx),
                knob("rows", op.M, (1, 2, 4, 8), 2), knob("ty", op.M, (1, 2, 4, 8), 4),
                knob("unroll", words, (1, 2, 4, 8), un)]  # fmt: skip
    if kind == "gemm_dp4a":
        return [knob("v", words, (2, 4), v), knob("tx", words, (8, 16, 32), tx),
                knob("rows", op.M, (1, 2, 4), 2), knob("ty", op.M, (1, 2, 4), 2),
                knob("tokens", op.N, (1, 2, 4, 8), 4)]  # fmt: skip
    raise KeyError(f"no CUDA schedule for op kind {kind!r}")


def valid(op, knobs: dict) -> bool:
    """Whether a grid point splits every dimension evenly (the grid search skips the rest unbuilt)."""
    try:
        _fits({k.name: k for k in space(op)}, knobs, _splits(op))
        return True
    except ValueError:
        return False


def _splits(op):
    words = op.K // 16
    kk = ("v", "tx") if op.kind == "gemm_dp4a" else ("v", "tx", "unroll")
    return [(kk, words), (("rows", "ty"), op.M)]


def _fits(ks, knobs, names_n) -> None:
    """Reject knob combinations that over-split a dimension (the split factors must divide it)."""
    for names, n in names_n:
        prod = 1
        for k in names:
            prod *= int(knobs.get(k, ks[k].default)) if knobs is not None else ks[k].default
        if n % prod:
            raise ValueError(f"knobs {names} = {prod} do not divide {n}")


def gemv_dp4a(sch, op, knobs: dict | None = None):
    return _dp4a_matmul(sch, op, knobs, tokens=False)


def gemm_dp4a(sch, op, knobs: dict | None = None):
    return _dp4a_matmul(sch, op, knobs, tokens=True)


def _dp4a_matmul(sch, op, knobs: dict | None, tokens: bool):
    ks = {k.name: k for k in space(op)}
    if knobs is not None:
        _fits(ks, knobs, _splits(op))
    v, tx = choose(sch, knobs, ks["v"]), choose(sch, knobs, ks["tx"])
    rows, ty = choose(sch, knobs, ks["rows"]), choose(sch, knobs, ks["ty"])
    un = choose(sch, knobs, ks["unroll"]) if "unroll" in ks else 1
    nt = choose(sch, knobs, ks["tokens"]) if tokens else 1
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    if tokens:
        n, m, w, s = sch.get_loops(acc)
    else:
        m, w, s = sch.get_loops(acc)
    wo, wu, wt, wv = sch.split(w, [None, un, tx, v])
    rf = sch.rfactor(wt, factor_axis=0)  # acc_rf[tx, (N,) M]: per-thread partial sums
    loops = sch.get_loops(rf)
    if tokens:
        n, m, wo, wu, wt, wv, s = loops
        no, ni = sch.split(n, [None, nt])
    else:
        m, wo, wu, wt, wv, s = loops
    bx, by, mi = sch.split(m, [None, ty, rows])
    if tokens:
        sch.reorder(no, bx, by, wt, wo, wu, ni, mi, wv, s)
        sch.bind(no, "blockIdx.y")
    else:
        sch.reorder(bx, by, wt, wo, wu, mi, wv, s)
    sch.bind(bx, "blockIdx.x")
    sch.bind(by, "threadIdx.y")
    sch.bind(wt, "threadIdx.x")
    sch.set_scope(rf, 0, "local")
    wl = sch.cache_read(rf, 0, "local")  # W: v words per row per step → one vector load each
    sch.compute_at(wl, wu)
    sch.vectorize(sch.get_loops(wl)[-1])
    xl = sch.cache_read(rf, 1, "local")  # x4: 4·v words per token per step, reused by every row
    sch.compute_at(xl, wu)
    sch.vectorize(sch.split(sch.get_loops(xl)[-1], [None, 4])[1])
    sch.decompose_reduction(rf, wo)
    for loop in (wu, mi, wv, s) + ((ni,) if tokens else ()):
        sch.unroll(loop)
    # cross-thread (warp-shuffle) reduction of the tx partial sums, then the epilogue, per row (and token)
    sch.reverse_compute_at(acc, by)

    def value(name):  # the Python value of a knob (the loop structure below depends on it)
        return int(knobs.get(name, ks[name].default)) if knobs is not None else ks[name].default

    # unit loops are not generated: (tx reduction, [tokens], [rows])
    new = 1 + (value("rows") > 1) + (tokens and value("tokens") > 1)
    t2, *rest = sch.get_loops(acc)[-new:]
    if rest:
        sch.reorder(*rest, t2)
    sch.bind(t2, "threadIdx.x")
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(y, by)
    return sch


SCHEDULES = {"gemv_dp4a": gemv_dp4a, "gemm_dp4a": gemm_dp4a, "gemv_f32_dp4a": gemv_dp4a}


def rows(func, threads: int = 256):
    """A CUDA schedule for the graph's normalisation/elementwise kernels (RMSNorm+quantize, quantize, mHC post, the
    LM head as a GEMV...): one kernel per block; a reduction over ≥ 64 elements gets a CUDA block per output element
    and ``threads`` threads across the reduction (a cross-thread reduction: warp shuffles + shared memory), consecutive
    threads reading consecutive elements; everything else gets one thread per output element (a short reduction,
    like the S streams of the mHC aggregate, stays a loop in the thread). Returns the scheduled PrimFunc, marked
    scheduled. (dlight's GPU rules leave these kernels to its Fallback rule, which runs each reduction in ONE thread:
    ~100 us per call instead of ~2.)"""
    import math

    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        loops, ivs = sch.get_loops(b), sch.get(b).iter_vars
        if len(loops) != len(ivs):
            raise ValueError(f"block {sch.get(b).name_hint}: loops do not map one-to-one to its iterators")
        kinds = [int(iv.iter_type) for iv in ivs]
        spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == 0]
        red = [lp for lp, k in zip(loops, kinds, strict=True) if k == 2]
        if kinds != sorted(kinds) or any(k not in (0, 2) for k in kinds):
            raise ValueError(f"block {sch.get(b).name_hint}: expected spatial loops, then reduction loops")
        if not spatial:
            spatial = [sch.add_unit_loop(b)]
        sp = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        n_red = math.prod(int(sch.get(lp).extent) for lp in red)
        if red and n_red >= 64:
            sch.bind(sp, "blockIdx.x")
            r = sch.fuse(*red) if len(red) > 1 else red[0]
            _, ri = sch.split(r, [None, min(threads, 1 << (n_red.bit_length() - 1))])
            sch.bind(ri, "threadIdx.x")
        else:
            bx, tx = sch.split(sp, [None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
