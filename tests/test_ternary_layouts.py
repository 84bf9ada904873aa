"""Kernel layouts (model/ternary/layouts.py): rowmajor4 packing and the TQ2_0/TQ1_0 → kernel repack."""

import numpy as np
import pytest
from helpers import ks, ms, random_codes, seeds
from hypothesis import given
from hypothesis import strategies as st

from model.ternary import ggml, quantize_weights
from model.ternary.checks import TernaryFormatError
from model.ternary.layouts import LAYOUTS, get_layout, pack_weights, repack_gguf

pytestmark = pytest.mark.unit


@given(seeds, ms, ks, st.sampled_from(sorted(LAYOUTS)))
def test_every_layout_round_trips(seed, m, k, name):
    layout = get_layout(name)
    m = -(-m // layout.row_multiple) * layout.row_multiple
    codes = random_codes(np.random.default_rng(seed), m, k)
    assert np.array_equal(layout.unpack(layout.pack(codes), k), codes)
    if layout.row_multiple > 1:  # a row count the tiling cannot hold is refused clearly, not mangled
        with pytest.raises(TernaryFormatError, match="multiple"):
            layout.pack(codes[:-1])


@given(seeds, ms)
def test_rowmajor4_follows_the_kernel_decode_rule(seed, m):
    codes = random_codes(np.random.default_rng(seed), m, 256)
    w = get_layout("rowmajor4").pack(codes)
    assert w.shape == (m, 64) and w.dtype == np.uint8
    mm, kk = np.meshgrid(np.arange(m), np.arange(256), indexing="ij")
    decoded = (w[mm, kk // 4] >> (2 * (kk % 4)).astype(np.uint8)) & 3  # the rule the TVM kernels use
    assert np.array_equal(decoded.astype(np.int8) - 1, codes)


@given(seeds, ms, ks, st.sampled_from(list(ggml.TernaryType)))
def test_repack_from_gguf_equals_direct_pack(seed, m, k, qtype):
    rng = np.random.default_rng(seed)
    tw = quantize_weights((rng.standard_normal((m, k)) * rng.uniform(0.01, 3)).astype(np.float32))
    packed, scale = repack_gguf(ggml.pack(tw, qtype), k, qtype)
    assert np.array_equal(packed, pack_weights(tw)) and scale == tw.scale


def test_layout_errors_are_clear():
    with pytest.raises(TernaryFormatError, match="unknown kernel layout"):
        get_layout("nope")
    with pytest.raises(TernaryFormatError, match="outside"):
        get_layout("rowmajor4").pack(np.full((1, 256), 3, np.int8))
    with pytest.raises(TernaryFormatError, match="multiple of 256"):
        get_layout("rowmajor4").pack(np.zeros((1, 300), np.int8))
    with pytest.raises(TernaryFormatError, match="needs"):
        get_layout("rowmajor4").unpack(np.zeros((1, 64), np.uint8), 512)
    with pytest.raises(TernaryFormatError, match="code 3"):
        get_layout("rowmajor4").unpack(np.full((1, 64), 0xFF, np.uint8), 256)
