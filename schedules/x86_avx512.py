"""AVX-512 (VNNI) schedules: the x86 templates bound to the ``vpdpbusd`` ternary intrinsic and 16 float lanes.

Target: ``{"kind": "llvm", "mcpu": "znver4", ...}`` (see :mod:`targets`). ``SCHEDULES[kind](sch, op,
knobs=None)`` applies the hand schedule (fixed knobs) or samples it (a MetaSchedule design space).

    python -c "from compiler.schedule import self_check; self_check('avx512')"   # 512×1024 W2A8 GEMV, bit-exact check
"""

from __future__ import annotations

import functools

from schedules import x86_common, x86_tl
from schedules.x86_common import AVX512 as ISA

NAME = "avx512"
SCHEDULES = {kind: functools.partial(fn, isa=ISA) for kind, fn in x86_common.TEMPLATES.items()}
SCHEDULES.update(x86_tl.SCHEDULES)  # table-lookup (1.67-bit) GEMV: VBMI + VNNI only


def space(op):
    return x86_tl.space(op) if op.kind in x86_tl.KINDS else x86_common.space(op, ISA)


def valid(op, knobs: dict) -> bool:
    """Knobs the tuner may try (:func:`compiler.tuning_db.plan`): all but the table-lookup GEMV's non-portable ones
    and the GEMV's duplicates (:func:`x86_common.valid`)."""
    return x86_tl.valid(op, knobs) if op.kind in x86_tl.KINDS else x86_common.valid(op, knobs)
