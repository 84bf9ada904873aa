"""Tuning databases after kill -9: the build reads a database with torn or malformed lines (skipping them with a
warning, leaving the files alone), and the tuner writes records atomically, so a write cut off mid-line leaves the
database whole. Every test works on a temporary copy; the committed tuning_logs/ are only read.

    pytest tests/test_tuning_db.py -q
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

import targets
from compiler import schedule as S
from compiler import tune
from compiler.kernels import Kernel
from compiler.ops import make_op

REPO = Path(__file__).resolve().parent.parent
TARGET = targets.detect()
SHIPPED_OP = make_op("gemv_i8", M=256, K=512)  # a shipped-model workload: the committed logs have records for it
TILED_OP = make_op("gemv_i8", M=256, K=512, tile=8)  # the shipped model's layout: a later line of the workloads
SMALL_OP = make_op("gemv_i8", M=48, K=512)  # cheap to tune
NEW_OP = make_op("gemv_i8", M=64, K=512)
FILES = ("database_workload.json", "database_tuning_record.json")


@pytest.fixture
def logs_copy(tmp_path):
    """A copy of the committed tuning_logs/<this CPU's target>."""
    src = REPO / "tuning_logs" / TARGET
    if not (src / FILES[1]).exists():
        pytest.skip(f"no committed tuning logs for {TARGET}")
    shutil.copytree(src, tmp_path / TARGET)
    return tmp_path


def tear_last_line(path: Path) -> None:
    """What a kill in the middle of appending a line leaves: the last line cut in half, no newline."""
    lines = path.read_text().splitlines()
    path.write_text("".join(x + "\n" for x in lines[:-1]) + lines[-1][: len(lines[-1]) // 2])


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (the shared database and each CPU kind's own), by its path relative to ``d``."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def all_lines_parse(d: Path) -> bool:
    return all(json.loads(x) is not None for n in FILES for x in (d / n).read_text().splitlines())


def assert_builds_correctly(sf) -> None:
    ins = sf.op.random_inputs(np.random.default_rng(0))
    np.testing.assert_array_equal(Kernel(sf.op, sf.build())(*ins)[0], sf.op.reference(*ins)[0])


@pytest.mark.build
def test_build_skips_a_torn_last_record_with_a_warning(logs_copy):
    d = logs_copy / TARGET
    tear_last_line(d / FILES[1])
    before = snapshot(d)
    with pytest.warns(S.TornDatabaseWarning, match="skipped 1 malformed line"):
        sf = S.get_primfunc(SHIPPED_OP, TARGET, logs_root=logs_copy, mode="tuned")
    assert sf.source == "tuned"
    assert_builds_correctly(sf)
    assert snapshot(d) == before  # read through a cleaned copy: the files are not modified


@pytest.mark.build
def test_malformed_workload_lines_renumber_the_records(logs_copy):
    """Records name their workload by line number: dropping a workload line must not point records at another one."""
    d = logs_copy / TARGET
    lines = (d / FILES[0]).read_text().splitlines()
    lines[0] = lines[0][: len(lines[0]) // 2]  # the first workload (another op's) torn in place: later ones move up
    (d / FILES[0]).write_text("".join(x + "\n" for x in lines))
    tear_last_line(d / FILES[0])
    with pytest.warns(S.TornDatabaseWarning, match="malformed line"):
        sf = S.get_primfunc(TILED_OP, TARGET, logs_root=logs_copy, mode="tuned")
    assert sf.source == "tuned"
    assert sf.run_secs == S.get_primfunc(TILED_OP, TARGET, mode="tuned").run_secs  # the same best record
    assert_builds_correctly(sf)


CUT_OFF_WRITER = """
import resource, signal, sys
from compiler import tune
from compiler.ops import make_op
root, target, limit, sigxfsz = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tune.tune([make_op("gemv_i8", M=48, K=512)], target, trials=1, root=root, progress=False)  # tuned: warms up only
if sigxfsz == "die":  # the write that crosses the limit kills the process, as kill -9 mid-write would
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # "ignore" (Python's default): the write fails, short
tune.tune([make_op("gemv_i8", M=64, K=512)], target, trials=1, root=root, progress=False)  # a new workload line
"""


@pytest.mark.e2e
@pytest.mark.parametrize("sigxfsz", ["die", "ignore"])
def test_a_write_cut_off_mid_line_leaves_the_database_whole(tmp_path, sigxfsz):
    """RLIMIT_FSIZE stops the next workload line half-way (and SIGXFSZ kills the tuner, or the write just fails as on
    a full disk): the database must still hold whole lines only, and tuning must resume."""
    tune.tune([SMALL_OP], TARGET, trials=1, root=tmp_path, progress=False)
    d = tmp_path / TARGET
    before = snapshot(d)
    size = len(before[FILES[0]])  # one workload line, about as long as the next one
    env = {**os.environ, "TVM_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    args = [str(tmp_path), TARGET, str(size + size // 2), sigxfsz]  # the file may grow by half a line
    proc = subprocess.Popen([sys.executable, "-c", CUT_OFF_WRITER, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    if sigxfsz == "die":
        assert proc.returncode == -signal.SIGXFSZ, f"the write was not cut off: {err[-2000:]}"
    else:  # the short write is noticed before anything is published
        assert proc.returncode != 0 and "TuningDatabaseError" in err, f"the write was not cut off: {err[-2000:]}"
    assert all_lines_parse(d), "a torn line reached the database"
    assert snapshot(d) == before
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.TornDatabaseWarning)
        assert S.get_primfunc(SMALL_OP, TARGET, logs_root=tmp_path, mode="tuned").source == "tuned"
    res = tune.tune([NEW_OP], TARGET, trials=1, root=tmp_path, progress=False)
    assert res[0].status == "tuned" and len((d / FILES[1]).read_text().splitlines()) == 2
    assert not list(Path(tempfile.gettempdir()).glob(f"{tune.SCRATCH_PREFIX}{proc.pid}-*"))  # its scratch: removed


@pytest.mark.build
def test_a_kill_before_the_rename_leaves_the_old_file_and_the_next_run_cleans_up(tmp_path, monkeypatch, caplog):
    """The tuner dies after writing a record's temporary file, before renaming it into place."""
    tune.tune([SMALL_OP], TARGET, trials=1, root=tmp_path, progress=False)
    d = tmp_path / TARGET
    before = snapshot(d)

    class Killed(BaseException):
        pass

    def killed(*args):
        raise Killed

    monkeypatch.setattr(tune.os, "replace", killed)
    with pytest.raises(Killed):
        tune.tune([SMALL_OP], TARGET, trials=2, root=tmp_path, progress=False)
    monkeypatch.undo()
    assert [p.name for p in d.glob(".database_*.tmp-*")] == [f".{FILES[1]}.tmp-{os.getpid()}"]
    assert {n: (d / n).read_bytes() for n in FILES} == before  # the old files, untouched
    res = tune.tune([SMALL_OP], TARGET, trials=2, root=tmp_path, progress=False)
    assert "left by a tuner that was killed" in caplog.text
    assert not list(d.glob(".database_*.tmp-*")) and all_lines_parse(d)
    assert res[0].trials == 1 and len((d / FILES[1]).read_text().splitlines()) == 2


def _graph(line: str) -> bytes:
    """The JSON graph inside a workload line (after the base64 and the 8-byte length)."""
    return base64.b64decode(json.loads(line)[1])[8:]


def _indented(line: str) -> str:
    """A workload line as TVM writes it: the graph indented by two spaces."""
    h, _ = json.loads(line)
    g = json.dumps(json.loads(_graph(line)), indent=2).encode()
    return json.dumps([h, base64.b64encode(struct.pack("<Q", len(g)) + g).decode()])


@pytest.mark.unit
def test_committed_workloads_are_compact():
    """Every workload line under tuning_logs/ is stored compact (half the bytes that travel to the GPU host)."""
    from compiler.tuning_db import compact_workload

    files = sorted((REPO / "tuning_logs").rglob(FILES[0]))
    assert files
    for f in files:
        for line in f.read_text().splitlines():
            assert compact_workload(line) == line, f"{f}: run `python -m compiler.tuning_db compact`"


@pytest.mark.unit
def test_compact_workload_leaves_other_lines_alone():
    from compiler.tuning_db import compact_workload

    for line in ('["h", "not base64!"]', '["h", "AAAA"]', "[1, 2]", "{", ""):
        assert compact_workload(line) == line


@pytest.mark.build
def test_compacting_an_indented_database_keeps_every_record(logs_copy, tmp_path):
    """A database whose workloads are indented (as TVM writes them) gives the same records after compaction: the
    same workload modules, traces, times and targets; compacting again changes nothing."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from compiler.tuning_db import compact_all

    d = logs_copy / TARGET
    wl = d / FILES[0]
    wl.write_text("".join(_indented(x) + "\n" for x in wl.read_text().splitlines()))
    indented = ms.database.JSONDatabase(work_dir=str(d)).get_all_tuning_records()
    ((before, after),) = [(b, a) for f, b, a in compact_all(logs_copy) if f == wl]
    assert after < 0.6 * before
    assert all(b"\n" not in _graph(x) for x in wl.read_text().splitlines())
    compact = ms.database.JSONDatabase(work_dir=str(d)).get_all_tuning_records()
    assert len(compact) == len(indented) > 0
    for a, b in zip(indented, compact, strict=True):
        tvm.ir.assert_structural_equal(a.workload.mod, b.workload.mod)
        assert tvm_ffi.structural_hash(a.workload.mod) == tvm_ffi.structural_hash(b.workload.mod)
        assert (str(a.trace), str(a.target)) == (str(b.trace), str(b.target))
        assert [float(x) for x in a.run_secs] == [float(x) for x in b.run_secs]
    text = wl.read_text()
    compact_all(logs_copy)
    assert wl.read_text() == text


@pytest.mark.build
def test_the_tuner_writes_workloads_compact(tmp_path):
    tune.tune([SMALL_OP], TARGET, trials=1, root=tmp_path, progress=False)
    (line,) = (tmp_path / TARGET / FILES[0]).read_text().splitlines()
    assert b"\n" not in _graph(line)
    sf = S.get_primfunc(SMALL_OP, TARGET, logs_root=tmp_path, mode="tuned")
    assert_builds_correctly(sf)


@pytest.mark.build
def test_pruning_drops_only_the_records_of_ops_no_longer_built(tmp_path):
    """``prune_records`` (scripts/prune_tuning_logs.py) drops the records and workloads of ops the compiler no longer
    builds (e.g. q, k and v once stacked), keeps every other record as it was, and rewrites nothing when it drops
    nothing."""
    from compiler.tuning_db import prune_records

    tune.tune([SMALL_OP, NEW_OP], TARGET, trials=1, root=tmp_path, progress=False)
    d = tmp_path / TARGET
    kept = S.records(S.open_database(TARGET, root=tmp_path), SMALL_OP)
    assert kept and S.records(S.open_database(TARGET, root=tmp_path), NEW_OP)
    assert prune_records(d, [SMALL_OP]) == 1
    db = S.open_database(TARGET, root=tmp_path)
    assert not S.records(db, NEW_OP) and len(db.get_all_tuning_records()) == 1
    (rec,) = S.records(db, SMALL_OP)
    assert (str(rec.trace), [float(x) for x in rec.run_secs]) == (
        str(kept[0].trace),
        [float(x) for x in kept[0].run_secs],
    )
    assert len((d / FILES[0]).read_text().splitlines()) == 1
    files = snapshot(d)
    assert prune_records(d, [SMALL_OP]) == 0 and snapshot(d) == files  # nothing to drop: nothing written
