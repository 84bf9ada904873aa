"""Safe callable wrappers around compiled kernels: a caller can never crash the process.

TVM kernels assume 64-byte-aligned, C-contiguous data and check nothing about alignment (docs/tvm.md, "64-byte
alignment": a 16-byte-aligned numpy array segfaults). :class:`Kernel` therefore

* rejects wrong argument counts, types, dtypes and shapes with a :class:`KernelArgError` naming the argument — no
  silent casts (an int64 ``x_sum`` from ``torch.sum`` is a bug in the caller, not something to paper over);
* copies misaligned, non-contiguous (strided views, negative strides) or read-only inputs into fresh 64-byte-aligned
  buffers, and counts the copies (``kernel.copies``) so a hot loop can notice it pays for them;
* allocates aligned outputs itself; ``out=`` arrays are validated the same way and filled (through an aligned temporary
  if they are misaligned).

Accepts numpy arrays and CPU torch tensors (zero-copy through numpy), returns numpy arrays.

Built and wrapped in one call by :func:`compiler.schedule.get_kernel` (tests/test_kernels_safety.py calls one with
misaligned views).
"""

from __future__ import annotations

import numpy as np

from targets.cpu import check_flags

ALIGN = 64


class KernelArgError(ValueError):
    """A kernel argument has the wrong type, dtype or shape."""


def aligned_empty(shape, dtype, align: int = ALIGN) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is a multiple of ``align``."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray, align: int = ALIGN) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


def is_aligned(a: np.ndarray, align: int = ALIGN) -> bool:
    return a.ctypes.data % align == 0


def needs_copy(a: np.ndarray) -> bool:
    return not (a.flags.c_contiguous and a.flags.writeable and is_aligned(a))


def _as_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    mod = type(value).__module__
    if mod.startswith("torch"):
        if value.device.type != "cpu":
            raise KernelArgError(f"{name}: expected a CPU tensor, got one on {value.device}")
        return value.detach().resolve_conj().numpy()
    raise KernelArgError(f"{name}: expected a numpy array or a CPU torch tensor, got {type(value).__name__}")


class Kernel:
    """``Kernel(op, executable)(*inputs, out=None) -> [outputs]`` with full argument checking (see module doc)."""

    def __init__(self, op, executable, entry: str = "main", cpu_flags=None):
        """``cpu_flags``: the flags the executable's code needs beyond its target's; None means the op's scheduled
        kernels' (``op.cpu_flags``, e.g. VBMI), ``()`` an executable built from the naive TE, which needs none."""
        needs = getattr(op, "cpu_flags", ()) if cpu_flags is None else cpu_flags
        check_flags(needs, f"{op.key}'s kernel")  # a missing one would SIGILL, not raise
        self.op = op
        mod = getattr(executable, "mod", executable)  # tvm.runtime.Executable or runtime.Module
        self.module = mod
        self.func = mod[entry]
        self.ins = op.inputs()
        self.outs = op.outputs()
        self.copies = 0

    def _check(self, value, spec, role: str) -> np.ndarray:
        a = _as_numpy(value, f"{role} {spec.name!r}")
        if a.dtype != np.dtype(spec.dtype):
            raise KernelArgError(f"{self.op.key}: {role} {spec.name!r} must have dtype {spec.dtype}, got {a.dtype}")
        if tuple(a.shape) != tuple(spec.shape):
            raise KernelArgError(
                f"{self.op.key}: {role} {spec.name!r} must have shape {tuple(spec.shape)}, got {tuple(a.shape)}"
            )
        return a

    def __call__(self, *inputs, out=None) -> list[np.ndarray]:
        if len(inputs) != len(self.ins):
            names = ", ".join(a.name for a in self.ins)
            raise KernelArgError(f"{self.op.key}: expected {len(self.ins)} inputs ({names}), got {len(inputs)}")
        args = []
        for value, spec in zip(inputs, self.ins, strict=True):
            a = self._check(value, spec, "input")
            if needs_copy(a):
                a = aligned_copy(a)
                self.copies += 1
            args.append(a)
        if out is not None:
            out = list(out) if isinstance(out, list | tuple) else [out]
            if len(out) != len(self.outs):
                raise KernelArgError(f"{self.op.key}: expected {len(self.outs)} output arrays, got {len(out)}")
            out = [self._check(o, s, "output") for o, s in zip(out, self.outs, strict=True)]
        results = [aligned_empty(s.shape, s.dtype) for s in self.outs]
        self.func(*args, *results)
        if out is None:
            return results
        for o, r in zip(out, results, strict=True):
            o[...] = r
        return out
