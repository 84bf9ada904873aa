"""Helpers shared by tests: ternary test-data strategies and the repo root.

Import as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent


# --- hypothesis strategies for ternary data ------------------------------------------------------------------------

ks = st.sampled_from([256, 512, 768, 1024, 2048])  # input dims: multiples of the 256-weight block
ms = st.integers(min_value=1, max_value=67)  # output dims: any (odd sizes catch tail bugs)
ns = st.integers(min_value=1, max_value=4)  # tokens
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def random_codes(rng: np.random.Generator, m: int, k: int, p_zero: float | None = None) -> np.ndarray:
    """int8 ternary codes; ``p_zero`` sets the fraction of zeros (random when None)."""
    p0 = rng.uniform(0.0, 1.0) if p_zero is None else p_zero
    p = [(1 - p0) / 2, p0, (1 - p0) / 2]
    return rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(m, k), p=p)


def random_int8(rng: np.random.Generator, shape, full_range: bool = True) -> np.ndarray:
    """int8 activations; ``full_range`` adds -128, which kernels may be handed though the quantizer never emits it."""
    lo = -128 if full_range else -127
    return rng.integers(lo, 128, size=shape, dtype=np.int8)
