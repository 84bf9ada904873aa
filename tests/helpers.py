"""Helpers shared by tests: ternary test-data strategies, CPU-feature skips, the repo root.

Import as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def require_isa(*flags: str):
    """Decorator: skip (with the reason) unless the CPU has every flag, e.g. ``require_isa("avx512_vnni")``."""
    missing = [f for f in flags if f not in cpu_flags()]
    return pytest.mark.skipif(bool(missing), reason=f"CPU lacks {', '.join(missing)}")


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
