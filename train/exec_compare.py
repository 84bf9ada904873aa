"""Compare two pass@k reports of one task set (``train.eval --suite exec``): is the second model better?

A held-out pass@1 near zero moves by a task or two between runs, so a difference needs its uncertainty. Both
reports' per-task rows are paired (the same tasks, each scored in both) and two intervals are given:

* the difference of mean per-task pass@1 (``c/n``), with a 95 % interval from a two-level bootstrap: resample the
  tasks with replacement, then each chosen task's passes from ``Binomial(n, c/n)`` in both reports (10 000 times,
  seeded), so both the choice of tasks and the sampling within a task count;
* the ratio of the pass rates over all samples (passes / samples), with the exact conditional test for two Poisson
  counts: given ``k`` passes in all, the second report's share is ``Binomial(k, s₂/(s₁+s₂))`` when the rates are
  equal; its two-sided p-value and a Clopper–Pearson 95 % interval for the ratio. It treats samples as independent,
  which passes clustered in a few tasks are not: read it beside the bootstrap.

The table also gives pass@k for the ks both reports have, greedy pass@1, parse rate and mean reward, and the
relative change of pass@1 (the goal of issue 20: ≥ +30 %).

    python -m train.exec_compare before.json after.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

FIGURES = ("pass_at_1", "pass_at_10", "pass_at_1_greedy", "parse_rate", "mean_reward")


class CompareError(ValueError):
    pass


def _rows(report: dict, name: str) -> dict[str, dict]:
    rows = report.get("tasks")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "task_id" in r for r in rows):
        raise CompareError(f"{name}: not a pass@k report (no per-task rows)")
    return {r["task_id"]: r for r in rows}


def _binom_cdf(x: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(x + 1)) if x >= 0 else 0.0


def _quantile(n: int, x: int, target: float) -> float:
    """The ``p`` with ``P(X ≤ x | n, p) = target`` (decreasing in ``p``), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _binom_cdf(x, n, mid) > target else (lo, mid)
    return (lo + hi) / 2


def rate_ratio(c1: int, s1: int, c2: int, s2: int) -> dict:
    """Exact conditional comparison of two pass counts ``c1/s1`` and ``c2/s2`` (see the module docstring)."""
    k, q = c1 + c2, s2 / (s1 + s2)
    if k == 0:
        return {"ratio": None, "ci95": [None, None], "p_value": 1.0}
    pmf = [math.comb(k, i) * q**i * (1 - q) ** (k - i) for i in range(k + 1)]
    p_value = min(1.0, sum(v for v in pmf if v <= pmf[c2] * (1 + 1e-9)))
    lo = 0.0 if c2 == 0 else _quantile(k, c2 - 1, 0.975)  # Clopper–Pearson bounds of the share c2/k
    hi = 1.0 if c2 == k else _quantile(k, c2, 0.025)
    to_ratio = lambda share: None if share >= 1 else share / (1 - share) * s1 / s2  # noqa: E731
    return {"ratio": to_ratio(c2 / k), "ci95": [to_ratio(lo), to_ratio(hi)], "p_value": p_value}


def compare(before: dict, after: dict, resamples: int = 10_000, seed: int = 0) -> dict:
    """The two reports' figures side by side and the paired difference of per-task pass@1 on the tasks both
    scored, with a bootstrap 95 % interval. Raises :class:`CompareError` when they share no task."""
    a, b = _rows(before, "before"), _rows(after, "after")
    common = sorted(a.keys() & b.keys())
    if not common:
        raise CompareError("the reports share no task")
    na, nb = (np.array([max(1, r[t]["n"]) for t in common]) for r in (a, b))
    pa = np.array([a[t]["passed"] for t in common]) / na
    pb = np.array([b[t]["passed"] for t in common]) / nb
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(common), size=(resamples, len(common)))
    diffs = (rng.binomial(nb[idx], pb[idx]) / nb[idx] - rng.binomial(na[idx], pa[idx]) / na[idx]).mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    samples = [int(na.sum()), int(nb.sum())]
    passes = [int(sum(r[t]["passed"] for t in common)) for r in (a, b)]
    base, new = float(pa.mean()), float(pb.mean())
    return {
        "tasks": len(common),
        "only_before": len(a.keys() - b.keys()),
        "only_after": len(b.keys() - a.keys()),
        "samples": samples,
        "passes": passes,
        "pass_at_1": [base, new],
        "difference": new - base,
        "difference_ci95": [float(lo), float(hi)],
        "relative": (new - base) / base if base else None,
        "rate_ratio": rate_ratio(passes[0], samples[0], passes[1], samples[1]),
        "tasks_gained": int(((pa == 0) & (pb > 0)).sum()),
        "tasks_lost": int(((pb == 0) & (pa > 0)).sum()),
        "figures": {k: [before.get(k), after.get(k)] for k in FIGURES if k in before or k in after},
        "resamples": resamples,
        "seed": seed,
    }


def table(c: dict, names: tuple[str, str] = ("before", "after")) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"| figure | {names[0]} | {names[1]} |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v[0])} | {fmt(v[1])} |" for k, v in c["figures"].items()]
    rel = "–" if c["relative"] is None else f"{100 * c['relative']:+.0f} %"
    lines += [
        "",
        f"{c['tasks']} tasks in both; passes {c['passes'][0]} of {c['samples'][0]} → {c['passes'][1]} of "
        f"{c['samples'][1]}; per-task pass@1 {c['pass_at_1'][0]:.4f} → {c['pass_at_1'][1]:.4f} ({rel}), "
        f"difference {c['difference']:+.4f}, 95 % CI [{c['difference_ci95'][0]:+.4f}, {c['difference_ci95'][1]:+.4f}]"
        f" (two-level bootstrap); tasks gained {c['tasks_gained']}, lost {c['tasks_lost']}",
    ]
    r = c["rate_ratio"]
    if sum(c["passes"]):
        x = lambda v: "∞" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"pass-rate ratio {x(r['ratio'])}, 95 % CI [{x(r['ci95'][0])}, {x(r['ci95'][1])}], "
                     f"p = {r['p_value']:.3f} (exact conditional test, samples taken as independent)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="pass@k report of the starting model")
    ap.add_argument("after", type=Path, help="pass@k report of the trained model, on the same task file")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.resamples < 1:
        ap.error("--resamples must be ≥ 1")
    try:
        reports = [json.loads(p.read_text()) for p in (args.before, args.after)]
        c = compare(*reports, resamples=args.resamples, seed=args.seed)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, CompareError, AttributeError, KeyError, TypeError) as e:
        print(f"python -m train.exec_compare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table(c, (args.before.stem, args.after.stem)))
    if args.json:
        args.json.write_text(json.dumps(c, indent=2) + "\n")


if __name__ == "__main__":
    main()
