"""Ternary formats: the numbers every room of the project agrees on.

This package is numpy-only (no torch, no TVM) so the runtime, the compiler and the tests can all use it.

Maths (BitNet b1.58)
--------------------
* Weights, per tensor: ``s = max(mean|W|, 1e-5)`` rounded to the nearest float16 (so that the TQ2_0 block scale
  stores it exactly), codes ``q = clip(round(W / s), -1, 1)`` (round half to even, as torch does), and ``W ≈ s·q``.
  See :func:`quant.quantize_weights`.
* Activations, per token (row): ``a = 127 / max(max|x|, 1e-5)``, ``x_q = clip(round(x·a), -127, 127)`` as int8, and
  ``x ≈ x_q / a``. The int32 sum ``Σ x_q`` is returned with it. See :func:`quant.quantize_activations`.
* Storage codes are ``c = q + 1 ∈ {0, 1, 2}`` (2 bits each), so the integer dot product is computed on codes and
  corrected by the activation sum: ``Σ q·x_q = Σ c·x_q − Σ x_q``. The float result is ``acc · (s / a)`` with the
  ratio ``s / a`` taken in float32 first.

Formats
-------
* GGUF (:mod:`.ggml`): the standard ggml types TQ2_0 (type 35, 66 bytes per 256 weights) and TQ1_0 (type 34,
  54 bytes per 256 weights), bit-identical to ``gguf.quants.quantize``. Input dimension K must be a multiple of 256.
* Kernel layouts (:mod:`.layouts`): what the compiled kernels read. ``rowmajor4``: ``uint8[M, K/4]`` with
  ``code(m, k) = (W[m, k // 4] >> 2·(k % 4)) & 3``; ``tile{R}``, ``tl{R}`` and ``dp4a``, all listed in
  ``layouts.LAYOUTS``.

Reference
---------
:mod:`.reference` holds the truth every kernel is tested against: a numpy implementation and a plain-loop C++
implementation (``model.ternary._scalar_ref``, built by pybind11 at install) of the ternary GEMV/GEMM for float32 and
int8 activations. They agree bit-exactly on the integer path.
"""

from model.ternary.quant import (
    ACT_QMAX,
    SCALE_EPS,
    ActQuant,
    TernaryWeights,
    quantize_activations,
    quantize_weights,
)

__all__ = [
    "ACT_QMAX",
    "SCALE_EPS",
    "ActQuant",
    "TernaryWeights",
    "quantize_activations",
    "quantize_weights",
]
