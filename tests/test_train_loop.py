"""The training loop (train/train.py) and checkpoints (train/checkpoint.py): schedule, data, exact resume, DDP."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train import checkpoint
from train.shards import write_shards
from train.train import Batches, TrainConfig, lr_factor, train

VOCAB = 512  # the tiny preset's vocabulary


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A learnable stream: a fixed random permutation cycle, so each token determines the next one."""
    rng = np.random.default_rng(0)
    cycle = rng.permutation(VOCAB).astype(np.uint16)
    stream = np.tile(cycle, 40)
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, {"train": stream, "val": np.tile(cycle, 4)}, VOCAB, "test", eot=0)
    return folder


def tiny_cfg(shards, out, **kw) -> TrainConfig:
    base = TrainConfig(preset="tiny", data=str(shards), out=str(out), steps=12, batch_size=4, seq_len=32,
                       warmup_steps=3, log_every=1, eval_every=4, eval_tokens=256, ckpt_every=1000)  # fmt: skip
    return replace(base, **kw)


def final_tensors(out) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(out / "checkpoints")
    return load_file(str(path / "model.safetensors")) | load_file(str(path / "optim.safetensors"))


@pytest.mark.unit
def test_wsd_schedule_shape():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_frac=0.2)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0  # linear warmup
    assert all(v == 1.0 for v in f[10:80])  # stable
    assert all(a > b for a, b in itertools.pairwise(f[80:])) and f[99] == pytest.approx(1 / 20)  # decay


@pytest.mark.unit
def test_batches_are_a_pure_function_of_step_micro_and_rank():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = Batches(tokens, 16, 4, seed=1, rank=0, device=torch.device("cpu"))
    b = Batches(tokens, 16, 4, seed=1, rank=1, device=torch.device("cpu"))
    x1, y1 = a.get(5, 0)
    assert torch.equal(x1, a.get(5, 0)[0]) and not torch.equal(x1, a.get(6, 0)[0])
    assert not torch.equal(x1, b.get(5, 0)[0])  # ranks see different data
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one: next-token prediction


@pytest.mark.e2e
def test_training_learns_the_next_token(shards, tmp_path):
    summary = train(tiny_cfg(shards, tmp_path, steps=60, lr_embed=1e-2, log_every=10, eval_every=60), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    # uniform guessing costs ln(512) = 6.24 nats; the cycle is fully predictable, so a working loop goes far below
    assert last["val_loss"] < 3.0 < first["ce"], (first, last)
    assert summary["status"] == "completed" and summary["step"] == 60
    assert {"grad_norm", "lr_matrix", "tokens_per_s", "entropy", "logit_max"} <= set(last)
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.e2e
def test_paused_and_resumed_run_equals_uninterrupted_run(shards, tmp_path):
    whole = tiny_cfg(shards, tmp_path / "whole")
    train(whole, progress=False)
    parts = tiny_cfg(shards, tmp_path / "parts", run_steps=5)
    summary = train(parts, progress=False)
    assert (summary["status"], summary["step"]) == ("paused", 5)
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "parts" / "checkpoints"))["step"] == 5
    train(replace(parts, run_steps=0), progress=False)
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "parts")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:  # bit-exact: model weights, Muon momenta, Adam moments and step counters, RNG state
        assert torch.equal(a[k], b[k]), k


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(shards, tmp_path):
    cmd = [sys.executable, "-m", "train.train", "--preset", "tiny", "--data", str(shards), "--batch-size", "4",
           "--seq-len", "32", "--warmup-steps", "3", "--log-every", "1", "--eval-every", "100000",
           "--ckpt-every", "100000", "--steps", "100000"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out[out.index("{") :])["status"] == "interrupted"
    stopped = checkpoint.read_state(checkpoint.latest(tmp_path / "killed" / "checkpoints"))["step"]
    assert stopped >= 3
    # resume for 2 more steps; compare with a fresh run of stopped + 2 steps
    subprocess.run([*cmd, "--out", str(tmp_path / "killed"), "--run-steps", "2"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([*cmd, "--out", str(tmp_path / "fresh"), "--run-steps", str(stopped + 2)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    a, b = final_tensors(tmp_path / "killed"), final_tensors(tmp_path / "fresh")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.e2e
def test_corrupt_or_partial_checkpoints_are_refused(shards, tmp_path):
    train(tiny_cfg(shards, tmp_path, steps=2), progress=False)
    path = checkpoint.latest(tmp_path / "checkpoints")
    blob = path / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit
    blob.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.read_state(path)
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        train(tiny_cfg(shards, tmp_path, steps=4), progress=False)  # resume must not load it
    (path / "optim.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_state(path)
    (path / "state.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.read_state(path)
    (tmp_path / "checkpoints" / "latest").write_text("ckpt-99999999\n")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.latest(tmp_path / "checkpoints")


@pytest.mark.e2e
def test_resume_with_different_settings_is_refused(shards, tmp_path):
    train(tiny_cfg(shards, tmp_path, steps=2), progress=False)
    with pytest.raises(ValueError, match="different settings"):
        train(tiny_cfg(shards, tmp_path, steps=4, lr_matrix=0.5), progress=False)


@pytest.mark.e2e
@pytest.mark.slow
def test_ddp_on_two_cpu_processes(shards, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "train.train",
        "--preset",
        "tiny",
        "--data",
        str(shards),
        "--out",
        str(tmp_path),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--eval-tokens",
        "128",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes metrics
    assert rows[-1]["tokens"] == 4 * 2 * 32 * 2  # steps × batch × seq_len × world size
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "checkpoints"))["step"] == 4


@pytest.mark.unit
def test_batched_muon_matches_torch_muon_exactly():
    from train.muon import BatchedMuon

    torch.manual_seed(0)
    shapes = [(8, 16), (8, 16), (16, 8), (12, 12), (16, 8)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours, opt_ref = BatchedMuon(ours, lr=0.02, weight_decay=0.01), torch.optim.Muon(ref, lr=0.02, weight_decay=0.01)
    for _ in range(4):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)  # same maths, batched: bit-identical on the CPU
    with pytest.raises(ValueError, match="2-D"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.unit
def test_throughput_summary_pairs_each_2gpu_run_with_its_own_rounds_1gpu_run(tmp_path):
    from train.throughput import summarize

    def run(rnd, world, tps, batch=32):
        r = {"world_size": world, "batch_size_per_rank": batch, "seq_len": 2048, "tokens_per_s": tps,
             "mfu": tps / 1e6, "peak_mem_gib": 40.0 + world, "preset": "base", "device": "H200",
             "params": 8.9e7, "peak_tflops_assumed": 989.0}  # fmt: skip
        (tmp_path / f"r{rnd}_{world}gpu_b{batch}.json").write_text(json.dumps(r))

    for rnd, (one, two) in enumerate([(100.0, 190.0), (200.0, 390.0), (150.0, 300.0)], 1):
        run(rnd, 1, one)
        run(rnd, 2, two)
    s = summarize(sorted(tmp_path.glob("*.json")))
    single, double = s["rows"]
    assert (single["gpus"], double["gpus"]) == (1, 2) and double["runs"] == 3
    assert double["tokens_per_s"] == 300.0 and double["tokens_per_s_range"] == [190.0, 390.0]
    # per round 1.9, 1.95, 2.0: a ratio of medians (300 / 150) would be 2.0
    assert double["vs_1gpu_same_round"] == pytest.approx(1.95) and double["vs_1gpu_range"] == pytest.approx([1.9, 2.0])
    assert single["vs_1gpu_same_round"] is None and double["peak_mem_gib"] == 42.0
