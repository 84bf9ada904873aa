"""The tuner's MetaSchedule JSON database under ``tuning_logs/<target>/``: opened repaired, written atomically,
append-only; and the plan of a workload's trials (the hand schedule's knob grid, less what is already recorded).

Used by :mod:`compiler.tune` (local tuning) and :mod:`compiler.cuda_remote` (candidates built here, timed on the GPU
host, recorded here); it imports neither. A torn line (from a tuner before writes were atomic) is dropped when a tuner
next opens the database; ``compiler.build`` skips such lines with a warning and leaves the files alone.

Workloads are written compact (:func:`compact_workloads`): TVM stores each one as base64 of an indented JSON graph,
twice the bytes of the same graph without the indentation, and the tuning logs travel with the repository to the GPU
host (64 MiB a call).

    python -m compiler.tuning_db compact          # rewrite every database under tuning_logs/ compact (idempotent)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import logging
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

import targets
from compiler import schedule as S
from schedules.knobs import grid, knobs_of_trace

log = logging.getLogger("compiler.tune")


# ---------------------------------------------------------------------------------------------------------------
class TuningDatabaseError(RuntimeError):
    """A tuning record could not be written whole (disk full, file size limit, ...)."""


def compact_workload(line: str) -> str:
    """One workload line ``[hash, base64(u64 length + JSON graph)]`` with the graph's JSON re-serialized without
    whitespace (the same graph: TVM parses it to the same module). A line that is not of that form is returned as it
    is, so compacting is safe on any line and idempotent. A graph written compact starts ``{"`` (TVM's own starts
    ``{`` and a newline): such a line is returned after decoding its first 12 bytes only, so compacting a whole file
    at every tuner commit costs little."""
    try:
        h, blob = json.loads(line)
        if base64.b64decode(blob[:16], validate=True)[8:10] == b'{"':
            return line
        raw = base64.b64decode(blob, validate=True)
        (n,) = struct.unpack("<Q", raw[:8])
        if n != len(raw) - 8:
            return line
        graph = json.dumps(json.loads(raw[8:]), separators=(",", ":")).encode()
    except (ValueError, TypeError, struct.error):
        return line
    blob = base64.b64encode(struct.pack("<Q", len(graph)) + graph).decode()
    return json.dumps([h, blob])


def compact_workloads(text: str) -> str:
    """:func:`compact_workload` on every line of a workload file's text."""
    return "".join(compact_workload(x) + "\n" for x in text.splitlines())


def _replace_atomically(src_text_or_path, dest: Path) -> None:
    """Put ``src`` (a str, or a file to copy) at ``dest`` by write-temp + fsync + rename: ``dest`` is always whole.
    A workload file is written compact (:func:`compact_workloads`)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if dest.name == S.DB_FILES[0]:
        text = src_text_or_path if isinstance(src_text_or_path, str) else Path(src_text_or_path).read_text()
        tmp.write_text(compact_workloads(text))
    elif isinstance(src_text_or_path, str):
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


def open_db(target: str, root=None, machine: bool = False) -> TuningDatabase:
    """The tuner's handle on ``tuning_logs/<target>/`` (or ``root/<target>``; ``machine``: this CPU kind's own records
    under it, :func:`compiler.schedule.machine_dir`): repaired, written atomically."""
    d = S.machine_dir(target, root) if machine else S.logs_dir(target, root)
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
        except ValueError:  # a record whose trace is not our knobs (MetaSchedule's own search): count it, do not key it
            kv = ("ms", id(rec))
        secs = float(np.mean([float(s) for s in rec.run_secs]))
        out[kv] = min(secs, out.get(kv, float("inf")))
    return out


def commit(db, op, sch, target: str, run_secs: list[float]) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = S.workload(op.canonical())
    rec = ms.database.TuningRecord(
        sch.trace, db.commit_workload(mod), [tvm.runtime.convert(float(s)) for s in run_secs],
        targets.get_target(target), ms.arg_info.ArgInfo.from_prim_func(mod["main"]),
    )  # fmt: skip
    db.commit_tuning_record(rec)
    if isinstance(db, TuningDatabase):
        db.publish()


def plan(db, op, target: str, trials: int, retune: bool, seed: int) -> list[dict]:
    mod = S.schedule_module(target)
    configs = grid(mod.space(op))
    if hasattr(mod, "valid"):  # knobs that interact (CUDA: split products must divide the dimension) or that would
        # tie a parallel loop to the tuning machine's cores (the table-lookup GEMV's tables at root for few row groups)
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


@contextlib.contextmanager
def _rewrite(d: Path):
    """``(records, out)``: the records of the database in ``d`` and an empty database beside it. What ``out`` holds
    when the block ends replaces the database in ``d``, written atomically (``JSONDatabase`` appends as it commits)."""
    from tvm.s_tir import meta_schedule as ms

    d.mkdir(parents=True, exist_ok=True)
    repair_database(d)
    importlib.import_module("schedules.intrin_x86")  # records' traces name our intrinsics: register before parsing
    records = ms.database.JSONDatabase(work_dir=str(d)).get_all_tuning_records()
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as tmp:
        yield records, ms.database.JSONDatabase(work_dir=tmp)
        for name in S.DB_FILES:
            path = Path(tmp) / name
            _replace_atomically(path.read_text() if path.exists() else "", d / name)


def _keep(out, rec, trace=None) -> None:
    """Copy ``rec`` into ``out`` (with ``trace`` instead of its own, if given)."""
    from tvm.s_tir import meta_schedule as ms

    out.commit_tuning_record(ms.database.TuningRecord(trace if trace is not None else rec.trace,
                                                      out.commit_workload(rec.workload.mod), rec.run_secs,
                                                      rec.target, rec.args_info))  # fmt: skip


def replace_records(d: Path, target: str, new: list[tuple]) -> None:
    """Make ``(op, schedule, run_secs)`` the only records of their ops in the database in ``d`` (other ops' records
    are kept as they are), written atomically: what a whole-model measurement chose (``bench.knob_sweep --record``)
    replaces what isolated timings ranked, whose times cannot compete with it."""
    import tvm_ffi

    replaced = {tvm_ffi.structural_hash(S.workload(op.canonical())) for op, _, _ in new}
    with _rewrite(d) as (records, out):
        for rec in records:
            if tvm_ffi.structural_hash(rec.workload.mod) not in replaced:
                _keep(out, rec)
        for op, sch, secs in new:
            commit(out, op, sch, target, secs)


def retrace_records(d: Path, target: str, ops, kinds: tuple[str, ...]) -> int:
    """Rewrite the records of ``ops`` of ``kinds`` in the database in ``d`` with the trace the current hand schedule
    makes from each record's own knobs, at its own core count (the same knobs, run_secs, target and arguments);
    written atomically, other records untouched. For a template change that keeps every knob's meaning (a CPU build
    reads only the knobs of a record and rebuilds the schedule, :func:`compiler.schedule._apply_record`; the
    trace should still be what the knobs build, ``tests/test_threads.py``). The run_secs stay those measured with
    the template of the time. The number of records rewritten."""
    import tvm_ffi

    space = S.schedule_module(target).space
    by_hash = {tvm_ffi.structural_hash(S.workload(op.canonical())): (op, space(op)) for op in ops if op.kind in kinds}
    n = 0
    with _rewrite(d) as (records, out):
        for rec in records:
            op, knob_space = by_hash.get(tvm_ffi.structural_hash(rec.workload.mod), (None, None))
            trace = None
            if op is not None:
                knobs = knobs_of_trace(rec.trace, knob_space)
                trace = S.manual(op, target, knobs, int(rec.target.attrs["num-cores"])).trace
                n += 1
            _keep(out, rec, trace)
    return n


def database_dirs(target: str, root=None) -> list[Path]:
    """The databases of ``target`` (under ``root``, default ``tuning_logs/``) that hold records: the shared one and
    each CPU kind's own (:func:`compiler.schedule.machine_dir`)."""
    base = S.logs_dir(target, root)
    dirs = [base, *sorted(p for p in (base / "machines").glob("*") if p.is_dir())]
    return [d for d in dirs if (d / S.DB_FILES[1]).exists()]


def prune_records(d: Path, ops) -> int:
    """Drop the records of the database in ``d`` whose workload is none of ``ops`` (the ops the compiler still builds,
    e.g. after a change stacked two matrices into one shape), and their workloads; written atomically, the other
    records untouched, and nothing written when nothing is dropped. The number dropped."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    keep = {tvm_ffi.structural_hash(S.workload(op.canonical())) for op in ops}
    repair_database(d)
    importlib.import_module("schedules.intrin_x86")
    records = ms.database.JSONDatabase(work_dir=str(d)).get_all_tuning_records()
    dropped = sum(tvm_ffi.structural_hash(rec.workload.mod) not in keep for rec in records)
    if dropped:
        with _rewrite(d) as (records, out):
            for rec in records:
                if tvm_ffi.structural_hash(rec.workload.mod) in keep:
                    _keep(out, rec)
    return dropped


def compact_all(root: Path) -> list[tuple[Path, int, int]]:
    """Rewrite every workload file under ``root`` compact; ``(file, bytes before, bytes after)`` for each."""
    out = []
    for f in sorted(root.rglob(S.DB_FILES[0])):
        before = f.stat().st_size
        _replace_atomically(f.read_text(), f)
        out.append((f, before, f.stat().st_size))
    return out


def main(argv: list[str] | None = None) -> None:
    from compiler.cache import logs_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["compact"], help="compact: rewrite every workload file compact")
    ap.add_argument("--logs", default=None, help="tuning log root (default: tuning_logs/)")
    a = ap.parse_args(argv)
    total = [0, 0]
    for f, before, after in compact_all(Path(a.logs or logs_root())):
        total[0] += before
        total[1] += after
        print(f"{f}: {before:,} -> {after:,} bytes")
    print(f"workloads: {total[0]:,} -> {total[1]:,} bytes")


if __name__ == "__main__":
    main()
