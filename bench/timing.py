"""Timing helpers of the developer benchmarks (one home: ``bench.kernels``, ``bench.threads`` and the rest use these).

* :func:`tvm_time`: a compiled function's median seconds per call (``time_evaluator``), its weights cache-warm.
* :func:`cycle_time`: seconds per call while cycling over argument lists (DRAM-resident weights: each call reads
  another copy).
* :func:`py_time`: a Python callable's median seconds per call.
* :func:`llc_bytes`: this machine's last-level cache, from sysfs (never assumed).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


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


def llc_bytes() -> int:
    """The largest CPU cache of this machine (sysfs), or 32 MiB if it cannot be read."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG") or 0) * mult)
    return best or 32 << 20
