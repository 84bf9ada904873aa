"""Thread scaling of the tuned CPU GEMVs against the read roof, on machines with more cores than the one that builds.

Each kernel is built for the thread count it runs with (``cores``: the table-lookup GEMV splits its per-thread table
build by it, see docs/threads.md), so the build happens where TVM's compiler is and the timing where the cores are:

    python -m bench.threads export DIR --threads 1,2,4,8,16      # here: kernels + read roof + manifest
    python -m bench.threads run DIR --json scaling.json           # there, TVM's runtime only
    python -m bench.threads all --threads 1,2 --json s.json       # both here

Per thread count, every kernel and the read roof are timed in turn, ``--rounds`` times (default 5): figures are the
medians, ratios are medians of the ratios within a round (a shared machine's bandwidth drifts between minutes), and
the JSON keeps every round. DRAM-resident shapes rotate over enough copies of the weights to exceed twice the
last-level cache of the machine that runs them (read from sysfs, never assumed), so no call finds its weights in
cache; the read roof rotates over the same number of arrays of the same size. Every kernel's output is checked
against the numpy reference before it is timed. ``×2bit``: a 1.67-bit ``gemv_i8_tl`` against the 2-bit
``gemv_i8`` of the same shape in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_name
from compiler.measure import cycle_time, dram_copies, weight_bytes
from targets.cpu import llc_bytes
from targets.hugepages import host_tensor

MANIFEST = "manifest.json"
SHAPES = ["gemv_i8:M=32768:K=16384:tile=8", "gemv_i8_tl:M=32768:K=16384:tile=8", "gemv_i8:M=4096:K=4096:tile=8",
          "gemv_i8_tl:M=4096:K=4096:tile=8"]  # fmt: skip
ROOF_CHUNKS = 64  # the read roof's parallel chunks (bench.kernels._roof_kernel): enough for 64 threads


def _threads(text: str) -> list[int]:
    try:
        ts = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: expected comma-separated integers") from None
    if not ts or ts[0] < 1 or ts[-1] > 256:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: each must be in 1..256")
    return ts


def roof_bytes(op) -> int:
    """The read roof's array for ``op``: the 2-bit weights of its shape (the same size class for both layouts)."""
    return op.M * op.K // 4


# ---------------------------------------------------------------------------------------------------------------
# export (the machine with TVM's compiler)
# ---------------------------------------------------------------------------------------------------------------
def _variants(text: list[str]) -> list[dict]:
    """``--knobs prefetch=0,cores_mult=2`` → [{"prefetch": 0, "cores_mult": 2}]: knob values that replace the tuned
    record's (``cores_mult``: build for that multiple of the thread count it runs with)."""
    out = []
    for v in text:
        try:
            out.append({k: int(x) for k, x in (kv.split("=") for kv in v.split(","))})
        except ValueError:
            raise SystemExit(f"--knobs {v!r}: expected name=int[,name=int...]") from None
    return out


def export(out: Path | str, target: str, threads: list[int], shapes: list[str], variants=()) -> Path:
    import targets
    from bench.kernels import _roof_kernel
    from compiler import schedule as S
    from compiler.ops import parse_key

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = targets.resolve(target)
    kernels, roofs = [], {}
    for key in shapes:
        op = parse_key(key)
        space = S.schedule_module(target).space(op)
        tuned = S.build_knobs(op, target)
        for var in [{}, *variants]:
            knobs = {**tuned, **{k: v for k, v in var.items() if k != "cores_mult"}}
            if any(k.name in knobs and knobs[k.name] not in k.candidates for k in space):
                continue  # a variant this shape's knob space does not have
            label = op.key + ("[" + ",".join(f"{k}={v}" for k, v in var.items()) + "]" if var else "")
            for t in threads:
                name = f"k{len(kernels):03d}.so"
                cores = t * var.get("cores_mult", 1)
                if var:
                    ex, source = S.build(op, target, knobs=knobs, cores=cores), "variant"
                else:
                    sf = S.get_primfunc(op, target, cores=cores)
                    ex, source = sf.build(), sf.source
                ex.export_library(str(out / name))
                kernels.append({"op": op.key, "label": label, "threads": t, "file": name, "source": source,
                                "knobs": knobs, "cores": cores})  # fmt: skip
                print(f"built {label} for {t} threads ({source}) -> {name}", file=sys.stderr)
        nb = roof_bytes(op)
        if nb not in roofs:
            ex, args, actual = _roof_kernel("read", nb, target)
            name = f"roof{len(roofs)}.so"
            ex.export_library(str(out / name))
            roofs[nb] = {"file": name, "shape": [int(s) for s in args[0].shape], "bytes": int(actual)}
    manifest = {"target": target, "threads": threads, "kernels": kernels,
                "roofs": {str(k): v for k, v in roofs.items()}, "built_on": platform.node(),
                "command": " ".join(["python -m bench.threads", *sys.argv[1:]])}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out / MANIFEST


# ---------------------------------------------------------------------------------------------------------------
# run (TVM's runtime only)
# ---------------------------------------------------------------------------------------------------------------
def _set_threads(n: int) -> int:
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, int(n))
    return int(tvm.get_global_func("runtime.NumThreads")())


def read_roof_gbs(d: Path | str, threads: int, repeat: int = 5) -> tuple[float, int]:
    """(median read GB/s, array bytes) of the largest prebuilt read roof in export ``d``, at ``threads`` threads
    (``TVM_NUM_THREADS`` must allow them), rotated over arrays that exceed twice the last-level cache."""
    import tvm

    man = json.loads((Path(d) / MANIFEST).read_text())
    nb, r = max(((int(k), v) for k, v in man["roofs"].items()), key=lambda kv: kv[0])
    copies = math.ceil(2 * llc_bytes() / nb) + 1
    arrs = [[host_tensor(np.ones(r["shape"], np.int32), tvm.cpu()), tvm.runtime.tensor(np.zeros((ROOF_CHUNKS, 16),
             np.int32))] for _ in range(copies)]  # fmt: skip
    f = tvm.runtime.load_module(str(Path(d) / r["file"]))["main"]
    _set_threads(threads)
    return statistics.median(r["bytes"] / cycle_time(f, arrs, 0.1) / 1e9 for _ in range(repeat)), nb


def run(d: Path | str, rounds: int = 5, min_s: float = 0.05) -> dict:
    d = Path(d)
    man = json.loads((d / MANIFEST).read_text())
    os.environ["TVM_NUM_THREADS"] = str(max(man["threads"]))  # the pool's size is fixed when it first starts
    import tvm

    from compiler.ops import parse_key

    llc = llc_bytes()
    rng = np.random.default_rng(0)
    data = {}  # op key -> (op, [arg lists per copy], reference outputs, tolerances, copies)
    for key in dict.fromkeys(k["op"] for k in man["kernels"]):
        op = parse_key(key)
        ins = op.random_inputs(rng)
        refs, tols = op.reference(*ins, impl="numpy"), op.tolerances(*ins)
        copies = dram_copies(weight_bytes(op), llc)
        sets = []
        for c in range(copies):
            own = [ins[0].copy() if c else ins[0], *ins[1:]]
            sets.append([host_tensor(a, tvm.cpu()) for a in own + op.empty_outputs()])
        data[key] = (op, sets, refs, tols, copies)
        print(f"{key}: {copies} weight copies (LLC {llc >> 20} MiB)", file=sys.stderr)
    roofs = {}
    for nb, r in man["roofs"].items():
        copies = dram_copies(int(nb), llc)
        arrs = [[host_tensor(np.ones(r["shape"], np.int32), tvm.cpu()), tvm.runtime.tensor(np.zeros((ROOF_CHUNKS, 16),
                 np.int32))] for _ in range(copies)]  # fmt: skip
        roofs[int(nb)] = (tvm.runtime.load_module(str(d / r["file"])), arrs, r["bytes"])
    rows = []
    for t in man["threads"]:
        got = _set_threads(t)
        ks = {k.get("label", k["op"]): k for k in man["kernels"] if k["threads"] == t}
        mods = {lab: tvm.runtime.load_module(str(d / k["file"])) for lab, k in ks.items()}
        for lab, mod in mods.items():  # correct before timed
            key = ks[lab]["op"]
            op, sets, refs, tols, _ = data[key]
            mod["main"](*sets[0])
            for o, ref, tol in zip(sets[0][len(sets[0]) - len(refs) :], refs, tols, strict=True):
                if not np.allclose(o.numpy(), ref, rtol=0, atol=tol):
                    raise SystemExit(f"{lab} built for {t} threads: wrong result, refusing to time it")
        order = [("kernel", k) for k in mods] + [("roof", nb) for nb in roofs]
        times = {x: [] for x in order}
        for _ in range(rounds):
            for kind, k in order:
                if kind == "kernel":
                    times[(kind, k)].append(cycle_time(mods[k]["main"], data[ks[k]["op"]][1], min_s))
                else:
                    f, arrs, _ = roofs[k]
                    times[(kind, k)].append(cycle_time(f["main"], arrs, min_s))
        for lab in mods:
            key = ks[lab]["op"]
            op = data[key][0]
            ts = np.array(times[("kernel", lab)])
            nb = roof_bytes(op)
            roof_ts = np.array(times[("roof", nb)])
            roof_gbs = roofs[nb][2] / roof_ts / 1e9
            row = {"op": lab, "threads": t, "pool_threads": got, "copies": data[key][4], "knobs": ks[lab].get("knobs"),
                   "median_us": float(np.median(ts) * 1e6), "times_us": (ts * 1e6).round(2).tolist(),
                   "gops": float(op.ops() / np.median(ts) / 1e9),
                   "weights_gbs": float(weight_bytes(op) / np.median(ts) / 1e9),
                   "roof_gbs": float(np.median(roof_gbs)),
                   "pct_roof": float(np.median(weight_bytes(op) / ts / 1e9 / roof_gbs) * 100)}  # fmt: skip
            twin = getattr(op, "two_bit_twin", None)
            if twin is not None and twin().key in mods:
                row["x2bit"] = float(np.median(np.array(times[("kernel", twin().key)]) / ts))
            rows.append(row)
    base = {r["op"]: r["median_us"] for r in rows if r["threads"] == min(man["threads"])}
    for r in rows:
        r["speedup_vs_fewest"] = base[r["op"]] / r["median_us"]
    return {"command": " ".join(["python -m bench.threads", *sys.argv[1:]]), "export": man["command"],
            "target": man["target"], "cpu": cpu_name(), "cores": os.cpu_count(), "llc_bytes": llc, "rounds": rounds,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}  # fmt: skip


def table(res: dict) -> str:
    head = (f"{'op':52s} {'thr':>3s} {'median':>10s} {'GOPS':>8s} {'GB/s':>7s} {'roof':>7s} {'%roof':>6s} "
            f"{'x2bit':>6s} {'xfew':>6s}")  # fmt: skip
    lines = [f"{res['cpu']} ({res['cores']} cpus, LLC {res['llc_bytes'] >> 20} MiB), {res['target']}", head,
             "-" * len(head)]  # fmt: skip
    for r in res["rows"]:
        x2 = f"{r['x2bit']:6.2f}" if "x2bit" in r else f"{'-':>6s}"
        lines.append(f"{r['op']:52s} {r['threads']:3d} {r['median_us']:8.1f}us {r['gops']:8.1f} "
                     f"{r['weights_gbs']:7.1f} {r['roof_gbs']:7.1f} {r['pct_roof']:5.0f}% {x2} "
                     f"{r['speedup_vs_fewest']:6.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("export", "run", "all"):
        s = sub.add_parser(name)
        if name != "all":
            s.add_argument("dir", type=Path)
        if name != "run":
            s.add_argument("--target", default="avx512", choices=["avx512", "avx2", "auto"])
            s.add_argument("--threads", type=_threads, default=[1, 2, 4, 8, 16])
            s.add_argument("--shape", action="append", default=[], help=f"op key (repeatable; default {SHAPES})")
            s.add_argument(
                "--knobs",
                action="append",
                default=[],
                help="also time a variant of the tuned knobs, e.g. prefetch=0 or lut_at=2,cores_mult=2 (repeatable)",
            )
        if name != "export":
            s.add_argument("--rounds", type=int, default=5)
            s.add_argument("--json", type=Path, default=None, help="write the result here")
    a = p.parse_args(argv)
    if a.cmd in ("export", "all"):
        d = a.dir if a.cmd == "export" else Path(os.environ.get("TMPDIR", "/tmp")) / "bench_threads"
        print(export(d, a.target, a.threads, a.shape or SHAPES, _variants(a.knobs)))
        if a.cmd == "export":
            return 0
        a.dir = d
    res = run(a.dir, a.rounds)
    print(table(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
