"""Facts that tuning (:mod:`compiler.tune`) and lowering (:mod:`compiler.lower`) must agree on, kept here only.

A prefill chunk is the number of tokens one ``prefill`` call takes; the prefill GEMM is tuned for exactly that ``N``,
so the tuned records are found only while both sides read the same figure. ``model.config.PREFILL_TOKENS`` (the
attention scratch's bound, in the model layer that cannot import this) is at least the largest of them
(``tests/test_lower.py`` holds it).
"""

from __future__ import annotations

CPU_PREFILL_CHUNK = 8  # CPU builds: the N of the tuned gemm_i8 tile (tile8 weights; tl runs its GEMV per token)
CUDA_PREFILL_CHUNK = 16  # CUDA builds: the N of the tuned gemm_dp4a
