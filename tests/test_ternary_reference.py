"""The reference ternary GEMV/GEMM (model/ternary/reference.py): C++ scalar == numpy == dequantize-then-matmul."""

import numpy as np
import pytest
from helpers import ks, ms, ns, random_codes, random_int8, seeds
from hypothesis import given

from model.ternary import quantize_activations, quantize_weights
from model.ternary.checks import TernaryFormatError
from model.ternary.layouts import pack_weights
from model.ternary.quant import TernaryWeights
from model.ternary.reference import _scalar, scalar_available, ternary_matmul_f32, ternary_matmul_i8

pytestmark = pytest.mark.unit

IMPLS = ["numpy", "scalar"]


def make_case(seed, n, m, k):
    rng = np.random.default_rng(seed)
    tw = TernaryWeights(random_codes(rng, m, k), np.float32(np.float16(rng.uniform(1e-3, 4))))
    xq = random_int8(rng, (n, k))
    xs = rng.uniform(0.5, 300, size=n).astype(np.float32)
    return tw, pack_weights(tw), xq, xs


def test_scalar_extension_is_built():
    # CI installs with `pip install -e .`, which must compile the pybind11 reference
    assert scalar_available()


@given(seeds, ns, ms, ks)
def test_int8_scalar_equals_numpy_bit_for_bit(seed, n, m, k):
    tw, w, xq, xs = make_case(seed, n, m, k)
    acc_c, y_c = ternary_matmul_i8(w, xq, xs, tw.scale, impl="scalar")
    acc_n, y_n = ternary_matmul_i8(w, xq, xs, tw.scale, impl="numpy")
    assert acc_c.dtype == np.int32 and y_c.dtype == np.float32 and acc_c.shape == (n, m)
    assert np.array_equal(acc_c, acc_n)
    assert np.array_equal(y_c.view(np.int32), y_n.view(np.int32))  # same bits, not merely close


@given(seeds, ns, ms, ks)
def test_int8_path_equals_dequantize_then_matmul(seed, n, m, k):
    tw, w, xq, xs = make_case(seed, n, m, k)
    acc, y = ternary_matmul_i8(w, xq, xs, tw.scale, impl="scalar")
    exact = xq.astype(np.int64) @ tw.codes.astype(np.int64).T  # Σ q·x with signed weights, no code trick
    assert np.array_equal(acc, exact)
    dense = (xq.astype(np.float64) / xs[:, None]) @ (tw.codes.astype(np.float64) * tw.scale).T
    # y rounds acc to float32 (|acc| < 2^24 here, exact) and multiplies by a float32 ratio: ≤ ~2 ulp relative error;
    # the float64 dense sum itself may cancel to ±1e-16 where the exact value is 0, hence the tiny absolute term
    terms = (np.abs(xq).astype(np.float64) / xs[:, None]) @ np.abs(tw.codes).astype(np.float64).T * tw.scale
    assert np.all(np.abs(y - dense) <= 3e-7 * np.abs(dense) + 1e-14 * terms)


@given(seeds, ns, ms, ks)
def test_float_path_scalar_numpy_and_dense_agree(seed, n, m, k):
    rng = np.random.default_rng(seed)
    tw, w, _, _ = make_case(seed, n, m, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    y_c = ternary_matmul_f32(w, x, tw.scale, impl="scalar")
    y_n = ternary_matmul_f32(w, x, tw.scale, impl="numpy")
    dense = x.astype(np.float64) @ tw.dequantize().astype(np.float64).T
    # float64 sums in a different order, then one float32 rounding of the sum and one of the product: 2 ulp + tiny
    bound = 2.5e-7 * np.abs(dense) + 1e-12 * np.abs(x).sum(axis=1, keepdims=True)
    assert np.all(np.abs(y_c - y_n) <= bound) and np.all(np.abs(y_c - dense) <= bound)


@given(seeds, ms, ks)
def test_gemv_is_one_row_of_gemm(seed, m, k):
    tw, w, xq, xs = make_case(seed, 3, m, k)
    for impl in IMPLS:
        acc, y = ternary_matmul_i8(w, xq, xs, tw.scale, impl=impl)
        acc1, y1 = ternary_matmul_i8(w, xq[1], xs[1], tw.scale, impl=impl)
        assert acc1.shape == (m,) and np.array_equal(acc1, acc[1]) and np.array_equal(y1, y[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("weight", "act", "expected_per_k"),
    [(1, 127, 127), (1, -128, -128), (-1, -128, 128), (-1, 127, -127), (0, -128, 0), (1, 0, 0)],
)
def test_extreme_values(impl, weight, act, expected_per_k):
    k, m = 4096, 5
    w = pack_weights(TernaryWeights(np.full((m, k), weight, np.int8), np.float32(1.0)))
    xq = np.full(k, act, np.int8)
    acc, y = ternary_matmul_i8(w, xq, np.float32(1.0), 1.0, impl=impl)
    assert np.all(acc == expected_per_k * k) and np.all(y == np.float32(expected_per_k * k))


@pytest.mark.parametrize("impl", IMPLS)
def test_end_to_end_from_float_weights_and_activations(impl):
    rng = np.random.default_rng(3)
    wf, x = rng.standard_normal((48, 1024)).astype(np.float32), rng.standard_normal(1024).astype(np.float32)
    tw, a = quantize_weights(wf), quantize_activations(x)
    _, y = ternary_matmul_i8(pack_weights(tw), a.q, a.scale, tw.scale, impl=impl)
    y_f = ternary_matmul_f32(pack_weights(tw), x, tw.scale, impl=impl)
    # int8 activations cost at most half a step per element: |Δy| ≤ s·Σ|q|·0.5/a
    bound = tw.scale * np.abs(tw.codes).sum(axis=1) * 0.5 / np.float32(a.scale)
    assert np.all(np.abs(y - y_f) <= bound * 1.001)
    assert np.corrcoef(y, y_f)[0, 1] > 0.99  # and the quantized product still tracks the float one closely


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_give_the_same_result(impl):
    tw, w, xq, xs = make_case(11, 2, 9, 512)
    wide = np.zeros((9, 256), np.uint8)
    wide[:, ::2] = w  # a strided view of the same bytes
    acc, _ = ternary_matmul_i8(wide[:, ::2], np.asfortranarray(xq), xs, tw.scale, impl=impl)
    assert np.array_equal(acc, ternary_matmul_i8(w, xq, xs, tw.scale, impl=impl)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise_clear_errors(impl):
    tw, w, xq, xs = make_case(5, 2, 4, 512)
    with pytest.raises(TypeError, match="int8"):
        ternary_matmul_i8(w, xq.astype(np.int16), xs, tw.scale, impl=impl)
    with pytest.raises(TypeError, match="float32"):
        ternary_matmul_f32(w, xq.astype(np.float64), tw.scale, impl=impl)
    with pytest.raises(TypeError, match="uint8"):
        ternary_matmul_i8(w.view(np.int8), xq, xs, tw.scale, impl=impl)
    with pytest.raises(TernaryFormatError, match="K = 256"):
        ternary_matmul_i8(w, xq[:, :256], xs, tw.scale, impl=impl)
    with pytest.raises(TernaryFormatError, match="multiple of 256"):
        ternary_matmul_i8(w, xq[:, :300], xs, tw.scale, impl=impl)
    with pytest.raises(TernaryFormatError, match="one per token"):
        ternary_matmul_i8(w, xq, xs[:1], tw.scale, impl=impl)
    with pytest.raises(TypeError, match="x_scale"):
        ternary_matmul_i8(w, xq, xs.astype(np.float64), tw.scale, impl=impl)
    with pytest.raises(TernaryFormatError, match="> 0"):
        ternary_matmul_i8(w, xq, xs, 0.0, impl=impl)
    with pytest.raises(TernaryFormatError, match="> 0"):
        ternary_matmul_i8(w, xq, np.float32([1, np.inf]), tw.scale, impl=impl)
    with pytest.raises(TernaryFormatError, match="1-D or 2-D"):
        ternary_matmul_i8(w, xq[None], xs, tw.scale, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        ternary_matmul_i8(w, xq, xs, tw.scale, impl="fast")


def test_scalar_extension_refuses_silent_casts_and_bad_shapes():
    # called directly (bypassing the Python checks), the C++ side still must not accept wrong data
    _tw, w, xq, xs = make_case(5, 1, 4, 512)
    ext = _scalar()
    with pytest.raises(TypeError):
        ext.gemm_i8(w, xq.astype(np.int32), xs, 1.0)
    with pytest.raises(ValueError, match="multiple of 256"):
        ext.gemm_f32(np.zeros((4, 25), np.uint8), np.zeros((1, 100), np.float32), 1.0)
    with pytest.raises(ValueError, match="bytes per row"):
        ext.gemm_i8(np.ascontiguousarray(w[:, :64]), xq, xs, 1.0)
    with pytest.raises(ValueError, match="x_scale"):
        ext.gemm_i8(w, xq, np.float32([-1.0]), 1.0)
