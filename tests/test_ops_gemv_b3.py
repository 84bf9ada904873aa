"""Base-3 (1.6-bit) ternary GEMV ``gemv_i8_b3`` and its ``b3tile{R}`` layouts == the scalar/numpy reference, bit-exact.

Layout round trips (hypothesis), the digit identity the kernel relies on (all 256 bytes), the AVX-512 VNNI kernel
with knobs drawn from its design space (M not a multiple of 8 on the untiled layout, K not a multiple of 320), the
naive TE, the worst-case activations at the largest K the kernel allows, and the committed tuning records.

    pytest tests/test_ops_gemv_b3.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import X86

import compiler.layouts_x86_b3 as B3
from compiler.kernels import Kernel
from compiler.ops import OpShapeError, make_op
from compiler.ops.ternary_gemv_b3 import K_MAX_B3
from compiler.schedule import build, schedule_module
from model.ternary import ggml
from model.ternary.layouts import LAYOUTS
from model.ternary.reference import scalar_available
from schedules import targets

IMPL = "scalar" if scalar_available() else "numpy"
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AVX512 = [p for p in X86 if p.values[0] == "avx512"]


@settings(max_examples=25, deadline=None)
@given(tile=st.sampled_from(B3.B3_TILES), mt=st.integers(1, 3), kc=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_b3_layout_round_trip(tile, mt, kc, seed):
    codes = np.random.default_rng(seed).integers(-1, 2, (tile * mt, 256 * kc)).astype(np.int8)
    lay = LAYOUTS[f"b3tile{tile}"]
    packed = lay.pack(codes)
    assert packed.shape == (mt, B3.chunks(256 * kc), tile, 64) and packed.dtype == np.uint8
    np.testing.assert_array_equal(lay.unpack(packed, 256 * kc), codes)


def test_b3_bytes_are_tq1_0_and_the_digit_identity_holds():
    """Every byte value: the layout's digits are ggml's TQ1_0 decode, and 3·q_j = 256·d_j + q_{j+1} (the kernel)."""
    b = np.arange(256, dtype=np.uint8).reshape(1, 256)
    d = ggml._tq1_decode(b, 5)[0].astype(np.int64)  # [5, 256]
    for j in range(5):
        q, q1 = (b[0].astype(np.int64) * 3**j) % 256, (b[0].astype(np.int64) * 3 ** (j + 1)) % 256
        np.testing.assert_array_equal(3 * q, 256 * d[j] + q1)
    assert B3.bits_per_weight(4096) == B3.bits_per_weight(16384) == 1.625
    assert max(B3.bits_per_weight(k) for k in range(4096, K_MAX_B3 + 1, 256)) <= 1.7  # K padded to 320s


@pytest.mark.parametrize("target", AVX512)
@SETTINGS
@given(tile=st.sampled_from(B3.B3_TILES), m=st.integers(1, 40), kc=st.integers(1, 5), seed=st.integers(0, 2**16),
       data=st.data())  # fmt: skip
def test_gemv_i8_b3_bit_exact(target, tile, m, kc, seed, data):
    M = m if tile == 1 else tile * (1 + m % 3)  # untiled: any M (row tile from the divisors); tiled: multiples
    op = make_op("gemv_i8_b3", M=M, K=256 * kc, tile=tile)
    space = schedule_module(target).space(op)
    knobs = {k.name: data.draw(st.sampled_from(k.candidates)) for k in space}
    ins = op.random_inputs(np.random.default_rng(seed))
    y = Kernel(op, build(op, target, knobs=knobs))(*ins)[0]
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


def test_naive_te_matches():
    op = make_op("gemv_i8_b3", M=37, K=768)
    ins = op.random_inputs(np.random.default_rng(3))
    y = Kernel(op, build(op, "auto", mode="naive"))(*ins)[0]
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.parametrize("target", AVX512)
@pytest.mark.parametrize("sign", [1, -1])
def test_extremes_at_k_max(target, sign):
    """All codes +1 against x = ±127 at the largest K: |256·Σd·x| is closest to 2³¹, the sums A, B wrap."""
    op = make_op("gemv_i8_b3", M=8, K=K_MAX_B3, tile=8)
    W = B3.pack_b3(np.ones((8, K_MAX_B3), np.int8), 8)
    x = np.full(K_MAX_B3, 127 * sign, np.int8)
    ins = [W, x, np.array([x.astype(np.int32).sum()], np.int32), np.ones(1, np.float32), np.ones(1, np.float32)]
    y = Kernel(op, build(op, target, mode="hand"))(*ins)[0]
    np.testing.assert_array_equal(y, np.full(8, 127.0 * sign * K_MAX_B3, np.float32))
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


def test_shape_errors_are_clear():
    with pytest.raises(OpShapeError, match="exact up to"):
        make_op("gemv_i8_b3", M=8, K=K_MAX_B3 + 256)
    with pytest.raises(OpShapeError, match="tile"):
        make_op("gemv_i8_b3", M=12, K=256, tile=8)
    if targets.supported("avx2"):
        with pytest.raises(NotImplementedError, match="no avx2 schedule"):
            build(make_op("gemv_i8_b3", M=8, K=256), "avx2", mode="hand")


@pytest.mark.parametrize("target", AVX512)
def test_committed_record_replays_bit_exact(target):
    """The tuned schedule of the 4096×4096 benchmark shape (tuning_logs/avx512) replays and is bit-exact."""
    from compiler.schedule import get_primfunc, open_database, records

    op = make_op("gemv_i8_b3", M=4096, K=4096, tile=8)
    if not records(open_database(target), op):
        pytest.skip("no committed record for gemv_i8_b3 4096x4096 tile8")
    sf = get_primfunc(op, target, mode="tuned")
    ins = op.random_inputs(np.random.default_rng(1))
    np.testing.assert_array_equal(Kernel(op, sf.build())(*ins)[0], op.reference(*ins, impl=IMPL)[0])
