"""Compile real CUDA binaries (cubin/fatbin inside the exported ``.so``) on a machine with nvcc but no GPU.

TVM compiles CUDA kernels to device code only when its CUDA runtime library (``libtvm_runtime_cuda.so``) is loaded,
and that library needs ``libcuda.so.1`` — the driver, absent on a build machine. Without it TVM silently embeds
CUDA *source* in the module, which a GPU host can load only with TVM's whole compiler. :func:`enable` builds a stub
``libcuda.so.1`` (every entry point answers ``CUDA_ERROR_NO_DEVICE``; ``stub_libcuda.c``), loads it, the CUDA
runtime and TVM's CUDA runtime library into the process, and selects nvcc with the toolkit's real root; after that
``tvm.compile`` for a ``cuda`` target produces a device ELF, and the module loads on the GPU host with TVM's runtime
alone. On a machine with a real driver it only selects nvcc. nvcc runs without ``--use_fast_math`` (TVM's default
adds it), so float epilogues round as on the CPU and the integer kernels stay bit-exact with the reference.

    python -m compiler.cuda_cross            # enables it and prints what it found
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUB_SRC = HERE / "cuda" / "stub_libcuda.c"
CACHE = Path(os.environ.get("TERNARY_CACHE", Path.home() / ".cache" / "ternary"))


class CudaUnavailable(RuntimeError):
    """No CUDA toolkit here (nvcc / libcudart), so no CUDA binary can be built."""


def cuda_root() -> Path:
    """The CUDA toolkit root: ``$CUDA_PATH``, else nvcc's real location (``/usr/local/bin/nvcc`` may be a wrapper)."""
    env = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME")
    cands = [Path(env)] if env else []
    cands += [Path("/usr/local/cuda")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent)
    for c in cands:
        if (c / "bin" / "nvcc").exists() and (c / "include" / "cuda_runtime.h").exists():
            return c
    raise CudaUnavailable(f"no CUDA toolkit found (tried {[str(c) for c in cands]}); set CUDA_PATH")


def _cudart(root: Path) -> Path:
    libs = sorted((root / "lib64").glob("libcudart.so.*")) or sorted((root / "lib").glob("libcudart.so.*"))
    if not libs:
        raise CudaUnavailable(f"no libcudart.so.* under {root}")
    return libs[-1]


def stub_path() -> Path:
    """Build (once) and return the stub ``libcuda.so.1``."""
    out = CACHE / "cuda_stub" / "libcuda.so.1"
    if not out.exists() or out.stat().st_mtime < STUB_SRC.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        cmd = ["gcc", "-shared", "-fPIC", "-O1", "-o", str(tmp), "-Wl,-soname,libcuda.so.1", str(STUB_SRC)]
        subprocess.run(cmd, check=True, capture_output=True)
        tmp.replace(out)
    return out


def has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


STUBBED: list[bool] = []  # non-empty once the stub stands in for the driver in this process


@functools.cache
def enable() -> Path:
    """Make this process's TVM compile CUDA to device code; returns the toolkit root. Idempotent."""
    import tvm

    root = cuda_root()
    os.environ.setdefault("CUDA_PATH", str(root))
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    # TVM passes --use_fast_math to nvcc by default: its approximate division breaks the kernels' bit-exact float
    # epilogue (y = float(acc) · (w_scale / x_scale)), seen on an H200 as 1-ulp differences for some scales
    os.environ.setdefault("TVM_CUDA_NVCC_NO_FAST_MATH", "1")
    if not tvm.runtime.enabled("cuda"):
        ctypes.CDLL(str(_cudart(root)), mode=ctypes.RTLD_GLOBAL)
        if not has_driver():
            ctypes.CDLL(str(stub_path()), mode=ctypes.RTLD_GLOBAL)
            STUBBED.append(True)
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    if not tvm.runtime.enabled("cuda"):
        raise CudaUnavailable("TVM's CUDA runtime did not register after loading libtvm_runtime_cuda.so")
    return root


def available() -> bool:
    try:
        cuda_root()
        return True
    except CudaUnavailable:
        return False


if __name__ == "__main__":
    print("CUDA toolkit:", enable(), "| stub libcuda:", stub_path() if STUBBED else "no (a real driver is here)")
