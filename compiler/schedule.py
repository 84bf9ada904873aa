"""Schedules for an op on a target: hand (default knobs), tuned (from ``tuning_logs/<target>/``), or naive.

The one entry point the whole-model compiler needs:

    from compiler.schedule import get_primfunc
    sf = get_primfunc(make_op("gemv_i8", M=1536, K=512), "avx512")   # ScheduledFunc
    sf.func       # the scheduled tvm.tirx.PrimFunc (global_symbol = op.func_name), ready for relax call_tir
    sf.source     # "tuned" | "hand" (no tuning record: hand schedule with default knobs, logged as a WARNING)

``build(op, target)`` compiles it to a ``tvm.runtime.Executable``. The tuning database of a target is one MetaSchedule
``JSONDatabase`` (``database_workload.json`` + ``database_tuning_record.json``); a workload is the op's unscheduled
PrimFunc (structural hash), the best record is the one with the lowest measured time.

    python -m compiler.schedule --target avx512 --op gemv_i8:M=4096:K=4096   # where this op's schedule comes from
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import targets
from compiler.cache import DB_FILES, logs_root

log = logging.getLogger(__name__)

SCHEDULE_MODULES = {"avx512": "schedules.x86_avx512", "avx2": "schedules.x86_avx2", "cuda": "schedules.cuda"}


class UntunedWarning(UserWarning):
    """Emitted when a build uses the hand schedule because no tuning record exists."""


def schedule_module(target: str):
    target = targets.resolve(target)
    if target not in SCHEDULE_MODULES:
        raise NotImplementedError(f"no schedules for target {target!r} yet; have {sorted(SCHEDULE_MODULES)}")
    return importlib.import_module(SCHEDULE_MODULES[target])


def logs_dir(target: str, root: Path | str | None = None) -> Path:
    """``root/<target>``; ``root`` defaults to :func:`compiler.cache.logs_root` (``$TERNARY_TUNING_LOGS``, the
    checkout's ``tuning_logs/`` or the installed package's copy)."""

    return Path(root or logs_root()) / targets.resolve(target)


def machine_dir(target: str, root: Path | str | None = None, machine: str | None = None) -> Path:
    """``root/<target>/machines/<machine>``: the records tuned on one kind of CPU (default this one,
    :func:`targets.cpu.machine_id`), which the build prefers to the target's shared records (:func:`find_record`)."""
    from targets.cpu import machine_id

    return logs_dir(target, root) / "machines" / (machine or machine_id())


def workload(op):
    import tvm

    return tvm.IRModule({"main": op.compute()})


def manual(op, target: str, knobs: dict | None = None, cores: int | None = None):
    """The hand schedule (``knobs`` override the defaults) as an ``s_tir.Schedule`` (its ``.trace`` replays it).

    ``cores``: the thread count a CPU kernel is built for (default :func:`targets.build_cores`); only
    schedules with per-thread work use it (the table-lookup GEMV). CUDA schedules take none."""
    from tvm import s_tir

    target = targets.resolve(target)
    mod = schedule_module(target)
    if op.kind not in mod.SCHEDULES:
        raise NotImplementedError(f"no {target} schedule for {op.kind}")
    sch = s_tir.Schedule(workload(op))
    extra = {} if target == "cuda" else {"cores": cores or targets.build_cores()}
    mod.SCHEDULES[op.kind](sch, op, knobs=knobs if knobs is not None else {}, **extra)
    return sch


class TornDatabaseWarning(UserWarning):
    """Emitted when a tuning database has lines that do not parse (a write torn by a kill) and they are skipped."""


def clean_database(d: Path) -> tuple[str, str, int]:
    """The two files of the database in ``d`` without malformed lines: ``(workloads, records, lines dropped)``.

    A workload line must be ``[hash, module]``, a record line ``[workload index, record]`` naming a kept workload;
    anything else (a line torn by ``kill -9``, say) is dropped. A record's index is the line number of its workload,
    so the indices of the records after a dropped workload are renumbered. Nothing is written.
    """
    import json

    def lines(name: str) -> list:
        path = d / name
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def parse(line: str):
        try:
            return json.loads(line)
        except ValueError:
            return None

    keep_wl, index, dropped = [], {}, 0  # index: old line number -> new one
    for i, line in enumerate(lines(DB_FILES[0])):
        v = parse(line)
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v):
            index[i] = len(keep_wl)
            keep_wl.append(line)
        else:
            dropped += 1
    keep_rec = []
    for line in lines(DB_FILES[1]):
        v = parse(line)
        ok = isinstance(v, list) and len(v) == 2 and type(v[0]) is int and v[0] in index and isinstance(v[1], list)
        if not ok:
            dropped += 1
        elif index[v[0]] == v[0]:
            keep_rec.append(line)
        else:
            keep_rec.append(json.dumps([index[v[0]], v[1]], separators=(",", ":")))
    return "".join(x + "\n" for x in keep_wl), "".join(x + "\n" for x in keep_rec), dropped


def open_database(target: str, root: Path | str | None = None, machine: str | None = None):
    """The target's JSONDatabase for reading, or None if it does not exist (the tuner writes through
    :func:`compiler.tuning_db.open_db`); ``machine`` (a :func:`targets.cpu.machine_id`): that CPU kind's own records
    instead (:func:`machine_dir`).

    A database with malformed lines (a write torn by ``kill -9``) is read through a cleaned copy
    (:func:`clean_database`), with a :class:`TornDatabaseWarning`; its files are left as they are (``compiler.tune``
    repairs them). Such a handle is for reading: its commits would go nowhere.
    """
    import tempfile
    import warnings

    from tvm.s_tir import meta_schedule as ms

    importlib.import_module("schedules.intrin_x86")  # records' traces name our intrinsics: register before parsing
    d = logs_dir(target, root) if machine is None else machine_dir(target, root, machine)
    if not (d / DB_FILES[1]).exists():
        return None
    stats = [(d / n).stat() if (d / n).exists() else None for n in DB_FILES]
    key = (str(d.resolve()), *((s.st_ino, s.st_mtime_ns, s.st_size) if s else None for s in stats))
    if key in _DB_CACHE:  # parsing ~1 MB of traces takes a second: reuse it while the files are unchanged
        return _DB_CACHE[key]
    workloads, recs, dropped = clean_database(d)
    if not dropped:
        db = ms.database.JSONDatabase(work_dir=str(d))
    else:
        msg = (
            f"tuning database {d}: skipped {dropped} malformed line(s) (a write torn by a kill?); the files are left "
            f"as they are; `python -m compiler.tune --target {targets.resolve(target)}` repairs them"
        )
        log.warning(msg)
        warnings.warn(msg, TornDatabaseWarning, stacklevel=2)
        with tempfile.TemporaryDirectory(prefix="tuning-db-") as tmp:
            paths = [Path(tmp) / n for n in DB_FILES]
            paths[0].write_text(workloads)
            paths[1].write_text(recs)
            db = ms.database.JSONDatabase(str(paths[0]), str(paths[1]), allow_missing=False)
    _DB_CACHE[key] = db
    return db


_DB_CACHE: dict = {}


def records(db, op) -> list:
    """All tuning records of ``op`` in ``db``, best (lowest mean run time) first; [] if none."""
    if db is None:
        return []
    mod = workload(op.canonical())
    if not db.has_workload(mod):
        return []
    wl = db.commit_workload(mod)  # no write: the workload exists
    return list(db.get_top_k(wl, 1 << 30))


def best_record(db, op):
    recs = records(db, op)
    return recs[0] if recs else None


def find_record(op, target: str, root: Path | str | None = None):
    """The record a build uses for ``op``: the best of this CPU kind's own records (:func:`machine_dir`) if it has
    any, else the best of the target's shared ones, else None. Times are compared only within one database: records
    measured on different machines, or in another regime (cache-resident or streaming from DRAM), do not rank."""
    from targets.cpu import machine_id

    for machine in (machine_id(), None):
        rec = best_record(open_database(target, root, machine=machine), op)
        if rec is not None:
            return rec
    return None


def build_knobs(op, target: str, root: Path | str | None = None) -> dict:
    """The knob values a CPU build gives ``op``: its record's (:func:`find_record`), else the hand defaults."""
    from schedules.knobs import defaults, knobs_of_trace

    space = schedule_module(target).space(op)
    rec = find_record(op, target, root)
    return knobs_of_trace(rec.trace, space) if rec is not None else defaults(space)


@dataclass
class ScheduledFunc:
    op: object
    target: str
    func: object  # tvm.tirx.PrimFunc
    source: str  # "tuned" | "hand" | "naive"
    run_secs: float | None = None  # measured time of the tuning record

    def build(self):
        import tvm

        return compile_mod(tvm.IRModule({"main": self.func}), self.target)

    def for_relax(self):
        """The PrimFunc to ``bb.add_func(f, name)`` / ``call_tir``: no ``global_symbol`` (the IRModule names it) and
        ``op_pattern`` 8 (opaque: Relax must not try to fuse a tensorized kernel)."""
        return self.func.without_attr("global_symbol").with_attr("op_pattern", 8)


def _apply_record(op, rec, target: str, cores: int | None = None):
    """The record's schedule. On CPU targets the record is read as its knob values and the hand schedule is rebuilt
    with them for ``cores`` threads: a trace also carries the loop splits its tuning machine derived from its own
    core count, which must not travel to a machine with more (docs/threads.md). A trace whose decisions are not our
    knobs (MetaSchedule's own search) and every CUDA record replay verbatim."""
    from tvm import s_tir

    from schedules.knobs import knobs_of_trace

    importlib.import_module("schedules.intrin_x86")  # the traces tensorize with our intrinsics
    if target != "cuda":
        try:
            knobs = knobs_of_trace(rec.trace, schedule_module(target).space(op))
        except ValueError:
            knobs = None
        if knobs is not None:
            return manual(op, target, knobs, cores)
    sch = s_tir.Schedule(workload(op))
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def borrowed_knobs(op, like, target: str, logs_root: Path | str | None = None) -> dict | None:
    """The knob values of ``like``'s best tuning record, fitted to ``op`` (same kind, another token count ``N``): a
    value that ``op``'s shape does not allow (``tokens=4`` at ``N=2``) becomes the largest allowed one below it. None
    when ``like`` has no record or the target replays traces (CUDA)."""
    target = targets.resolve(target)
    if target == "cuda" or like.kind != op.kind:
        return None
    rec = find_record(like, target, logs_root)
    if rec is None:
        return None
    from schedules.knobs import knobs_of_trace

    mod = schedule_module(target)
    try:
        knobs = knobs_of_trace(rec.trace, mod.space(like))
    except ValueError:
        return None
    out = {}
    for k in mod.space(op):
        v = int(knobs.get(k.name, k.default))
        out[k.name] = v if v in k.candidates else max((c for c in k.candidates if c <= v), default=k.default)
    return out


def get_primfunc(
    op, target: str, logs_root: Path | str | None = None, mode: str = "auto", cores: int | None = None, like=None
) -> ScheduledFunc:
    """The scheduled PrimFunc for ``op`` on ``target``, built for ``cores`` threads (see :func:`manual`).

    ``mode``: ``"auto"`` (tuned if a record exists, else the hand schedule with a loud warning), ``"tuned"`` (raise if
    no record), ``"hand"`` (default knobs, no database), ``"naive"`` (the unscheduled TE: the "untuned default").
    ``like``: an op of the same kind whose record's knobs serve ``op`` when ``op`` has no record of its own (the
    decode batch's GEMMs borrow the prefill chunk's); ``mode="like"`` uses them (or, without a record, the hand
    defaults) even when ``op`` has a record: the decode batch's RMSNorm takes the one-token kernel's knobs, so a
    row's float sums do not depend on the batch. The source is then ``"borrowed"``.
    """
    import warnings

    target = targets.resolve(target)
    if mode not in ("auto", "tuned", "hand", "naive", "like"):
        raise ValueError(f"mode must be auto, tuned, hand, naive or like; got {mode!r}")
    sym = op.func_name
    if mode == "like":
        if like is None:
            raise ValueError("mode='like' needs the op to take the knobs of (like=...)")
        knobs = borrowed_knobs(op, like, target, logs_root) or {}
        sch = manual(op, target, knobs, cores)
        return ScheduledFunc(op, target, sch.mod["main"].with_attr("global_symbol", sym), "borrowed")
    if mode == "naive":
        return ScheduledFunc(op, target, op.compute().with_attr("global_symbol", sym), "naive")
    rec = None
    if mode in ("auto", "tuned"):
        rec = find_record(op, target, logs_root)
        if rec is None and mode == "tuned":
            raise LookupError(f"no tuning record for {op.key} in {logs_dir(target, logs_root)}; "
                              f"run: python -m compiler.tune --target {target} --shape {op.key}")  # fmt: skip
    if rec is not None:
        sch = _apply_record(op, rec, target, cores)
        secs = [float(s) for s in rec.run_secs]
        return ScheduledFunc(op, target, sch.mod["main"].with_attr("global_symbol", sym), "tuned", min(secs))
    if mode == "auto" and like is not None:
        knobs = borrowed_knobs(op, like, target, logs_root)
        if knobs is not None:
            sch = manual(op, target, knobs, cores)
            return ScheduledFunc(op, target, sch.mod["main"].with_attr("global_symbol", sym), "borrowed")
    if mode == "auto":
        msg = (
            f"UNTUNED: no tuning record for {op.key} on {target} in {logs_dir(target, logs_root)}; using the hand "
            f"schedule with default knobs (run `python -m compiler.tune --target {target} --shape {op.key}`)"
        )
        log.warning(msg)
        warnings.warn(msg, UntunedWarning, stacklevel=2)
    sch = manual(op, target, cores=cores)
    return ScheduledFunc(op, target, sch.mod["main"].with_attr("global_symbol", sym), "hand")


def build(op, target: str, mode: str = "auto", knobs: dict | None = None, logs_root=None, cores: int | None = None):
    """Compile ``op`` for ``target`` → ``tvm.runtime.Executable`` (``knobs`` force a hand schedule with them)."""

    if knobs is not None:
        return compile_mod(manual(op, target, knobs, cores).mod, target)
    return get_primfunc(op, target, logs_root, mode, cores).build()


@functools.cache
def get_kernel(op, target: str = "auto", mode: str = "auto"):
    """A cached :class:`compiler.kernels.Kernel` for ``op`` (ops are frozen dataclasses, hence hashable) on
    ``target``."""
    from compiler.kernels import Kernel

    return Kernel(op, build(op, target, mode=mode), cpu_flags=() if mode == "naive" else None)


def compile_mod(mod, target: str):
    """``tvm.compile`` for a short target name; CUDA gets real device code here even without a GPU
    (:mod:`compiler.cuda_cross`), and is compiled inside the target's scope (nvcc reads the arch from it)."""
    import tvm

    tgt = targets.get_target(target)
    if targets.resolve(target) != "cuda":
        return tvm.compile(mod, target=tgt)
    from compiler import cuda_cross

    cuda_cross.enable()
    with tgt:
        return tvm.compile(mod, target=tgt)


def self_check(target: str) -> None:
    """Build the W2A8 GEMV with the hand schedule and compare it with the reference (``python -m schedules.x86_*``)."""
    import numpy as np

    from compiler import kernels
    from compiler.ops import make_op

    op = make_op("gemv_i8", M=512, K=1024)
    k = kernels.Kernel(op, build(op, target, mode="hand"))
    ins = op.random_inputs(np.random.default_rng(0))
    ok = np.array_equal(k(*ins)[0], op.reference(*ins)[0])
    print(f"{target}: {op} hand schedule bit-exact: {ok}")


def main(argv=None) -> None:
    from compiler.ops import parse_key

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="auto")
    p.add_argument("--op", required=True, help="op key, e.g. gemv_i8:M=4096:K=4096")
    p.add_argument("--trace", action="store_true", help="print the schedule trace")
    a = p.parse_args(argv)
    sf = get_primfunc(parse_key(a.op), a.target)
    timing = f" ({sf.run_secs * 1e3:.3f} ms)" if sf.run_secs else ""
    print(f"{a.op} on {targets.resolve(a.target)}: {sf.source}{timing}")
    if a.trace:
        print(sf.func.script())


if __name__ == "__main__":
    main()
