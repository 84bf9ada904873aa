"""Facts that tuning (:mod:`compiler.tune`) and lowering (:mod:`compiler.lower`) must agree on, kept here only.

A prefill chunk is the number of tokens one ``prefill`` call takes; the prefill GEMM is tuned for exactly that ``N``,
so the tuned records are found only while both sides read the same figure. ``model.config.PREFILL_TOKENS`` (the
attention scratch's bound, in the model layer that cannot import this) is at least the largest of them
(``tests/test_lower.py`` holds it).
"""

from __future__ import annotations

CPU_PREFILL_CHUNK = 8  # CPU builds: the N of the tuned gemm_i8 (tile8 weights) and gemm_i8_tl (tl)
CUDA_PREFILL_CHUNK = 16  # CUDA builds: the N of the tuned gemm_dp4a
CPU_BATCH_SIZES = (1, 2, 4, 8, 16)  # CPU builds: decode_b{B} functions (a batch runs in the smallest that holds it)
CUDA_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # CUDA builds: the same, to 64 sequences per step
CHAIN_RING = 64  # chain_b1: the tokens its ring holds, the most one burst of steps may run before the host reads it
KV_BLOCK = 16  # tokens per KV-cache block (the paged cache's unit of allocation, as vLLM's default)
