"""Muon's Newton–Schulz split over DDP ranks (``train.muon.orthogonalize_shared``): on two CPU processes (gloo) every
rank's update must equal the single-process update bit for bit, for stacks that do and do not divide by the world
size, with plain, 8-bit and GaLore Muon."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [(8, 16), (8, 16), (8, 16), (16, 8), (12, 12), (12, 12), (6, 10)]  # stacks of 3, 1, 2 and 1 matrices


def _params_and_grads(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]  # three steps
    return params, grads


def _run(kind: str) -> list[torch.Tensor]:
    from train.galore import GaLoreMuon
    from train.muon import BatchedMuon
    from train.optim8 import Muon8bit

    params, grads = _params_and_grads(0)
    make = {"plain": BatchedMuon, "8bit": Muon8bit, "galore": lambda p, **k: GaLoreMuon(p, rank=4, **k)}[kind]
    opt = make(params, lr=0.02, weight_decay=0.01)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _worker(rank: int, port: int, kind: str, out: dict) -> None:
    torch.set_num_threads(1)
    alone = _run(kind)  # no process group yet: the single-process update
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shared = _run(kind)
    finally:
        dist.destroy_process_group()
    out[rank] = all(torch.equal(a, b) for a, b in zip(alone, shared, strict=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["plain", "8bit", "galore"])
def test_split_newton_schulz_equals_the_single_process_update(kind):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), kind, out), nprocs=2, join=True)
        assert dict(out) == {0: True, 1: True}


@pytest.mark.unit
def test_split_newton_schulz_is_used_only_with_a_process_group():
    from train.muon import orthogonalize, orthogonalize_shared

    g = torch.randn(3, 8, 16)
    assert not dist.is_initialized()
    assert torch.equal(orthogonalize_shared(g), orthogonalize(g))
