"""Shared helpers of the kernel tests (tests/test_ops_*.py, test_kernels_safety.py, test_tune.py)."""

from __future__ import annotations

import pytest

import targets


def x86_params():
    """The x86 targets as pytest params, skipped (with the missing CPU flags) where this machine cannot run them."""
    return [
        pytest.param(t, marks=pytest.mark.skipif(not targets.supported(t), reason=f"lacks {targets.missing_flags(t)}"))
        for t in ("avx512", "avx2")
    ]


X86 = x86_params()
