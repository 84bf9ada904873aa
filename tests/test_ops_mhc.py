"""Fused mHC-lite site op (post+mix, next pre-aggregate, Σu²; expand/collapse folded) vs the float64 reference.

Tolerances are the float32 error bounds of :meth:`MhcPost.tolerances`; the collapse variant is checked against
``model.mhc`` semantics (mean of the streams) and the in-place call (X' aliasing X) against the out-of-place one.

    pytest tests/test_ops_mhc.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import X86

from compiler.kernels import Kernel, aligned_copy
from compiler.ops import OpShapeError, make_op
from compiler.schedule import build, schedule_module

pytestmark = pytest.mark.build

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(op, outs, ins):
    for o, r, tol in zip(outs, op.reference(*ins), op.tolerances(*ins), strict=True):
        np.testing.assert_allclose(o, r, rtol=0, atol=tol)


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(S=st.sampled_from([1, 2, 4]), dk=st.integers(1, 8), first=st.integers(0, 1), last=st.integers(0, 1),
       seed=st.integers(0, 2**16), data=st.data())  # fmt: skip
def test_mhc_post_matches_reference(target, S, dk, first, last, seed, data):
    op = make_op("mhc_post", D=256 * dk, S=S, first=first, last=last)
    knobs = {k.name: data.draw(st.sampled_from(k.candidates)) for k in schedule_module(target).space(op)}
    ins = op.random_inputs(np.random.default_rng(seed))
    check(op, Kernel(op, build(op, target, knobs=knobs))(*ins), ins)


def test_zero_update_conserves_stream_sum():
    """With y = 0 and a doubly stochastic H_res, Σ_s X'[s] = Σ_s X[s] (docs/mhc.md invariant)."""
    op = make_op("mhc_post", D=512, S=4)
    X, _y, H, hp, hpre = op.random_inputs(np.random.default_rng(1))
    H = np.full((4, 4), 0.25, np.float32)
    Xp = Kernel(op, build(op, "auto", mode="hand"))(X, np.zeros(512, np.float32), H, hp, hpre)[0]
    np.testing.assert_allclose(Xp.sum(axis=0), X.sum(axis=0), rtol=1e-6, atol=1e-5)


def test_collapse_is_stream_mean():
    torch = pytest.importorskip("torch")
    from model.mhc import apply_update, collapse

    op = make_op("mhc_post", D=512, S=2, last=1)
    X, y, H, hp = op.random_inputs(np.random.default_rng(2))
    u, ss = Kernel(op, build(op, "auto", mode="hand"))(X, y, H, hp)
    ref = collapse(apply_update(*(torch.from_numpy(a) for a in (X, y, H, hp)))).numpy()
    np.testing.assert_allclose(u, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ss[0], float((ref.astype(np.float64) ** 2).sum()), rtol=1e-5)


def test_expand_equals_replicated_streams():
    a, b = make_op("mhc_post", D=256, S=4, first=1), make_op("mhc_post", D=256, S=4)
    x, y, H, hp, hpre = a.random_inputs(np.random.default_rng(3))
    out_a = Kernel(a, build(a, "auto", mode="hand"))(x, y, H, hp, hpre)
    out_b = Kernel(b, build(b, "auto", mode="hand"))(np.tile(x, (4, 1)), y, H, hp, hpre)
    for p, q in zip(out_a, out_b, strict=True):
        np.testing.assert_array_equal(p, q)


def test_in_place_update():
    """X' may alias X: every column is read before it is written."""
    op = make_op("mhc_post", D=1024, S=4)
    ins = op.random_inputs(np.random.default_rng(4))
    ex = build(op, "auto", mode="hand")
    expected = Kernel(op, ex)(*ins)
    X = aligned_copy(ins[0])
    u, ss = np.zeros(1024, np.float32), np.zeros(1, np.float32)
    args = [X, *[aligned_copy(a) for a in ins[1:]], X, aligned_copy(u), aligned_copy(ss)]
    ex.mod["main"](*args)
    np.testing.assert_array_equal(X, expected[0])
    np.testing.assert_array_equal(args[-2], expected[1])


def test_rejects_bad_stream_count():
    with pytest.raises(OpShapeError, match="1, 2 or 4"):
        make_op("mhc_post", D=256, S=3)
