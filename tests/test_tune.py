"""compiler.tune: records land in a MetaSchedule JSON database, replay into correct kernels, resume after kill -9,
skip tuned workloads, never let a worse record win; and the committed tuning_logs/ load and give valid schedules.

    pytest tests/test_tune.py -q            # add -m slow for the kill -9 test
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from kernel_helpers import X86

import targets
from compiler import schedule as S
from compiler import tune
from compiler.kernels import Kernel
from compiler.ops import make_op
from model.config import get_config

REPO = Path(__file__).resolve().parent.parent
OP = make_op("gemv_i8", M=48, K=512)  # rows {1, 2, 4, 8, 12} × unroll_k {1, 2} × prefetch {0, 1k, 2k, 4k} × to {1, 2}


def record_lines(root, target):
    return (Path(root) / target / "database_tuning_record.json").read_text().splitlines()


@pytest.mark.build
def test_tune_then_build_from_record(tmp_path):
    target = targets.detect()
    res = tune.tune([OP], target, trials=3, root=tmp_path, progress=False)
    assert res[0].status == "tuned" and res[0].trials == 3 and res[0].best_ms > 0
    assert len(record_lines(tmp_path, target)) == 3
    sf = S.get_primfunc(OP, target, logs_root=tmp_path, mode="tuned")
    assert sf.source == "tuned" and sf.run_secs == pytest.approx(res[0].best_ms / 1e3, rel=0.5)
    ins = OP.random_inputs(np.random.default_rng(5))
    np.testing.assert_array_equal(Kernel(OP, sf.build())(*ins)[0], OP.reference(*ins)[0])
    # rerun: nothing left to do at this budget; a larger budget measures only the configurations not yet tried
    assert tune.tune([OP], target, trials=3, root=tmp_path, progress=False)[0].status == "skipped"
    res = tune.tune([OP], target, trials=5, root=tmp_path, progress=False)
    assert res[0].trials == 2 and len(record_lines(tmp_path, target)) == 5
    assert len(tune.tried_knobs(S.open_database(target, tmp_path), OP, target)) == 5


@pytest.mark.build
def test_torn_line_is_dropped_and_tuning_resumes(tmp_path):
    target = targets.detect()
    tune.tune([OP], target, trials=2, root=tmp_path, progress=False)
    path = tmp_path / target / "database_tuning_record.json"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # a kill -9 in the middle of a write
    res = tune.tune([OP], target, trials=2, root=tmp_path, progress=False)
    assert res[0].trials == 1  # the torn record is measured again, the intact one is not
    assert all(json.loads(x) for x in record_lines(tmp_path, target))


@pytest.mark.build
def test_worse_records_never_win(tmp_path):
    target = targets.detect()
    tune.tune([OP], target, trials=1, root=tmp_path, progress=False)
    db = S.open_database(target, tmp_path)
    best = S.best_record(db, OP)
    slow = S.manual(OP, target, {"rows": 1, "unroll_k": 1})
    tune.commit(db, OP, slow, target, [10.0, 10.0])  # a much worse measurement, appended later
    db = S.open_database(target, tmp_path)
    assert [float(s) for s in S.best_record(db, OP).run_secs] == [float(s) for s in best.run_secs]
    fast = S.manual(OP, target, {"rows": 2, "unroll_k": 1})
    tune.commit(db, OP, fast, target, [1e-9, 1e-9])  # a better one wins
    db = S.open_database(target, tmp_path)
    rec = S.best_record(db, OP)
    knobs = tune.knobs_of_trace(rec.trace, S.schedule_module(target).space(OP))
    assert knobs == {"rows": 2, "unroll_k": 1, "prefetch": 0, "prefetch_to": 1}


@pytest.mark.build
def test_untuned_build_warns_loudly(tmp_path):
    with pytest.warns(S.UntunedWarning, match="UNTUNED"):
        sf = S.get_primfunc(OP, "auto", logs_root=tmp_path)
    assert sf.source == "hand"
    with pytest.raises(LookupError, match=r"compiler\.tune"):
        S.get_primfunc(OP, "auto", logs_root=tmp_path, mode="tuned")


@pytest.mark.unit
def test_shapes_and_workloads():
    assert tune.parse_shape("gemv_i8:4096:4096") == make_op("gemv_i8", M=4096, K=4096)
    assert tune.parse_shape("gemv_i8:4096:4096:8") == make_op("gemv_i8", M=4096, K=4096, tile=8)
    assert tune.parse_shape("gemm_i8:N=8:M=512:K=1536") == make_op("gemm_i8", N=8, M=512, K=1536)
    with pytest.raises(ValueError, match="unknown op"):
        tune.parse_shape("conv:1:2")
    kinds = {op.kind for op in tune.config_ops(get_config("small"))}
    assert kinds == {"gemv_i8", "gemm_i8", "rmsnorm_quant", "mhc_post"}


@pytest.mark.build
def test_model_workloads_from_gguf(tmp_path):
    """``--model X.gguf`` tunes exactly the workloads of the file's config."""
    gguf_io = pytest.importorskip("model.gguf_io")
    torch = pytest.importorskip("torch")
    from model_helpers import tiny_spec

    from model.transformer import Transformer

    cfg = get_config("tiny", n_streams=4)
    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    gguf_io.write_gguf(path, cfg, Transformer(cfg).eval().gguf_tensors(), tiny_spec(cfg.vocab_size))
    assert tune.model_ops(str(path)) == tune.config_ops(cfg)
    assert make_op("mhc_post", D=cfg.d_model, S=4) in tune.model_ops(str(path))


@pytest.mark.e2e
@pytest.mark.slow
def test_kill_9_loses_at_most_the_trial_in_flight(tmp_path):
    target = targets.detect()
    cmd = [sys.executable, "-m", "compiler.tune", "--target", target, "--shape", "gemv_i8:48:512", "--trials", "20",
           "--logs", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TVM_NUM_THREADS": "1"})  # fmt: skip
    path = tmp_path / target / "database_tuning_record.json"
    deadline = time.time() + 120
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 3):
        assert proc.poll() is None, "the tuner exited before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(path.read_text().splitlines())
    assert 3 <= killed_at < 20  # 20 trials leave a wide window for the kill, even on a fast idle machine
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    lines = record_lines(tmp_path, target)
    assert all(json.loads(x) for x in lines)
    tried = tune.tried_knobs(S.open_database(target, tmp_path), OP, target)
    assert len(tried) == 20  # the grid is complete ...
    assert len(lines) <= 20 + 1  # ... and at most the trial in flight was measured twice


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
def test_committed_logs_give_valid_schedules(target):
    """Every shipped-model and benchmark workload has a record in tuning_logs/<target>/, and it replays correctly."""
    db = S.open_database(target)
    if db is None:
        pytest.skip(f"no committed tuning logs for {target}")
    ops = tune.config_ops(get_config("small")) + tune.bench_ops(target)
    for op in ops:
        sf = S.get_primfunc(op, target, mode="tuned")
        assert sf.source == "tuned" and sf.run_secs > 0
    for op in tune.config_ops(get_config("small")):  # the shipped model's kernels, built from the logs, are correct
        ins = op.random_inputs(np.random.default_rng(0))
        outs = Kernel(op, S.get_primfunc(op, target, mode="tuned").build())(*ins)
        for o, r, tol in zip(outs, op.reference(*ins), op.tolerances(*ins), strict=True):
            np.testing.assert_allclose(o, r, rtol=0, atol=tol, err_msg=op.key)


@pytest.mark.build
def test_relax_call_tir_of_a_scheduled_kernel():
    """The whole-model compiler's path: get_primfunc → Relax call_tir → VM, bit-exact with the reference."""
    import tvm
    from tvm import relax

    op = make_op("gemv_i8", M=64, K=512)
    sf = S.get_primfunc(op, "auto", mode="hand")
    bb = relax.BlockBuilder()
    params = [relax.Var(a.name, relax.TensorType(a.shape, a.dtype)) for a in op.inputs()]
    (out,) = op.outputs()
    with bb.function("main", params):
        gv = bb.add_func(sf.for_relax(), op.func_name)
        y = bb.emit(relax.call_tir(gv, params, relax.TensorType(out.shape, out.dtype)))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target=targets.get_target("auto"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    ins = op.random_inputs(np.random.default_rng(9))
    y = vm["main"](*[tvm.runtime.tensor(a) for a in ins]).numpy()
    np.testing.assert_array_equal(y, op.reference(*ins)[0])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trials", "0"], "--trials must be ≥ 1"),
        (["--shape", "conv:1:2"], "unknown op 'conv'"),
        (["--shape", "gemv_i8:100:100"], "must be a multiple of 256"),
        (["--shape", "gemv_i8:M=64:Q=512"], "unexpected keyword argument 'Q'"),
        (["--config", "nope"], "--config nope: unknown preset"),
        (["--model", "/nonexistent.gguf"], "--model /nonexistent.gguf: not a file"),
        (["--logs", "/etc/hostname"], "exists and is not a directory"),
        (["--target", "avx3"], "invalid choice: 'avx3'"),
        (["--trials", "x"], "invalid int value"),
        (["--target", "avx512", "--import-timings", "t.json"], "are for --target cuda"),
        (["--target", "cuda", "--import-timings", "/nonexistent.json"], "unreadable"),
    ],
)
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys, flags, message):
    """Arguments are checked before anything is loaded or written; the error is one line, no stack trace."""
    with pytest.raises(SystemExit) as exc:
        tune.main(["--logs", str(tmp_path / "logs"), "--shape", "gemv_i8:48:512", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "logs").exists()


@pytest.mark.e2e
def test_cli_reports_a_bad_model_file_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "compiler.tune", "--model", "README.md", "--logs", str(tmp_path), "--trials", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("python -m compiler.tune: error: README.md") and "GGUF" in line, line


@pytest.mark.build
def test_dram_resident_weights_are_measured_from_dram(monkeypatch):
    """Weights beyond a quarter of the last-level cache are timed while cycling over copies that exceed twice it:
    with a 256 KiB 'cache', a 512×1024 GEMV (128 KiB of weights) is measured over 5 copies; on the real cache one."""
    from compiler import measure

    op = make_op("gemv_i8", M=512, K=1024)
    ex = S.build(op, targets.detect(), mode="hand")
    seen = []
    real_cycle = tune.cycle_time
    monkeypatch.setattr(tune, "cycle_time", lambda f, sets, s: seen.append(len(sets)) or real_cycle(f, sets, s))
    monkeypatch.setattr(measure, "llc_bytes", lambda: 256 << 10)
    secs = tune.measure(op, ex, repeat=3, min_repeat_ms=2)
    assert len(secs) == 3 and all(s > 0 for s in secs) and seen == [5, 5, 5]
    monkeypatch.setattr(measure, "llc_bytes", lambda: 256 << 20)
    seen.clear()
    assert len(tune.measure(op, ex, repeat=3, min_repeat_ms=2)) == 3 and seen == []


@pytest.mark.unit
def test_dram_copies_rule():
    from compiler.measure import dram_copies

    assert dram_copies(64 << 20, llc=256 << 20) == 1  # a quarter of the cache: cache-warm
    assert dram_copies(128 << 20, llc=256 << 20) == 5  # 5 × 128 MiB > 2 × 256 MiB
    assert dram_copies(128 << 20, llc=32 << 20) == 2


@pytest.mark.build
def test_this_machines_records_win_over_the_shared_ones(tmp_path, monkeypatch):
    """A CPU kind's own records (``--machine``) are what a build on that kind uses, whatever their times against the
    shared database's (other machines, other regimes); on another kind the shared record serves."""
    target = targets.detect()
    space = S.schedule_module(target).space(OP)
    knobs_of = lambda rec: tune.knobs_of_trace(rec.trace, space)  # noqa: E731
    shared = tune.open_db(target, tmp_path)
    tune.commit(shared, OP, S.manual(OP, target, {"rows": 2, "unroll_k": 1}), target, [1e-9])  # fastest of all
    monkeypatch.setenv("TERNARY_MACHINE", "kind-a")
    mine = tune.open_db(target, tmp_path, machine=True)
    assert mine.dir == tmp_path / target / "machines" / "kind-a"
    mine_knobs = {"rows": 4, "unroll_k": 2, "prefetch": 1024, "prefetch_to": 2}
    tune.commit(mine, OP, S.manual(OP, target, mine_knobs), target, [1.0])
    assert knobs_of(S.find_record(OP, target, tmp_path)) == mine_knobs
    sf = S.get_primfunc(OP, target, logs_root=tmp_path, mode="tuned")
    assert sf.source == "tuned" and sf.run_secs == 1.0
    ins = OP.random_inputs(np.random.default_rng(1))
    np.testing.assert_array_equal(Kernel(OP, sf.build())(*ins)[0], OP.reference(*ins)[0])
    monkeypatch.setenv("TERNARY_MACHINE", "kind-b")  # another CPU kind: no records of its own
    assert knobs_of(S.find_record(OP, target, tmp_path)) == {"rows": 2, "unroll_k": 1, "prefetch": 0, "prefetch_to": 1}


@pytest.mark.unit
def test_machine_id_and_its_records_in_the_cache_key(tmp_path, monkeypatch):
    from runtime_helpers import tiny_gguf

    from compiler import cache
    from targets.cpu import machine_id

    monkeypatch.delenv("TERNARY_MACHINE", raising=False)
    mid = machine_id()
    assert mid == "unknown" or (mid.split("-")[0] in ("intel", "amd") and all(p.isdigit() for p in mid.split("-")[1:]))
    target = targets.detect()
    gguf = tiny_gguf(2)
    monkeypatch.setenv("TERNARY_MACHINE", "kind-a")
    base = cache.cache_key(gguf, target, tmp_path)
    other = tmp_path / target / "machines" / "kind-b"
    other.mkdir(parents=True)
    (other / "database_tuning_record.json").write_text("[]\n")
    assert cache.cache_key(gguf, target, tmp_path) == base  # another kind's records: not this build's
    mine = tmp_path / target / "machines" / "kind-a"
    mine.mkdir(parents=True)
    (mine / "database_tuning_record.json").write_text("[]\n")
    assert cache.cache_key(gguf, target, tmp_path) != base


@pytest.mark.unit
def test_machine_and_dram_are_cpu_flags(capsys):
    with pytest.raises(SystemExit) as e:
        tune.main(["--target", "cuda", "--machine", "--shape", "gemv_i8:512:512"])
    assert e.value.code == 2 and "--machine and --dram are for CPU targets" in capsys.readouterr().err


@pytest.mark.build
def test_a_whole_model_choice_replaces_this_machines_records(tmp_path, monkeypatch):
    """``replace_records`` (bench.knob_sweep --record): the given records become the only ones of their ops in this
    CPU kind's database, even slower than what they replace; other ops' records stay."""
    from compiler.tuning_db import replace_records

    target = targets.detect()
    monkeypatch.setenv("TERNARY_MACHINE", "kind-a")
    other = make_op("gemv_i8", M=64, K=512)
    mine = tune.open_db(target, tmp_path, machine=True)
    tune.commit(mine, OP, S.manual(OP, target, {"rows": 2, "unroll_k": 1}), target, [1e-9])
    tune.commit(mine, other, S.manual(other, target, {"rows": 4}), target, [2e-9])
    replace_records(S.machine_dir(target, tmp_path), target,
                    [(OP, S.manual(OP, target, {"rows": 8, "unroll_k": 2, "prefetch": 1024}), [5.0])])  # fmt: skip
    space = S.schedule_module(target).space(OP)
    db = S.open_database(target, tmp_path, machine="kind-a")
    assert [tune.knobs_of_trace(r.trace, space) for r in S.records(db, OP)] == [
        {"rows": 8, "unroll_k": 2, "prefetch": 1024, "prefetch_to": 1}]  # fmt: skip
    assert tune.knobs_of_trace(S.find_record(other, target, tmp_path).trace, space)["rows"] == 4
    sf = S.get_primfunc(OP, target, logs_root=tmp_path, mode="tuned")
    ins = OP.random_inputs(np.random.default_rng(2))
    np.testing.assert_array_equal(Kernel(OP, sf.build())(*ins)[0], OP.reference(*ins)[0])


@pytest.mark.build
def test_knob_sweep_variant_logs_set_the_knob_on_every_gemv(tmp_path, monkeypatch):
    from runtime_helpers import tiny_gguf

    from bench import knob_sweep

    target = targets.detect()
    monkeypatch.setenv("TERNARY_MACHINE", "kind-a")
    gguf = tiny_gguf(2)
    ops = knob_sweep.sweep_ops(str(gguf))
    assert ops and {op.kind for op in ops} == {"gemv_i8"} and all(op.tile == 8 for op in ops)
    logs = knob_sweep.variant_logs(ops, target, "prefetch_to", 2, tmp_path / "v", fixed={"prefetch": 2048})
    assert (logs / target / "database_tuning_record.json").exists()  # the shared records, copied
    for op in ops:
        want = S.build_knobs(op, target) | {"prefetch": 2048, "prefetch_to": 2}
        assert S.build_knobs(op, target, logs) == want
    ap = SimpleNamespace(model=str(tmp_path / "none.gguf"), knob="nope", values=[1], runs=0,
                         with_=["prefetch=2048", "rows", "nope=1", "unroll_k=x"])  # fmt: skip
    problems = knob_sweep.check_args(ap, {"rows", "unroll_k", "prefetch"})
    assert len(problems) == 7 and "--knob nope" in problems[1]
    assert [p.split(":")[0] for p in problems[2:5]] == ["--with rows", "--with nope=1", "--with unroll_k=x"]
    assert knob_sweep.fixed_knobs(["prefetch=2048", "rows=8"]) == {"prefetch": 2048, "rows": 8}


@pytest.mark.unit
def test_knob_sweep_cli_refuses_bad_arguments(capsys, tmp_path):
    from runtime_helpers import tiny_gguf

    from bench import knob_sweep

    with pytest.raises(SystemExit) as e:
        knob_sweep.main(["--model", str(tiny_gguf(2)), "--knob", "nope", "--values", "0", "1024"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--knob nope: the GEMV's knobs are prefetch, prefetch_to, rows, unroll_k" in err
    with pytest.raises(SystemExit) as e:
        knob_sweep.main(["--model", str(tmp_path / "missing.gguf"), "--values", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a file" in err and "at least two different values" in err


@pytest.mark.unit
def test_records_from_before_prefetch_to_read_as_prefetching_into_l1():
    """Committed records tuned before the ``prefetch_to`` knob existed (their traces have no decision for it) read as
    its default, ``prefetch_to=1``: the kernel they were timed with."""
    from compiler.tune import parse_shape
    from schedules.knobs import knobs_of_trace

    op = parse_shape("gemv_i8:M=2560:K=6912:tile=8")
    for target in ("avx512", "avx2"):
        rec = S.best_record(S.open_database(target, machine=None), op)
        assert rec is not None, f"the shared {target} records have no {op.key}"
        space = S.schedule_module(target).space(op)
        insts = [i for i in rec.trace.insts if i.kind.name == "SampleCategorical"]
        assert len(insts) == sum(len(k.candidates) > 1 for k in space) - 1  # all but prefetch_to's
        knobs = knobs_of_trace(rec.trace, space)
        assert knobs["prefetch_to"] == 1 and knobs["prefetch"] in (0, 1024, 2048, 4096)
