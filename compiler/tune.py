"""Tune the operators a model needs and store the results as MetaSchedule JSON databases under tuning_logs/<target>/.

    python -m compiler.tune --target avx512 --config small                 # the shipped model's workloads
    python -m compiler.tune --target avx2 --shape gemv_i8:4096:4096 --shape gemv_i8:M=11008:K=4096 --trials 12
    python -m compiler.tune --target avx512 --config small --retune        # measure again (best record still wins)

CUDA: the build machine usually has no GPU; ``--export-candidates DIR`` / ``--import-timings FILE`` split tuning between
it and the GPU host (:mod:`compiler.cuda_remote`); on a machine with both, ``--target cuda`` does the three steps.

Search: every workload's design space is the hand schedule's knob grid (:mod:`schedules.knobs`); ``grid`` (default)
measures the default knobs first, then the rest of the grid in a seeded random order, up to ``--trials`` per workload.
Each trial is built, checked against the numpy reference (a wrong kernel is never recorded) and timed in-process, then
committed to the database at once and atomically (:class:`TuningDatabase`: written to a scratch copy, then put in place
by rename) — so ``kill -9`` loses at most the trial in flight and never leaves a torn line, and a rerun resumes where it
stopped: configurations already in the database are not measured again, workloads with ``--trials`` records (or the
whole grid) are skipped unless ``--retune``. The database itself (atomic writes, repair, the plan of a workload's
trials) is :mod:`compiler.tuning_db`.

Per machine: the knobs that stream weights fastest differ between CPU designs of one ISA (the software prefetch
distance above all; docs/threads.md, "Per-machine records"). ``--machine`` records into
``tuning_logs/<target>/machines/<id>/`` (:func:`targets.cpu.machine_id`), which a build on that kind of CPU prefers
(:func:`compiler.schedule.find_record`); ``--dram`` times every weight streaming from DRAM, as it does in a model
larger than the last-level cache (by default a matrix within a quarter of the cache is timed cache-resident). A
knob that decides how a GEMV streams is better chosen in the whole model (``python -m bench.knob_sweep``), which
isolated timings can misrank; compute-bound kernels (the prefill GEMM) rank alone as in the model:

    python -m compiler.tune --target avx512 --machine --dram --shape gemm_i8:N=8:M=6912:K=2560:tile=8

The database is append-only and a workload's schedule is its *fastest* record, so a new, worse measurement never
replaces a better one. A torn line (from a tuner before writes were atomic) is dropped when the tuner next opens the
database; ``compiler.build`` skips such lines with a warning and leaves the files alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

import targets
from compiler import schedule as S
from compiler.measure import cycle_time, dram_copies, weight_bytes
from compiler.ops import OPS, make_op
from compiler.tuning_db import (  # noqa: F401  (re-exported: the tuner's database API, as before)
    SCRATCH_PREFIX,
    TuningDatabase,
    TuningDatabaseError,
    commit,
    open_db,
    plan,
    repair_database,
    tried_knobs,
)
from schedules.knobs import knobs_of_trace  # noqa: F401  (re-exported)
from targets.hugepages import host_tensor

log = logging.getLogger("compiler.tune")

from compiler.constants import CPU_PREFILL_CHUNK as PREFILL_TOKENS  # noqa: E402 (gemm_i8 tuned N)

BENCH_SHAPES = [  # the bench.kernels default set (kept in sync by tests/test_tune.py)
    ("gemv_i8", {"M": 4096, "K": 4096}), ("gemv_i8", {"M": 4096, "K": 4096, "tile": 8}),
    ("gemv_i8", {"M": 11008, "K": 4096}), ("gemv_i8", {"M": 11008, "K": 4096, "tile": 8}),
    ("gemv_i8", {"M": 32768, "K": 16384, "tile": 8}), ("gemv_i8", {"M": 1536, "K": 512}),
    ("gemv_i8", {"M": 512, "K": 1536}), ("gemv_f32", {"M": 4096, "K": 4096}),
    ("gemm_i8", {"N": 8, "M": 4096, "K": 4096}),
    ("rmsnorm_quant", {"D": 4096, "N": 1}), ("mhc_post", {"D": 2048, "S": 4}),
    ("gemv_i8_tl", {"M": 4096, "K": 4096}), ("gemv_i8_tl", {"M": 11008, "K": 4096}),
    ("gemv_i8_tl", {"M": 32768, "K": 16384}),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------------------------
def parse_shape(text: str):
    """``gemv_i8:4096:4096`` (dims in the op's field order) or ``gemv_i8:M=4096:K=4096`` → the op."""
    kind, *parts = text.split(":")
    if kind not in OPS:
        raise ValueError(f"--shape {text!r}: unknown op {kind!r}; known: {sorted(OPS)}")
    names = [f.name for f in fields(OPS[kind])]
    try:
        if all("=" in p for p in parts):
            dims = {p.split("=")[0]: int(p.split("=")[1]) for p in parts}
        else:
            if len(parts) > len(names):
                raise ValueError
            dims = dict(zip(names, (int(p) for p in parts), strict=False))  # trailing fields keep their defaults
    except ValueError:
        raise ValueError(f"--shape {text!r}: expected {kind}:{':'.join(names)} with integer sizes") from None
    try:
        return make_op(kind, **dims)
    except (TypeError, ValueError) as exc:  # a size the op refuses, a dimension it does not have
        raise ValueError(f"--shape {text!r}: {exc}") from None


def bench_ops(target: str) -> list:
    """The :data:`BENCH_SHAPES` ops that ``target`` has a schedule for (``gemv_i8_tl`` is AVX-512 VBMI only)."""
    from compiler.schedule import schedule_module

    have = schedule_module(target).SCHEDULES
    return [op for op in (make_op(k, **d) for k, d in BENCH_SHAPES) if op.kind in have]


CUDA_BENCH_SHAPES = [  # bench.kernels --target cuda: small (launch-bound), LLaMA-7B-like, and ≥ 64 MiB packed
    ("gemv_dp4a", {"M": 4096, "K": 4096}), ("gemv_dp4a", {"M": 11008, "K": 4096}),
    ("gemv_dp4a", {"M": 32768, "K": 8192}), ("gemv_dp4a", {"M": 32768, "K": 16384}),
    ("gemm_dp4a", {"N": 16, "M": 4096, "K": 4096}),
    ("gemv_f32_dp4a", {"M": 4096, "K": 4096}), ("gemv_f32_dp4a", {"M": 32768, "K": 8192}),
]  # fmt: skip
from compiler.constants import CPU_BATCH_SIZES, CUDA_BATCH_SIZES  # noqa: E402 (decode batches: their GEMMs' N)
from compiler.constants import CUDA_PREFILL_CHUNK as CUDA_PREFILL_TOKENS  # noqa: E402 (gemm_dp4a tuned N)


def matmul_shapes(cfg, gpu: bool = False) -> tuple[list, list]:
    """``(shapes of the dense GEMVs and GEMMs, shapes of the MoE expert GEMVs)``, each ``(M, K)``: each layer's dense
    ternary parameters, stacked ones (q|k|v, gate|up: :func:`compiler.lower.stacked`) as one matrix. A mixture of
    experts' FFN calls the expert GEMV only on the CPU (``compiler.lower.Lowering.moe``), whose tuning record is the
    dense workload's of the same shape: an expert's gate and up stacked, ``(2F, D)``, and its down, ``(D, F)``; a
    GPU runs ``experts_dp4a`` instead (no expert shapes)."""
    from compiler.lower import block_ternary, ternary_shapes

    named = ternary_shapes(cfg)
    dense = sorted({(sum(named[t][0] for t in parts), named[parts[0]][1]) for i in range(cfg.n_layers)
                    for _, parts, E in block_ternary(cfg, i, gpu=gpu) if not E})  # fmt: skip
    if not cfg.n_experts or gpu:
        return dense, []
    return dense, sorted({(2 * cfg.ffn_hidden, cfg.d_model), (cfg.d_model, cfg.ffn_hidden)})


def config_ops(cfg, include_prefill: bool = True, target: str = "cpu", weights: str = "tile8") -> list:
    """Every tunable workload of a model config: the ternary GEMVs (+ the GEMMs of prefill and of the decode
    batches, ``decode_b{B}``) and the fused elementwise ops. ``weights="tl"``: the CPU build's 1.67-bit layout
    (``gemv_i8_tl``, ``gemm_i8_tl``)."""
    if target == "cuda":  # a mixture of experts' FFN runs graph_kernels_gpu.experts_dp4a, not a tuned operator
        shapes = matmul_shapes(cfg, gpu=True)[0]
        ops = [make_op("gemv_dp4a", M=M, K=K) for M, K in shapes]
        if include_prefill:
            ns = sorted({CUDA_PREFILL_TOKENS, *(b for b in CUDA_BATCH_SIZES if b > 1)})
            ops += [make_op("gemm_dp4a", N=n, M=M, K=K) for n in ns for M, K in shapes]
        return ops
    from compiler.lower import cpu_tile, tl_tile  # the CPU build's weight layouts: its GEMV and GEMM read them

    shapes, expert_shapes = matmul_shapes(cfg)

    ops = [make_op("gemv_i8", M=M, K=K, tile=cpu_tile(M)) for M, K in expert_shapes]  # MoE: per slot, no GEMM
    for M, K in shapes:
        tl = weights == "tl"
        gemv, gemm, tile = ("gemv_i8_tl", "gemm_i8_tl", tl_tile(M)) if tl else ("gemv_i8", "gemm_i8", cpu_tile(M))
        ops.append(make_op(gemv, M=M, K=K, tile=tile))
        if include_prefill:
            for n in sorted({PREFILL_TOKENS, *(b for b in CPU_BATCH_SIZES if b > 1)}):
                ops.append(make_op(gemm, N=n, M=M, K=K, tile=tile))
    # what compiler.build calls: RMSNorm+quantize per token (decode) and per prefill chunk, and the mHC site op in its
    # three positions (a middle site, the first with expand folded in, the last with collapse folded in)
    norms = (cfg.d_model, cfg.ffn_hidden) if cfg.sub_norms else (cfg.d_model,)  # + the FFN's sub-norm (bitnet)
    norms += (cfg.kv_lora_rank,) if cfg.mla else ()  # + MLA's latent norm (attn_kv_a_norm)
    for D in norms:
        ops.append(make_op("rmsnorm_quant", D=D))
        if include_prefill:
            ops.append(make_op("rmsnorm_quant", D=D, N=PREFILL_TOKENS))
    for first, last in ((0, 0), (1, 0), (0, 1)):
        ops.append(make_op("mhc_post", D=cfg.d_model, S=cfg.n_streams, first=first, last=last))
    return ops


def model_ops(path: str, target: str = "cpu", weights: str = "tile8") -> list:
    """The workloads of the model in a ``.gguf`` file (its config, read by :func:`model.gguf_io.read_gguf`)."""
    from model.gguf_io import read_gguf

    return config_ops(read_gguf(path, check_values=False).config, target=target, weights=weights)


# ---------------------------------------------------------------------------------------------------------------
# measuring one trial
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _workload_data(op):
    """Inputs, reference outputs and tolerances of ``op`` (computed once per workload: large shapes are slow)."""
    import tvm

    ins = op.random_inputs(np.random.default_rng(0))
    return [host_tensor(a, tvm.cpu()) for a in ins], op.reference(*ins), op.tolerances(*ins)


def measure(op, ex, repeat: int = 5, min_repeat_ms: int = 20, check: bool = True, dram: bool = False) -> list[float]:
    """Per-repeat seconds of one call; first checks the result against the reference. Weights beyond a quarter of
    the last-level cache (or any weights, with ``dram``: the matrices of a model larger than the cache, which every
    token streams from DRAM whatever their own size) are DRAM-resident: each call then reads another of enough copies
    to exceed twice the cache (:mod:`compiler.measure`), so a machine with a large L3 does not tune them
    cache-resident. Otherwise ``time_evaluator`` on one copy."""
    import tvm

    ins, refs, tols = _workload_data(op)
    args = [*ins, *(tvm.runtime.tensor(a) for a in op.empty_outputs())]
    ex.mod["main"](*args)
    if check:
        outs = args[len(ins) :]
        for o, r, tol in zip(outs, refs, tols, strict=True):
            if not np.allclose(o.numpy(), r, rtol=0, atol=tol):
                raise AssertionError(f"{op.key}: kernel output differs from the reference")
    copies = dram_copies(weight_bytes(op), dram=dram) if hasattr(op, "K") else 1
    if copies > 1:
        sets = [args] + [[host_tensor(ins[0].numpy(), tvm.cpu()), *args[1:]] for _ in range(copies - 1)]
        return [cycle_time(ex.mod["main"], sets, min_repeat_ms / 1e3) for _ in range(repeat)]
    t = ex.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)(*args)
    return [float(r) for r in t.results]


# ---------------------------------------------------------------------------------------------------------------
# the tuner
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    op: str
    status: str  # "tuned" | "skipped" | "partial"
    trials: int
    best_ms: float | None
    best_knobs: dict | None


def tune(ops, target: str, trials: int = 16, retune: bool = False, root=None, seed: int = 0,
         progress: bool = True, machine: bool = False, dram: bool = False) -> list[Result]:  # fmt: skip
    """Tune ``ops`` on ``target`` into ``tuning_logs/<target>/`` (or ``root/<target>``; ``machine``: this CPU kind's
    own records, :func:`compiler.schedule.machine_dir`); ``dram``: time every weight streaming from DRAM
    (:func:`measure`). See the module doc."""
    import tvm
    from tqdm import tqdm

    target = targets.resolve(target)
    if target == "cuda":
        return tune_cuda_here(ops, trials, retune, root, seed)
    if not targets.supported(target):
        raise SystemExit(f"cannot tune {target} here: this CPU lacks {targets.missing_flags(target)}")
    db = open_db(target, root, machine)
    tgt = targets.get_target(target)
    plans = {op: plan(db, op, target, trials, retune, seed) for op in ops}
    results = []
    bar = tqdm(total=sum(len(p) for p in plans.values()), desc=f"tune {target}", unit="trial", disable=not progress,
               file=sys.stderr)  # fmt: skip
    for op, configs in plans.items():
        for knobs in configs:
            bar.set_postfix_str(f"{op.key} {knobs}")
            try:
                sch = S.manual(op, target, knobs)
                secs = measure(op, tvm.compile(sch.mod, target=tgt), dram=dram)
            except Exception as exc:  # a knob combination that fails to build or verify is logged, never recorded
                log.warning("%s %s failed: %s", op.key, knobs, str(exc).splitlines()[0] if str(exc) else exc)
            else:
                commit(db, op, sch, target, secs)  # a failed write stops tuning: it is not the knobs' fault
            bar.update(1)
        done = tried_knobs(db, op, target)
        best = min(done.items(), key=lambda kv: kv[1]) if done else None
        space = S.schedule_module(target).space(op)
        best_knobs = dict(zip([k.name for k in space], best[0], strict=False)) if best else None
        status = "tuned" if configs else "skipped"
        results.append(Result(op.key, status, len(configs), best[1] * 1e3 if best else None, best_knobs))
    bar.close()
    return results


def tune_cuda_here(ops, trials: int, retune: bool, root, seed: int) -> list[Result]:
    """CUDA on a machine with both the GPU and TVM's compiler: the remote flow of compiler.cuda_remote in one go."""

    from compiler import cuda_remote

    if not targets.supported("cuda"):
        raise SystemExit("no CUDA device here: build candidates with --export-candidates DIR, run "
                         "`python -m compiler.cuda_remote run DIR --out T.json` on the GPU host, then "
                         "--import-timings T.json (see compiler/cuda_remote.py)")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        cuda_remote.export_candidates(ops, d, trials, retune, root, seed)
        cuda_remote.run_candidates(d, Path(d) / "timings.json")
        cuda_remote.import_timings(Path(d) / "timings.json", root)
    db = open_db("cuda", root)
    out = []
    for op in ops:
        best = S.best_record(db, op)
        secs = float(np.mean([float(s) for s in best.run_secs])) if best else None
        out.append(Result(op.key, "tuned", trials, secs * 1e3 if secs else None, None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block and no stack trace
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_args(a) -> list[str]:
    """What is wrong with the command line (flags, paths), checked before anything is loaded; [] if nothing."""
    from model.config import PRESETS

    out = []
    if a.trials < 1:
        out.append(f"--trials must be ≥ 1, got {a.trials}")
    out += [f"--config {c}: unknown preset; known: {', '.join(sorted(PRESETS))}" for c in a.config if c not in PRESETS]
    for text in a.shape:
        try:
            parse_shape(text)
        except ValueError as exc:
            out.append(str(exc))
    if a.model and not Path(a.model).is_file():
        out.append(f"--model {a.model}: not a file")
    if a.logs:
        logs = Path(a.logs)
        if logs.exists() and not logs.is_dir():
            out.append(f"--logs {logs}: exists and is not a directory")
        elif not os.access(next(x for x in (logs, *logs.absolute().parents) if x.exists()), os.W_OK):
            out.append(f"--logs {logs}: not writable")
    if a.weights == "tl" and a.target != "cuda" and targets.resolve(a.target) != "avx512":
        out.append("--weights tl is the AVX-512 VBMI layout: it needs --target avx512")
    if (a.machine or a.dram) and a.target == "cuda":
        out.append("--machine and --dram are for CPU targets (a GPU's records are its own already)")
    if (a.import_timings or a.export_candidates) and a.target != "cuda":
        out.append("--import-timings and --export-candidates are for --target cuda")
    if a.import_timings and a.export_candidates:
        out.append("--import-timings and --export-candidates are two steps: give one at a time")
    if a.export_candidates and Path(a.export_candidates).exists() and not Path(a.export_candidates).is_dir():
        out.append(f"--export-candidates {a.export_candidates}: exists and is not a directory")
    if a.import_timings:
        try:
            ok = isinstance(json.loads(Path(a.import_timings).read_text()).get("results"), list)
        except (OSError, ValueError, AttributeError) as exc:
            ok = False
            out.append(f"--import-timings {a.import_timings}: unreadable ({exc})")
        else:
            if not ok:
                out.append(f"--import-timings {a.import_timings}: no results list (made by cuda_remote run?)")
    return out


def main(argv=None) -> int:
    p = _Parser(
        prog="python -m compiler.tune",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("\n") :],
    )
    p.add_argument("--target", default="auto", choices=["auto", *targets.TARGET_NAMES],
                   help="avx512 | avx2 | cuda | auto (default: the best this CPU runs)")  # fmt: skip
    src = p.add_argument_group("workloads (combinable; default: --config small + the benchmark shapes)")
    src.add_argument("--config", action="append", default=[], help="a model preset (model.config.PRESETS)")
    src.add_argument("--model", help="a .gguf file (reads its config through model.gguf_io)")
    src.add_argument("--shape", action="append", default=[], help="op:dims, e.g. gemv_i8:4096:4096 (repeatable)")
    src.add_argument(
        "--weights",
        default="tile8",
        choices=["tile8", "tl"],
        help="the CPU weight layout of --config/--model (compiler.build --weights)",
    )
    src.add_argument("--bench-shapes", action="store_true", help="add the benchmark shapes (4096² and 11008×4096)")
    p.add_argument("--trials", type=int, default=16, help="trials per workload (default 16)")
    p.add_argument("--retune", action="store_true", help="measure workloads that already have records again")
    p.add_argument("--logs", default=None, help="tuning log root (default: tuning_logs/)")
    p.add_argument("--machine", action="store_true",
                   help="record into this CPU kind's own records (<logs>/<target>/machines/<id>/), which builds on "
                        "this kind of CPU prefer to the shared ones")  # fmt: skip
    p.add_argument("--dram", action="store_true",
                   help="time every ternary weight streaming from DRAM, as in a model larger than the last-level cache "
                        "(default: only weights beyond a quarter of it)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    gpu = p.add_argument_group("CUDA without a GPU here (compiler.cuda_remote)")
    gpu.add_argument("--export-candidates", metavar="DIR", help="compile the planned trials into DIR for the GPU host")
    gpu.add_argument("--import-timings", metavar="FILE", help="record the GPU host's timings (cuda_remote run)")
    a = p.parse_args(argv)
    if problems := check_args(a):
        p.error("; ".join(problems))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(a)
    except (ValueError, OSError, TuningDatabaseError) as exc:  # a bad GGUF, a disk error: one line, no stack trace
        raise SystemExit(f"{p.prog}: error: {exc}") from None


def run(a) -> int:
    """The command line's work, its arguments checked (:func:`check_args`)."""
    from model.config import get_config

    kind = "cuda" if a.target == "cuda" else "cpu"
    ops = [op for name in a.config for op in config_ops(get_config(name), target=kind, weights=a.weights)]
    if a.model:
        ops += model_ops(a.model, kind, a.weights)
    ops += [parse_shape(s) for s in a.shape]
    if a.bench_shapes or not (a.config or a.model or a.shape):
        if not (a.config or a.model or a.shape):
            ops += config_ops(get_config("small"), target=kind, weights=a.weights)
        ops += [make_op(k, **d) for k, d in CUDA_BENCH_SHAPES] if kind == "cuda" else bench_ops(a.target)
    ops = list(dict.fromkeys(ops))
    if a.import_timings:
        from compiler.cuda_remote import import_timings

        for key, n in import_timings(a.import_timings, a.logs).items():
            print(f"imported {key:32s} +{n} records")
        return 0
    if a.export_candidates:
        from compiler.cuda_remote import export_candidates

        print(export_candidates(ops, a.export_candidates, a.trials, a.retune, a.logs, a.seed))
        return 0
    t0 = time.time()
    results = tune(ops, a.target, a.trials, a.retune, a.logs, a.seed, machine=a.machine, dram=a.dram)
    for r in results:
        best = f"{r.best_ms:.4f} ms {r.best_knobs}" if r.best_ms is not None else "no record"
        print(f"{r.status:8s} {r.op:32s} trials={r.trials:3d} best={best}")
    where = (S.machine_dir if a.machine else S.logs_dir)(targets.resolve(a.target), a.logs)
    print(f"{len(results)} workloads in {time.time() - t0:.1f} s -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
