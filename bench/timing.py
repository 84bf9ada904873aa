"""Timing helpers of the developer benchmarks: :func:`tvm_time` (a compiled function's median seconds per call,
``time_evaluator``, weights cache-warm) and :func:`py_time` (a Python callable's). DRAM-resident timing (weights
rotated over copies beyond the last-level cache) is :mod:`compiler.measure`'s, shared with the tuner.
"""

from __future__ import annotations

import statistics
import time


def tvm_time(ex, args, min_ms: float = 50.0, repeat: int = 7) -> float:
    """Median seconds per call; ``number`` is chosen so one repeat lasts about ``min_ms``."""
    import tvm

    f = ex.mod if hasattr(ex, "mod") else ex
    f["main"](*args)
    t0 = time.perf_counter()
    f["main"](*args)
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_ms / 1e3 / one))
    return float(f.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args).median)


def py_time(fn, min_s: float = 0.05, repeat: int = 5) -> float:
    """Median seconds per call of a Python callable (``number`` calls per repeat, about ``min_s`` each)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_s / one))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)
