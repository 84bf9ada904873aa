"""compiler.kernels.Kernel never lets a bad argument reach a TVM kernel: it copies what it can and rejects the rest.

Misaligned (1-byte offset), strided, reversed, Fortran-ordered, read-only and torch-view inputs give the same result as
clean inputs; wrong dtypes, shapes, counts, types and devices raise KernelArgError naming the argument.

    pytest tests/test_kernels_safety.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from compiler.kernels import KernelArgError, aligned_copy, aligned_empty, is_aligned
from compiler.ops import make_op
from compiler.schedule import get_kernel

pytestmark = pytest.mark.build

OP = make_op("gemv_i8", M=64, K=512)


@pytest.fixture(scope="module")
def kernel():
    return get_kernel(OP, "auto", "hand")


@pytest.fixture(scope="module")
def inputs():
    return OP.random_inputs(np.random.default_rng(0))


@pytest.fixture(scope="module")
def expected(inputs):
    return OP.reference(*inputs)[0]


def misaligned(a: np.ndarray, offset: int = 1) -> np.ndarray:
    raw = np.empty(a.nbytes + 64 + offset, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not is_aligned(out)
    return out


def strided(a: np.ndarray) -> np.ndarray:
    big = np.zeros((*a.shape[:-1], a.shape[-1] * 2), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def reversed_view(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[..., ::-1])[..., ::-1]


def readonly(a: np.ndarray) -> np.ndarray:
    b = aligned_copy(a)
    b.setflags(write=False)
    return b


@pytest.mark.parametrize("transform", [misaligned, strided, reversed_view, readonly, np.asfortranarray])
@pytest.mark.parametrize("which", range(5))
def test_bad_layouts_are_copied_not_crashed(kernel, inputs, expected, transform, which):
    args = [aligned_copy(a) for a in inputs]
    args[which] = transform(args[which])
    before = kernel.copies
    y = kernel(*args)[0]
    np.testing.assert_array_equal(y, expected)
    a = args[which]  # size-1 and 1-D arrays stay C-contiguous under some transforms: then no copy is due
    copied = not (a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0)
    assert kernel.copies == before + copied


def test_clean_inputs_are_not_copied(kernel, inputs, expected):
    args = [aligned_copy(a) for a in inputs]
    before = kernel.copies
    np.testing.assert_array_equal(kernel(*args)[0], expected)
    assert kernel.copies == before


def test_outputs_are_aligned_and_out_arrays_filled(kernel, inputs, expected):
    y = kernel(*inputs)[0]
    assert is_aligned(y) and y.flags.c_contiguous
    out = misaligned(np.zeros(64, np.float32), 4)
    res = kernel(*inputs, out=out)
    assert res[0] is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("which", "bad", "match"),
    [
        (2, np.array([5], np.int64), "x_sum.*int32.*int64"),  # torch.sum() gives int64
        (1, np.zeros(512, np.uint8), "'x'.*int8"),
        (0, np.zeros((64, 64), np.uint8), r"'W'.*shape \(64, 128\)"),
        (1, np.zeros((1, 512), np.int8), r"'x'.*shape \(512,\)"),
        (3, np.float32(1.0), "numpy array"),
        (4, [1.0], "numpy array"),
    ],
)
def test_wrong_arguments_are_rejected(kernel, inputs, which, bad, match):
    args = list(inputs)
    args[which] = bad
    with pytest.raises(KernelArgError, match=match):
        kernel(*args)


def test_wrong_counts_and_outputs_are_rejected(kernel, inputs):
    with pytest.raises(KernelArgError, match="expected 5 inputs"):
        kernel(*inputs[:4])
    with pytest.raises(KernelArgError, match=r"'y'.*float32"):
        kernel(*inputs, out=np.zeros(64, np.float64))
    with pytest.raises(KernelArgError, match="expected 1 output"):
        kernel(*inputs, out=[np.zeros(64, np.float32)] * 2)


def test_torch_tensors_and_views(kernel, inputs, expected):
    torch = pytest.importorskip("torch")
    W, x, xs, xsc, ws = (torch.from_numpy(np.array(a)) for a in inputs)
    wide = torch.zeros(1025, dtype=torch.int8)
    wide[1:513] = x
    view = wide[1:513]  # a torch view 1 byte off alignment
    np.testing.assert_array_equal(kernel(W, view, xs, xsc, ws)[0], expected)
    with pytest.raises(KernelArgError, match=r"int32.*int64"):
        kernel(W, x, x.sum().reshape(1), xsc, ws)


def test_aligned_empty_alignment():
    for shape, dtype in [((3,), np.int8), ((5, 7), np.float32), ((0,), np.int32)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and (a.size == 0 or is_aligned(a))
