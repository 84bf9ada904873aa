"""Where a benchmark ran: the CPU (model, cores, ISA flags that matter here), memory, Python, the git commit; and
where its report goes (:func:`save_json`).

Every benchmark JSON carries :func:`machine` and :func:`git_commit`, so a figure names its machine.

    python -m bench.machine
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

from targets.cpu import cpu_name

REPO = Path(__file__).resolve().parent.parent
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512vbmi", "avx512_vbmi2", "avx512_bf16", "amx_int8")  # fmt: skip


def machine() -> dict:
    from targets.cpu import cpu_flags

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) / (1 << 20)
    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "isa": [f for f in ISA_FLAGS if f in flags], "mem_gib": round(mem, 1) if mem else None,
            "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def save_json(path: str | Path, report: dict) -> None:
    """Write a benchmark's report (creating its folder) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    print(json.dumps({"machine": machine(), "git": git_commit()}, indent=1))
