"""CUDA kernel benchmark: tuned ternary kernels vs the measured HBM roofline, the launch floor and torch bf16.

    python -m bench.kernels --target cuda                      # on a machine with a GPU and TVM's compiler
    python -m bench.kernels --target cuda --export DIR         # build machine (no GPU): compile the kernels to DIR
    python -m bench.kernels --target cuda --from DIR           # GPU host, TVM runtime only: measure DIR's kernels

Per operator and shape (default: ``compiler.tune.CUDA_BENCH_SHAPES``): median kernel time from CUDA events around
back-to-back calls (weights ≥ 64 MiB stream from HBM: they exceed the L2), the effective bandwidth (bytes the kernel
must move ÷ time), the % of the HBM roofline measured in the same run (a device-to-device copy of 2 GiB, read+write
bytes ÷ time), the ratio to the launch floor (an empty TVM kernel called the same way) and the speed-up over
``torch.nn.functional.linear`` in bf16 on the same shape (dense weights, the same tokens). Both the tuned schedule
and the hand schedule with default knobs are timed; every kernel's output is checked against the numpy reference
first. Writes JSON (``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

MANIFEST = "bench_manifest.json"


def _empty_kernel():
    """One thread that copies one float: the cost of a launch through TVM's calling path."""
    import tvm
    from tvm import s_tir, te

    a = te.placeholder((1,), "float32", name="a")
    b = te.compute((1,), lambda i: a[i], name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("b"))
    sch.bind(i, "threadIdx.x")
    return tvm.IRModule({"main": sch.mod["main"]})


def export(ops, out: Path | str, logs_root=None) -> Path:
    """Compile each op's tuned (or hand, if untuned) and hand schedules and an empty kernel into ``out``."""
    from compiler import schedule as S

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    S.compile_mod(_empty_kernel(), "cuda").export_library(str(out / "empty.so"))
    entries = []
    for i, op in enumerate(ops):
        e = {"op": op.key}
        sf = S.get_primfunc(op, "cuda", logs_root)
        sf.build().export_library(str(out / f"k{i:03d}_best.so"))
        e.update(best=f"k{i:03d}_best.so", best_source=sf.source, tuned_secs=sf.run_secs)
        S.build(op, "cuda", mode="hand").export_library(str(out / f"k{i:03d}_hand.so"))
        e["hand"] = f"k{i:03d}_hand.so"
        entries.append(e)
    (out / MANIFEST).write_text(json.dumps({"kernels": entries}, indent=1))
    return out


def _torch_linear_time(op, cuda_time) -> float:
    import torch
    import torch.nn.functional as F

    n = getattr(op, "N", 1)
    w = torch.randn(op.M, op.K, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, op.K, device="cuda", dtype=torch.bfloat16)
    return statistics.median(cuda_time(F.linear, [x, w]))


def copy_bandwidth(cuda_time, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = statistics.median(cuda_time(lambda: b.copy_(a), [], repeat=7, target_ms=50))
    return 2 * nbytes / t  # the 4 GiB are freed when the caller empties torch's cache


def run(from_dir: Path | str, json_out: Path | str | None = None) -> dict:
    import numpy as np
    import torch

    from compiler.cuda_remote import cuda_time, device_inputs, load_runtime_cuda
    from compiler.ops import parse_key

    tvm = load_runtime_cuda()
    d = Path(from_dir)
    man = json.loads((d / MANIFEST).read_text())
    t0 = time.time()
    hbm = copy_bandwidth(cuda_time)
    torch.cuda.empty_cache()
    dev = tvm.cuda(0)
    e_args = [tvm.runtime.tensor(np.zeros(1, np.float32), dev) for _ in range(2)]
    empty = statistics.median(cuda_time(tvm.runtime.load_module(str(d / "empty.so"))["main"], e_args))
    rows = []
    for e in man["kernels"]:
        op = parse_key(e["op"])
        ins, refs, args = device_inputs(tvm, op)
        row = {"op": e["op"], "best_source": e["best_source"], "bytes": op.bytes_moved()}
        for which in ("best", "hand"):
            f = tvm.runtime.load_module(str(d / e[which]))["main"]
            f(*args)
            torch.cuda.synchronize()
            ok = all(np.allclose(a.numpy(), r, rtol=0, atol=t)
                     for a, r, t in zip(args[len(ins):], refs, op.tolerances(*ins), strict=True))  # fmt: skip
            t = statistics.median(cuda_time(f, args))
            row[which] = {"ok": bool(ok), "us": t * 1e6, "gbs": op.bytes_moved() / t / 1e9,
                          "pct_hbm": 100 * op.bytes_moved() / t / hbm, "x_launch_floor": t / empty}  # fmt: skip
        del args
        row["torch_bf16_us"] = _torch_linear_time(op, cuda_time) * 1e6
        row["speedup_vs_torch_bf16"] = row["torch_bf16_us"] / row["best"]["us"]
        row["speedup_vs_hand"] = row["hand"]["us"] / row["best"]["us"]
        rows.append(row)
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "hbm_copy_gbs": hbm / 1e9,
           "empty_kernel_us": empty * 1e6, "rows": rows, "wall_s": round(time.time() - t0, 1),
           "method": "CUDA events around back-to-back calls, median of 9; random inputs checked vs numpy"}  # fmt: skip
    res["table"] = table(res)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=1))
    return res


def table(res: dict) -> str:
    head = (f"{res['device']}: HBM copy {res['hbm_copy_gbs']:.0f} GB/s (read+write), empty kernel "
            f"{res['empty_kernel_us']:.2f} us")  # fmt: skip
    lines = [head, f"{'op':34s} {'src':6s} {'us':>8s} {'GB/s':>7s} {'%HBM':>6s} {'xfloor':>7s} {'hand us':>8s} "
             f"{'bf16 us':>8s} {'x bf16':>7s} ok"]  # fmt: skip
    for r in res["rows"]:
        b = r["best"]
        lines.append(f"{r['op']:34s} {r['best_source']:6s} {b['us']:8.2f} {b['gbs']:7.0f} {b['pct_hbm']:6.1f} "
                     f"{b['x_launch_floor']:7.2f} {r['hand']['us']:8.2f} {r['torch_bf16_us']:8.2f} "
                     f"{r['speedup_vs_torch_bf16']:7.2f} {b['ok'] and r['hand']['ok']}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    from compiler.ops import make_op
    from compiler.tune import CUDA_BENCH_SHAPES, parse_shape

    p = argparse.ArgumentParser(prog="python -m bench.kernels --target cuda", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shape", action="append", default=[], help="op key, e.g. gemv_dp4a:32768:8192 (repeatable)")
    p.add_argument("--export", metavar="DIR", help="only compile the kernels into DIR (no GPU needed)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="measure the kernels compiled into DIR")
    p.add_argument("--json", default="bench_results/bench_cuda.json")
    a = p.parse_args(argv)
    ops = [parse_shape(s) for s in a.shape] or [make_op(k, **d) for k, d in CUDA_BENCH_SHAPES]
    if a.export:
        print(export(ops, a.export))
        return 0
    src = a.from_dir
    if src is None:  # GPU and compiler on one machine: build then measure
        import tempfile

        from targets import supported

        if not supported("cuda"):
            raise SystemExit("no CUDA device here: compile with --export DIR, then run --from DIR on the GPU host")

        src = export(ops, tempfile.mkdtemp(prefix="bench_cuda_"))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    res = run(src, a.json)
    print(res["table"])
    print(f"wrote {a.json} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
