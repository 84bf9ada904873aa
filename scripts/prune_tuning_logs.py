"""Drop the committed CPU tuning records whose workload the compiler no longer builds
(compiler.tuning_db.prune_records), e.g. the separate q, k, v, gate and up shapes once a build stacks them
(compiler.lower.stacked); the audit in tests/test_threads.py fails on such records.

    python scripts/prune_tuning_logs.py            # every CPU target, the shared records and each CPU kind's own
"""

from __future__ import annotations

from bench.kernels import known_ops
from compiler.tuning_db import database_dirs, prune_records


def main() -> None:
    for target in ("avx512", "avx2"):
        ops = known_ops(target)
        for d in database_dirs(target):
            print(f"{d}: {prune_records(d, ops)} records dropped")


if __name__ == "__main__":
    main()
