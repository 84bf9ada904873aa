"""x86 schedule templates shared by AVX2 and AVX-512; the ISA enters as the tensor intrinsic and the vector width.

Each template is ``fn(sch, op, isa, knobs=None, cores=None)`` (see :mod:`schedules.knobs`) and returns the scheduled
``s_tir.Schedule``; :mod:`schedules.x86_avx512` and :mod:`schedules.x86_avx2` bind ``isa``. ``cores`` (the thread
count a kernel is built for) is part of every CPU schedule's signature, but these templates never use it: their
parallel loops run over row tiles or tokens, an extent the shape fixes, so a kernel splits over any thread count.
A ternary GEMV/GEMM with less work than ``isa.parallel_macs`` (``N·M·K`` multiply-adds) runs on one thread: inside a
model step, waking the pool and waiting for it costs more than the second core saves on so little work
(docs/threads.md, "Small kernels run on one thread").

Ternary GEMV/GEMM (int8): the reduction ``acc[m] = Σ_{c,b,j}`` is split ``b = 4l + t`` and rfactored over ``l`` into
16 int32 lanes per row (``acc_rf[m, l]``); the inner ``(l, t, j)`` block — 64 packed bytes × 256 activations — is
tensorized with the ISA's ternary dot intrinsic. Rows go in tiles of ``rows`` (independent accumulators, the x chunk
loaded once per tile), the 256-code chunks loop is unrolled by ``unroll_k``; row tiles run in parallel. The
cross-lane sum, the ``Σx`` correction and the float rescale happen per row tile, right after its reduction.

    python -m compiler.schedule --op gemv_i8:M=4096:K=4096 --trace    # this schedule of one GEMV, as the build picks it
"""

from __future__ import annotations

from dataclasses import dataclass

from schedules import intrin_x86
from schedules.knobs import Knob, choose, duplicate_prefetch, knob


@dataclass(frozen=True)
class Isa:
    name: str
    intrin: str  # ternary dot intrinsic (schedules/intrin_x86.py)
    f32_lanes: int  # float32 lanes of one vector register
    # the least work (N·M·K multiply-adds) of a ternary GEMV/GEMM that runs its row tiles in parallel: below it, one
    # thread (about 6 µs of one core's work: 2 launch-and-wait costs inside a model step, docs/threads.md)
    parallel_macs: int


# A parallel loop of a CPU kernel must be able to feed this many threads: records are tuned on 2 cores and travel to
# machines with more (a loop over a shape's row tiles, tokens or table blocks), or the loop is per thread, sized from
# the core count at build time (tests/test_threads.py audits every record and hand schedule)
PORTABLE_THREADS = 16

AVX512 = Isa("avx512", intrin_x86.VNNI_INTRIN, 16, 1 << 20)
AVX2 = Isa("avx2", intrin_x86.AVX2_INTRIN, 8, 1 << 19)


# ---------------------------------------------------------------------------------------------------------------
# knob spaces
# ---------------------------------------------------------------------------------------------------------------
def space(op, isa: Isa) -> list[Knob]:
    kind = op.kind
    if kind == "gemv_i8":
        rows = (op.tile,) if getattr(op, "tile", 0) else (1, 2, 4, 8, 12)  # a tiled layout fixes the row tile
        big = op.M * op.K // 4 > 24 << 20  # weights beyond most of the L3: prefetch by default
        # prefetch_to last: records tuned before it existed read as its default (schedules.knobs.knobs_of_trace)
        return [knob("rows", op.M, rows, 8), knob("unroll_k", op.K // 256, (1, 2, 4), 2),
                Knob("prefetch", intrin_x86.PREFETCH, 2048 if big else 0, grid_only=True),
                Knob("prefetch_to", intrin_x86.PREFETCH_TO, 1, grid_only=True)]  # fmt: skip
    if kind == "gemm_i8":
        rows = tuple(r for r in (1, 2, 4, 8) if getattr(op, "tile", 0) % r == 0)  # a row tile within a layout tile
        return [knob("rows", op.M, rows, 4), knob("tokens", op.N, (1, 2, 4), 2),
                knob("unroll_k", op.K // 256, (1, 2), 1)]  # fmt: skip
    if kind == "gemv_f32":
        return [knob("rows", op.M, (1, 2, 4, 8), 4), knob("lanes", 64, (isa.f32_lanes, 2 * isa.f32_lanes),
                isa.f32_lanes)]  # fmt: skip
    if kind == "rmsnorm_quant":
        return [knob("vec", op.D, (8, 16, 32, 64), 32)]
    if kind == "mhc_post":
        # unroll ≥ 2: the Σu² lane loop of mhc_post needs a reduction loop of extent > 1 under each column tile
        return [knob("vec", op.D, (8, 16, 32), isa.f32_lanes), knob("unroll", op.D // 32, (2, 4), 2)]
    raise KeyError(f"no x86 schedule for op kind {kind!r}")


def valid(op, knobs: dict) -> bool:
    """False for knob sets that build the same kernel as another: a cache level for no prefetch."""
    return not duplicate_prefetch(knobs)


# ---------------------------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------------------------
def _lanes_innermost(sch, acc) -> None:
    """The cross-lane sum of a row tile (``acc[.., m] = Σ_l acc_rf[.., m, l]``) with the 16 lanes innermost: each
    row's lanes are contiguous, so LLVM sums them with vector adds. ``reverse_compute_at`` leaves the lane loop
    outermost, which LLVM vectorized across rows with a ``vpgatherqd`` per 4 sums: a third of a 4-token GEMM's
    time on Zen 4 (docs/speculative.md, "Prompt-lookup drafts")."""
    lane, *rest = sch.get_loops(acc)[1:]
    sch.reorder(*rest, lane)


def _lane_sum_tree(sch, acc, rows: int) -> None:
    """A row tile of ``rows`` in :data:`intrin_x86.LANE_SUM_ROWS`: its cross-lane sums as one transposed tree
    (:func:`intrin_x86.lane_sum_intrin`) instead of a horizontal sum per row. Call last: the sum's block is split
    and tensorized."""
    rows = rows if isinstance(rows, int) else int(sch.get(rows))  # a sampled knob: this trace's value
    if rows not in intrin_x86.LANE_SUM_ROWS:
        return  # one row: its loop is gone, the horizontal sum stays; 12: not a power of two
    m = sch.get_loops(acc)[-2]
    sch.decompose_reduction(acc, m)
    sch.tensorize(m, intrin_x86.lane_sum_intrin(rows))


def grid_only(sch, knobs: dict | None, k: Knob) -> int:
    """A grid-only knob's value: recorded in the trace (:func:`choose`), its Python value shapes the code."""
    choose(sch, knobs, k)
    return k.default if knobs is None else int(knobs.get(k.name, k.default))


def _parallel(sch, loop, macs: int, isa: Isa) -> None:
    """Run ``loop`` (the row tiles) on the thread pool when the kernel's ``macs`` reach ``isa.parallel_macs``."""
    if macs >= isa.parallel_macs:
        sch.parallel(loop)


def gemv_i8(sch, op, isa: Isa, knobs: dict | None = None, cores: int | None = None):
    ks = {k.name: k for k in space(op, isa)}
    rows, uk = choose(sch, knobs, ks["rows"]), choose(sch, knobs, ks["unroll_k"])
    pf, to = (grid_only(sch, knobs, ks[n]) for n in ("prefetch", "prefetch_to"))  # they pick the intrinsic
    acc = sch.get_sblock("acc")
    _m, _c, b, _j = sch.get_loops(acc)
    ln, _t = sch.split(b, [16, 4])
    rf = sch.rfactor(ln, factor_axis=1)  # acc_rf[M, 16]
    m, c, ln, t, j = sch.get_loops(rf)
    mo, mi = sch.split(m, [None, rows])
    co, ci = sch.split(c, [None, uk])
    sch.reorder(mo, co, ci, mi, ln, t, j)
    _parallel(sch, mo, op.M * op.K, isa)
    sch.reverse_compute_at(acc, mo)
    _lanes_innermost(sch, acc)
    sch.reverse_compute_at(sch.get_sblock("y"), mo)
    sch.decompose_reduction(rf, co)
    sch.tensorize(ln, intrin_x86.intrin_name(isa.intrin, pf, to))
    sch.unroll(mi)
    sch.unroll(ci)
    _lane_sum_tree(sch, acc, rows)
    return sch


def gemm_i8(sch, op, isa: Isa, knobs: dict | None = None, cores: int | None = None):
    ks = {k.name: k for k in space(op, isa)}
    rows, tok, uk = (choose(sch, knobs, ks[n]) for n in ("rows", "tokens", "unroll_k"))
    acc = sch.get_sblock("acc")
    _n, _m, _c, b, _j = sch.get_loops(acc)
    ln, _t = sch.split(b, [16, 4])
    rf = sch.rfactor(ln, factor_axis=2)  # acc_rf[N, M, 16]
    n, m, c, ln, t, j = sch.get_loops(rf)
    mo, mi = sch.split(m, [None, rows])
    no, ni = sch.split(n, [None, tok])
    co, ci = sch.split(c, [None, uk])
    sch.reorder(mo, no, co, ci, mi, ni, ln, t, j)
    _parallel(sch, mo, op.N * op.M * op.K, isa)
    sch.reverse_compute_at(acc, mo)
    _lanes_innermost(sch, acc)
    sch.reverse_compute_at(sch.get_sblock("y"), mo)
    sch.decompose_reduction(rf, co)
    sch.tensorize(ln, isa.intrin)
    sch.unroll(mi)
    sch.unroll(ni)
    sch.unroll(ci)
    _lane_sum_tree(sch, acc, rows)
    return sch


def gemv_f32(sch, op, isa: Isa, knobs: dict | None = None, cores: int | None = None):
    ks = {k.name: k for k in space(op, isa)}
    rows, lanes = choose(sch, knobs, ks["rows"]), choose(sch, knobs, ks["lanes"])
    acc = sch.get_sblock("y_acc")
    _m, _c, b, _j = sch.get_loops(acc)
    _bo, bi = sch.split(b, [None, lanes])
    rf = sch.rfactor(bi, factor_axis=1)  # y_acc_rf[M, lanes]
    m, c, bo, bi, j = sch.get_loops(rf)
    mo, mi = sch.split(m, [None, rows])
    sch.reorder(mo, c, bo, j, mi, bi)
    sch.parallel(mo)
    sch.reverse_compute_at(acc, mo)
    sch.reverse_compute_at(sch.get_sblock("y"), mo)
    sch.vectorize(bi)
    sch.unroll(mi)
    sch.unroll(j)
    sch.decompose_reduction(rf, c)  # after vectorize: the update block must still be a reduction block then
    return sch


def rmsnorm_quant(sch, op, isa: Isa, knobs: dict | None = None, cores: int | None = None):
    """Three vectorized passes per token: Σx² (lane partial sums), max|h|, then quantize + Σq (h never stored)."""
    vec = choose(sch, knobs, {k.name: k for k in space(op, isa)}["vec"])
    sch.compute_inline(sch.get_sblock("h"))
    for name in ("ss", "amax", "q_sum"):  # lane partial results (rf[N, vec]) in vector registers, then one reduce
        blk = sch.get_sblock(name)
        _n, d = sch.get_loops(blk)
        _o, i = sch.split(d, [None, vec])
        rf = sch.rfactor(i, factor_axis=1)
        _n, do, di = sch.get_loops(rf)
        sch.vectorize(di)
        sch.decompose_reduction(rf, do)  # the init out of the loop: no per-iteration branch
    q = sch.get_sblock("q")
    _n, i = sch.get_loops(q)
    _o, qi = sch.split(i, [None, vec])
    sch.vectorize(qi)
    return sch


def mhc_post(sch, op, isa: Isa, knobs: dict | None = None, cores: int | None = None):
    """One sweep over columns: per ``vec`` columns, the S mixed streams (unrolled over s), u, and ss lane sums."""
    ks = {k.name: k for k in space(op, isa)}
    vec, unroll = choose(sch, knobs, ks["vec"]), choose(sch, knobs, ks["unroll"])
    u = sch.get_sblock("u")
    if op.last:
        sch.compute_inline(sch.get_sblock("X_out"))
        d, rs = sch.get_loops(u)
        main = u
    else:
        main = sch.get_sblock("X_out")
        rs, d = sch.get_loops(main)
    do, di = sch.split(d, [None, vec])
    sch.reorder(do, rs, di)  # per column tile: the S streams (unrolled), each a vector of columns
    doo, doi = sch.split(do, [None, unroll])
    sch.unroll(doi)
    sch.unroll(rs)
    sch.vectorize(di)
    anchor = doo
    if not op.last:  # u for this column tile, right after X' (reads it from L1)
        sch.reverse_compute_at(u, doo)
        if op.S > 1:
            ud, urs = sch.get_loops(u)[-2:]
            udo, udi = sch.split(ud, [None, vec])
            sch.reorder(udo, urs, udi)
            sch.unroll(urs)
        else:  # reverse_compute_at drops the extent-1 stream loop
            (ud,) = sch.get_loops(u)[-1:]
            udo, udi = sch.split(ud, [None, vec])
        sch.vectorize(udi)
    ss = sch.get_sblock("ss")
    _x, k = sch.get_loops(ss)
    _ko, ki = sch.split(k, [None, vec])
    rf = sch.rfactor(ki, factor_axis=0)  # ss_rf[vec] lane partial sums
    sch.reverse_compute_at(rf, anchor)
    lane, red = sch.get_loops(rf)[-2:]
    sch.reorder(red, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(rf, anchor)
    return sch


TEMPLATES = {"gemv_i8": gemv_i8, "gemm_i8": gemm_i8, "gemv_f32": gemv_f32, "rmsnorm_quant": rmsnorm_quant,
             "mhc_post": mhc_post}  # fmt: skip
