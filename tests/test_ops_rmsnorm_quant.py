"""Fused RMSNorm + int8 quantize == numpy RMSNorm then ``model.ternary.quant.quantize_activations``.

Bit-exact (q, scale, Σq) when ``Σx²`` is exact in float32 — inputs on a coarse dyadic grid, so every square and partial
sum is exact whatever the summation order — which pins the rounding mode (half to even) and the clip. On general
inputs: scale within 8 ulps, at most a handful of q off by one (half-integer ties decided by rounding error), Σq
always equal to Σ of the returned q.

    pytest tests/test_ops_rmsnorm_quant.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import X86

from compiler.kernels import Kernel
from compiler.ops import make_op
from compiler.ops.rmsnorm_quant import rmsnorm_numpy
from compiler.schedule import build, schedule_module
from model.ternary.quant import quantize_activations

pytestmark = pytest.mark.build

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact_inputs(rng, n, d):
    """x on the grid k/8, |k| ≤ 64: Σx² ≤ 64·d stays an exact float32 sum in any order (d ≤ 4096)."""
    return (rng.integers(-64, 65, (n, d)) / 8).astype(np.float32), np.ones(d, np.float32)


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(n=st.integers(1, 3), dk=st.integers(1, 6), seed=st.integers(0, 2**16), data=st.data())
def test_bit_exact_on_exact_sums(target, n, dk, seed, data):
    op = make_op("rmsnorm_quant", D=128 * dk, N=n)
    knobs = {k.name: data.draw(st.sampled_from(k.candidates)) for k in schedule_module(target).space(op)}
    x, w = exact_inputs(np.random.default_rng(seed), n, op.D)
    q, scale, qsum = Kernel(op, build(op, target, knobs=knobs))(x, w)
    ref = quantize_activations(rmsnorm_numpy(x, w))
    np.testing.assert_array_equal(q, ref.q)
    np.testing.assert_array_equal(scale, ref.scale)
    np.testing.assert_array_equal(qsum, ref.total)


@pytest.mark.parametrize("target", X86)
def test_general_inputs_within_bounds(target):
    op = make_op("rmsnorm_quant", D=1024, N=4)
    x, w = op.random_inputs(np.random.default_rng(7))
    q, scale, qsum = Kernel(op, build(op, target, mode="hand"))(x, w)
    ref = quantize_activations(rmsnorm_numpy(x, w))
    np.testing.assert_allclose(scale, ref.scale, rtol=8 * 2.0**-23, atol=0)
    diff = np.abs(q.astype(np.int32) - ref.q)
    assert diff.max() <= 1 and (diff > 0).sum() <= 4
    np.testing.assert_array_equal(qsum, q.astype(np.int32).sum(axis=1))
    assert np.abs(q.astype(np.int32)).max() == 127  # absmax lands on ±127


def test_round_half_to_even():
    """h·scale exactly at ±0.5, ±1.5, ±2.5: numpy/torch give 0, 2, 2 (half to even), never 1, 2, 3."""
    op = make_op("rmsnorm_quant", D=256)
    x = np.zeros((1, 256), np.float32)
    x[0, :7] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]  # amax 127 → scale 1 up to the RMS factor, cancelled by weight
    h_inv = rmsnorm_numpy(x, np.ones(256, np.float32))[0, 0] / np.float32(127)
    w = np.full(256, np.float32(1) / h_inv, np.float32)
    h = rmsnorm_numpy(x, w)
    if not np.array_equal(h[0, :7] * quantize_activations(h).scale[0], x[0, :7]):
        pytest.skip("the RMS factor did not cancel exactly on this platform")
    q = Kernel(op, build(op, "auto", mode="hand"))(x, w)[0]
    np.testing.assert_array_equal(q[0, :7], [127, 0, 2, 2, 0, -2, -2])
    np.testing.assert_array_equal(q, quantize_activations(h).q)


def test_zero_token_quantizes_to_zeros():
    op = make_op("rmsnorm_quant", D=256, N=2)
    x = np.zeros((2, 256), np.float32)
    x[1] = 1.0
    q, scale, qsum = Kernel(op, build(op, "auto", mode="hand"))(x, np.ones(256, np.float32))
    assert not q[0].any() and qsum[0] == 0 and np.isfinite(scale).all()
    np.testing.assert_array_equal(q[1], np.full(256, 127, np.int8))
