"""Schedule benchmark: tuned kernels vs a measured roofline, the scalar reference, the untuned TE and torch.

    python -m bench.kernels                        # default set, best target here (< 3 minutes): table + JSON + PNG
    python -m bench.kernels --target avx2 --full   # + more shapes (rowmajor4 DRAM GEMV, small-model shapes)
    python -m bench.kernels --shape gemv_i8:4096:4096 --threads 2 --no-baselines

Per operator and shape: median time (``time_evaluator`` while the weights fit in a quarter of the last-level cache,
read from sysfs; beyond that the weights are DRAM-resident and every call reads another of enough copies to exceed
twice the cache, the roof and the 2-bit twin likewise, timed in turn), GOPS (GB/s for the memory-bound mHC and
RMSNorm ops), and % of a roofline measured in the same run on an array of the same size: a streaming-read kernel over
the packed weights for the GEMV/GEMM (2-bit roofline GOPS = 8 · read GB/s), a copy kernel over the same bytes for the
elementwise ops. Ratios (×, higher = tuned is faster): vs the scalar C++ reference (``impl="scalar"``, one thread),
vs the untuned TE (``mode="naive"``), vs ``torch.nn.functional.linear`` in fp32 and bf16 of the same shape (the
elementwise ops: the eager torch formula); for the sub-2-bit GEMV (``gemv_i8_tl``), vs the tuned 2-bit ``gemv_i8`` of
the same shape, timed alternately with it (``x2bit``: the median of 5 paired ratios). The load average at start and
end goes into the JSON: a busy machine makes every figure lower. Writes ``bench_results/bench_<target>.json`` and
``bench_results/roofline_<target>.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import targets
from bench.timing import py_time, tvm_time
from compiler import schedule as S
from compiler.measure import cycle_time, dram_copies, weight_bytes
from compiler.tune import bench_ops, parse_shape
from targets.hugepages import host_tensor

targets.ensure_tvm_threads()

FULL_EXTRA = ["gemv_i8:32768:16384", "gemv_i8:512:512", "gemm_i8:8:1536:512", "mhc_post:D=512:S=2",
              "mhc_post:D=4096:S=4", "rmsnorm_quant:D=512:N=1"]  # fmt: skip
MEMORY_BOUND = ("mhc_post", "rmsnorm_quant")


def known_ops(target: str) -> tuple:
    """Every op the compiler, the tuner and the benchmarks build for ``target`` (what a tuning record may be of)."""
    from compiler import tune
    from compiler.ops import make_op
    from model.config import PRESETS

    ops = list(bench_ops(target))
    for cfg in PRESETS.values():
        ops += tune.config_ops(cfg)
        if target == "avx512":
            ops += tune.config_ops(cfg, weights="tl")
        for M, K in set(cfg.ternary_shapes().values()):  # the row-major layout's records (`--shape` without tile)
            ops += [make_op("gemv_i8", M=M, K=K), make_op("gemm_i8", N=tune.PREFILL_TOKENS, M=M, K=K)]
    ops += [parse_shape(s) for s in FULL_EXTRA]  # bench.kernels --full
    return tuple({op.key: op for op in ops}.values())


# ---------------------------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# rooflines measured in the same run
# ---------------------------------------------------------------------------------------------------------------
_ROOF_CACHE: dict = {}


def _roof_kernel(kind: str, nbytes: int, target: str):
    """``read``: Σ of int32 lanes over ``nbytes`` (16 vector lanes per chunk, chunks in parallel); ``copy``: y = x."""
    import tvm
    from tvm import s_tir, te

    n = max(1024, nbytes // 4 // 1024 * 1024)
    P = 64
    if kind == "read":
        X = te.placeholder((P, n // P), "int32", name="X")
        r = te.reduce_axis((0, n // P // 16), name="r")
        Y = te.compute((P, 16), lambda p, i: te.sum(X[p, r * 16 + i], axis=r), name="Y")
        sch = s_tir.Schedule(te.create_prim_func([X, Y]))
        blk = sch.get_sblock("Y")
        p, i, rr = sch.get_loops(blk)
        ro, ri = sch.split(rr, [None, 4])
        sch.reorder(p, ro, ri, i)
        sch.parallel(p)
        sch.unroll(ri)
        sch.vectorize(i)
        sch.decompose_reduction(blk, ro)
        shapes = [((P, n // P), "int32"), ((P, 16), "int32")]
    else:
        X = te.placeholder((P, n // P), "float32", name="X")
        Y = te.compute((P, n // P), lambda p, i: X[p, i], name="Y")
        sch = s_tir.Schedule(te.create_prim_func([X, Y]))
        p, i = sch.get_loops(sch.get_sblock("Y"))
        _io, ii = sch.split(i, [None, 16])
        sch.parallel(p)
        sch.vectorize(ii)
        shapes = [((P, n // P), "float32"), ((P, n // P), "float32")]
    ex = tvm.compile(sch.mod, target=targets.get_target(target))
    args = [host_tensor(np.ones(s, d), tvm.cpu()) for s, d in shapes]  # huge pages, as the runtime's weights
    return ex, args, n * 4


def roofline_gbs(kind: str, nbytes: int, target: str, threads: int) -> float:
    """Streaming read (``read``) or copy (``copy``, read + write counted) GB/s over an array of ``nbytes``: the best
    of 1..``threads`` threads (a small, cache-resident array streams fastest on one thread: no parallel launch)."""
    best = 0.0
    for th in range(1, threads + 1):
        key = (kind, nbytes, target, th)
        if key not in _ROOF_CACHE:
            targets.set_tvm_threads(th)
            ex, args, actual = _roof_kernel(kind, nbytes, target)
            t = tvm_time(ex, args, min_ms=30)
            _ROOF_CACHE[key] = (2 if kind == "copy" else 1) * actual / t / 1e9
        best = max(best, _ROOF_CACHE[key])
    targets.set_tvm_threads(threads)
    return best


# ---------------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _torch_linear_inputs(op) -> dict:
    """fp32 and bf16 ``(weight [M, K], x [N, K])`` for ``op``, made once for all thread counts (2 GiB at 32768²/2)."""
    import torch

    n = getattr(op, "N", 1)
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(op.M, op.K, generator=g)
    x32 = torch.randn(n, op.K, generator=g)
    return {"torch_fp32": (w32, x32), "torch_bf16": (w32.to(torch.bfloat16), x32.to(torch.bfloat16))}


def torch_baselines(op, threads: int) -> dict[str, float]:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    out = {}
    with torch.inference_mode():
        if op.kind in ("gemv_i8", "gemv_f32", "gemm_i8", "gemv_i8_tl", "gemm_i8_tl"):
            for name, (w, x) in _torch_linear_inputs(op).items():
                out[name] = py_time(lambda w=w, x=x: F.linear(x, w))
        elif op.kind == "mhc_post":
            X, y = torch.randn(op.S, op.D), torch.randn(op.D)
            H, hp, hpre = torch.rand(op.S, op.S), torch.rand(op.S), torch.rand(op.S)

            def mhc():
                Xp = H @ X + hp[:, None] * y
                u = hpre @ Xp
                return Xp, u, (u * u).sum()

            out["torch_fp32"] = py_time(mhc)
        elif op.kind == "rmsnorm_quant":
            x, w = torch.randn(op.N, op.D), torch.rand(op.D)

            def rq():
                h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
                s = 127.0 / h.abs().amax(-1).clamp(min=1e-5)
                q = (h * s[:, None]).round().clamp(-127, 127).to(torch.int8)
                return q, s, q.sum(-1, dtype=torch.int32)

            out["torch_fp32"] = py_time(rq)
    return out


def scalar_time(op, ins) -> float | None:
    """The C++ scalar reference (GEMV/GEMM) or the numpy reference (elementwise ops), single-threaded."""
    from model.ternary.reference import scalar_available

    if op.kind in ("gemv_i8", "gemm_i8", "gemv_f32"):
        if not scalar_available():
            return None
        return py_time(lambda: op.reference(*ins, impl="scalar"), min_s=0.02, repeat=3)
    return py_time(lambda: op.reference(*ins), min_s=0.02, repeat=3)


# ---------------------------------------------------------------------------------------------------------------
# one row
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    op: str
    target: str
    threads: int
    source: str  # tuned | hand
    median_us: float
    gops: float
    gbs: float
    metric: str  # "GOPS" or "GB/s": the headline figure of this op
    roof_kind: str
    roof_gbs: float
    pct_roof: float
    times_us: dict = field(default_factory=dict)  # baseline name -> µs
    speedup: dict = field(default_factory=dict)  # baseline name -> baseline time / tuned time


def rotated(arrays: list, copies: int, first: int = 0) -> list[list]:
    """``copies`` argument lists: the first is ``arrays``; the others copy ``arrays[first]`` (the weights)."""
    import tvm

    out = [arrays]
    for _ in range(copies - 1):
        own = list(arrays)
        own[first] = host_tensor(arrays[first].numpy(), tvm.cpu())
        out.append(own)
    return out


def paired_times(kernels, rounds: int = 5) -> np.ndarray:
    """Time the ``(executable, [argument lists])`` kernels in turn, ``rounds`` times: seconds ``[rounds, n]``. One
    argument list: ``time_evaluator`` (3 repeats); several (DRAM-resident weights): calls cycle over them. Ratios taken
    within a round cancel most of the drift of a shared machine's DRAM bandwidth, which moves by ±20 % between
    minutes."""

    def one(ex, sets):
        if len(sets) == 1:
            return tvm_time(ex, sets[0], repeat=3)
        return cycle_time((ex.mod if hasattr(ex, "mod") else ex)["main"], sets, 0.05)

    return np.array([[one(ex, sets) for ex, sets in kernels] for _ in range(rounds)])


def two_bit_twin(op, target: str, logs_root=None):
    """For an op on a sub-2-bit layout (``op.two_bit_twin()``): the tuned 2-bit ``gemv_i8`` or ``gemm_i8`` of the
    same shape, built, with its numpy inputs — the baseline the ≤ 1.7-bit layout must beat (and what the scalar
    reference reads)."""
    import warnings

    twin = op.two_bit_twin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.UntunedWarning)
        ex = S.get_primfunc(twin, target, logs_root).build()
    return twin, ex, twin.random_inputs(np.random.default_rng(0))


def bench_op(op, target: str, threads_list, baselines: bool = True, logs_root=None) -> list[Row]:
    import warnings

    import tvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.UntunedWarning)  # the row's `source` says "hand" instead
        sf = S.get_primfunc(op, target, logs_root)
    ex = sf.build()
    ins = op.random_inputs(np.random.default_rng(0))
    args = [host_tensor(a, tvm.cpu()) for a in ins + op.empty_outputs()]
    ex.mod["main"](*args)
    for o, r, tol in zip(args[len(ins) :], op.reference(*ins), op.tolerances(*ins), strict=True):
        if not np.allclose(o.numpy(), r, rtol=0, atol=tol):
            raise AssertionError(f"{op.key} on {target}: wrong result, refusing to time it")
    naive = S.get_primfunc(op, target, mode="naive").build() if baselines else None
    mem = op.kind in MEMORY_BOUND
    roof_kind = "copy" if mem else "read"
    nbytes = op.bytes_moved() if mem else weight_bytes(op)
    copies = 1 if mem else dram_copies(nbytes)  # DRAM-resident weights: rotate so no call finds them in cache
    sets = rotated(args, copies)
    twin = None
    if hasattr(op, "two_bit_twin"):  # built once; its inputs also feed the scalar reference (the same product)
        twin_op, twin_ex, twin_ins = two_bit_twin(op, target, logs_root)
        twin_args = [host_tensor(a, tvm.cpu()) for a in twin_ins + twin_op.empty_outputs()]
        twin = (twin_ex, rotated(twin_args, dram_copies(weight_bytes(twin_op))))
    scalar = (scalar_time(twin_op, twin_ins) if twin else scalar_time(op, ins)) if baselines else None
    rows = []
    for th in threads_list:
        targets.set_tvm_threads(th)
        t = tvm_time(ex, args) if copies == 1 else cycle_time(ex.mod["main"], sets, 0.05)
        times = {}
        if baselines:
            times["untuned"] = tvm_time(naive, args, min_ms=20, repeat=3)
            if scalar is not None:
                times["scalar_ref"] = scalar
            times.update(torch_baselines(op, th))
        roof_k = _roof_kernel("read", int(nbytes), target) if copies > 1 else None
        if roof_k is None:  # cache-resident: the roof measured once per size (DRAM-resident: in turn, below)
            roof = roofline_gbs(roof_kind, int(nbytes / 2 if mem else nbytes), target, th)
            pct = 100.0 * nbytes / t / 1e9 / roof
        roof_pair = [(roof_k[0], rotated(roof_k[1], copies))] if roof_k else []
        paired = [(ex, sets), *roof_pair] + ([twin] if twin else [])
        if len(paired) > 1:  # the roof (DRAM-resident) and the 2-bit twin, timed in turn with the kernel
            ts = paired_times(paired)
            t = float(np.median(ts[:, 0]))
            if roof_k:
                roof = float(np.median(roof_k[2] / ts[:, 1] / 1e9))
                pct = 100.0 * float(np.median(nbytes / ts[:, 0] / (roof_k[2] / ts[:, 1])))
            if twin:
                times["2bit"] = float(np.median(ts[:, -1]))
        speedup = {k: v / t for k, v in times.items()}
        if twin:
            speedup["2bit"] = float(np.median(ts[:, -1] / ts[:, 0]))  # the median of the paired ratios
        gbs, gops = nbytes / t / 1e9, op.ops() / t / 1e9
        rows.append(Row(op.key, target, th, sf.source, t * 1e6, gops, gbs, "GB/s" if mem else "GOPS", roof_kind, roof,
                        pct, {k: v * 1e6 for k, v in times.items()}, speedup))  # fmt: skip
        del roof_k
    return rows


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
BASELINES = ("scalar_ref", "untuned", "torch_fp32", "torch_bf16", "2bit")


def format_table(rows: list[Row]) -> str:
    head = (f"{'op':36s} {'target':6s} {'thr':>3s} {'src':5s} {'median':>10s} {'figure':>13s} {'roof GB/s':>9s} "
            f"{'%roof':>6s} " + " ".join(f"{'x' + b:>11s}" for b in BASELINES))  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        fig = f"{r.gops:8.1f} GOPS" if r.metric == "GOPS" else f"{r.gbs:7.1f} GB/s"
        ratios = " ".join(f"{r.speedup[b]:11.{2 if b == '2bit' else 1}f}" if b in r.speedup else f"{'-':>11s}"
                          for b in BASELINES)  # fmt: skip
        lines.append(f"{r.op:36s} {r.target:6s} {r.threads:3d} {r.source:5s} {r.median_us:8.1f}us {fig:>13s} "
                     f"{r.roof_gbs:9.1f} {r.pct_roof:5.0f}% {ratios}")  # fmt: skip
    return "\n".join(lines)


def _short(key: str) -> str:
    kind, *dims = key.split(":")
    return kind + " " + "×".join(d.split("=")[1] for d in dims if not d.endswith("=0"))


def plot_roofline(rows: list[Row], path: Path) -> Path | None:
    """Two panels: the classical roofline (GOPS vs ops/byte, measured read roofs) and GB/s vs working-set size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no roofline plot (pip install matplotlib)", file=sys.stderr)
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6))
    gemv = [r for r in rows if r.metric == "GOPS"]
    xs = np.logspace(-1, 2.2, 50)
    tmax = max(r.threads for r in rows)
    roofs = sorted({round(r.roof_gbs) for r in gemv if r.threads == tmax})
    for bw in (roofs[0], roofs[-1]) if roofs else ():
        ax.plot(
            xs, bw * xs, "--", lw=1, label=f"read roof {bw} GB/s ({tmax} thr, {'DRAM' if bw == roofs[0] else 'cache'})"
        )
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(gemv):
        intensity = r.gops / r.gbs
        jitter = 1 + 0.04 * (i % 8)  # all 2-bit kernels have intensity 8: spread them a little to be readable
        ax.scatter([intensity * jitter], [r.gops], marker="o" if r.threads == 1 else "s", color=cmap(i % 20),
                   label=f"{_short(r.op)} {r.threads}t: {r.gops:.0f} GOPS ({r.pct_roof:.0f}%)")  # fmt: skip
        if "torch_fp32" in r.speedup and r.threads == tmax:
            ax.scatter([0.5], [r.gops / r.speedup["torch_fp32"]], marker="x", color=cmap(i % 20))
    ax.set(xscale="log", yscale="log", xlabel="operations per byte of weights read (2-bit = 8; torch fp32 = 0.5, x)",
           ylabel="GOPS", title=f"{rows[0].target}: ternary kernels vs measured read roofs")  # fmt: skip
    ax.legend(fontsize=6, loc="upper left", ncol=1)
    ax.grid(True, which="both", alpha=0.3)
    for th in sorted({r.threads for r in rows}):
        pts = sorted((weight_bytes(parse_shape(r.op)), r.roof_gbs, r.gbs) for r in gemv if r.threads == th)
        if pts:
            bx.plot([p[0] for p in pts], [p[1] for p in pts], "--", label=f"measured read GB/s, {th} thr")
            bx.scatter([p[0] for p in pts], [p[2] for p in pts], label=f"ternary GEMV/GEMM weights GB/s, {th} thr")
    bx.set(xscale="log", xlabel="packed weight bytes (working set)", ylabel="GB/s of weights",
           title="effective bandwidth vs the roof at the same size")  # fmt: skip
    bx.legend(fontsize=7)
    bx.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(target: str = "auto", shapes=None, threads=(1, 2), baselines: bool = True, out_dir="bench_results",
        full: bool = False, logs_root=None) -> dict:  # fmt: skip
    """Benchmark ``shapes`` (op keys) on ``target``; returns the JSON-able result and writes JSON + PNG."""
    target = targets.resolve(target)
    if not targets.supported(target):
        raise SystemExit(f"cannot run {target} here: this CPU lacks {targets.missing_flags(target)}")
    if max(threads) > targets.num_cores():  # more threads than cores: a scaling check of the kernels' structure
        print(f"note: {max(threads)} threads on {targets.num_cores()} cores (oversubscribed; for the thread scaling "
              "of a bigger machine, run bench.threads there)", file=sys.stderr)  # fmt: skip
    os.environ["TVM_NUM_THREADS"] = str(max(threads))  # before TVM's pool starts: it cannot grow later
    shapes = list(shapes or [op.key for op in bench_ops(target)] + (FULL_EXTRA if full else []))
    t0, load0 = time.time(), os.getloadavg()
    rows: list[Row] = []
    for key in shapes:
        op = parse_shape(key)
        if targets.missing_op_flags(op):
            print(f"... {op.key}: skipped, this CPU lacks {targets.missing_op_flags(op)}", file=sys.stderr)
            continue
        print(f"... {op.key}", file=sys.stderr, flush=True)
        rows.extend(bench_op(op, target, threads, baselines, logs_root))
        _torch_linear_inputs.cache_clear()
    result = {
        "command": " ".join(["python -m bench.kernels", *sys.argv[1:]]), "target": target,
        "target_dict": targets.target_dict(target), "cpu": platform.processor() or platform.machine(),
        "cores": targets.num_cores(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [asdict(r) for r in rows],
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{target}.json").write_text(json.dumps(result, indent=1))
    plot_roofline(rows, out / f"roofline_{target}.png")
    result["table"] = format_table(rows)
    return result


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--target", default="auto")
    known, rest = pre.parse_known_args(argv)
    if known.target == "cuda":
        from bench import kernels_cuda  # GPU kernels: their own measurement (CUDA events, HBM roofline)

        return kernels_cuda.main(rest)
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--target", default="auto", help="avx512 | avx2 | auto (default) | all | cuda (see bench.kernels_cuda)"
    )
    p.add_argument("--shape", action="append", default=[], help="op key, e.g. gemv_i8:4096:4096 (repeatable)")
    p.add_argument("--full", action="store_true", help="add the DRAM-resident and small-model shapes")
    p.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated thread counts (default 1,2; may exceed the cores; for other machines see bench.threads)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip scalar/untuned/torch (faster)")
    p.add_argument("--out", default="bench_results", help="output folder for the JSON and the PNG")
    a = p.parse_args(argv)
    tlist = [targets.detect()] if a.target == "auto" else (
        [t for t in ("avx512", "avx2") if targets.supported(t)] if a.target == "all" else [a.target])  # fmt: skip
    for t in tlist:
        res = run(t, a.shape or None, [int(x) for x in a.threads.split(",")], not a.no_baselines, a.out, a.full)
        print(res["table"])
        print(f"{t}: {res['wall_s']} s, load average {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}; "
              f"wrote {a.out}/bench_{t}.json and roofline_{t}.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
