"""Operator units (TE compute + numpy reference + cost), one module per operator; :func:`make_op` builds one.

python -c "from compiler.ops import OPS; print(sorted(OPS))"
"""

from __future__ import annotations

from compiler.ops.base import Arg, Op, OpShapeError
from compiler.ops.mhc import MhcPost
from compiler.ops.rmsnorm_quant import RmsNormQuant
from compiler.ops.ternary_gemm import TernaryGemmI8
from compiler.ops.ternary_gemm_amx import TernaryGemmI8AMX
from compiler.ops.ternary_gemm_tl import TernaryGemmI8TL
from compiler.ops.ternary_gemv import TernaryGemvF32, TernaryGemvI8
from compiler.ops.ternary_gemv_tl import TernaryGemvI8TL
from compiler.ops.ternary_gpu import TernaryGemmDp4a, TernaryGemvDp4a, TernaryGemvF32Dp4a

OPS: dict[str, type[Op]] = {
    cls.kind: cls
    for cls in (
        TernaryGemvI8,
        TernaryGemvF32,
        TernaryGemmI8,
        RmsNormQuant,
        MhcPost,
        TernaryGemvDp4a,
        TernaryGemmDp4a,
        TernaryGemvF32Dp4a,
        TernaryGemvI8TL,
        TernaryGemmI8TL,
        TernaryGemmI8AMX,
    )
}


def register(cls: type[Op]) -> type[Op]:
    OPS[cls.kind] = cls
    return cls


def make_op(kind: str, **dims) -> Op:
    """``make_op("gemv_i8", M=4096, K=4096)`` (and any non-dimension field, e.g. ``rmsnorm_quant``'s ``eps``)."""
    if kind not in OPS:
        raise KeyError(f"unknown op kind {kind!r}; known: {sorted(OPS)}")
    return OPS[kind](**dims)


def parse_key(key: str) -> Op:
    """Inverse of :attr:`Op.key`: ``"gemv_i8:M=4096:K=4096"`` → the op."""
    kind, *parts = key.split(":")
    try:
        dims = {p.split("=")[0]: int(p.split("=")[1]) for p in parts}
    except (IndexError, ValueError):
        raise ValueError(f"malformed op key {key!r}; expected kind:DIM=int:...") from None
    return make_op(kind, **dims)


__all__ = ["OPS", "Arg", "Op", "OpShapeError", "make_op", "parse_key", "register"]
