"""Tuned kernels are portable across core counts: no committed record or hand schedule ties a parallel loop to the
machine that tuned it, and kernels give the same bits at 1, 2, 3 and 8 threads.

* Every workload of every committed CPU database (``tuning_logs/avx512``, ``tuning_logs/avx2``) is matched to an op
  the compiler builds (so no record escapes the audit), scheduled from its best record for 3 and for 16 cores, and
  its parallel loops read from the scheduled TIR: each extent is the same for both (fixed by the shape) or, for the
  per-thread table build of ``gemv_i8_tl``, exactly :func:`schedules.x86_tl.tasks` of the core count asked for. The
  tuning machine had 2 cores: a frozen split would show as a 2 in both.
* Each record, rebuilt from its knobs for the core count it was measured with, is the very schedule it measured
  (structurally equal to replaying its trace).
* The hand schedule of every op kind passes the same audit.
* Bit-exactness across thread counts runs in a subprocess whose TVM pool has 8 threads (oversubscribed here: a
  correctness check, not a timing).

Scheduling needs no CPU features (nothing runs), so the audit runs on any machine; the bit-exact check skips targets
this CPU cannot run.

    pytest tests/test_threads.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import targets
from bench.kernels import known_ops
from compiler import schedule as S
from compiler.ops import make_op
from schedules import x86_tl
from schedules.x86_common import PORTABLE_THREADS

REPO = Path(__file__).resolve().parent.parent
CPU_TARGETS = ("avx512", "avx2")
PARALLEL = re.compile(r"T\.parallel\(([^)]*)\)")


def parallel_extents(func) -> list[str]:
    return PARALLEL.findall(func.script())


@cache
def committed_ops(target: str) -> list:
    """The ops with records in the committed databases of ``target`` (the shared one and every CPU kind's own,
    ``tuning_logs/<target>/machines/<id>/``); fails when some record belongs to no op the compiler builds (it would
    escape the audit)."""
    db = S.open_database(target)
    if db is None:
        pytest.skip(f"no committed tuning_logs/{target}")
    machines = sorted(p.name for p in (S.logs_dir(target) / "machines").glob("*") if p.is_dir())
    ops = {}
    for where, d in [("", db), *((f"machines/{m}", S.open_database(target, machine=m)) for m in machines)]:
        mine = [op for op in known_ops(target) if S.records(d, op)]
        matched = sum(len(S.records(d, op)) for op in mine)
        total = len(d.get_all_tuning_records())
        assert matched == total, f"{total - matched} records in tuning_logs/{target}/{where} match no op we build"
        ops |= {op.key: op for op in mine}
    return list(ops.values())


WIDE = PORTABLE_THREADS  # the widest machine the audit asks for: a kernel built for it must keep it busy


def check_extents(op, by_cores: dict[int, list[str]]) -> None:
    """Each parallel loop can feed every thread asked for: its extent is at least :data:`WIDE` (a grain of row
    tiles, tokens or table blocks that the shape fixes), or it is the per-thread table build of ``gemv_i8_tl`` with
    exactly :func:`schedules.x86_tl.tasks` of the core count asked for. A split frozen at the tuning machine's 2
    cores fails the first rule at 16 cores and the second whenever the row groups allow more than 2 tasks."""
    a, b = by_cores.values()
    assert len(a) == len(b), f"{op.key}: the parallel structure changes with the core count: {by_cores}"
    for cores, exts in by_cores.items():
        for e in map(int, exts):
            per_thread = op.kind == "gemv_i8_tl" and e == x86_tl.tasks(op, cores)
            assert e >= WIDE or per_thread, f"{op.key}: a parallel loop of {e} built for {cores} cores: {by_cores}"


@pytest.mark.build
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_committed_records_do_not_freeze_parallelism(target):
    ops = committed_ops(target)
    assert ops
    for op in ops:
        by_cores = {c: parallel_extents(S.get_primfunc(op, target, mode="tuned", cores=c).func) for c in (3, WIDE)}
        check_extents(op, by_cores)


@pytest.mark.build
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_records_rebuilt_from_knobs_are_what_was_measured(target):
    """At the core count a record was measured with, the schedule rebuilt from its knobs is its own trace's."""
    import tvm_ffi
    from tvm import s_tir

    for op in committed_ops(target):
        rec = S.find_record(op, target)  # this CPU kind's own record where it has one, as the build picks
        cores = int(rec.target.attrs["num-cores"])
        sch = s_tir.Schedule(S.workload(op))
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        rebuilt = S.get_primfunc(op, target, mode="tuned", cores=cores).func
        assert tvm_ffi.structural_equal(sch.mod["main"], rebuilt.with_attr("global_symbol", "main")), op.key


@pytest.mark.build
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_hand_schedules_do_not_freeze_parallelism(target):
    kinds = {}
    for op in known_ops(target):
        if op.kind in S.schedule_module(target).SCHEDULES:
            kinds.setdefault(op.kind, op)
    kinds["gemv_i8_tl_odd"] = make_op("gemv_i8_tl", M=16 * 8 * 6, K=768, tile=8)  # 6 groups: 3 tasks on 3 cores
    if target != "avx512":
        kinds = {k: op for k, op in kinds.items() if op.kind != "gemv_i8_tl"}
    assert {"gemv_i8", "gemm_i8", "rmsnorm_quant", "mhc_post"} <= {op.kind for op in kinds.values()}
    for op in kinds.values():
        by_cores = {c: parallel_extents(S.manual(op, target, cores=c).mod["main"]) for c in (3, WIDE)}
        check_extents(op, by_cores)


@pytest.mark.build
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_small_ternary_kernels_run_on_one_thread(target):
    """A ternary GEMV/GEMM with less work than the ISA's ``parallel_macs`` has no parallel loop (inside a model step
    the pool's launch and wait cost more than a second core saves on it: docs/threads.md); one with that much work
    or more splits its row tiles, in the hand schedule and in a committed record alike."""
    least = S.schedule_module(target).ISA.parallel_macs
    cases = [make_op("gemv_i8", M=1024, K=512, tile=8), make_op("gemv_i8", M=3072, K=512, tile=8),
             make_op("gemm_i8", N=2, M=256, K=512, tile=8), make_op("gemm_i8", N=4, M=3072, K=512, tile=8)]  # fmt: skip
    for op in cases:  # the shipped model's stacked q|k|v and gate|up, a DeltaNet layer's k: all have records
        assert S.records(S.open_database(target), op), op.key
        macs = getattr(op, "N", 1) * op.M * op.K
        for func in (S.manual(op, target).mod["main"], S.get_primfunc(op, target, cores=2).func):
            assert bool(parallel_extents(func)) == (macs >= least), (op.key, macs, least)


@pytest.mark.build
def test_tasks_divide_the_row_groups():
    for groups in (1, 2, 3, 4, 6, 44, 86, 256):
        op = make_op("gemv_i8_tl", M=16 * 8 * groups, K=256, tile=8)
        for cores in (1, 2, 3, 8, 16, 64):
            t = x86_tl.tasks(op, cores)
            assert 1 <= t <= cores and groups % t == 0
            assert all(groups % d for d in range(t + 1, min(groups, cores) + 1))  # the largest such divisor


BITS_SCRIPT = r"""
import json, sys
import numpy as np
from compiler import schedule as S
from compiler.kernels import Kernel
from compiler.ops import parse_key
import targets
target, keys = sys.argv[1], sys.argv[2:]
out = {}
for key in keys:
    op = parse_key(key)
    ins = op.random_inputs(np.random.default_rng(7))
    ref = op.reference(*ins)
    for cores in (1, 2, 3, 8):
        k = Kernel(op, S.build(op, target, cores=cores))
        for threads in (1, 2, 3, 8):
            assert targets.set_tvm_threads(threads) == threads
            got = k(*ins)
            out[f"{key} cores={cores} threads={threads}"] = all(
                np.array_equal(g, r) for g, r in zip(got, ref, strict=True))
print(json.dumps(out))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_same_bits_at_every_thread_count(target):
    if not targets.supported(target):
        pytest.skip(f"this CPU lacks {targets.missing_flags(target)}")
    keys = ["gemv_i8:M=2048:K=2048:tile=8", "gemm_i8:N=8:M=512:K=1536:tile=8"]
    if target == "avx512" and "avx512vbmi" in targets.cpu_flags():
        keys += ["gemv_i8_tl:M=2048:K=2048:tile=8", "gemv_i8_tl:M=768:K=768:tile=8"]  # 64 and 6 row groups
    env = {**os.environ, "TVM_NUM_THREADS": "8"}
    r = subprocess.run([sys.executable, "-c", BITS_SCRIPT, target, *keys], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == len(keys) * 16 and all(results.values()), [k for k, ok in results.items() if not ok]


@pytest.mark.unit
def test_cache_key_follows_cores_only_where_kernels_split_per_thread(monkeypatch):
    """A 2-bit entry serves every thread count (its kernels split over row tiles): the same key whatever the pool
    size. A 1.67-bit entry's per-thread table build is fixed at build time: one key per thread count."""
    from compiler import cache

    gguf = REPO / "models" / "small.gguf"
    keys = {}
    for n in ("2", "16"):
        monkeypatch.setenv("TVM_NUM_THREADS", n)
        keys[n] = (cache.cache_key(gguf, "avx512"), cache.cache_key(gguf, "avx512", weights="tl"))
    assert keys["2"][0] == keys["16"][0]
    assert keys["2"][1] != keys["16"][1]
    assert cache.cache_key(gguf, "avx512", weights="tl", cores=16) == keys["16"][1]


@pytest.mark.unit
def test_the_tuner_never_plans_a_frozen_table_lookup_split():
    """Few row groups (640 rows: 5 groups of 8 tiles): only per-thread tables are planned, since tables at root or in
    parallel would leave a parallel loop of 5; many groups (6912 rows: 54) get every ``lut_at``."""
    from compiler.tuning_db import plan

    few, many = make_op("gemv_i8_tl", M=640, K=2560, tile=8), make_op("gemv_i8_tl", M=6912, K=2560, tile=8)
    planned = plan(None, few, "avx512", trials=100, retune=True, seed=0)
    assert planned and {c["lut_at"] for c in planned} == {2}
    for c in planned:
        check_extents(few, {n: parallel_extents(S.manual(few, "avx512", c, cores=n).mod["main"]) for n in (3, WIDE)})
    assert {c["lut_at"] for c in plan(None, many, "avx512", trials=100, retune=True, seed=0)} == {0, 1, 2}
