"""Timing that a cache cannot flatter: DRAM-resident weights are rotated over copies, for the tuner and the benchmarks.

A kernel whose weights exceed a quarter of the last-level cache (:func:`targets.cpu.llc_bytes`) is timed while
cycling over enough copies of its weights to exceed twice that cache, so every call streams from DRAM as it does in
a model; smaller ones are timed on one copy (cache-warm, as a model's small matrices mostly are). ``compiler.tune``
and ``bench.kernels``/``bench.threads`` use the same rule.

    python -c "from compiler.measure import dram_copies; print(dram_copies(128 << 20))"
"""

from __future__ import annotations

import math
import time

from targets.cpu import llc_bytes


def weight_bytes(op) -> float:
    """Bytes of an op's packed weights (its own ``weight_bytes`` for layouts that are not 2-bit), else what it moves."""
    if hasattr(op, "weight_bytes"):
        return op.weight_bytes()
    return op.M * op.K / 4 if hasattr(op, "K") else op.bytes_moved()


def dram_copies(nbytes: float, llc: int | None = None, dram: bool = False) -> int:
    """Copies of an operand of ``nbytes`` to rotate over: 1 up to a quarter of the last-level cache (unless ``dram``:
    the operand of a model that streams all its weights from DRAM every token), else enough to exceed twice the
    cache."""
    llc = llc or llc_bytes()
    return 1 if nbytes <= llc / 4 and not dram else math.ceil(2 * llc / nbytes) + 1


def cycle_time(f, arg_sets, min_s: float) -> float:
    """Seconds per call, cycling over ``arg_sets`` (each call reads other weights) for at least ``min_s``."""
    f(*arg_sets[0])
    calls, t0 = 0, time.perf_counter()
    while True:
        for args in arg_sets:
            f(*args)
        calls += len(arg_sets)
        el = time.perf_counter() - t0
        if el >= min_s:
            return el / calls
