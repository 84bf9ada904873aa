"""Ternary GEMV/GEMM kernels == the scalar C++ reference, on every x86 target this CPU runs.

Integer path (W2A8 GEMV/GEMM): bit-exact on ``y`` (hence on ``acc``: ``|acc| ≤ 2·128·K < 2²⁴`` converts to float32
exactly, and the rescale is the same float32 multiply by the same float32 ratio). Float path: within the float32
summation bound of :meth:`TernaryGemvF32.tolerance`. Shapes are random (K a multiple of 256, M not a multiple of the
row tile), knobs are drawn from each schedule's design space, and the naive (untuned) TE is checked too.

    pytest tests/test_ops_gemv.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import X86

from compiler.kernels import Kernel
from compiler.ops import OpShapeError, make_op
from compiler.schedule import build, schedule_module
from model.ternary.reference import scalar_available

pytestmark = pytest.mark.build

IMPL = "scalar" if scalar_available() else "numpy"
SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def knob_choice(draw, op, target):
    return {k.name: draw(st.sampled_from(k.candidates)) for k in schedule_module(target).space(op)}


def run(op, ex, seed):
    ins = op.random_inputs(np.random.default_rng(seed))
    return ins, Kernel(op, ex)(*ins)[0]


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(M=st.integers(1, 70), kc=st.integers(1, 4), seed=st.integers(0, 2**16), data=st.data())
def test_gemv_i8_bit_exact(target, M, kc, seed, data):
    op = make_op("gemv_i8", M=M, K=256 * kc)
    knobs = data.draw(knob_choice(op, target))
    ins, y = run(op, build(op, target, knobs=knobs), seed)
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(N=st.integers(1, 6), M=st.integers(1, 40), kc=st.integers(1, 3), seed=st.integers(0, 2**16), data=st.data())
def test_gemm_i8_bit_exact(target, N, M, kc, seed, data):
    op = make_op("gemm_i8", N=N, M=M, K=256 * kc)
    knobs = data.draw(knob_choice(op, target))
    ins, y = run(op, build(op, target, knobs=knobs), seed)
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(M=st.integers(1, 70), kc=st.integers(1, 4), seed=st.integers(0, 2**16), data=st.data())
def test_gemv_f32_within_bound(target, M, kc, seed, data):
    op = make_op("gemv_f32", M=M, K=256 * kc)
    knobs = data.draw(knob_choice(op, target))
    ins, y = run(op, build(op, target, knobs=knobs), seed)
    ref = op.reference(*ins, impl=IMPL)[0]
    np.testing.assert_allclose(y, ref, rtol=0, atol=op.tolerance(ins[1], float(ins[2][0])))


@pytest.mark.parametrize("kind", ["gemv_i8", "gemv_f32"])
def test_naive_te_matches(kind):
    """The untuned default (no schedule at all) is correct too; it is the bench's "untuned" baseline."""
    op = make_op(kind, M=37, K=512)
    ins, y = run(op, build(op, "auto", mode="naive"), 3)
    ref = op.reference(*ins, impl=IMPL)[0]
    if kind == "gemv_i8":
        np.testing.assert_array_equal(y, ref)
    else:
        np.testing.assert_allclose(y, ref, rtol=0, atol=op.tolerance(ins[1], float(ins[2][0])))


@pytest.mark.parametrize("target", X86)
def test_extreme_activations_do_not_saturate(target):
    """All codes +1 (storage 2) against x = −128 everywhere: the worst case of the int16 pair sums on AVX2."""
    op = make_op("gemv_i8", M=16, K=1024)
    W = np.full((16, 256), 0b10101010, np.uint8)
    x = np.full(1024, -128, np.int8)
    ins = [W, x, np.array([x.astype(np.int32).sum()], np.int32), np.ones(1, np.float32), np.ones(1, np.float32)]
    y = Kernel(op, build(op, target, mode="hand"))(*ins)[0]
    np.testing.assert_array_equal(y, np.full(16, -128.0 * 1024, np.float32))
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


def _asm(ex) -> str:
    return "\n".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind in ("llvm", "library"))


@pytest.mark.parametrize("target", X86)
def test_prefetch_level_picks_the_instruction_and_keeps_the_result(target):
    """``prefetch_to`` 1 issues ``prefetcht0`` (into L1), 2 ``prefetcht1`` (into L2 only); the result is the same."""
    op = make_op("gemv_i8", M=64, K=1024)
    outs = []
    for to, mnemonic, other in ((1, "prefetcht0", "prefetcht1"), (2, "prefetcht1", "prefetcht0")):
        ex = build(op, target, knobs={"rows": 8, "unroll_k": 2, "prefetch": 1024, "prefetch_to": to})
        asm = _asm(ex)
        assert mnemonic in asm and other not in asm
        ins, y = run(op, ex, 7)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], op.reference(*ins, impl=IMPL)[0])
    np.testing.assert_array_equal(outs[1], outs[0])


def test_shape_errors_are_clear():
    with pytest.raises(OpShapeError, match="multiple of 256"):
        make_op("gemv_i8", M=8, K=300)
    with pytest.raises(OpShapeError, match="positive"):
        make_op("gemm_i8", N=0, M=8, K=256)


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(tile=st.sampled_from([4, 8, 16]), mt=st.integers(1, 6), kc=st.integers(1, 3), seed=st.integers(0, 2**16),
       data=st.data())  # fmt: skip
def test_gemv_i8_tiled_layout_bit_exact(target, tile, mt, kc, seed, data):
    op = make_op("gemv_i8", M=tile * mt, K=256 * kc, tile=tile)
    knobs = data.draw(knob_choice(op, target))
    ins, y = run(op, build(op, target, knobs=knobs), seed)
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(tile=st.sampled_from([4, 8, 16]), N=st.integers(1, 9), mt=st.integers(1, 4), kc=st.integers(1, 3),
       seed=st.integers(0, 2**16), data=st.data())  # fmt: skip
def test_gemm_i8_tiled_layout_bit_exact(target, tile, N, mt, kc, seed, data):
    """Prefill reads the decode GEMV's tile layout (the CPU build stores each matrix once, in tile8)."""
    op = make_op("gemm_i8", N=N, M=tile * mt, K=256 * kc, tile=tile)
    knobs = data.draw(knob_choice(op, target))
    ins, y = run(op, build(op, target, knobs=knobs), seed)
    np.testing.assert_array_equal(y, op.reference(*ins, impl=IMPL)[0])


def test_tiled_layout_round_trip_and_registry():
    from model.ternary.layouts import LAYOUTS

    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (32, 512)).astype(np.int8)
    for r in (4, 8, 16):
        lay = LAYOUTS[f"tile{r}"]
        packed = lay.pack(codes)
        assert packed.shape == (32 // r, 2, r, 64)
        np.testing.assert_array_equal(lay.unpack(packed, 512), codes)
    with pytest.raises(OpShapeError, match="tile"):
        make_op("gemv_i8", M=12, K=256, tile=8)
    with pytest.raises(OpShapeError, match="tile"):
        make_op("gemm_i8", N=8, M=12, K=256, tile=8)


@pytest.mark.parametrize("target", X86)
@SETTINGS
@given(tile=st.sampled_from([4, 8]), sizes=st.lists(st.integers(1, 3), min_size=2, max_size=3), N=st.integers(0, 5),
       kc=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())  # fmt: skip
def test_stacked_matrix_rows_equal_each_matrix_alone(target, tile, sizes, N, kc, seed, data):
    """A stacked matrix (``parts``: a layer's q|k|v or gate|up read in one GEMV, or one GEMM with ``N`` tokens) gives,
    part by part, bit for bit what that part's own kernel gives with its own scale."""
    parts, K = tuple(tile * s for s in sizes), 256 * kc
    dims = {"M": sum(parts), "K": K, "tile": tile} | ({"N": N} if N else {})
    kind = "gemm_i8" if N else "gemv_i8"
    op = make_op(kind, **dims, parts=parts)
    assert op.canonical() == make_op(kind, **dims) and op.func_name.endswith("_p" + "x".join(map(str, parts)))
    knobs = data.draw(knob_choice(op, target))
    ins, y = run(op, build(op, target, knobs=knobs), seed)
    W, ws = ins[0], ins[-1]
    assert ws.shape == (len(parts),)
    at = 0
    for n, s in zip(parts, ws, strict=True):  # each part's own (plain) reference on its rows
        part = make_op(kind, **(dims | {"M": n}))
        rows = W[at // tile : (at + n) // tile]
        want = part.reference(rows, *ins[1:-1], np.array([s], np.float32), impl=IMPL)[0]
        np.testing.assert_array_equal(y[..., at : at + n], want)
        at += n


def test_stacked_parts_are_checked():
    with pytest.raises(OpShapeError, match="parts"):
        make_op("gemv_i8", M=64, K=256, tile=8, parts=(32, 16))
    with pytest.raises(OpShapeError, match="parts"):
        make_op("gemm_i8", N=2, M=64, K=256, tile=8, parts=(64,))
    with pytest.raises(OpShapeError, match="dense"):
        make_op("gemv_i8", M=64, K=256, tile=8, E=2, P=2, parts=(32, 32))
