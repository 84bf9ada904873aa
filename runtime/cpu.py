"""This CPU's feature flags, read from /proc/cpuinfo (no TVM): what the compiler targets and the runtime checks.

A compiled entry records the flags its kernels need (``meta.json`` ``cpu_flags``: the target's and its weight
layout's); :func:`check_flags` refuses to load one whose instructions this CPU lacks, which would otherwise kill the
process with SIGILL instead of raising.

    python -m runtime.cpu        # prints the flags
"""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty on systems without it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def check_flags(needed, what: str) -> None:
    missing = sorted(set(needed) - cpu_flags())
    if missing:
        raise RuntimeError(f"{what} needs the CPU flags {missing}, which this CPU lacks")


if __name__ == "__main__":
    print(" ".join(sorted(cpu_flags())))
