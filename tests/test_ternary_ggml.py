"""GGUF ternary types TQ2_0 / TQ1_0 (model/ternary/ggml.py): bit-identical to gguf-py, exact round trips, bad data."""

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from helpers import ks, random_codes, seeds
from hypothesis import given
from hypothesis import strategies as st

from model.ternary import ggml, quantize_weights
from model.ternary.checks import TernaryFormatError
from model.ternary.quant import TernaryWeights

pytestmark = pytest.mark.unit

TYPES = [ggml.TernaryType.TQ2_0, ggml.TernaryType.TQ1_0]
qtypes = st.sampled_from(TYPES)


def gguf_type(qtype):
    return gguf.GGMLQuantizationType(int(qtype))


def test_type_ids_and_sizes_match_mainline_ggml():
    for qtype in TYPES:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf_type(qtype)]
        assert gguf_type(qtype).name == qtype.name  # 34 is TQ1_0 and 35 is TQ2_0 in ggml too
        assert (block, nbytes) == (256, ggml.BLOCK_BYTES[qtype])
        assert ggml.row_bytes(1024, qtype) == 4 * nbytes


@given(seeds, ks, st.integers(1, 9), qtypes, st.sampled_from([1e-4, 1.0, 300.0]))
def test_quantize_is_bit_identical_to_gguf_py_on_any_floats(seed, k, m, qtype, sigma):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((m, k)) * sigma).astype(np.float32)
    w[rng.random((m, k)) < 0.2] = 0  # zeros, and sometimes whole zero blocks below
    if m > 1:
        w[0, :256] = 0
    assert np.array_equal(ggml.quantize(w, qtype), gguf_quantize(w, gguf_type(qtype)))


@given(seeds, ks, st.integers(1, 9), qtypes)
def test_pack_of_ternary_weights_matches_gguf_quantize_of_their_floats(seed, k, m, qtype):
    rng = np.random.default_rng(seed)
    tw = quantize_weights((rng.standard_normal((m, k)) * rng.uniform(0.01, 5)).astype(np.float32))
    assert np.array_equal(ggml.pack(tw, qtype), gguf_quantize(tw.dequantize(), gguf_type(qtype)))


@given(seeds, ks, st.integers(1, 9), qtypes)
def test_pack_unpack_round_trip_is_exact(seed, k, m, qtype):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, m, k)
    tw = TernaryWeights(codes, np.float32(np.float16(rng.uniform(1e-3, 10))))
    raw = ggml.pack(tw, qtype)
    assert raw.shape == (m, ggml.row_bytes(k, qtype))
    back, d = ggml.unpack(raw, k, qtype)
    assert np.array_equal(back, codes)
    nonzero = codes.reshape(m, k // 256, 256).any(axis=-1)
    assert np.all(d[nonzero] == tw.scale) and np.all(d[~nonzero] == 0)
    if codes.any():  # an all-zero tensor stores no scale at all (every block's d is 0)
        assert ggml.to_ternary(back, d).scale == tw.scale
    np.testing.assert_array_equal(ggml.dequantize(raw, k, qtype), gguf_dequantize(raw, gguf_type(qtype)))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("value", [-1, 0, 1])
def test_constant_tensors(qtype, value):
    codes = np.full((3, 512), value, np.int8)
    tw = TernaryWeights(codes, np.float32(0.5))
    raw = ggml.pack(tw, qtype)
    assert np.array_equal(raw, gguf_quantize(tw.dequantize(), gguf_type(qtype)))
    back, d = ggml.unpack(raw, 512, qtype)
    assert np.array_equal(back, codes)
    assert np.all(d == (0.0 if value == 0 else 0.5))


def test_tq1_0_byte_code_covers_all_243_five_trit_groups_exactly():
    # every base-3 group of 5 trits must survive the ceil(v*256/243) byte encoding: exhaustive, not sampled
    trits = np.array(np.unravel_index(np.arange(243), (3,) * 5), dtype=np.uint8).T  # [243, 5], first trit high
    encoded = ggml._tq1_encode(trits[:, :, None], 5)
    decoded = ggml._tq1_decode(encoded, 5)[:, :, 0]
    assert np.array_equal(decoded, trits)
    assert len(set(encoded[:, 0].tolist())) == 243


def test_tq2_0_bit_layout_matches_the_documented_rule():
    rng = np.random.default_rng(7)
    codes = random_codes(rng, 1, 256)
    raw = ggml.pack(TernaryWeights(codes, np.float32(1.0)), ggml.TernaryType.TQ2_0)[0]
    for i in range(256):
        g, j, lane = i // 128, (i % 128) // 32, i % 32
        assert (raw[32 * g + lane] >> (2 * j)) & 3 == codes[0, i] + 1
    assert raw[64:66].view(np.float16)[0] == 1.0


def test_corrupt_tq2_0_code_3_is_rejected():
    raw = ggml.pack(TernaryWeights(np.zeros((1, 256), np.int8), np.float32(1.0)))
    raw[0, 5] = 0xFF
    with pytest.raises(TernaryFormatError, match="invalid 2-bit code 3"):
        ggml.unpack(raw, 256)


@pytest.mark.parametrize("qtype", TYPES)
def test_bad_shapes_and_values_are_rejected(qtype):
    with pytest.raises(TernaryFormatError, match="multiple of 256"):
        ggml.quantize(np.zeros((2, 100), np.float32), qtype)
    with pytest.raises(TernaryFormatError, match="needs"):
        ggml.unpack(np.zeros((2, 10), np.uint8), 256, qtype)
    with pytest.raises(TypeError, match="uint8"):
        ggml.unpack(np.zeros((2, ggml.row_bytes(256, qtype)), np.int8), 256, qtype)
    with pytest.raises(TernaryFormatError, match="outside"):
        ggml.pack(TernaryWeights(np.full((1, 256), 2, np.int8), np.float32(1.0)), qtype)
    with pytest.raises(TernaryFormatError, match="float16"):
        ggml.pack(TernaryWeights(np.zeros((1, 256), np.int8), np.float32(0.1)), qtype)  # 0.1 is not an fp16
    with pytest.raises(TernaryFormatError, match="overflows"):
        ggml.quantize(np.full((1, 256), 1e5, np.float32), qtype)
    with pytest.raises(TernaryFormatError, match="non-finite"):
        ggml.quantize(np.full((1, 256), np.inf, np.float32), qtype)


def test_to_ternary_refuses_per_block_scales():
    w = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    codes, d = ggml.unpack(ggml.quantize(w), 512)  # per-block absmax: four different scales
    with pytest.raises(TernaryFormatError, match="distinct block scales"):
        ggml.to_ternary(codes, d)
