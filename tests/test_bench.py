"""bench.kernels: a small run writes a JSON with sane figures and a roofline PNG; the default shapes per target.

pytest tests/test_bench.py -q
"""

from __future__ import annotations

import json

import pytest

from bench import kernels as bench


@pytest.mark.build
def test_small_run_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = bench.run("auto", ["gemv_i8:512:512", "mhc_post:D=256:S=2"], threads=(1,), baselines=True, out_dir=tmp_path)
    data = json.loads((tmp_path / f"bench_{res['target']}.json").read_text())
    assert (tmp_path / f"roofline_{res['target']}.png").stat().st_size > 10_000
    rows = {r["op"]: r for r in data["rows"]}
    gemv, mhc = rows["gemv_i8:M=512:K=512:tile=0"], rows["mhc_post:D=256:S=2:first=0:last=0"]
    assert gemv["metric"] == "GOPS" and gemv["gops"] > 1 and gemv["roof_gbs"] > 1 and 0 < gemv["pct_roof"] < 1000
    assert mhc["metric"] == "GB/s" and mhc["gbs"] > 0.1
    assert {"untuned", "scalar_ref"} <= set(gemv["speedup"])
    assert all(0 < v < float("inf") for v in gemv["speedup"].values())  # ratios measured (no timing claim)
    assert len(data["loadavg_start"]) == 3 and "gemv_i8" in res["table"]


@pytest.mark.unit
def test_bench_shapes_per_target():
    """The default set is the tuned BENCH_SHAPES a target has schedules for: the table-lookup GEMV on AVX-512 only."""
    from compiler.tune import BENCH_SHAPES, bench_ops

    avx512, avx2 = [op.key for op in bench_ops("avx512")], [op.key for op in bench_ops("avx2")]
    assert len(avx512) == len(BENCH_SHAPES) and {k for k, _ in BENCH_SHAPES} >= {"gemv_i8", "gemv_i8_tl"}
    assert avx2 == [k for k in avx512 if not k.startswith("gemv_i8_tl")]
