"""Host tensors backed by transparent huge pages (2 MiB), for the weights and the KV cache a CPU decode step streams.

A decode step reads every weight once; with 4 KiB pages that is a TLB miss every 4 KiB of a ~1 GB stream. Linux
backs an anonymous range with 2 MiB pages when it is marked ``MADV_HUGEPAGE`` before it is first touched (with
``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise``, the common default, nothing else gets them). So a
tensor is allocated empty, its 2 MiB-aligned interior marked, and only then filled. Where that is not possible
(another OS, THP ``never``, a tensor under 2 MiB, a GPU) the tensor is made as usual: the pages are a hint, never a
requirement. ``TERNARY_HUGEPAGES=0`` turns it off. Measured effect (``python -m bench.hugepages``):
``docs/runtime/README.md`` ("Huge pages").

    from targets.hugepages import empty_tensor, host_tensor
    w = host_tensor(np_array, tvm.cpu())   # filled
    kc = empty_tensor(shape, "float32", tvm.cpu())
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import numpy as np

HUGE = 2 << 20  # bytes of a transparent huge page on x86-64
MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` where THP can be asked for (Linux, mode ``always`` or ``madvise``), else None."""
    if not sys.platform.startswith("linux") or os.environ.get("TERNARY_HUGEPAGES", "1") == "0":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise(ptr: int, nbytes: int) -> int:
    """Mark the 2 MiB-aligned pages inside ``[ptr, ptr + nbytes)`` for huge pages; returns the bytes marked (0: none,
    e.g. the range is smaller than a huge page or the kernel refused)."""
    fn = _madvise()
    lo, hi = -(-ptr // HUGE) * HUGE, (ptr + nbytes) // HUGE * HUGE
    if fn is None or hi <= lo:
        return 0
    return hi - lo if fn(lo, hi - lo, MADV_HUGEPAGE) == 0 else 0


def empty_tensor(shape, dtype: str, dev):
    """``tvm.runtime.empty`` whose pages are huge where possible (a CPU tensor of at least 2 MiB)."""
    import tvm

    t = tvm.runtime.empty(shape, dtype, dev)
    if dev.dlpack_device_type() == tvm.cpu().dlpack_device_type():
        advise(t.data_ptr(), int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return t


def host_tensor(arr: np.ndarray, dev):
    """``tvm.runtime.tensor(arr, dev)`` with huge pages where possible (marked before the copy touches them)."""
    arr = np.ascontiguousarray(arr)
    t = empty_tensor(arr.shape, str(arr.dtype), dev)
    t.copyfrom(arr)
    return t
