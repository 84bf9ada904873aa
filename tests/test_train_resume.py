"""Resuming training after kill -9 (train/train.py, train/checkpoint.py): temporary checkpoints a kill left are removed
on start, ``metrics.jsonl`` holds each step once, a corrupt newest checkpoint falls back to the previous valid one
(with a warning), and ``python -m train.train`` checks its arguments before loading anything, failing in one line.

    pytest tests/test_train_resume.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from test_train_loop import final_tensors, shards, tiny_cfg  # noqa: F401  (shards: a fixture)

from train import checkpoint
from train.train import main, parse_args, train

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent

KILLED_IN_SAVE = """
import json, os, signal, sys
from train import checkpoint
from train.train import TrainConfig, train

save_file = checkpoint.save_file
def dies_after_one_file(*args, **kwargs):  # kill -9 between model.safetensors and optim.safetensors
    save_file(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = dies_after_one_file
train(TrainConfig(**json.loads(sys.argv[1])), progress=False)
"""


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory):  # noqa: F811
    """The final tensors of a 12-step run with checkpoints every 4 steps, never interrupted."""
    out = tmp_path_factory.mktemp("whole")
    train(tiny_cfg(shards, out, ckpt_every=4), progress=False)
    return final_tensors(out)


def steps_logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_kill_during_a_checkpoint_write_is_cleaned_up_on_start(shards, tmp_path, caplog):  # noqa: F811
    cfg = tiny_cfg(shards, tmp_path, run_steps=3)  # pauses after step 3 with a checkpoint: killed while writing it
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, json.dumps(asdict(cfg))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = tmp_path / "checkpoints"
    (stale,) = ckpts.glob(".tmp-ckpt-*")  # the half-written checkpoint
    assert checkpoint.resumable(ckpts) == (None, None)
    summary = train(replace(cfg, run_steps=0), progress=False)
    assert not stale.exists() and not list(ckpts.glob(".tmp-ckpt-*"))
    assert f"removing {stale}" in caplog.text
    assert summary["step"] == 12 and steps_logged(tmp_path) == list(range(1, 13))  # steps 1-3 again, logged once


def test_metrics_hold_each_step_once_after_a_resume(shards, tmp_path):  # noqa: F811
    cfg = tiny_cfg(shards, tmp_path, ckpt_every=4, run_steps=6)
    train(cfg, progress=False)  # steps 1-6 logged, checkpoints at 4 and 6
    ckpts = tmp_path / "checkpoints"
    # a kill -9 after step 6 was logged, before its checkpoint was written, with a row torn mid-write
    shutil.rmtree(ckpts / "ckpt-00000006")
    (ckpts / "latest").write_text("ckpt-00000004\n")
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "lo')
    train(replace(cfg, run_steps=0), progress=False)
    assert steps_logged(tmp_path) == list(range(1, 13))


@pytest.mark.parametrize("damage", ["bit flip", "state.json", "missing"])
def test_a_corrupt_newest_checkpoint_falls_back(shards, whole, tmp_path, caplog, damage):  # noqa: F811
    parts = tiny_cfg(shards, tmp_path / "parts", ckpt_every=4, run_steps=6)
    train(parts, progress=False)  # checkpoints at 4 and 6
    newest = tmp_path / "parts" / "checkpoints" / "ckpt-00000006"
    if damage == "bit flip":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x10
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "state.json":
        (newest / "state.json").write_text("{")
    else:
        shutil.rmtree(newest)  # `latest` names a folder that is gone
    summary = train(replace(parts, run_steps=0), progress=False)
    assert "ckpt-00000006" in caplog.text and "resuming from ckpt-00000004" in caplog.text
    assert summary["status"] == "completed" and summary["step"] == 12
    a, b = whole, final_tensors(tmp_path / "parts")
    for k in a:  # resumed from step 4, the run still ends bit-exactly where an uninterrupted one does
        assert torch.equal(a[k], b[k]), k
    assert steps_logged(tmp_path / "parts") == list(range(1, 13))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--lr-matrix", "nan"], "--lr-matrix must be finite"),
        (["--seed", "-1"], "--seed must be ≥ 0"),
        (["--decay-frac", "2"], "--decay-frac must be in [0, 1]"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--model", '{"bogus": 1}'], "unexpected keyword argument 'bogus'"),
        (["--model", "[1]"], "--model must be a JSON object"),
        (["--seq-len", "4096"], "exceeds the model's max_seq_len"),
        (["--data", "/nonexistent"], "--data /nonexistent: does not exist"),
        (["--out", "/etc/hostname"], "exists and is not a directory"),
        (["--steps", "abc"], "invalid int value"),
    ],
)
def test_cli_refuses_bad_arguments_in_one_line(shards, tmp_path, capsys, flags, message):  # noqa: F811
    base = ["--preset", "tiny", "--data", str(shards), "--out", str(tmp_path / "run"), "--seq-len", "32"]
    with pytest.raises(SystemExit) as exc:
        parse_args(base + flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_cli_reports_a_run_that_cannot_resume_in_one_line(shards, tmp_path):  # noqa: F811
    base = ["--preset", "tiny", "--data", str(shards), "--out", str(tmp_path), "--seq-len", "32", "--batch-size", "4"]
    train(parse_args([*base, "--steps", "2"]), progress=False)
    with pytest.raises(SystemExit) as exc:
        main([*base, "--steps", "2", "--lr-matrix", "0.5"])
    assert str(exc.value.code).startswith("python -m train.train: error:") and "different settings" in exc.value.code
    (checkpoint.latest(tmp_path / "checkpoints") / "state.json").write_text("{")  # the only checkpoint: corrupt
    with pytest.raises(SystemExit) as exc:
        main([*base, "--steps", "4"])
    assert "no valid checkpoint" in exc.value.code and "\n" not in exc.value.code
