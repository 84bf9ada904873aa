"""Rewrite the committed CPU tuning records of the ternary GEMV/GEMM with the traces the current hand schedules make
from their knobs (compiler.tuning_db.retrace_records), after a schedule change that keeps every knob's meaning.

    python scripts/retrace_tuning_logs.py            # every CPU target, the shared records and each CPU kind's own
"""

from __future__ import annotations

from bench.kernels import known_ops
from compiler import schedule as S
from compiler.tuning_db import retrace_records

KINDS = ("gemv_i8", "gemm_i8")


def main() -> None:
    for target in ("avx512", "avx2"):
        ops = known_ops(target)
        root = S.logs_dir(target)
        for d in [root, *sorted(p for p in (root / "machines").glob("*") if p.is_dir())]:
            if (d / S.DB_FILES[1]).exists():
                print(f"{d}: {retrace_records(d, target, ops, KINDS)} records retraced")


if __name__ == "__main__":
    main()
