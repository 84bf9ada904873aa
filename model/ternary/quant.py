"""BitNet b1.58 quantizers: absmean ternary weights and int8 per-token absmax activations (numpy).

The model's ``BitLinear`` (torch) must implement exactly these maths; tests compare the two.

    >>> import numpy as np
    >>> w = quantize_weights(np.random.randn(8, 256).astype(np.float32))
    >>> sorted(set(w.codes.ravel().tolist())) <= [-1, 0, 1]
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.ternary.checks import TernaryFormatError, as_array, check_finite

SCALE_EPS = 1e-5  # floor for both scales: an all-zero tensor/token quantizes to zeros, not to NaN
ACT_QMAX = 127  # int8 activations use the symmetric range [-127, 127]
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class TernaryWeights:
    """A ternary matrix: ``W ≈ scale · codes`` with ``codes ∈ {-1, 0, +1}`` (int8) and one float32 scale; or a stack
    of experts' matrices (MoE): ``codes [E, M, K]`` with one scale per expert, ``scale float32[E]``.

    ``scale`` is exactly representable in float16, the dtype of the TQ2_0/TQ1_0 block scale.
    """

    codes: np.ndarray  # int8 [M, K] (or [E, M, K]: stacked experts)
    scale: np.float32  # (or float32[E])

    @property
    def stacked(self) -> bool:
        return np.ndim(self.scale) == 1

    @classmethod
    def stack(cls, experts: list[TernaryWeights]) -> TernaryWeights:
        """The experts' matrices (all ``[M, K]``) as one ``[E, M, K]`` tensor with a scale each."""
        return cls(codes=np.stack([e.codes for e in experts]), scale=np.array([e.scale for e in experts], np.float32))

    def expert(self, e: int) -> TernaryWeights:
        """Expert ``e``'s matrix of a stack."""
        return TernaryWeights(codes=self.codes[e], scale=np.float32(self.scale[e]))

    def dequantize(self) -> np.ndarray:
        scale = np.asarray(self.scale, np.float32)
        return self.codes.astype(np.float32) * (scale[:, None, None] if self.stacked else scale)


@dataclass(frozen=True)
class ActQuant:
    """int8 activations per token: ``x ≈ q / scale``; ``total`` = ``Σ q`` per token (int32) for the code correction."""

    q: np.ndarray  # int8 [..., K]
    scale: np.ndarray  # float32 [...], one per token
    total: np.ndarray  # int32 [...], one per token

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) / self.scale[..., None]


def absmean_scale(w: np.ndarray) -> np.float32:
    """``max(mean|W|, 1e-5)`` rounded to float16 precision (returned as float32)."""
    mean = np.float32(np.abs(w, dtype=np.float32).mean(dtype=np.float64))
    with np.errstate(over="ignore"):
        s = np.float16(max(mean, np.float32(SCALE_EPS)))
    if not np.isfinite(s):
        raise TernaryFormatError(f"mean|W| = {mean:.6g} overflows the float16 block scale (max {FP16_MAX})")
    return np.float32(s)


def quantize_weights(w: np.ndarray) -> TernaryWeights:
    """BitNet b1.58 weight quantization of a float32 ``[M, K]`` (or any-rank) array: absmean scale, round, clip."""
    w = as_array(w, "W", np.float32, (1, 2, 3))
    check_finite(w, "W")
    s = absmean_scale(w)
    codes = np.clip(np.round(w / s), -1, 1).astype(np.int8)
    return TernaryWeights(codes=codes, scale=s)


def quantize_activations(x: np.ndarray) -> ActQuant:
    """int8 per-token absmax quantization of float32 activations ``[..., K]`` (the last axis is one token)."""
    x = as_array(x, "x", np.float32, (1, 2, 3))
    check_finite(x, "x")
    amax = np.maximum(np.abs(x).max(axis=-1), np.float32(SCALE_EPS))
    scale = (np.float32(ACT_QMAX) / amax).astype(np.float32)
    q = np.clip(np.round(x * scale[..., None]), -ACT_QMAX, ACT_QMAX).astype(np.int8)
    total = q.sum(axis=-1, dtype=np.int32)
    return ActQuant(q=q, scale=scale, total=total)
