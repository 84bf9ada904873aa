"""AVX-512 (VNNI) schedule of the base-3 ternary GEMV ``gemv_i8_b3`` (:mod:`compiler.ops.ternary_gemv_b3`).

Same shape as the 2-bit ``gemv_i8`` template (schedules/x86_common.py): the reduction over a chunk's 64 bytes is split
``b = 4l + t`` and rfactored over ``l`` into ``acc2_rf[M, 2, 16]`` (the A and B sums, 16 int32 lanes each), the
``(s, l, t)`` block — 64 bytes × 320 activations — is tensorized with :mod:`schedules.intrin_x86_b3`; rows go in tiles
of ``rows`` (the layout's tile when it has one), chunks are unrolled by ``unroll_k``, row tiles run in parallel, and
the ``(3A − B) >> 8`` epilogue with the float rescale runs per row tile. Knobs: ``rows``, ``unroll_k``, and the
grid-only ``prefetch`` and ``gfni`` (they pick the intrinsic variant). AVX2 has no ``vpdpbusd`` and ``vpmaddubsw``
would saturate on bytes up to 255, so there is no AVX2 schedule (the untuned TE runs anywhere).

    python -m schedules.x86_b3            # hand schedule of a 64×4096 tile8 GEMV, bit-exact check
"""

from __future__ import annotations

from schedules import intrin_x86_b3, targets
from schedules.knobs import Knob, choose, knob

KINDS = ("gemv_i8_b3",)


def space(op) -> list[Knob]:
    if op.kind != "gemv_i8_b3":
        raise KeyError(f"no base-3 schedule for op kind {op.kind!r}")
    rows = (op.tile,) if op.tile > 1 else (1, 2, 4, 8)
    big = op.weight_bytes() > 24 << 20  # beyond most of the L3: prefetch by default
    gfni = (0, 1) if "gfni" in targets.cpu_flags() else (0,)  # the doubling: GFNI (1 op) or shift + mask (2 ops)
    return [knob("rows", op.M, rows, 8), knob("unroll_k", op.C, (1, 2, 4), 2),
            Knob("prefetch", intrin_x86_b3.PREFETCH, 2048 if big else 0, grid_only=True),
            Knob("gfni", gfni, max(gfni), grid_only=True)]  # fmt: skip


def gemv_i8_b3(sch, op, knobs: dict | None = None):
    ks = {k.name: k for k in space(op)}
    rows, uk = choose(sch, knobs, ks["rows"]), choose(sch, knobs, ks["unroll_k"])
    fixed = {}
    for name in ("prefetch", "gfni"):  # grid-only: recorded in the trace, the Python value picks the intrinsic
        choose(sch, knobs, ks[name])
        fixed[name] = ks[name].default if knobs is None else int(knobs.get(name, ks[name].default))
    acc = sch.get_sblock("acc2")
    _m, _s, _c, b = sch.get_loops(acc)
    ln, _t = sch.split(b, [16, 4])
    rf = sch.rfactor(ln, factor_axis=2)  # acc2_rf[M, 2, 16]
    m, s, c, ln, t = sch.get_loops(rf)
    mo, mi = sch.split(m, [None, rows])
    co, ci = sch.split(c, [None, uk])
    sch.reorder(mo, co, ci, mi, s, ln, t)
    sch.parallel(mo)
    sch.reverse_compute_at(acc, mo)
    sch.reverse_compute_at(sch.get_sblock("acc"), mo)
    sch.reverse_compute_at(sch.get_sblock("y"), mo)
    init = sch.decompose_reduction(rf, co)
    sch.tensorize(s, intrin_x86_b3.intrin_name(fixed["prefetch"], bool(fixed["gfni"])))
    sch.set_scope(init, 0, "local")  # 8 rows of A, B = 1 KiB: "global" would be a workspace call, not registers
    sch.unroll(mi)
    sch.unroll(ci)
    return sch


SCHEDULES = {"gemv_i8_b3": gemv_i8_b3}


if __name__ == "__main__":
    import numpy as np

    from compiler.kernels import Kernel
    from compiler.ops import make_op
    from compiler.schedule import build

    op = make_op("gemv_i8_b3", M=64, K=4096, tile=8)
    ins = op.random_inputs(np.random.default_rng(0))
    y = Kernel(op, build(op, "avx512", mode="hand"))(*ins)[0]
    print(op, "hand schedule bit-exact:", np.array_equal(y, op.reference(*ins)[0]))
