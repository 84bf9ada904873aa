"""Table-lookup (1.67-bit) GEMV ``gemv_i8_tl`` and its ``tl{R}`` layouts == the scalar/numpy reference, bit-exact.

Layout round trips and corruption checks (hypothesis), the table arithmetic in numpy (lo/hi bytes, signs, the stored
sign sums), the AVX-512 VBMI kernel with knobs drawn from its design space (K not a multiple of 24, one to three row
groups), the naive TE, the extreme activations (±127 and −128 against all-(±1) weights at a large K), and the
committed tuning records.

    pytest tests/test_ops_gemv_tl.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import X86

import model.ternary.layouts_tl as TL
import targets
from compiler.kernels import Kernel
from compiler.ops import OpShapeError, make_op
from compiler.ops.ternary_gemv_tl import lut_numpy
from compiler.schedule import build, get_kernel, schedule_module
from model.ternary.checks import TernaryFormatError
from model.ternary.layouts import LAYOUTS
from model.ternary.reference import scalar_available

IMPL = "scalar" if scalar_available() else "numpy"
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VBMI = "avx512vbmi" in targets.cpu_flags()
AVX512 = [pytest.param(p.values[0], marks=[*p.marks, pytest.mark.skipif(not VBMI, reason="lacks avx512vbmi")])
          for p in X86 if p.values[0] == "avx512"]  # fmt: skip


@pytest.mark.unit
@settings(max_examples=25, deadline=None)
@given(tile=st.sampled_from(TL.TL_TILES), groups=st.integers(1, 3), kc=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_tl_layout_round_trip(tile, groups, kc, seed):
    m, k = 16 * tile * groups, 256 * kc
    codes = np.random.default_rng(seed).integers(-1, 2, (m, k)).astype(np.int8)
    packed = LAYOUTS[f"tl{tile}"].pack(codes)
    assert packed.shape == TL.shape(m, k, tile) == (groups, -(-k // 24) + 1, tile, 80) and packed.dtype == np.uint8
    np.testing.assert_array_equal(LAYOUTS[f"tl{tile}"].unpack(packed, k), codes)


@pytest.mark.unit
def test_tl_bits_per_weight():
    assert TL.bits_per_weight(16384) < 1.671 and TL.bits_per_weight(4096) < 1.681
    assert max(TL.bits_per_weight(k) for k in range(1536, 32768 + 1, 256)) <= 1.7  # K padded to 24s + the sums


@pytest.mark.unit
def test_tl_unpack_rejects_corruption():
    codes = np.random.default_rng(0).integers(-1, 2, (32, 512)).astype(np.int8)
    good = TL.pack_tl(codes, 2)
    bad = good.copy()
    bad[0, 0, 0, 0] = 0xEE  # index 14: no such code
    with pytest.raises(TernaryFormatError, match="above 13"):
        TL.unpack_tl(bad, 512)
    bad = good.copy()
    bad[0, 0, 1, 64] ^= 1  # one sign bit flipped: the stored Σ sign no longer matches
    with pytest.raises(TernaryFormatError, match="sign sums"):
        TL.unpack_tl(bad, 512)
    bad = good.copy()
    bad[0, -2, 0, 63] = 0xDD  # K = 512 = 21·24 + 8: the last block's padding codes must be zero weights
    with pytest.raises(TernaryFormatError):
        TL.unpack_tl(bad, 512)
    with pytest.raises(TernaryFormatError, match="expected uint8"):
        TL.unpack_tl(good[:, :-1], 512)
    with pytest.raises(TernaryFormatError, match="multiple of 32"):
        TL.pack_tl(codes[:16], 2)


@pytest.mark.unit
@settings(max_examples=20, deadline=None)
@given(kc=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_table_lookup_arithmetic(kc, seed):
    """The kernel's sums in numpy: Σ_lookups lo·s + 256·(Σ hi·s − 2·Σs) == Σ w·x for every row (x down to −128)."""
    rng = np.random.default_rng(seed)
    k, m = 256 * kc, 16
    codes = rng.integers(-1, 2, (m, k)).astype(np.int8)
    x = rng.integers(-128, 128, k).astype(np.int8)
    lut = np.ascontiguousarray(lut_numpy(x, k)).view(np.uint8).reshape(-1, 2, 2, 4, 16).astype(np.int64)
    c = TL._codes3(codes).astype(np.int64)  # [m, B, half, j]
    idx, s = np.abs(c - TL.ZERO_CODE), np.where(c < TL.ZERO_CODE, -1, 1)
    b, half, j = np.meshgrid(*[np.arange(n) for n in c.shape[1:]], indexing="ij")
    lo = (lut[b, half, 0, j, idx] * s).sum(axis=(1, 2, 3))
    hi = (lut[b, half, 1, j, idx] * s).sum(axis=(1, 2, 3))
    got = lo + 256 * (hi - 2 * s.sum(axis=(1, 2, 3)))
    np.testing.assert_array_equal(got, codes.astype(np.int64) @ x.astype(np.int64))


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
@SETTINGS
@given(tile=st.sampled_from(TL.TL_TILES), groups=st.integers(1, 3), kc=st.integers(1, 6), seed=st.integers(0, 2**16),
       data=st.data())  # fmt: skip
def test_gemv_i8_tl_bit_exact(target, tile, groups, kc, seed, data):
    op = make_op("gemv_i8_tl", M=16 * tile * groups, K=256 * kc, tile=tile)
    space = schedule_module(target).space(op)
    knobs = {k.name: data.draw(st.sampled_from(k.candidates)) for k in space}
    ins = op.random_inputs(np.random.default_rng(seed))
    y = Kernel(op, build(op, target, knobs=knobs))(*ins)[0]
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
@pytest.mark.parametrize("lut_at", [0, 1, 2])
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_every_table_placement(target, lut_at, groups):
    """Each place the tables can be built (root, in parallel, per thread) with 1, 3 and 4 row groups: a per-thread
    build splits the groups across the threads, which must keep every group's accumulators private."""
    op = make_op("gemv_i8_tl", M=32 * groups, K=768, tile=2)
    if lut_at not in {k.name: k for k in schedule_module(target).space(op)}["lut_at"].candidates:
        with pytest.raises(ValueError, match="lut_at"):  # an uneven split of the groups over the threads
            build(op, target, knobs={"lut_at": lut_at})
        return
    ins = op.random_inputs(np.random.default_rng(groups))
    y = Kernel(op, build(op, target, knobs={"lut_at": lut_at}))(*ins)[0]
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.build
def test_naive_te_matches():
    """The naive TE is plain LLVM code for the machine's own target: it runs on any CPU, VBMI or not (Zen 3)."""
    op = make_op("gemv_i8_tl", M=32, K=768, tile=1)
    ins = op.random_inputs(np.random.default_rng(3))
    y = get_kernel(op, "auto", mode="naive")(*ins)[0]
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
@pytest.mark.parametrize("w, xv", [(1, 127), (1, -127), (-1, -128), (1, -128)])
def test_extremes(target, w, xv):
    """All weights ±1 against constant activations: every lookup at |v| = 3·|x| (the table's hi byte at 0 or 3)."""
    k = 16384
    op = make_op("gemv_i8_tl", M=128, K=k, tile=8)
    W = TL.pack_tl(np.full((128, k), w, np.int8), 8)
    x = np.full(k, xv, np.int8)
    ins = [W, x, np.ones(1, np.float32), np.ones(1, np.float32)]
    y = Kernel(op, build(op, target, mode="hand"))(*ins)[0]
    np.testing.assert_array_equal(y, np.full(128, float(w * xv * k), np.float32))
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.build
def test_shape_errors_are_clear():
    with pytest.raises(OpShapeError, match="multiple of 16"):
        make_op("gemv_i8_tl", M=24, K=256, tile=1)
    with pytest.raises(OpShapeError, match="tile"):
        make_op("gemv_i8_tl", M=128, K=256, tile=3)
    if targets.supported("avx2"):
        with pytest.raises(NotImplementedError, match="no avx2 schedule"):
            build(make_op("gemv_i8_tl", M=16, K=256, tile=1), "avx2", mode="hand")


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
@pytest.mark.parametrize("key", ["gemv_i8_tl:M=4096:K=4096", "gemv_i8_tl:M=32768:K=16384",
                                 "gemm_i8_tl:N=8:M=2560:K=2560"])  # fmt: skip
def test_committed_record_replays_bit_exact(target, key):
    """The tuned schedules of the benchmark shapes and a 2B-4T prefill GEMM (tuning_logs/avx512) replay and are
    bit-exact."""
    from compiler.ops import parse_key
    from compiler.schedule import get_primfunc, open_database, records

    op = parse_key(f"{key}:tile=8")
    if not records(open_database(target), op):
        pytest.skip(f"no committed record for {op.key}")
    sf = get_primfunc(op, target, mode="tuned")
    ins = op.random_inputs(np.random.default_rng(1))
    np.testing.assert_array_equal(Kernel(op, sf.build())(*ins)[0], op.reference(*ins, impl=IMPL)[0])


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
@SETTINGS
@given(tile=st.sampled_from([1, 2]), sizes=st.lists(st.integers(1, 2), min_size=2, max_size=3),
       kc=st.integers(1, 3), seed=st.integers(0, 2**16), data=st.data())  # fmt: skip
def test_stacked_matrix_rows_equal_each_matrix_alone(target, tile, sizes, kc, seed, data):
    """A stacked ``tl`` matrix (``parts``, a scale each) gives, part by part, what each part's own kernel gives."""
    rows = TL.TILE_ROWS * tile
    parts, K = tuple(rows * s for s in sizes), 256 * kc
    op = make_op("gemv_i8_tl", M=sum(parts), K=K, tile=tile, parts=parts)
    space = schedule_module(target).space(op)
    knobs = {k.name: data.draw(st.sampled_from(k.candidates)) for k in space}
    ins = op.random_inputs(np.random.default_rng(seed))
    y = Kernel(op, build(op, target, knobs=knobs))(*ins)[0]
    W, x, xs, ws = ins
    at = 0
    for n, s in zip(parts, ws, strict=True):
        part = make_op("gemv_i8_tl", M=n, K=K, tile=tile)
        want = part.reference(W[at // rows : (at + n) // rows], x, xs, np.array([s], np.float32), impl=IMPL)[0]
        np.testing.assert_array_equal(y[at : at + n], want)
        at += n


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
@SETTINGS
@given(tile=st.sampled_from(TL.TL_TILES), groups=st.integers(1, 2), kc=st.integers(1, 4), n=st.integers(1, 9),
       stacked=st.booleans(), seed=st.integers(0, 2**16), data=st.data())  # fmt: skip
def test_gemm_i8_tl_bit_exact(target, tile, groups, kc, n, stacked, seed, data):
    """The GEMM (prefill, batches) with knobs drawn from its space, N not a multiple of the token block, K not of 24,
    stacked or not: bit-exact with the reference, and row for row what the decode GEMV gives each token."""
    M, K = TL.TILE_ROWS * tile * groups, 256 * kc
    parts = (M - TL.TILE_ROWS * tile, TL.TILE_ROWS * tile) if stacked and groups > 1 else ()
    op = make_op("gemm_i8_tl", N=n, M=M, K=K, tile=tile, parts=parts)
    space = schedule_module(target).space(op)
    knobs = {k.name: data.draw(st.sampled_from(k.candidates)) for k in space}
    ins = op.random_inputs(np.random.default_rng(seed))
    y = Kernel(op, build(op, target, knobs=knobs))(*ins)[0]
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])
    W, x, xs, ws = ins
    gemv = Kernel(op.gemv, build(op.gemv, target, mode="hand"))
    for t in range(n):
        np.testing.assert_array_equal(y[t], gemv(W, x[t], xs[t : t + 1], ws)[0])


@pytest.mark.build
@pytest.mark.parametrize("target", AVX512)
def test_gemm_i8_tl_extremes(target):
    """Tokens at the activations' extremes (127, −127, −128) against all-(+1) and all-(−1) rows at a large K."""
    k = 8192
    codes = np.repeat(np.array([1, -1], np.int8), 64)[:, None] * np.ones((1, k), np.int8)
    op = make_op("gemm_i8_tl", N=3, M=128, K=k, tile=4)
    x = np.stack([np.full(k, v, np.int8) for v in (127, -127, -128)])
    ins = [TL.pack_tl(codes, 4), x, np.ones(3, np.float32), np.ones(1, np.float32)]
    y = Kernel(op, build(op, target, mode="hand"))(*ins)[0]
    want = codes[:, 0].astype(np.float32)[None, :] * np.array([127, -127, -128], np.float32)[:, None] * k
    np.testing.assert_array_equal(y, want)


@pytest.mark.unit
def test_gemm_i8_tl_shape_errors_are_clear():
    with pytest.raises(OpShapeError, match="N"):
        make_op("gemm_i8_tl", N=0, M=128, K=256, tile=8)
    with pytest.raises(OpShapeError, match="multiple of 16"):
        make_op("gemm_i8_tl", N=2, M=24, K=256, tile=1)
