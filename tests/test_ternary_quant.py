"""BitNet b1.58 quantizers (model/ternary/quant.py): absmean ternary weights and int8 per-token activations."""

import numpy as np
import pytest
from helpers import seeds
from hypothesis import given
from hypothesis import strategies as st

from model.ternary import ACT_QMAX, SCALE_EPS, quantize_activations, quantize_weights
from model.ternary.checks import TernaryFormatError

pytestmark = pytest.mark.unit

scales = st.floats(min_value=1e-3, max_value=1e3)


@given(seeds, scales)
def test_weights_are_ternary_with_fp16_absmean_scale(seed, sigma):
    w = (np.random.default_rng(seed).standard_normal((5, 256)) * sigma).astype(np.float32)
    tw = quantize_weights(w)
    assert tw.codes.dtype == np.int8 and set(np.unique(tw.codes)) <= {-1, 0, 1}
    assert tw.scale == np.float32(np.float16(np.abs(w).mean(dtype=np.float64)))  # the GGUF block scale, exactly
    assert np.all(tw.codes == np.clip(np.round(w / tw.scale), -1, 1))


@given(seeds, st.integers(min_value=-10, max_value=10))
def test_weight_codes_invariant_to_power_of_two_rescaling(seed, e):
    # multiplying by 2^e is exact in float32 and float16 (in range), so codes must not change and the scale follows
    w = np.random.default_rng(seed).standard_normal((3, 512)).astype(np.float32)
    a, b = quantize_weights(w), quantize_weights(w * np.float32(2.0**e))
    assert np.array_equal(a.codes, b.codes)
    assert b.scale == a.scale * np.float32(2.0**e)


@given(seeds)
def test_weight_rounding_error_at_most_half_a_step(seed):
    w = np.random.default_rng(seed).standard_normal((4, 256)).astype(np.float32)
    tw = quantize_weights(w)
    inside = np.abs(w) <= 1.5 * tw.scale  # outside that band clipping, not rounding, sets the error
    err = np.abs(w - tw.dequantize())[inside]
    assert err.max(initial=0) <= tw.scale / 2 * (1 + 1e-6)


def test_all_zero_weights_quantize_to_zero_with_floor_scale():
    tw = quantize_weights(np.zeros((2, 256), np.float32))
    assert not tw.codes.any()
    assert tw.scale == np.float32(np.float16(SCALE_EPS)) and tw.scale > 0


@given(seeds, st.integers(min_value=1, max_value=5), scales)
def test_activations_absmax_int8(seed, n, sigma):
    x = (np.random.default_rng(seed).standard_normal((n, 256)) * sigma).astype(np.float32)
    a = quantize_activations(x)
    assert a.q.dtype == np.int8 and a.scale.dtype == np.float32 and a.total.dtype == np.int32
    assert np.abs(a.q).max(axis=1).tolist() == [ACT_QMAX] * n  # the largest |x| of each token maps to ±127
    assert np.array_equal(a.total, a.q.astype(np.int64).sum(axis=1))
    np.testing.assert_array_equal(a.scale, np.float32(ACT_QMAX) / np.abs(x).max(axis=1))
    # round to nearest: within half a quantization step (plus float32 rounding of x·scale)
    assert np.all(np.abs(x - a.dequantize()) <= (0.5 + 1e-4) / a.scale[:, None])


def test_activation_rows_are_independent_and_zero_rows_are_safe():
    x = np.zeros((3, 256), np.float32)
    x[1] = np.linspace(-4, 4, 256, dtype=np.float32)
    a = quantize_activations(x)
    assert not a.q[0].any() and not a.q[2].any() and np.isfinite(a.scale).all()
    assert a.q[1, 0] == -127 and a.q[1, -1] == 127
    single = quantize_activations(x[1])  # one token, 1-D
    assert np.array_equal(single.q, a.q[1]) and single.scale == a.scale[1]


@pytest.mark.parametrize("fn", [quantize_weights, quantize_activations])
def test_quantizers_reject_bad_input(fn):
    with pytest.raises(TypeError, match="float32"):
        fn(np.zeros((2, 256), np.float64))
    with pytest.raises(TypeError, match="ndarray"):
        fn([[0.0] * 256])
    with pytest.raises(TernaryFormatError, match="non-finite"):
        fn(np.full((2, 256), np.nan, np.float32))
    with pytest.raises(TernaryFormatError, match=r"1-D or 2-D or 3-D"):
        fn(np.zeros((1, 1, 1, 256), np.float32))


def test_weight_scale_overflowing_fp16_is_rejected():
    with pytest.raises(TernaryFormatError, match="float16"):
        quantize_weights(np.full((1, 256), 1e6, np.float32))
