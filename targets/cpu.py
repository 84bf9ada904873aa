"""This CPU's feature flags, read from /proc/cpuinfo (no TVM): what the compiler targets and the runtime checks.

A compiled entry records the flags its kernels need (``meta.json`` ``cpu_flags``: the target's and its weight
layout's); :func:`check_flags` refuses to load one whose instructions this CPU lacks, which would otherwise kill the
process with SIGILL instead of raising.

``TERNARY_CPU_MASK`` hides flags from everything that asks (comma-separated ``fnmatch`` patterns), so a machine can
behave as a smaller one would: with ``TERNARY_CPU_MASK='avx512*,avx_vnni*'`` an AVX-512 machine picks the ``avx2``
target, skips the AVX-512 tests and refuses AVX-512 entries exactly as a Zen 3 does.

    python -m targets                                       # prints the flags (and the targets they allow)
    TERNARY_CPU_MASK='avx512*,avx_vnni*' pytest -q          # the suite as an AVX2-only CPU runs it
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import platform
import sys
from pathlib import Path

MASK_ENV = "TERNARY_CPU_MASK"


def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    """The first CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


MACHINE_ENV = "TERNARY_MACHINE"


def machine_id() -> str:
    """A name for this kind of CPU, ``<vendor>-<family>-<model>`` from /proc/cpuinfo (``amd-25-17``, ``intel-6-143``;
    ``$TERNARY_MACHINE`` overrides it): the key of the tuning database's per-machine records
    (``tuning_logs/<target>/machines/<id>/``), because the knobs that stream weights fastest (e.g. the software
    prefetch distance) differ between CPU designs of one ISA. ``unknown`` without /proc/cpuinfo."""
    env = os.environ.get(MACHINE_ENV, "").strip()
    if env:
        return env
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first CPU's block
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(fields.get("vendor_id", ""), "")
    if not vendor or "cpu family" not in fields or "model" not in fields:
        return "unknown"
    return f"{vendor}-{fields['cpu family']}-{fields['model']}"


def mask_patterns() -> tuple[str, ...]:
    """The patterns of ``TERNARY_CPU_MASK`` (empty when unset)."""
    return tuple(p.strip() for p in os.environ.get(MASK_ENV, "").split(",") if p.strip())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo less those ``TERNARY_CPU_MASK`` hides (empty without /proc)."""
    pats = mask_patterns()
    return frozenset(f for f in _proc_flags() if not any(fnmatch.fnmatchcase(f, p) for p in pats))


def llc_bytes() -> int:
    """This machine's last-level cache in bytes: the largest CPU cache sysfs lists (32 MiB if it cannot be read).
    Benchmarks and the tuner size their DRAM-resident working sets by it (never by an assumed size)."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG") or 0) * mult)
    return best or 32 << 20


def check_flags(needed, what: str) -> None:
    """Refuse code that needs flags this CPU lacks (it would die of SIGILL); for code that executes AMX tile
    instructions, also ask Linux for the tile data (:func:`request_amx`)."""
    missing = sorted(set(needed) - cpu_flags())
    if missing:
        raise RuntimeError(f"{what} needs the CPU flags {missing}, which this CPU lacks")
    if "amx_tile" in needed:
        request_amx()


SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18  # x86-64 Linux (asm/prctl.h, fpu/xstate)


@functools.cache
def request_amx() -> None:
    """Ask Linux (5.16 and later) to let this process use AMX's tile data: ``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``, once per process, for all of its threads. Without the permission the first tile
    instruction kills the process, so a refusal raises here instead."""
    import ctypes

    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        raise RuntimeError("AMX kernels need x86-64 Linux (its arch_prctl permission for the tile data)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(f"Linux refused this process AMX's tile data (arch_prctl: {os.strerror(err)})")
