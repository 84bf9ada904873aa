"""targets.hugepages: tensors on transparent huge pages hold the same data; a range without a whole huge page and the
``TERNARY_HUGEPAGES=0`` opt-out are left alone; where the kernel offers THP a large tensor is marked."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from targets import hugepages

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_offered() -> bool:
    return sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text()


def test_host_tensor_keeps_the_data():
    tvm = pytest.importorskip("tvm")
    rng = np.random.default_rng(0)
    for shape, dtype in (((3, 5), "float32"), ((1 << 20,), "int8"), ((2049, 1024), "float16")):
        a = rng.standard_normal(shape).astype(dtype)
        t = hugepages.host_tensor(a, tvm.cpu())
        assert t.numpy().dtype == a.dtype and np.array_equal(t.numpy(), a)
        e = hugepages.empty_tensor(shape, dtype, tvm.cpu())
        assert tuple(e.shape) == shape


def test_advise_skips_ranges_without_a_whole_huge_page():
    assert hugepages.advise(4096, hugepages.HUGE - 4096) == 0  # no aligned 2 MiB inside
    assert hugepages.advise(1, hugepages.HUGE) == 0


@pytest.mark.skipif(not _thp_offered(), reason="the kernel offers no transparent huge pages here")
def test_a_large_tensor_can_be_marked_unless_opted_out():
    """A 16 MiB tensor's aligned interior takes ``MADV_HUGEPAGE`` (whether the kernel then backs it is
    ``bench.hugepages``'s ``AnonHugePages``); with ``TERNARY_HUGEPAGES=0`` nothing is marked."""
    code = (
        "import numpy as np, tvm\n"
        "from targets import hugepages\n"
        "t = hugepages.host_tensor(np.ones(16 << 20, np.int8), tvm.cpu())\n"
        "print(hugepages.advise(t.data_ptr(), 16 << 20))\n"
    )
    for flag, marked in (("1", True), ("0", False)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                             env={**os.environ, "TERNARY_HUGEPAGES": flag})  # fmt: skip
        n = int(out.stdout.split()[-1])
        assert (n >= 14 << 20) if marked else n == 0, (flag, n)
