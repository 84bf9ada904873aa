"""AVX-512 (VBMI + VNNI) schedules of the table-lookup GEMV ``gemv_i8_tl`` (:mod:`compiler.ops.ternary_gemv_tl`) and
GEMM ``gemm_i8_tl`` (:mod:`compiler.ops.ternary_gemm_tl`, :func:`gemm_i8_tl`; below, the GEMV).

* ``lut`` (knob ``lut_at``): the tables are built once before the rows (``root``), the same with the blocks in
  parallel (``parallel``), or by every thread at the start of its share of the row groups (``thread``: one parallel
  region instead of two, for a redundant build of K/24·256 bytes; offered when the groups split evenly over the
  cores, since tensorize cannot take the predicate of an uneven split). One intrinsic call builds a block's tables.
* ``acc``: rows are split into row groups of ``tile`` 16-row tiles (the layout's), the groups run in parallel, and
  for each block the ``(h, r, half, j)`` nest of every tile — 16 rows × 24 weights × both table bytes — is
  tensorized with :mod:`schedules.intrin_x86_tl`. Tiles are unrolled so the block's four table registers are loaded
  once per group, the accumulators (``2·tile`` zmm) live in registers for the whole row, and blocks are unrolled by
  ``unroll_k``. The epilogue (``Σ w·x`` from the two byte sums and the stored ``Σ sign``, the float rescale) runs per
  row group.

Knobs: ``unroll_k``, and the grid-only ``lut_at`` and ``prefetch`` (the latter picks the intrinsic variant).
``vpermb`` is AVX-512 VBMI (Ice Lake, Zen 4): there is no AVX2 schedule (the untuned TE runs anywhere).

    python -m compiler.schedule --target avx512 --op gemv_i8_tl:M=256:K=4096:tile=8 --trace   # one GEMV
    python -m compiler.schedule --target avx512 --op gemm_i8_tl:N=8:M=256:K=4096:tile=8 --trace   # one GEMM
"""

from __future__ import annotations

import targets
from model.ternary.layouts_tl import TILE_ROWS
from schedules import intrin_x86_tl
from schedules.knobs import Knob, choose, duplicate_prefetch, knob
from schedules.x86_common import PORTABLE_THREADS, grid_only

KINDS = ("gemv_i8_tl", "gemm_i8_tl")

LUT_AT = ("root", "parallel", "thread")  # where the tables are built (knob lut_at: the index)


def _groups(op) -> int:
    return op.M // (TILE_ROWS * op.tile)


def _row_tiles(op) -> int:
    """16-row tiles of the matrix: the GEMM's tasks are blocks of ``tiles`` of them."""
    return _groups(op) * op.tile


def tasks(op, cores: int) -> int:
    """Parallel tasks of the per-thread table build for a kernel built for ``cores`` threads: the largest divisor
    of the row groups not above ``cores`` (each task builds the tables once, then streams an equal share of rows)."""
    g = _groups(op)
    return max(d for d in range(1, min(g, max(1, int(cores))) + 1) if g % d == 0)


def space(op) -> list[Knob]:
    """The knobs; the same on every machine (a record's decisions index these candidates, so they must not depend
    on the core count)."""
    big = op.weight_bytes() > 24 << 20  # beyond most of the L3: prefetch by default
    prefetch = Knob("prefetch", intrin_x86_tl.PREFETCH, 2048 if big else 0, grid_only=True)
    to = Knob("prefetch_to", intrin_x86_tl.PREFETCH_TO, 1, grid_only=True)  # last: older records read as 1
    if op.kind == "gemm_i8_tl":  # default tiles: 2, or 1 where the tasks would not feed PORTABLE_THREADS
        tiles = 2 if op.tile % 2 == 0 and _row_tiles(op) // 2 >= PORTABLE_THREADS else 1
        return [knob("tiles", op.tile, (1, 2, 4), tiles), knob("tokens", op.N, (1, 2, 4), 2),
                knob("unroll_k", op.B, (1, 2), 1), Knob("lut_at", (0, 1), 1, grid_only=True), prefetch, to]  # fmt: skip
    if op.kind != "gemv_i8_tl":
        raise KeyError(f"no table-lookup schedule for op kind {op.kind!r}")
    return [knob("unroll_k", op.B, (1, 2, 4), 2), Knob("lut_at", (0, 1, 2), 2, grid_only=True), prefetch, to]


def valid(op, knobs: dict) -> bool:
    """Whether the tuner may try ``knobs``: tables built at ``root`` or in ``parallel`` leave the rows' parallel loop
    over the row groups (and ``parallel`` one over the table blocks), which must feed
    :data:`schedules.x86_common.PORTABLE_THREADS` threads; ``thread`` sizes its loop from the core count. Nor a
    cache level for no prefetch."""
    if duplicate_prefetch(knobs):
        return False
    if op.kind == "gemm_i8_tl":  # the rows' tasks are blocks of `tiles` row tiles
        return _row_tiles(op) // int(knobs["tiles"]) >= min(PORTABLE_THREADS, _row_tiles(op))
    lut_at = LUT_AT[int(knobs["lut_at"])]
    if lut_at == "thread":
        return True
    return _groups(op) >= PORTABLE_THREADS and (lut_at == "root" or 2 * op.B >= PORTABLE_THREADS)


def _grid_only(sch, knobs: dict | None, ks: dict) -> tuple[str, str]:
    """``(lut_at, the lookup intrinsic)``: from the grid-only knobs ``lut_at``, ``prefetch`` and ``prefetch_to``,
    recorded in the trace; their Python values shape the code."""
    lut_at, pf, to = (grid_only(sch, knobs, ks[name]) for name in ("lut_at", "prefetch", "prefetch_to"))
    return LUT_AT[lut_at], intrin_x86_tl.intrin_name(pf, to)


def _tables(sch, parallel: bool) -> None:
    """The padded activations (``xp``, vectorized) and the tables (``lut``): one table-building call per ((token,)
    block, half), those loops fused and run in parallel or not (where the tables were computed at a thread's loop,
    only the loops below it)."""
    xp, lut = sch.get_sblock("xp"), sch.get_sblock("lut")
    sch.vectorize(sch.split(sch.get_loops(xp)[-1], [None, 64])[1])
    axes = len(sch.get(lut).iter_vars)  # (token,) block, half, byte, group, word
    *lead, h, _j, _w = sch.get_loops(lut)[-axes:]
    fused = sch.fuse(*lead)
    if parallel:
        sch.parallel(fused)
    sch.tensorize(h, intrin_x86_tl.LUT_INTRIN)


def gemv_i8_tl(sch, op, knobs: dict | None = None, cores: int | None = None):
    """``cores``: the thread count the kernel is built for (default :func:`targets.build_cores`); only
    ``lut_at = thread`` depends on it (:func:`tasks`)."""
    ks = {k.name: k for k in space(op)}
    uk = choose(sch, knobs, ks["unroll_k"])
    lut_at, intrin = _grid_only(sch, knobs, ks)

    acc = sch.get_sblock("acc")
    h, m, b, half, j = sch.get_loops(acc)
    g, t, r = sch.split(m, [None, op.tile, TILE_ROWS])
    if lut_at == "thread":  # one parallel region: each thread builds the tables, then streams its rows
        par, g = sch.split(g, [tasks(op, cores or targets.build_cores()), None])
    bo, bi = sch.split(b, [None, uk])
    sch.reorder(*([par] if lut_at == "thread" else []), g, bo, bi, t, h, r, half, j)
    sch.parallel(par if lut_at == "thread" else g)
    y = sch.get_sblock("y")
    sch.reverse_compute_at(sch.get_sblock("dot"), g)
    sch.reverse_compute_at(y, g)
    init = sch.decompose_reduction(acc, bo)
    sch.tensorize(h, intrin)
    sch.set_scope(init, 0, "local")  # 2·tile zmm of int32: registers, not a workspace call
    sch.unroll(t)
    sch.unroll(bi)
    (ym,) = sch.get_loops(y)[-1:]
    sch.vectorize(sch.split(ym, [None, TILE_ROWS])[1])

    if lut_at == "thread":
        sch.compute_at(sch.get_sblock("lut"), par)
        sch.compute_at(sch.get_sblock("xp"), par)
    _tables(sch, lut_at == "parallel")
    return sch


def gemm_i8_tl(sch, op, knobs: dict | None = None, cores: int | None = None):
    """N tokens: every token's tables first (:func:`_tables`), then per task (a row group and a block of ``tiles``
    16-row tiles, in parallel) and per block of ``tokens`` tokens, the blocks of K with each tile × token call of
    the lookup intrinsic unrolled: a weight record is loaded once for the token block (LLVM shares the index and sign
    vectors across the calls), a token's four table registers once for the tile block, and the ``2·tiles·tokens``
    accumulators stay in registers. ``cores`` is unused (no per-thread table build)."""
    ks = {k.name: k for k in space(op)}
    tt = choose(sch, knobs, ks["tiles"])
    nt = choose(sch, knobs, ks["tokens"])
    uk = choose(sch, knobs, ks["unroll_k"])
    lut_at, intrin = _grid_only(sch, knobs, ks)

    acc = sch.get_sblock("acc")
    n, h, m, b, half, j = sch.get_loops(acc)
    g, t, r = sch.split(m, [None, op.tile, TILE_ROWS])
    to, ti = sch.split(t, [None, tt])
    no, ni = sch.split(n, [None, nt])
    bo, bi = sch.split(b, [None, uk])
    sch.reorder(g, to, no, bo, bi, ti, ni, h, r, half, j)
    task = sch.fuse(g, to)
    sch.parallel(task)
    sch.reverse_compute_at(sch.get_sblock("dot"), no)
    y = sch.get_sblock("y")
    sch.reverse_compute_at(y, no)
    init = sch.decompose_reduction(acc, bo)
    sch.tensorize(h, intrin)
    sch.set_scope(init, 0, "local")  # 2·tiles·tokens zmm of int32: registers
    sch.unroll(ni)
    sch.unroll(ti)
    sch.unroll(bi)
    (ym,) = sch.get_loops(y)[-1:]
    sch.vectorize(sch.split(ym, [None, TILE_ROWS])[1])
    _tables(sch, lut_at == "parallel")
    return sch


SCHEDULES = {"gemv_i8_tl": gemv_i8_tl, "gemm_i8_tl": gemm_i8_tl}
