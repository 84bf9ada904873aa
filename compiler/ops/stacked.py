"""Stacked matrices: one ternary matrix whose rows are several matrices of one layer (q|k|v, gate|up), a scale each.

A decode step reads the stacked matrix in one GEMV instead of one per matrix: fewer kernel calls and VM instructions,
and small matrices (GQA's k and v) no longer stream on their own. ``parts`` are the row counts in order; row ``m``
takes the scale of the part it falls in, and every element is computed exactly as by its own matrix's kernel (the
same integer sum, the same float32 rescale). The loops are the plain kernel's, so ``parts`` is not a dimension: the
stacked matrix's workload ``M, K`` keys its tuning records. Used by the CPU (:mod:`compiler.ops.ternary_gemv`,
:mod:`compiler.ops.ternary_gemm`, :mod:`compiler.ops.ternary_gemv_tl`) and GPU (:mod:`compiler.ops.ternary_gpu`)
matmuls; which matrices a build stacks: :func:`compiler.lower.stacked`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from compiler.ops.base import OpShapeError


def check_parts(parts: tuple[int, ...], M: int) -> None:
    if parts and (len(parts) < 2 or sum(parts) != M or min(parts) <= 0):
        raise OpShapeError(f"parts = {parts}: two or more positive row counts summing to M = {M}")


def n_scales(parts: tuple[int, ...]) -> int:
    """The weight scales of a (stacked) matrix: one per part, one without parts."""
    return max(len(parts), 1)


def parts_suffix(parts: tuple[int, ...]) -> str:
    """The kernel-name suffix of a stacked matrix's parts (``_p512x256x256``), empty without parts."""
    return "_p" + "x".join(map(str, parts)) if parts else ""


def te_part_scale(Ws, parts: tuple[int, ...]):
    """``m ↦`` the scale of the stacked matrix that row ``m`` belongs to: ``Ws[j]`` for ``parts[j]``'s rows (one scale,
    ``Ws[0]``, without parts)."""
    import tvm

    if not parts:
        return lambda m: Ws[0]

    def scale(m):
        out, end = Ws[len(parts) - 1], sum(parts)
        for j in range(len(parts) - 2, -1, -1):
            end -= parts[j + 1]
            out = tvm.tirx.Select(m < end, Ws[j], out)
        return out

    return scale


def by_parts(rows: Callable[[int, int, float], np.ndarray], w_scale, parts: tuple[int, ...], M: int) -> np.ndarray:
    """A reference over a stacked matrix: ``rows(start, stop, scale)`` (the outputs of rows ``start:stop``, last axis)
    for each part with its scale, concatenated; without parts, all ``M`` rows with ``w_scale[0]``."""
    if not parts:
        return rows(0, M, float(w_scale[0]))
    ends = np.cumsum(parts)
    return np.concatenate([rows(int(e - n), int(e), float(s)) for n, e, s in zip(parts, ends, w_scale, strict=True)],
                          axis=-1)  # fmt: skip
