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
whole grid) are skipped unless ``--retune``. ``--search ms`` instead runs MetaSchedule's evolutionary search over the
same design space (``ScheduleFn``), in a scratch directory, and copies its records in.

The database is append-only and a workload's schedule is its *fastest* record, so a new, worse measurement never
replaces a better one. A torn line (from a tuner before writes were atomic) is dropped when the tuner next opens the
database; ``compiler.build`` skips such lines with a warning and leaves the files alone.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

import targets
from compiler import schedule as S
from compiler.ops import OPS, make_op
from schedules.knobs import grid, knobs_of_trace

log = logging.getLogger("compiler.tune")

from compiler.constants import CPU_PREFILL_CHUNK as PREFILL_TOKENS  # noqa: E402 (gemm_i8 tuned N)

BENCH_SHAPES = [  # the compiler.bench default set (kept in sync by tests/test_tune.py)
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


CUDA_BENCH_SHAPES = [  # compiler.bench --target cuda: small (launch-bound), LLaMA-7B-like, and ≥ 64 MiB packed
    ("gemv_dp4a", {"M": 4096, "K": 4096}), ("gemv_dp4a", {"M": 11008, "K": 4096}),
    ("gemv_dp4a", {"M": 32768, "K": 8192}), ("gemv_dp4a", {"M": 32768, "K": 16384}),
    ("gemm_dp4a", {"N": 16, "M": 4096, "K": 4096}),
    ("gemv_f32_dp4a", {"M": 4096, "K": 4096}), ("gemv_f32_dp4a", {"M": 32768, "K": 8192}),
]  # fmt: skip
from compiler.constants import CUDA_PREFILL_CHUNK as CUDA_PREFILL_TOKENS  # noqa: E402 (gemm_dp4a tuned N)


def config_ops(cfg, include_prefill: bool = True, target: str = "cpu", weights: str = "tile8") -> list:
    """Every tunable workload of a model config: the ternary GEMVs (+ prefill GEMMs) and the fused elementwise ops.
    ``weights="tl"``: the CPU build's 1.67-bit layout, whose GEMV serves prefill too (once per token)."""
    if target == "cuda":
        shapes = sorted(set(cfg.ternary_shapes().values()))
        ops = [make_op("gemv_dp4a", M=M, K=K) for M, K in shapes]
        if include_prefill:
            ops += [make_op("gemm_dp4a", N=CUDA_PREFILL_TOKENS, M=M, K=K) for M, K in shapes]
        return ops
    from compiler.lower import cpu_tile, tl_tile  # the CPU build's weight layouts: its GEMV and GEMM read them

    ops = []
    for M, K in sorted(set(cfg.ternary_shapes().values())):
        if weights == "tl":
            ops.append(make_op("gemv_i8_tl", M=M, K=K, tile=tl_tile(M)))
            continue
        ops.append(make_op("gemv_i8", M=M, K=K, tile=cpu_tile(M)))
        if include_prefill:
            ops.append(make_op("gemm_i8", N=PREFILL_TOKENS, M=M, K=K, tile=cpu_tile(M)))
    # what compiler.build calls: RMSNorm+quantize per token (decode) and per prefill chunk, and the mHC site op in its
    # three positions (a middle site, the first with expand folded in, the last with collapse folded in)
    ops.append(make_op("rmsnorm_quant", D=cfg.d_model))
    if include_prefill:
        ops.append(make_op("rmsnorm_quant", D=cfg.d_model, N=PREFILL_TOKENS))
    for first, last in ((0, 0), (1, 0), (0, 1)):
        ops.append(make_op("mhc_post", D=cfg.d_model, S=cfg.n_streams, first=first, last=last))
    return ops


def model_ops(path: str, target: str = "cpu", weights: str = "tile8") -> list:
    """The workloads of the model in a ``.gguf`` file (its config, read by :func:`model.gguf_io.read_gguf`)."""
    try:
        from model.gguf_io import read_gguf
    except ImportError:
        raise SystemExit(f"--model {path}: not yet — no model.gguf_io.read_gguf; use --config or --shape") from None
    return config_ops(read_gguf(path, check_values=False).config, target=target, weights=weights)


# ---------------------------------------------------------------------------------------------------------------
# database
# ---------------------------------------------------------------------------------------------------------------
class TuningDatabaseError(RuntimeError):
    """A tuning record could not be written whole (disk full, file size limit, ...)."""


def _replace_atomically(src_text_or_path, dest: Path) -> None:
    """Put ``src`` (a str, or a file to copy) at ``dest`` by write-temp + fsync + rename: ``dest`` is always whole."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if isinstance(src_text_or_path, str):
        tmp.write_text(src_text_or_path)
    else:
        shutil.copyfile(src_text_or_path, tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    if dest.exists():
        shutil.copymode(dest, tmp)
    os.replace(tmp, dest)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def repair_database(d: Path) -> int:
    """Drop malformed lines (a write torn by ``kill -9`` before writes were atomic) from the database in ``d`` and
    remove temporary files a killed tuner left there; return how many lines were dropped."""
    for stale in sorted(d.glob(".database_*.tmp-*")):
        log.warning("%s: removing %s, left by a tuner that was killed while writing", d, stale.name)
        stale.unlink(missing_ok=True)
    workloads, records, dropped = S.clean_database(d)
    if dropped:
        _replace_atomically(workloads, d / S.DB_FILES[0])
        _replace_atomically(records, d / S.DB_FILES[1])
        log.warning("%s: dropped %d torn or malformed line(s)", d, dropped)
    return dropped


class TuningDatabase:
    """A target's database for the tuner, written so that a kill at any instant leaves no torn line.

    TVM's JSONDatabase appends each commit with a buffered stream (several ``write`` calls, no fsync), so it works on
    a scratch copy here; after each commit :meth:`publish` checks the new lines parse and puts the scratch files in
    place by write-temp + fsync + rename. The workload file goes first, so a record never names a missing workload.
    Everything else (``has_workload``, ``get_top_k``, ...) is the JSONDatabase's.
    """

    def __init__(self, d: Path) -> None:
        from tvm.s_tir import meta_schedule as ms

        importlib.import_module("schedules.intrin_x86")  # records' traces name our intrinsics: register before parsing
        _remove_dead_scratch()
        self.dir = d
        self._scratch = tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
        self.scratch = Path(self._scratch.name)
        for name in S.DB_FILES:
            if (d / name).exists():
                shutil.copyfile(d / name, self.scratch / name)
        self.db = ms.database.JSONDatabase(work_dir=str(self.scratch))
        self.published = {n: self._size(self.scratch / n) for n in S.DB_FILES}

    @staticmethod
    def _size(path: Path) -> int:
        return path.stat().st_size if path.exists() else 0

    def __getattr__(self, name):
        return getattr(self.db, name)

    def publish(self) -> None:
        for name in S.DB_FILES:
            src = self.scratch / name
            if self._size(src) == self.published[name]:
                continue
            with src.open("rb") as fh:
                fh.seek(self.published[name])
                new = fh.read()
            try:
                ok = new.endswith(b"\n") and all(json.loads(x) is not None for x in new.splitlines())
            except ValueError:
                ok = False
            if not ok:
                raise TuningDatabaseError(f"{self.dir / name}: a record was not written whole (disk full?); "
                                          f"the database was left as it was before it")  # fmt: skip
            _replace_atomically(src, self.dir / name)
            self.published[name] = len(new) + self.published[name]


SCRATCH_PREFIX = "ternary-tune-db-"


def _remove_dead_scratch() -> None:
    """Remove the scratch copies of tuners that were killed (the pid in the name is no longer running)."""
    for p in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        try:
            os.kill(int(p.name[len(SCRATCH_PREFIX) :].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def open_db(target: str, root=None) -> TuningDatabase:
    """The tuner's handle on ``tuning_logs/<target>/`` (or ``root/<target>``): repaired, written atomically."""
    d = S.logs_dir(target, root)
    d.mkdir(parents=True, exist_ok=True)
    repair_database(d)
    return TuningDatabase(d)


def tried_knobs(db, op, target: str) -> dict[tuple, float]:
    """{knob values: best mean seconds} of the records already in ``db``."""
    space = S.schedule_module(target).space(op)
    out: dict[tuple, float] = {}
    for rec in S.records(db, op):
        try:
            kv = tuple(knobs_of_trace(rec.trace, space).values())
        except ValueError:  # a record from another search (ms with a different space): count it, do not key it
            kv = ("ms", id(rec))
        secs = float(np.mean([float(s) for s in rec.run_secs]))
        out[kv] = min(secs, out.get(kv, float("inf")))
    return out


# ---------------------------------------------------------------------------------------------------------------
# measuring one trial
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _workload_data(op):
    """Inputs, reference outputs and tolerances of ``op`` (computed once per workload: large shapes are slow)."""
    import tvm

    ins = op.random_inputs(np.random.default_rng(0))
    return [tvm.runtime.tensor(a) for a in ins], op.reference(*ins), op.tolerances(*ins)


def measure(op, ex, repeat: int = 5, min_repeat_ms: int = 20, check: bool = True) -> list[float]:
    """Per-repeat seconds of one call (``time_evaluator``); first checks the result against the reference."""
    import tvm

    ins, refs, tols = _workload_data(op)
    args = [*ins, *(tvm.runtime.tensor(a) for a in op.empty_outputs())]
    ex.mod["main"](*args)
    if check:
        outs = args[len(ins) :]
        for o, r, tol in zip(outs, refs, tols, strict=True):
            if not np.allclose(o.numpy(), r, rtol=0, atol=tol):
                raise AssertionError(f"{op.key}: kernel output differs from the reference")
    t = ex.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)(*args)
    return [float(r) for r in t.results]


def commit(db, op, sch, target: str, run_secs: list[float]) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = S.workload(op)
    rec = ms.database.TuningRecord(
        sch.trace, db.commit_workload(mod), [tvm.runtime.convert(float(s)) for s in run_secs],
        targets.get_target(target), ms.arg_info.ArgInfo.from_prim_func(mod["main"]),
    )  # fmt: skip
    db.commit_tuning_record(rec)
    if isinstance(db, TuningDatabase):
        db.publish()


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


def plan(db, op, target: str, trials: int, retune: bool, seed: int) -> list[dict]:
    mod = S.schedule_module(target)
    configs = grid(mod.space(op))
    if hasattr(mod, "valid"):  # templates whose knobs interact (CUDA: split products must divide the dimension)
        configs = [configs[0]] + [c for c in configs[1:] if mod.valid(op, c)]
    rest = configs[1:]
    random.Random(seed).shuffle(rest)
    configs = [configs[0], *rest][:trials]
    if retune:
        return configs
    done = tried_knobs(db, op, target)
    if len(done) >= min(trials, len(configs)):
        return []
    return [c for c in configs if tuple(c.values()) not in done][: max(0, trials - len(done))]


def tune(ops, target: str, trials: int = 16, retune: bool = False, root=None, seed: int = 0,
         search: str = "grid", progress: bool = True) -> list[Result]:  # fmt: skip
    """Tune ``ops`` on ``target`` into ``tuning_logs/<target>/`` (or ``root/<target>``); see the module doc."""
    import tvm
    from tqdm import tqdm

    target = targets.resolve(target)
    if target == "cuda":
        return tune_cuda_here(ops, trials, retune, root, seed)
    if not targets.supported(target):
        raise SystemExit(f"cannot tune {target} here: this CPU lacks {targets.missing_flags(target)}")
    db = open_db(target, root)
    tgt = targets.get_target(target)
    if search == "ms":
        return [tune_ms(db, op, target, trials, seed) for op in ops]
    plans = {op: plan(db, op, target, trials, retune, seed) for op in ops}
    results = []
    bar = tqdm(total=sum(len(p) for p in plans.values()), desc=f"tune {target}", unit="trial", disable=not progress,
               file=sys.stderr)  # fmt: skip
    for op, configs in plans.items():
        for knobs in configs:
            bar.set_postfix_str(f"{op.key} {knobs}")
            try:
                sch = S.manual(op, target, knobs)
                secs = measure(op, tvm.compile(sch.mod, target=tgt))
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
    import tempfile

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


def tune_ms(db, op, target: str, trials: int, seed: int) -> Result:
    """MetaSchedule's evolutionary search over the hand design space; its records are copied into ``db``."""
    import tempfile

    import tvm
    from tvm.s_tir import meta_schedule as ms

    def fast_build(mod, target, _params):  # default_build minus the 17 s tensor_intrin import (docs/TVM.md §2)
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    with tempfile.TemporaryDirectory() as work:
        scratch = ms.tune_tir(
            mod=S.workload(op), target=targets.get_target(target), work_dir=work, max_trials_global=trials,
            num_trials_per_iter=min(8, trials), space=S.design_space(op, target), seed=seed, cost_model="xgb",
            builder=ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=60),
        )  # fmt: skip
        for rec in scratch.get_all_tuning_records():
            if rec.run_secs and all(float(s) < 1e9 for s in rec.run_secs):
                commit(db, op, _replay(op, rec), target, [float(s) for s in rec.run_secs])
    best = S.best_record(db, op)
    secs = float(np.mean([float(s) for s in best.run_secs])) if best else None
    return Result(op.key, "tuned", trials, secs * 1e3 if secs else None, None)


def _replay(op, rec):
    from tvm import s_tir

    sch = s_tir.Schedule(S.workload(op))
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


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
    p.add_argument("--search", choices=["grid", "ms"], default="grid")
    p.add_argument("--logs", default=None, help="tuning log root (default: tuning_logs/)")
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
    results = tune(ops, a.target, a.trials, a.retune, a.logs, a.seed, a.search)
    for r in results:
        best = f"{r.best_ms:.4f} ms {r.best_knobs}" if r.best_ms is not None else "no record"
        print(f"{r.status:8s} {r.op:32s} trials={r.trials:3d} best={best}")
    print(f"{len(results)} workloads in {time.time() - t0:.1f} s -> {S.logs_dir(targets.resolve(a.target), a.logs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
