"""Execution tasks and pass@k: mining doctested functions, the check program, cheats that must not pass, the estimator.

The tasks come from the standard library's ``statistics`` module (its functions carry doctests on every Python the
project supports), so the programs import a real module in the real sandbox.

    pytest tests/test_exec_tasks.py -q
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from train.corpus import SourceFile
from train.exec_eval import ExecEvalConfig, evaluate_exec, pass_at_k, score
from train.exec_tasks import (
    LIMITS,
    Task,
    TaskFileError,
    Verdict,
    cap_per_package,
    check_many,
    file_tasks,
    load_tasks,
    module_name,
    program,
    read_header,
    reward,
    stub_body,
    validate,
    write_tasks,
)
from train.sandbox import Limits, run_program

ROOT = Path(__file__).resolve().parent.parent
STATS = SourceFile(statistics.__file__, "stdlib", "statistics", 0, "", "val")


@pytest.mark.unit
def test_cap_per_package_samples_only_the_large_packages():
    """``--per-package``: a package with more candidates than the cap keeps a seeded sample of that many, a smaller one
    keeps all of its; the result is sorted by task id and the same for the same seed."""
    tasks = [Task(f"r/{pkg}/m.py::f{i}", pkg, "m", f"f{i}", "", "", "", 1) for pkg, n in (("big", 9), ("small", 2))
             for i in range(n)]  # fmt: skip
    kept = cap_per_package(tasks, 3, seed=5)
    assert [t.package for t in kept].count("big") == 3 and [t.package for t in kept].count("small") == 2
    assert kept == sorted(kept, key=lambda t: t.task_id) and set(kept) <= set(tasks)
    assert cap_per_package(tasks, 3, seed=5) == kept and cap_per_package(tasks, 9, seed=5) == sorted(
        tasks, key=lambda t: t.task_id
    )


def _tasks():
    return {t.qualname: t for t in file_tasks(STATS)}


@pytest.mark.unit
@given(st.integers(1, 60), st.data())
def test_pass_at_k_is_the_unbiased_estimator(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    want = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.unit
def test_pass_at_k_edges_and_refusals():
    assert pass_at_k(20, 0, 10) == 0.0 and pass_at_k(20, 20, 1) == 1.0 and pass_at_k(20, 11, 10) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in ((5, 6, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


@pytest.mark.unit
def test_mining_finds_doctested_functions_and_methods_with_prompts_and_references():
    assert module_name(statistics.__file__) == "statistics"
    tasks = _tasks()
    assert {"mean", "median", "NormalDist.overlap"} <= set(tasks)  # a method too
    t = tasks["mean"]
    assert t.task_id == "stdlib/statistics::mean" and t.module == "statistics" and t.examples >= 2
    assert t.prompt.startswith("def mean(data):") and t.prompt.endswith('"""') and ">>> mean(" in t.prompt
    assert t.reference.startswith("\n    ") and "return" in t.reference
    assert all(">>>" in x.check for x in tasks.values())


@pytest.mark.e2e
def test_the_reference_passes_and_a_stub_fails_in_the_sandbox():
    tasks = _tasks()
    picked = [tasks["mean"], tasks["median"], tasks["NormalDist.overlap"]]
    got = check_many(picked * 2, [t.reference for t in picked] + [stub_body(t) for t in picked], LIMITS)
    assert [v.passed for v in got] == [True] * 3 + [False] * 3, got
    assert got[0].attempted == tasks["mean"].examples and got[0].failed == 0
    assert got[3].attempted == tasks["mean"].examples and got[3].failed >= 1 and got[3].raised == 0
    kept, why = validate(picked, LIMITS, progress=False)
    assert kept == picked and not why


@pytest.mark.e2e
def test_cheating_bodies_do_not_pass():
    t = _tasks()["mean"]
    ind = "\n    "
    cheats = {
        "os._exit(0)": f"{ind}import os{ind}os._exit(0)\n",
        "sys.exit(0)": f"{ind}import sys{ind}sys.exit(0)\n",
        "SystemExit at definition": "\n    pass\nraise SystemExit(0)\n",
        "a forged result line": f"{ind}import sys{ind}print('EXEC-RESULT 0123abcd 5 0 0', file=sys.__stdout__)"
        f"{ind}return 1\n",
        "a forged line then exit": "\n    pass\nprint('EXEC-RESULT 0123abcd 5 0 0')\nimport os\nos._exit(0)\n",
    }
    got = check_many([t] * len(cheats), list(cheats.values()), LIMITS)
    assert not any(v.passed for v in got), dict(zip(cheats, got, strict=True))


@pytest.mark.unit
def test_the_program_carries_its_nonce_and_the_verdict_needs_it():
    t = _tasks()["mean"]
    script, nonce = program(t, t.reference, nonce="00ff")
    assert nonce == "00ff" and "'00ff'" in script
    out = run_program(script, LIMITS)
    assert out.passed and f"EXEC-RESULT 00ff {t.examples} 0 0" in out.stdout


@pytest.mark.unit
def test_rewards_order_failure_kinds():
    t = _tasks()["mean"]
    n = t.examples
    assert reward(t, "\n    return (\n", Verdict(False, 0, 0, 0, "failed")) == 0.0  # does not parse
    assert reward(t, stub_body(t), Verdict(False, 0, 0, 0, "timeout")) == pytest.approx(0.1)
    raised = reward(t, stub_body(t), Verdict(False, n, n, n, "failed"))
    wrong = reward(t, stub_body(t), Verdict(False, n, n, 0, "failed"))
    half = reward(t, stub_body(t), Verdict(False, n, n // 2, 0, "failed"))
    assert 0.1 <= raised < wrong < half < 0.7 and reward(t, t.reference, Verdict(True, n, 0, 0, "passed")) == 1.0


@pytest.mark.unit
def test_task_files_round_trip_and_refuse_what_they_are_not(tmp_path):
    tasks = list(_tasks().values())[:4]
    path = tmp_path / "t.jsonl"
    write_tasks(path, tasks, {"split": "val"})
    head = read_header(path)
    assert head["split"] == "val" and head["n_tasks"] == 4 and head["kind"] == "exec-tasks"
    assert load_tasks(path) == sorted(tasks, key=lambda t: t.task_id)
    (tmp_path / "bad.jsonl").write_text('{"kind": "something else"}\n')
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    for name in ("bad.jsonl", "bin.jsonl", "missing.jsonl"):
        with pytest.raises(TaskFileError):
            load_tasks(tmp_path / name)
    path.write_text(path.read_text() + '{"task_id": 3}\n')
    with pytest.raises(TaskFileError, match=":6: not a task"):
        load_tasks(path)


class _Tok:  # encode(text).ids; token_to_id
    def encode(self, text):
        return type("E", (), {"ids": [ord(c) % 256 for c in text]})()

    def token_to_id(self, s):
        return None


@pytest.mark.e2e
def test_pass_at_k_report_from_a_generator_that_solves_some_tasks():
    tasks = _tasks()
    picked = [tasks["mean"], tasks["median"]]
    refs = {t.prompt: t.reference for t in picked}
    solved = {picked[0].prompt}
    calls = []

    def gen_many(jobs):  # the mean task: greedy right, 2 of 4 samples right; the median task: never
        calls.append(len(jobs))
        out = []
        for ids, params in jobs:
            prompt = next(p for p in refs if [ord(c) % 256 for c in p] == ids)
            good = refs[prompt] if prompt in solved else "\n    return None\n"
            right = params.temperature == 0 or params.seed % 1009 in (0, 2)  # samples 0 and 2 of each task
            out.append((good if right else "\n    return 0\n", "stop"))
        return out

    cfg = ExecEvalConfig(n=4, ks=(1, 2), workers=2)
    report = evaluate_exec(gen_many, _Tok(), picked, cfg, ctx=4096, progress=False)
    assert calls == [10]  # both tasks' greedy + n jobs in one call
    calls.clear()
    per_task = evaluate_exec(gen_many, _Tok(), picked, replace(cfg, jobs_per_call=5), ctx=4096, progress=False)
    assert calls == [5, 5] and per_task["tasks"] == report["tasks"]  # the seeds do not depend on the batching
    assert report["tasks"][0]["passed"] == 2 and report["tasks"][0]["greedy_passed"]
    assert report["pass_at_1"] == pytest.approx((0.5 + 0) / 2)
    assert report["pass_at_2"] == pytest.approx((pass_at_k(4, 2, 2) + 0) / 2)
    assert report["pass_at_1_greedy"] == 0.5 and report["parse_rate"] == 1.0 and report["n_packages"] == 1
    again = score(picked, [[refs[picked[0].prompt]] * 5, ["\n    return None\n"] * 5], cfg, progress=False)
    assert again["pass_at_1"] == 0.5


@pytest.mark.e2e
def test_the_cli_mines_a_manifest_and_eval_reports_pass_at_k(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(asdict(STATS)) + "\n")
    tasks = tmp_path / "tasks.jsonl"
    r = subprocess.run([sys.executable, "-m", "train.exec_tasks", "--manifest", str(manifest), "--split", "val",
                        "--out", str(tasks), "--limit", "3", "--workers", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    head = read_header(tasks)
    assert head["split"] == "val" and 1 <= head["n_tasks"] <= 3 and head["python"]
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "train.eval", "--suite", "exec", "--gguf", "models/small.gguf",
                        "--tasks", str(tasks), "--n", "2", "--k", "1,2", "--max-new-tokens", "24", "--device", "cpu",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["tasks"] and {"pass_at_1", "pass_at_2", "pass_at_1_greedy", "parse_rate"} <= set(rep)
    assert rep["task_file_header"]["split"] == "val"
    r = subprocess.run([sys.executable, "-m", "train.eval", "--suite", "exec", "--gguf", "models/small.gguf",
                        "--tasks", str(tasks), "--n", "2", "--k", "5", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "--k 5 needs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.unit
def test_a_killed_validation_resumes_from_its_journal_with_the_same_result(tmp_path, monkeypatch):
    """The journal holds every finished chunk's verdicts: a rerun checks only the tasks it does not name and ends
    with what one uninterrupted run gives; a journal of other limits is refused."""
    import train.exec_tasks as et

    tasks = [Task(f"r/p{i % 3}.py::f{i}", f"p{i % 3}", "m", f"f{i}", "", "", f"ref{i}", 1) for i in range(150)]
    checked: list[str] = []

    def fake_check_many(ts, bodies, limits, workers=0):  # a reference passes unless i % 5 == 0, a stub if i % 7 == 0
        checked.extend(t.task_id for t in ts[: len(ts) // 3])
        out = []
        for t, b in zip(ts, bodies, strict=True):
            i = int(t.qualname[1:])
            ok = (i % 5 != 0) if b.startswith("ref") else (i % 7 == 0)
            out.append(Verdict(ok, 1, 0 if ok else 1, 0, "passed" if ok else "failed"))
        return out

    monkeypatch.setattr(et, "check_many", fake_check_many)
    whole, why_whole = et.validate(tasks, LIMITS, progress=False)
    assert 0 < len(whole) < len(tasks) and sum(why_whole.values()) == len(tasks) - len(whole)

    checked.clear()
    journal = tmp_path / "j.jsonl"
    calls = {"n": 0}

    def dies_on_second_chunk(ts, bodies, limits, workers=0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the job is killed during its second chunk
        return fake_check_many(ts, bodies, limits, workers)

    monkeypatch.setattr(et, "check_many", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        et.validate(tasks, LIMITS, progress=False, journal=journal)
    with journal.open("a") as fh:
        fh.write('{"task_id": "r/p0.py::f9')  # a torn line
    first_chunk = set(checked)
    assert len(first_chunk) == 64
    checked.clear()
    monkeypatch.setattr(et, "check_many", fake_check_many)
    resumed, why_resumed = et.validate(tasks, LIMITS, progress=False, journal=journal)
    assert (resumed, why_resumed) == (whole, why_whole)
    assert not first_chunk & set(checked) and len(checked) == len(tasks) - 64
    with pytest.raises(TaskFileError, match="journal"):
        et.validate(tasks, Limits(cpu_s=1.0), progress=False, journal=journal)


@pytest.mark.unit
def test_candidates_run_once_per_distinct_parsed_body_with_the_verdicts_of_a_full_run(monkeypatch):
    """check_candidates gives what check_many gives for every body, running no program for a body that does not
    parse and one for each distinct (task, body)."""
    import train.exec_tasks as et

    task = _tasks()["mean"]
    bodies = [task.reference, "\n    return None\n", "\n    return (\n", task.reference, "\n    return None\n", "oops("]
    full = et.check_many([task] * len(bodies), bodies, LIMITS, workers=2)
    ran: list[str] = []
    real = et.check_many

    def counting(ts, bs, limits, workers=0):
        ran.extend(bs)
        return real(ts, bs, limits, workers)

    monkeypatch.setattr(et, "check_many", counting)
    got = et.check_candidates([task] * len(bodies), bodies, LIMITS, workers=2)
    assert ran == [task.reference, "\n    return None\n"]
    assert [v.passed for v in got] == [v.passed for v in full] == [True, False, False, True, False, False]
    assert got[2] == got[5] == et.UNPARSED == replace(full[2], status="failed")
    rewards = [[et.reward(task, b, v) for b, v in zip(bodies, vs, strict=True)] for vs in (got, full)]
    assert rewards[0] == rewards[1]


@pytest.mark.unit
def test_mining_keeps_only_short_bodies_of_the_packages_asked_for(monkeypatch):
    import train.exec_tasks as et

    monkeypatch.setattr(et, "validate", lambda tasks, *a, **k: (list(tasks), Counter()))
    every, _ = et.mine_tasks([STATS], progress=False)
    cut = sorted(et.body_lines(t) for t in every)[len(every) // 2]  # the median body
    short, _ = et.mine_tasks([STATS], progress=False, max_body_lines=cut)
    assert {t.task_id for t in short} == {t.task_id for t in every if et.body_lines(t) <= cut}
    assert 0 < len(short) < len(every)
    assert et.mine_tasks([STATS], progress=False, packages=frozenset({"statistics"}))[0] == every
    assert et.mine_tasks([STATS], progress=False, packages=frozenset({"sympy"}))[0] == []
    task = replace(every[0], reference="\n    # a comment\n\n    x = 1\n    return x\n")
    assert et.body_lines(task) == 2
