"""Shared helpers for the whole-model build and runtime tests: random tiny GGUFs, cached builds, the torch reference."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from model_helpers import tiny_spec

from model.config import get_config
from model.gguf_io import read_gguf, write_gguf
from model.transformer import Transformer

_TMP = Path(tempfile.mkdtemp(prefix="ternary-build-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def write_tiny(path: Path, n_streams: int = 2, seed: int = 0, **overrides) -> Path:
    """A random ``tiny`` model with non-trivial mHC coefficients (so a site mix-up would show), as GGUF."""
    torch.manual_seed(seed)
    cfg = get_config("tiny", n_streams=n_streams, **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for site in model.mhc_sites():
            for p in site.parameters():
                p.add_(torch.randn_like(p))
        if cfg.arch != "bitnet-mhc":  # norm weights away from 1, so that a norm (or sub-norm) mix-up would show
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.mul_(1 + 0.3 * torch.randn_like(p))
    write_gguf(path, cfg, model.gguf_tensors(), tiny_spec(cfg.vocab_size))
    return path


@functools.cache
def tiny_gguf(n_streams: int = 2, **overrides) -> Path:
    name = f"tiny_n{n_streams}" + "".join(f"_{k}{v}" for k, v in sorted(overrides.items())) + ".gguf"
    return write_tiny(_TMP / name, n_streams, **overrides)


def cache_dir() -> Path:
    return _TMP / "cache"


@functools.cache
def built(gguf: Path, target: str = "auto"):
    """``compiler.build.build`` into the shared test cache (once per process)."""
    from compiler.build import build

    return build(gguf, target, cache_dir())


@functools.cache
def reference(gguf: Path) -> Transformer:
    g = read_gguf(gguf)
    return Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch on one thread: on a loaded 2-core machine its spinning OpenMP threads run up to 45x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
@one_torch_thread()
@torch.no_grad()
def reference_run(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits before each of them (step 0: after the prompt) from the PyTorch model."""
    cache = model.new_cache(1)
    logits = [model(torch.tensor([prompt]), cache)[0, -1].numpy()]
    toks = [int(np.argmax(logits[0]))]
    while len(toks) < steps:
        logits.append(model(torch.tensor([[toks[-1]]]), cache)[0, -1].numpy())
        toks.append(int(np.argmax(logits[-1])))
    return toks, logits


def _teacher_forced(engine, model: Transformer, prompt: list[int], steps: int):
    ref_toks, ref_logits = reference_run(model, prompt, steps)
    engine.reset()
    got = [engine.prefill(prompt)]
    for t in ref_toks[:-1]:
        got.append(engine.decode(t))
    return ref_toks, ref_logits, got


def greedy_parity(engine, model: Transformer, prompt: list[int], steps: int):
    """Greedy decode with both, the engine teacher-forced on the reference's tokens: (ref tokens, engine tokens,
    max |Δlogits| per step; step 0 is the prefill). The two never run interleaved (their thread pools would fight)."""
    ref_toks, ref_logits, got = _teacher_forced(engine, model, prompt, steps)
    errs = [float(np.abs(r - g).max()) for r, g in zip(ref_logits, got, strict=True)]
    return ref_toks, [int(np.argmax(g)) for g in got], errs


FLIP_TOL = 0.05  # a few int8 activation flips of a random tiny model (each moves its logits by ~0.005-0.017)


def assert_pytorch_parity(engine, model: Transformer, prompt: list[int], steps: int, tol: float = FLIP_TOL) -> list:
    """The compiled module against float32 PyTorch, teacher-forced: logits within ``tol`` at every step, and a greedy
    token differs only where PyTorch's margin between the two tokens is within twice that step's error.

    Not 1e-3 and identical tokens: PyTorch's float32 kernels round differently from CPU to CPU, and where an int8
    activation lands on a .5 tie (ternary sums are structured numbers; it happens) that decides the rounding; one flip
    moves a tiny random model's logits by ~0.01. Measured ≤ 7e-4 on an AVX-512 Xeon, 0.005-0.017 on an AVX2 Zen 3 (a
    tie in ``ffn.down``'s input; float64 PyTorch flips at other ties). The bit-exact check of the compiled arithmetic is
    ``tests/test_exact_reference.py``'s. Returns the errors per step."""
    ref_toks, ref_logits, got = _teacher_forced(engine, model, prompt, steps)
    errs = [float(np.abs(r - g).max()) for r, g in zip(ref_logits, got, strict=True)]
    assert max(errs) <= tol, errs
    for step, (want, r, g, e) in enumerate(zip(ref_toks, ref_logits, got, errs, strict=True)):
        mine = int(np.argmax(g))
        assert mine == want or r[want] - r[mine] <= 2 * e, (step, want, mine, float(r[want] - r[mine]), e)
    return errs


def random_prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 500, n)]


def assert_batch_rows_equal_alone(engine) -> None:
    """Each row of the engine's largest ``decode_b{B}`` (sequences of different lengths, each in its own blocks or
    state) gets bit for bit the logits it gets decoded alone."""
    from runtime.kv_cache import Sequence

    B = max(engine.batch_sizes)
    alone = []
    for s in range(B):
        engine.reset()
        engine.prefill(random_prompt(3 + 5 * s, s))
        alone.append(engine.decode(7))
    seqs = []
    for s in range(B):
        seq = Sequence()
        engine.prefill(random_prompt(3 + 5 * s, s), seq=seq)
        seqs.append(seq)
    rows = engine.decode_batch(seqs, [7] * B)
    for s in range(B):
        np.testing.assert_array_equal(rows[s], alone[s])
        engine.pool.release(seqs[s])


def stepwise_greedy(eng, prompt: list[int], n: int) -> tuple[int, list[int], list[np.ndarray]]:
    """On a ``runtime.engine.Engine``: the first pick after the prompt, then ``n`` greedy picks one decode call at a
    time (and their logits); the reference of the device chains' tests."""
    eng.reset()
    first = int(np.argmax(eng.prefill(prompt)))
    toks, logits, t = [], [], first
    for _ in range(n):
        logits.append(eng.decode(t))
        t = int(np.argmax(logits[-1]))
        toks.append(t)
    return first, toks, logits
