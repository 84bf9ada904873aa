"""One GEMV knob swept over a whole model: which value decodes fastest on this machine, and its records for this CPU.

    python -m bench.knob_sweep --model bitnet-2b.gguf --target avx512 --knob prefetch --values 0 1024 2048 4096
    python -m bench.knob_sweep --model bitnet-2b.gguf --knob prefetch --values 0 1024 --runs 5 --record
    python -m bench.knob_sweep --model bitnet-2b.gguf --weights tl --knob prefetch --values 0 1024 2048 4096
    python -m bench.knob_sweep --model bitnet-2b.gguf --knob prefetch_to --values 1 2 --with prefetch=2048

Why: a knob that decides how weights stream from DRAM (the software prefetch distance above all) is ranked wrongly
by timing one kernel alone. On an Intel AVX-512 VM (2 vCPUs, 480 MiB L3) ``compiler.tune --dram`` timed the 2B-4T
GEMVs within a few % at 0 and 1024 B of prefetch, in either order from one harness to the next, while in the model
1024 B decodes 1.24x faster (``docs/threads.md``). So this measures the model itself.

For each value: every ternary GEMV of the model (``gemv_i8``; with ``--weights tl`` the 1.67-bit ``gemv_i8_tl``,
built for ``--threads``) gets the knobs the build would use (this CPU kind's record, else the shared one, else the
hand defaults) with ``--knob`` set to the value (and each ``--with KNOB=V``), as this CPU kind's records in a scratch
copy of the tuning logs; ``compiler.build`` compiles the model against it (into ``--workdir``);
then ``--runs`` rounds, each timing every build in turn in its own subprocess (``bench.runtime``'s worker: prefill
``--prompt-tokens``, then ``--decode-tokens`` greedy steps; decode tok/s = 1 / the median step), plus the build
from the current records as the baseline. The table gives medians and ranges, and the median of the per-round ratios
to the baseline. ``--record`` writes the winner (by median decode rate) as this CPU kind's records of those GEMVs
(``tuning_logs/<target>/machines/<id>/``, :func:`compiler.tuning_db.replace_records`), each with its own
DRAM-resident time (:func:`compiler.tune.measure`). Timings on a shared machine mean something only when nothing
else runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import targets
from bench.runtime import _median_row, _run_worker
from compiler import schedule as S
from compiler import tune
from compiler.cache import logs_root
from compiler.tuning_db import open_db, replace_records

GEMV = {"tile8": "gemv_i8", "tl": "gemv_i8_tl"}  # the decode step's weight-streaming kernel of each CPU layout


def sweep_ops(model: str, weights: str = "tile8") -> list:
    """The model's ternary GEMVs in the layout ``weights``: the kernels a decode step streams its weights through."""
    return [op for op in tune.model_ops(model, "cpu", weights) if op.kind == GEMV[weights]]


def variant_logs(ops, target: str, knob: str, value: int, dest: Path, logs=None, cores: int | None = None,
                 fixed: dict | None = None) -> Path:  # fmt: skip
    """A copy of the tuning logs whose records for this CPU kind give every op of ``ops`` its current knobs with
    ``fixed`` and ``knob = value`` (run times: placeholders, never ranked against anything: the op has no other
    record there)."""
    src = Path(logs or logs_root()) / target
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest / target, ignore=shutil.ignore_patterns("machines"))
    db = open_db(target, dest, machine=True)
    for op in ops:
        knobs = S.build_knobs(op, target, logs) | (fixed or {}) | {knob: value}
        tune.commit(db, op, S.manual(op, target, knobs, cores), target, [1.0])
    return dest


def fixed_knobs(pairs: list[str]) -> dict[str, int]:
    """``["prefetch=2048"]`` → ``{"prefetch": 2048}`` (checked by :func:`check_args`)."""
    return {name: int(v) for name, _, v in (p.partition("=") for p in pairs)}


def check_args(a, space_names: set[str]) -> list[str]:
    out = []
    if not Path(a.model).is_file():
        out.append(f"--model {a.model}: not a file")
    if space_names and a.knob not in space_names:
        out.append(f"--knob {a.knob}: the GEMV's knobs are {', '.join(sorted(space_names))}")
    for w in a.with_:
        name, eq, v = w.partition("=")
        if not eq or not v.lstrip("-").isdigit() or (space_names and name not in space_names) or name == a.knob:
            out.append(f"--with {w}: give KNOB=INT for another of the GEMV's knobs")
    if len(set(a.values)) < 2:
        out.append("--values: give at least two different values to compare")
    if a.runs < 1:
        out.append(f"--runs must be ≥ 1, got {a.runs}")
    return out


def run(a, ops: list) -> dict:
    """The sweep of ``a.knob`` over ``ops`` (:func:`sweep_ops` of ``a.model``)."""
    target = targets.resolve(a.target)
    from compiler import cache
    from compiler.lower import amx_for

    # kernels that split work per thread (the 1.67-bit tables, AMX tasks): built for the threads they run with
    cores = a.threads if cache.per_thread(target, a.weights, amx_for(target, a.weights)) else None
    fixed = fixed_knobs(a.with_)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from compiler.build import build

    opts = {"cache_dir": work / "cache", "weights": a.weights, "cores": cores}
    builds = {"current": build(a.model, target, tuning_logs=a.logs, **opts).dir}
    for v in a.values:
        print(f"building {a.knob}={v} ...", file=sys.stderr, flush=True)
        logs = variant_logs(ops, target, a.knob, v, work / f"logs_{a.knob}_{v}", a.logs, cores, fixed)
        builds[v] = build(a.model, target, tuning_logs=logs, **opts).dir
    runs: dict = {k: [] for k in builds}
    for r in range(a.runs):
        for k, entry in builds.items():
            print(f"run {r + 1}/{a.runs}: {a.knob}={k}", file=sys.stderr, flush=True)
            args = ["tvm", "--model", a.model, "--entry", str(entry), "--prompt-tokens", str(a.prompt_tokens),
                    "--decode-tokens", str(a.decode_tokens)]  # fmt: skip
            runs[k].append(_run_worker(args, a.threads))
    rows = []
    for k, rs in runs.items():
        row = _median_row(rs)
        ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(rs, runs["current"], strict=True)]
        rows.append({"value": k, "decode_tok_s": row["decode_tok_s"], "decode_tok_s_range": row["decode_tok_s_range"],
                     "vs_current": float(np.median(ratios)), "vs_current_range": [min(ratios), max(ratios)],
                     "entry": str(builds[k])})  # fmt: skip
    best = max((r for r in rows if r["value"] != "current"), key=lambda r: r["decode_tok_s"])
    res = {"command": "python -m bench.knob_sweep " + " ".join(sys.argv[1:]), "model": a.model, "target": target,
           "machine_id": S.machine_dir(target).name, "cpu": targets.cpu.cpu_name(), "threads": a.threads,
           "weights": a.weights, "knob": a.knob, "with": fixed, "ops": [op.key for op in ops], "runs": a.runs,
           "rows": rows, "best": best["value"], "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    if a.record:
        new = []
        for op in ops:
            sch = S.manual(op, target, S.build_knobs(op, target, a.logs) | fixed | {a.knob: best["value"]}, cores)
            new.append((op, sch, tune.measure(op, S.compile_mod(sch.mod, target), dram=True)))
        replace_records(S.machine_dir(target, a.logs), target, new)
        res["recorded"] = str(S.machine_dir(target, a.logs))
    return res


def table(res: dict) -> str:
    fixed = "".join(f", {k}={v}" for k, v in res.get("with", {}).items())
    lines = [f"{res['knob']}{fixed} over the {len(res['ops'])} {res['weights']} GEMVs of {res['model']} "
             f"({res['target']}, {res['threads']} thread(s), {res['cpu']}, {res['machine_id']}); "
             f"medians of {res['runs']} runs",
             f"{'value':>10} {'decode tok/s':>13} {'range':>16} {'vs current':>11} {'range':>16}"]  # fmt: skip
    for r in res["rows"]:
        lo, hi = r["decode_tok_s_range"]
        rlo, rhi = r["vs_current_range"]
        lines.append(f"{r['value']!s:>10} {r['decode_tok_s']:13.2f} {f'[{lo:.2f}, {hi:.2f}]':>16} "
                     f"{r['vs_current']:10.3f}x {f'[{rlo:.3f}, {rhi:.3f}]':>16}")  # fmt: skip
    where = f"; recorded in {res['recorded']}" if "recorded" in res else ""
    lines.append(f"best: {res['knob']}={res['best']}{where}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.knob_sweep", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("\n"):])  # fmt: skip
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--target", default="auto", help="avx512 | avx2 | auto")
    ap.add_argument("--weights", default="tile8", choices=sorted(GEMV), help="the CPU weight layout (compiler.build)")
    ap.add_argument("--knob", default="prefetch", help="the GEMV knob to sweep (default prefetch)")
    ap.add_argument("--values", type=int, nargs="+", default=[0, 1024, 2048, 4096])
    ap.add_argument(
        "--with",
        dest="with_",
        action="append",
        default=[],
        metavar="KNOB=V",
        help="another knob fixed at V in every variant, e.g. prefetch=2048 (repeatable)",
    )
    ap.add_argument("--threads", type=int, default=targets.num_cores())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="bench_results/knob_sweep", help="builds and scratch tuning logs go here")
    ap.add_argument("--logs", default=None, help="tuning log root (default: the one builds use)")
    ap.add_argument("--record", action="store_true", help="write the winner as this CPU kind's records")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if targets.resolve(a.target) == "cuda":
        ap.error("--target cuda: the sweep is for CPU targets")
    ops = sweep_ops(a.model, a.weights) if Path(a.model).is_file() else []
    space = S.schedule_module(targets.resolve(a.target)).space(ops[0]) if ops else []
    if problems := check_args(a, {k.name for k in space}):
        ap.error("; ".join(problems))
    res = run(a, ops)
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
