"""train.exec_compare: paired comparison of two pass@k reports.

pytest tests/test_exec_compare.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train.exec_compare import compare, rate_ratio

ROOT = Path(__file__).resolve().parent.parent


def _report(passed: list[int], n: int = 10) -> dict:
    rows = [{"task_id": f"t{i}", "n": n, "passed": c} for i, c in enumerate(passed)]
    return {"tasks": rows, "pass_at_1": sum(passed) / (n * len(passed))}


@pytest.mark.unit
def test_rate_ratio_is_the_exact_conditional_binomial_test():
    c1, s1, c2, s2 = 10, 1000, 20, 1000
    r = rate_ratio(c1, s1, c2, s2)
    k, q = c1 + c2, s2 / (s1 + s2)
    pmf = [math.comb(k, i) * q**i * (1 - q) ** (k - i) for i in range(k + 1)]
    assert r["p_value"] == pytest.approx(sum(v for v in pmf if v <= pmf[c2] * (1 + 1e-9)))
    assert r["ratio"] == pytest.approx(2.0)
    lo, hi = r["ci95"]
    share = lambda ratio: ratio / (ratio + 1)  # noqa: E731  (s1 == s2)
    # Clopper–Pearson: at the bounds the tail probabilities are 2.5 % each
    assert sum(math.comb(k, i) * share(lo) ** i * (1 - share(lo)) ** (k - i) for i in range(c2, k + 1)) == (
        pytest.approx(0.025, abs=1e-6))  # fmt: skip
    assert sum(math.comb(k, i) * share(hi) ** i * (1 - share(hi)) ** (k - i) for i in range(c2 + 1)) == (
        pytest.approx(0.025, abs=1e-6))  # fmt: skip
    assert rate_ratio(0, 10, 0, 10) == {"ratio": None, "ci95": [None, None], "p_value": 1.0}
    assert rate_ratio(3, 100, 0, 100)["ci95"][0] == 0.0 and rate_ratio(0, 100, 3, 100)["ratio"] is None


@pytest.mark.unit
def test_compare_pairs_tasks_and_its_interval_covers_no_change():
    same = compare(_report([0, 1, 0, 3, 0]), _report([0, 1, 0, 3, 0]))
    assert same["difference"] == 0 and same["difference_ci95"][0] < 0 < same["difference_ci95"][1]
    assert same["rate_ratio"]["ratio"] == pytest.approx(1.0) and same["tasks_gained"] == same["tasks_lost"] == 0
    better = compare(_report([0] * 20 + [1] * 5), _report([5] * 20 + [6] * 5))
    assert better["difference_ci95"][0] > 0 and better["rate_ratio"]["p_value"] < 1e-6 and better["tasks_gained"] == 20
    partial = compare(_report([1, 2]), {"tasks": [{"task_id": "t1", "n": 10, "passed": 4}, {"task_id": "x", "n": 1,
                                                                                          "passed": 0}]})  # fmt: skip
    assert partial["tasks"] == 1 and partial["only_before"] == partial["only_after"] == 1
    assert partial["passes"] == [2, 4] and partial["relative"] == pytest.approx(1.0)


@pytest.mark.unit
def test_the_cli_prints_a_table_and_refuses_what_is_not_a_report(tmp_path):
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    a.write_text(json.dumps(_report([0, 1, 2])))
    b.write_text(json.dumps(_report([1, 1, 3])))
    bad.write_text("[1, 2]")
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "train.exec_compare", str(a), str(b), "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "| pass_at_1 |" in r.stdout and "pass-rate ratio" in r.stdout
    assert json.loads(out.read_text())["passes"] == [3, 5]
    for args in ([str(a), str(bad)], [str(a), str(tmp_path / "missing.json")], [str(a), str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "train.exec_compare", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
