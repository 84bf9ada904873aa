"""Tune CUDA kernels where the GPU is not: build candidates here, time them on the GPU host, record them here.

The build machine has TVM's compiler and nvcc but no GPU; the GPU host has the GPU but not TVM's compiler (its wheel
is too large to carry). So tuning ``--target cuda`` is three steps over one directory, in MetaSchedule's JSON
database format at the end, exactly like CPU tuning:

    # 1. here: plan trials (the hand schedule's knob grid, minus configurations already recorded), compile each to a
    #    cubin module (compiler.cuda_cross) and write DIR/manifest.json + DIR/cand_*.so + the TVM runtime bundle
    python -m compiler.tune --target cuda --config small --bench-shapes --trials 48 --export-candidates DIR
    # 2. on the GPU host (TVM's runtime only + torch for CUDA events; see scripts/gpu_tune.sh)
    python -m compiler.cuda_remote run DIR --out timings.json
    # 3. here: every candidate that was correct becomes a tuning record with its measured times
    python -m compiler.tune --target cuda --import-timings timings.json

Step 2 checks every candidate's output against the numpy reference before timing it (a wrong kernel is never
recorded) and times with CUDA events around ``number`` back-to-back calls, ``repeat`` times (median). Step 3 replays
each configuration's schedule (the trace is rebuilt from the knobs, so the record is the same as a local one) and
appends it; the database is append-only and the best record wins, so a worse re-measurement never replaces a better
one, and a re-export skips configurations already recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("compiler.cuda_remote")
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------------------------
# 1. export (build machine)
# ---------------------------------------------------------------------------------------------------------------
def export_candidates(ops, out: Path | str, trials: int, retune: bool = False, root=None, seed: int = 0) -> Path:
    """Compile the planned trials of ``ops`` into ``out``; returns the manifest path."""
    from tqdm import tqdm

    from compiler import schedule as S
    from compiler.tuning_db import open_db, plan

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db = open_db("cuda", root)
    todo = [(op, knobs) for op in ops for knobs in plan(db, op, "cuda", trials, retune, seed)]
    entries = []
    for i, (op, knobs) in enumerate(tqdm(todo, desc="build cuda candidates", unit="cand", file=sys.stderr)):
        name = f"cand_{i:04d}.so"
        try:
            S.build(op, "cuda", knobs=knobs).export_library(str(out / name))
        except Exception as exc:  # an over-split or otherwise unbuildable configuration: not a candidate
            log.info("%s %s does not build: %s", op.key, knobs, str(exc).splitlines()[0] if str(exc) else exc)
            continue
        entries.append({"op": op.key, "knobs": knobs, "file": name})
    manifest = out / MANIFEST
    manifest.write_text(json.dumps({"target": "cuda", "created": time.time(), "candidates": entries}, indent=1))
    log.info("%d candidates for %d workloads in %s", len(entries), len(ops), out)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# 2. run (GPU host: TVM runtime only)
# ---------------------------------------------------------------------------------------------------------------
def load_runtime_cuda():
    """Import TVM's runtime only, with its CUDA library, and return ``tvm``."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    from targets.cuda import load_cuda_runtime

    return load_cuda_runtime()


def cuda_time(fn, args, number: int | None = None, repeat: int = 9, target_ms: float = 20.0) -> list[float]:
    """Seconds per call, ``repeat`` samples, each the CUDA-event time of ``number`` back-to-back calls / number."""
    import torch

    fn(*args)
    torch.cuda.synchronize()
    if number is None:
        t0 = time.perf_counter()
        for _ in range(10):
            fn(*args)
        torch.cuda.synchronize()
        one = max((time.perf_counter() - t0) / 10, 1e-6)
        number = int(min(2000, max(10, target_ms / 1e3 / one)))
    out = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn(*args)
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / number)
    return out


def device_inputs(tvm, op, seed: int = 0):
    """Random inputs (numpy), their reference outputs, and TVM tensors of inputs + outputs on the GPU."""
    ins = op.random_inputs(np.random.default_rng(seed))
    refs = op.reference(*ins)
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(a, dev) for a in ins] + [tvm.runtime.tensor(o, dev) for o in op.empty_outputs()]
    return ins, refs, args


def run_candidates(cand_dir: Path | str, out: Path | str) -> list[dict]:
    """Check and time every candidate of a manifest on the GPU; writes (and returns) the timings."""
    from compiler.ops import parse_key

    tvm = load_runtime_cuda()
    import torch

    cand_dir = Path(cand_dir)
    entries = json.loads((cand_dir / MANIFEST).read_text())["candidates"]
    results, key = [], None
    for e in entries:  # the manifest lists a workload's candidates together: one workload's data at a time
        op = parse_key(e["op"])
        if e["op"] != key:
            key, (ins, refs, args) = e["op"], device_inputs(tvm, op)
        rec = dict(e, ok=False, run_secs=None, error=None)
        try:
            f = tvm.runtime.load_module(str(cand_dir / e["file"]))["main"]
            for a in args[len(ins) :]:
                a.copyfrom(np.full(a.shape, np.nan if a.dtype == "float32" else 0, a.dtype))
            f(*args)
            torch.cuda.synchronize()
            got = [a.numpy() for a in args[len(ins) :]]
            tols = op.tolerances(*ins)
            if not all(np.allclose(g, r, rtol=0, atol=t) for g, r, t in zip(got, refs, tols, strict=True)):
                rec["error"] = "output differs from the reference"
            else:
                rec["run_secs"] = cuda_time(f, args)
                rec["ok"] = True
        except Exception as exc:
            rec["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        results.append(rec)
        status = f"{statistics.median(rec['run_secs']) * 1e6:9.2f} us" if rec["ok"] else f"FAILED {rec['error']}"
        print(f"{e['op']:34s} {json.dumps(e['knobs']):70s} {status}", flush=True)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": results}
    Path(out).write_text(json.dumps(info, indent=1))
    return results


# ---------------------------------------------------------------------------------------------------------------
# 3. import (build machine)
# ---------------------------------------------------------------------------------------------------------------
def import_timings(path: Path | str, root=None) -> dict[str, int]:
    """Append every correct, timed candidate of ``path`` to ``tuning_logs/cuda``; {op key: records added}."""
    from compiler import schedule as S
    from compiler.ops import parse_key
    from compiler.tuning_db import commit, open_db

    info = json.loads(Path(path).read_text())
    db = open_db("cuda", root)
    added: dict[str, int] = {}
    for r in info["results"]:
        if not r.get("ok") or not r.get("run_secs"):
            continue
        op = parse_key(r["op"])
        commit(db, op, S.manual(op, "cuda", r["knobs"]), "cuda", [float(s) for s in r["run_secs"]])
        added[r["op"]] = added.get(r["op"], 0) + 1
    log.info("imported %d records from %s (%s)", sum(added.values()), path, info.get("device"))
    return added


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compiler.cuda_remote", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("\n"):])  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="on the GPU host: check and time the candidates of DIR")
    r.add_argument("dir")
    r.add_argument("--out", required=True)
    i = sub.add_parser("import", help="here: record the timings into tuning_logs/cuda")
    i.add_argument("timings")
    i.add_argument("--logs", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.cmd == "run":
        run_candidates(a.dir, a.out)
    else:
        for op, n in import_timings(a.timings, a.logs).items():
            print(f"{op:34s} +{n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
