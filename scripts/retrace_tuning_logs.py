"""Rewrite the committed CPU tuning records of the ternary GEMV/GEMM with the traces the current hand schedules make
from their knobs (compiler.tuning_db.retrace_records), after a schedule change that keeps every knob's meaning.

    python scripts/retrace_tuning_logs.py            # every CPU target, the shared records and each CPU kind's own
"""

from __future__ import annotations

from bench.kernels import known_ops
from compiler.tuning_db import database_dirs, retrace_records

KINDS = ("gemv_i8", "gemm_i8")


def main() -> None:
    for target in ("avx512", "avx2"):
        ops = known_ops(target)
        for d in database_dirs(target):
            print(f"{d}: {retrace_records(d, target, ops, KINDS)} records retraced")


if __name__ == "__main__":
    main()
