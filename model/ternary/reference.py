"""Reference ternary GEMV/GEMM: the truth that every compiled kernel is tested against.

Two implementations of the same maths, selected by ``impl``:

* ``"numpy"``  — vectorised numpy (unpack the codes, integer/float64 matmul);
* ``"scalar"`` — plain C++ loops through pybind11 (``model.ternary._scalar_ref``, compiled at install).

Weights are in the ``rowmajor4`` kernel layout (``uint8[M, K/4]``, see :mod:`model.ternary.layouts`). Activations are
one token ``[K]`` (GEMV) or several ``[N, K]`` (GEMM); the output has the matching rank.

* float32 activations: ``y = float32(Σ_k (c − 1)·x_k) · w_scale`` with the sum in float64.
* int8 activations: ``acc = Σ_k c·x_k − Σ_k x_k`` (int32, exact) and ``y = float32(acc) · float32(w_scale / x_scale)``.
  The two implementations agree bit for bit on ``acc`` and ``y``.

    python -c "from model.ternary.reference import scalar_available; print(scalar_available())"
"""

from __future__ import annotations

import numpy as np

from model.ternary.checks import TernaryFormatError, as_array, check_k, check_scale
from model.ternary.layouts import unpack_rowmajor4

K_MAX = 1 << 22  # keeps every int32 partial sum of Σ c·x (|c| ≤ 2, |x| ≤ 128) exact

try:
    from model.ternary import _scalar_ref
except ImportError as exc:  # the extension is built by `pip install -e .`
    _scalar_ref = None
    _IMPORT_ERROR = exc


def scalar_available() -> bool:
    return _scalar_ref is not None


def _scalar():
    if _scalar_ref is None:
        raise RuntimeError(
            f"the C++ scalar reference is not built ({_IMPORT_ERROR}); run `pip install -e .` from the repo root"
        )
    return _scalar_ref


def _check_common(w: np.ndarray, x: np.ndarray, x_name: str, x_dtype) -> tuple[np.ndarray, np.ndarray, bool]:
    w = as_array(w, "W", np.uint8, (2,))
    x = as_array(x, x_name, x_dtype, (1, 2))
    k = x.shape[-1]
    check_k(k, f"K (the last dim of {x_name})")
    if k > K_MAX:
        raise TernaryFormatError(f"K = {k} exceeds {K_MAX}, beyond which int32 accumulation could overflow")
    if w.shape[1] * 4 != k:
        raise TernaryFormatError(f"W is [{w.shape[0]}, {w.shape[1]}] (K = {w.shape[1] * 4}) but {x_name} has K = {k}")
    return w, x.reshape(-1, k), x.ndim == 1


def _check_impl(impl: str) -> None:
    if impl not in ("numpy", "scalar"):
        raise ValueError(f"impl must be 'numpy' or 'scalar', got {impl!r}")


def ternary_matmul_f32(w: np.ndarray, x: np.ndarray, w_scale: float, impl: str = "numpy") -> np.ndarray:
    """``y[N, M] = (W · xᵀ)ᵀ · w_scale`` for float32 activations ``x`` of shape ``[K]`` or ``[N, K]``."""
    _check_impl(impl)
    w, x2, vec = _check_common(w, x, "x", np.float32)
    s = check_scale(w_scale, "w_scale")
    if impl == "scalar":
        y = _scalar().gemm_f32(w, x2, float(s))
    else:
        codes = unpack_rowmajor4(w, x2.shape[1]).astype(np.float64)
        y = (x2.astype(np.float64) @ codes.T).astype(np.float32) * s
    return y[0] if vec else y


def ternary_matmul_i8(
    w: np.ndarray, xq: np.ndarray, x_scale, w_scale: float, impl: str = "numpy"
) -> tuple[np.ndarray, np.ndarray]:
    """int8 activations ``xq`` (``[K]`` or ``[N, K]``, scales ``x_scale`` per token) → (acc int32, y float32)."""
    _check_impl(impl)
    w, x2, vec = _check_common(w, xq, "xq", np.int8)
    s = check_scale(w_scale, "w_scale")
    xs = np.atleast_1d(np.asarray(x_scale))
    if xs.dtype != np.float32:
        raise TypeError(f"x_scale: expected dtype float32, got {xs.dtype.name}")
    if xs.shape != (x2.shape[0],):
        raise TernaryFormatError(f"x_scale: expected shape ({x2.shape[0]},) (one per token), got {xs.shape}")
    for v in xs:
        check_scale(v, "x_scale")
    if impl == "scalar":
        acc, y = _scalar().gemm_i8(w, x2, np.ascontiguousarray(xs), float(s))
    else:
        codes = unpack_rowmajor4(w, x2.shape[1]).astype(np.int32) + 1  # back to storage codes {0, 1, 2}
        xi = x2.astype(np.int32)
        acc = (xi @ codes.T - xi.sum(axis=1, keepdims=True)).astype(np.int32)
        ratio = (s / xs).astype(np.float32)
        y = acc.astype(np.float32) * ratio[:, None]
    return (acc[0], y[0]) if vec else (acc, y)
