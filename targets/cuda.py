"""Loading TVM's CUDA runtime library (no TVM compiler needed): what the engine and the GPU-host tools call first.

python -c "import targets; print(targets.load_cuda_runtime().cuda(0).exist)"
"""

from __future__ import annotations

from pathlib import Path


def load_cuda_runtime():
    """Make TVM's runtime able to run CUDA modules: load ``libtvm_runtime_cuda.so`` (torch, if installed, is imported
    first: its wheels carry the ``libcudart`` that library links against). Returns ``tvm``."""
    import ctypes

    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    import tvm

    if not tvm.runtime.enabled("cuda"):
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
        raise RuntimeError("no CUDA device visible to TVM's runtime")
    return tvm
