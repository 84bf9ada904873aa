"""AVX2 schedules (mcpu haswell): the x86 templates bound to the ``vpmaddubsw`` ternary intrinsic and 8 float lanes.

The intrinsic's int16 pair sums cannot saturate (bound in :mod:`schedules.intrin_x86`). ``SCHEDULES[kind](sch, op,
knobs=None)`` applies the hand schedule (fixed knobs) or samples it (a MetaSchedule design space).

    python -c "from compiler.schedule import self_check; self_check('avx2')"   # 512×1024 W2A8 GEMV, bit-exact check
"""

from __future__ import annotations

import functools

from schedules import x86_common
from schedules.x86_common import AVX2 as ISA

NAME = "avx2"
SCHEDULES = {kind: functools.partial(fn, isa=ISA) for kind, fn in x86_common.TEMPLATES.items()}


def space(op):
    return x86_common.space(op, ISA)


def valid(op, knobs: dict) -> bool:
    """Knobs the tuner may try (:func:`compiler.tuning_db.plan`): all but the GEMV's duplicates
    (:func:`x86_common.valid`)."""
    return x86_common.valid(op, knobs)
