"""Kernel weight layouts: how the compiled kernels want ternary codes laid out, and the repack from GGUF into them.

The GGUF file stays the portable artifact (TQ2_0/TQ1_0); the compiler repacks each tensor into the layout of the
kernel that will read it, once, at build time. :data:`LAYOUTS` is the one registry of every layout, listed here
statically (no layout registers itself by being imported): each a :class:`Layout` with a ``pack`` (int8 codes
``[M, K]`` in {-1,0,+1} → packed array) and an exact inverse ``unpack``. All numpy-only:

* ``rowmajor4`` (:mod:`.rowmajor4`, the plain layout of the TVM kernels): ``uint8[M, K/4]``, four 2-bit codes
  ``c = q + 1`` per byte, ``code(m, k) = (W[m, k // 4] >> 2·(k % 4)) & 3``;
* ``tile4``, ``tile8``, ``tile16`` (:mod:`.layouts_x86`): row tiles of ``rowmajor4``, one linear stream per tile;
* ``tl1``, ``tl2``, ``tl4``, ``tl8`` (:mod:`.layouts_tl`): 1.67 bits a weight for the table-lookup GEMV;
* ``dp4a`` (:mod:`.layouts_gpu`): 16 codes per int32 word for CUDA's ``__dp4a``.

    python -c "from model.ternary.layouts import LAYOUTS; print(list(LAYOUTS))"
"""

from __future__ import annotations

import numpy as np

from model.ternary import ggml, layouts_gpu, layouts_tl, layouts_x86
from model.ternary.checks import TernaryFormatError
from model.ternary.quant import TernaryWeights
from model.ternary.rowmajor4 import ROWMAJOR4, Layout, _check_codes, pack_rowmajor4, unpack_rowmajor4

LAYOUTS: dict[str, Layout] = {
    lay.name: lay for lay in (ROWMAJOR4, *layouts_x86.TILE_LAYOUTS, *layouts_tl.TL_LAYOUTS, layouts_gpu.DP4A)
}
__all__ = ["LAYOUTS", "Layout", "_check_codes", "get_layout", "pack_rowmajor4", "pack_weights", "repack_gguf",
           "unpack_rowmajor4"]  # fmt: skip


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise TernaryFormatError(f"unknown kernel layout {name!r}; known: {sorted(LAYOUTS)}") from None


def repack_gguf(
    raw: np.ndarray, k: int, qtype: ggml.TernaryType = ggml.TernaryType.TQ2_0, layout: str = "rowmajor4"
) -> tuple[np.ndarray, np.float32]:
    """A GGUF ternary tensor ``[M, K/256·block]`` → (weights in ``layout``, the per-tensor float32 scale)."""
    codes, block_scales = ggml.unpack(raw, k, qtype)
    tw = ggml.to_ternary(codes, block_scales)
    return get_layout(layout).pack(tw.codes), tw.scale


def pack_weights(weights: TernaryWeights, layout: str = "rowmajor4") -> np.ndarray:
    """Ternary weights straight into a kernel layout (no GGUF round trip)."""
    return get_layout(layout).pack(weights.codes)
