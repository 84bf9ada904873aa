"""Where a compiled module's decode step spends its time: per kernel, from the Relax VM's instrument hook.

    python -m bench.profile --entry ENTRY --threads 1 16 --steps 32 [--batch 8] [--json out.json]

For each thread count (each in its own process: TVM's pool is sized once), the entry decodes ``--steps`` tokens
after a short prompt, with a hook that timestamps every VM call instruction before and after it. Per kernel name:
calls per step and µs per step (the median over steps); ``vm/python`` is the rest of the wall time of a step (the
VM's own work, the hook, the host loop). The hook costs about a microsecond per call, so totals run a little above
an un-instrumented step; kernel-level shares are what this is for. Needs TVM's runtime only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np


def profile(entry: str, threads: int, steps: int, prompt: int = 16, batch: int = 1) -> dict:
    from runtime.engine import Engine
    from runtime.kv_cache import Sequence

    eng = Engine(entry, None, threads=threads)
    seqs = [Sequence() for _ in range(batch)]
    for i, q in enumerate(seqs):
        eng.prefill(list(range(1 + i, prompt + 1 + i)), q)
    per_step: list[dict] = []
    cur: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    t_start: dict = {}

    def hook(func, name, before, ret, *args):
        now = time.perf_counter()
        if before:
            t_start[name] = now
        else:
            cur[name] += now - t_start.pop(name, now)
            calls[name] += 1
        return 0

    tok = 1
    for i in range(steps + 2):  # two warm-up steps
        cur.clear()
        calls.clear()
        eng.vm.set_instrument(hook)
        t0 = time.perf_counter()
        logits = eng.decode_batch(seqs, [tok] * batch)
        wall = time.perf_counter() - t0
        eng.vm.set_instrument(lambda *a: 0)
        tok = int(np.argmax(logits[0]))
        if i >= 2:
            per_step.append({"wall": wall, "kernels": dict(cur), "calls": dict(calls)})
    names = sorted({n for s in per_step for n in s["kernels"]})
    rows = []
    for n in names:
        us = [s["kernels"].get(n, 0.0) * 1e6 for s in per_step]
        rows.append({"kernel": n, "calls": per_step[-1]["calls"].get(n, 0), "us_per_step": float(np.median(us))})
    wall_us = float(np.median([s["wall"] for s in per_step]) * 1e6)
    rows.sort(key=lambda r: -r["us_per_step"])
    rows.append({"kernel": "vm/python", "calls": 0, "us_per_step": wall_us - sum(r["us_per_step"] for r in rows)})
    return {"entry": entry, "threads": threads, "batch": batch, "steps": steps, "wall_us_per_step": wall_us,
            "rows": rows}  # fmt: skip


def table(res: dict, top: int = 25) -> str:
    lines = [f"{res['threads']} thread(s), batch {res.get('batch', 1)}: {res['wall_us_per_step']:.0f} µs per decode "
             "step (instrumented)",
             f"{'kernel':60s} {'calls':>5s} {'µs/step':>9s} {'share':>6s}"]  # fmt: skip
    for r in res["rows"][:top] + ([res["rows"][-1]] if len(res["rows"]) > top else []):
        share = 100 * r["us_per_step"] / res["wall_us_per_step"]
        lines.append(f"{r['kernel'][:60]:60s} {r['calls']:5d} {r['us_per_step']:9.1f} {share:5.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--entry", required=True, help="a compiler.build cache entry (model.so + params.npz + meta.json)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="sequences per decode step (decode_batch)")
    ap.add_argument("--top", type=int, default=25, help="rows of the table")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if any(t < 1 for t in a.threads) or a.steps < 1 or a.batch < 1:
        ap.error("--threads, --steps and --batch must be positive")
    if a.worker:
        print(json.dumps(profile(a.entry, a.threads[0], a.steps, batch=a.batch)))
        return 0
    results = []
    for t in a.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(t))
        cmd = [sys.executable, "-m", "bench.profile", "--worker", "--entry", a.entry, "--threads", str(t),
               "--steps", str(a.steps), "--batch", str(a.batch)]  # fmt: skip
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"profile with {t} threads failed:\n{r.stderr[-3000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(table(results[-1], a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": " ".join(["python -m bench.profile", *sys.argv[1:]]), "results": results}, f,
                      indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
