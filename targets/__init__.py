"""Compilation targets by short name (``avx2``, ``avx512``, ``cuda``) and ``auto`` detection from the CPU flags.

The leaf every room may import: it imports nothing of ours but its own submodules (:mod:`targets.cpu`, the CPU flags;
:mod:`targets.cuda`, loading TVM's CUDA runtime), and TVM only inside the functions that need it.

TVM 0.27 takes JSON-dict targets only; MetaSchedule needs ``num-cores`` (see docs/tvm.md). ``avx2`` is
``-mcpu=haswell`` (AVX2 + FMA, no AVX-512), ``avx512`` is ``-mcpu=znver4`` (AVX-512 with VNNI/VBMI; the kernels use
only F/BW/VL/VNNI, which Ice Lake and later Intel parts have too).

    python -m targets                      # prints the detected target and what this CPU supports
"""

from __future__ import annotations

import os

from targets.cpu import check_flags, cpu_flags
from targets.cuda import load_cuda_runtime

TARGET_NAMES = ("avx2", "avx512", "cuda")

# CPU flags (as /proc/cpuinfo spells them) a target's generated code needs.
REQUIRED_FLAGS = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
}
MCPU = {"avx2": "haswell", "avx512": "znver4"}


def num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ensure_tvm_threads() -> int:
    """Make TVM's thread pool use every core: set ``TVM_NUM_THREADS`` (if unset) before the pool starts.

    TVM's default halves ``hardware_concurrency()`` on x86 ("ignore hyper-threading"), so on this 2-core machine
    without SMT it would run every parallel kernel on ONE thread. Called when :mod:`schedules` is imported (so by
    every compiler module), not when this package is: the runtime sizes its pool itself.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(num_cores()))
    return int(os.environ["TVM_NUM_THREADS"])


def build_cores() -> int:
    """The thread count CPU kernels are built for unless a caller says otherwise: TVM's pool size
    (``TVM_NUM_THREADS``, which :func:`ensure_tvm_threads` sets to this machine's cores when unset). Only schedules
    with per-thread work (the table-lookup GEMV's per-thread table build) depend on it; see docs/threads.md."""
    return ensure_tvm_threads()


def set_tvm_threads(n: int) -> int:
    """Resize TVM's thread pool to ``n`` threads (≤ ``TVM_NUM_THREADS``) for the following calls; returns the count."""
    import tvm

    ensure_tvm_threads()
    tvm.get_global_func("runtime.config_threadpool")(1, int(n))
    return int(tvm.get_global_func("runtime.NumThreads")())


def supported(name: str) -> bool:
    """Can this machine *run* code built for ``name``? (CUDA: whether TVM's CUDA runtime sees a device.)"""
    if name == "cuda":
        try:
            import tvm

            return bool(tvm.runtime.enabled("cuda")) and tvm.cuda(0).exist
        except Exception:
            return False
    if name not in REQUIRED_FLAGS:
        raise ValueError(f"unknown target {name!r}; known: {TARGET_NAMES}")
    return set(REQUIRED_FLAGS[name]) <= cpu_flags()


def missing_flags(name: str) -> list[str]:
    return sorted(set(REQUIRED_FLAGS.get(name, ())) - cpu_flags())


def missing_op_flags(op) -> list[str]:
    """CPU flags an op's kernels need beyond their target's (``op.cpu_flags``, e.g. VBMI) that this machine lacks."""
    return sorted(set(getattr(op, "cpu_flags", ())) - cpu_flags())


def detect() -> str:
    """The best CPU target this machine runs: ``avx512`` if it has VNNI, else ``avx2``."""
    for name in ("avx512", "avx2"):
        if supported(name):
            return name
    raise RuntimeError("this CPU has neither AVX-512 VNNI nor AVX2+FMA; no x86 target applies")


def resolve(name: str) -> str:
    """``auto`` → the detected target; any other name is checked and returned."""
    if name == "auto":
        return detect()
    if name not in TARGET_NAMES:
        raise ValueError(f"unknown target {name!r}; choose from auto, {', '.join(TARGET_NAMES)}")
    return name


AMX_FLAGS = ("amx_int8", "amx_tile")  # /proc/cpuinfo's names of what the AMX kernels execute
AMX_FEATURES = ("+amx-tile", "+amx-int8")  # LLVM's names of the same


def has_amx() -> bool:
    """Whether this CPU runs the AMX kernels: AMX-INT8 (Intel Sapphire Rapids and later Xeons) and the ``avx512``
    target's flags, since the kernels unpack weights with AVX-512 (so ``TERNARY_CPU_MASK='avx512*'`` hides AMX too)."""
    return set(AMX_FLAGS) <= cpu_flags() and supported("avx512")


def target_dict(name: str, cores: int | None = None, amx: bool = False) -> dict:
    """The JSON-dict target for ``name`` (``auto`` allowed); ``amx`` (``avx512`` only): LLVM may also emit AMX tile
    instructions, which only the AMX kernels contain (:mod:`compiler.ops.ternary_gemm_amx`)."""
    name = resolve(name)
    if name == "cuda":
        return {"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
                "thread_warp_size": 32, "registers_per_block": 65536}  # fmt: skip
    out = {"kind": "llvm", "mcpu": MCPU[name], "num-cores": int(cores or num_cores())}
    if amx:
        if name != "avx512":
            raise ValueError(f"AMX kernels build for the avx512 target, not {name}")
        out["mattr"] = list(AMX_FEATURES)
    return out


def get_target(name: str, cores: int | None = None, amx: bool = False):
    """A ``tvm.target.Target`` for ``name`` (see :func:`target_dict`)."""
    import tvm

    return tvm.target.Target(target_dict(name, cores, amx))


__all__ = [
    "AMX_FEATURES", "AMX_FLAGS", "MCPU", "REQUIRED_FLAGS", "TARGET_NAMES", "build_cores", "check_flags", "cpu_flags",
    "detect", "ensure_tvm_threads", "get_target", "has_amx", "load_cuda_runtime", "missing_flags", "missing_op_flags",
    "num_cores", "resolve", "set_tvm_threads", "supported", "target_dict",
]  # fmt: skip
