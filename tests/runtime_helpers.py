"""Shared helpers for the whole-model build and runtime tests: random tiny GGUFs, cached builds, the torch reference."""

from __future__ import annotations

import atexit
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


@torch.no_grad()
def greedy_parity(engine, model: Transformer, prompt: list[int], steps: int):
    """Greedy decode with both, teacher-forced on the reference's tokens: (ref tokens, engine tokens, max |Δlogits|
    per step; step 0 is the prefill)."""
    cache = model.new_cache(1)
    engine.reset()
    ref = model(torch.tensor([prompt]), cache)[0, -1].numpy()
    got = engine.prefill(prompt)
    errs, ref_toks, got_toks = [], [], []
    for _ in range(steps):
        errs.append(float(np.abs(ref - got).max()))
        ref_toks.append(int(np.argmax(ref)))
        got_toks.append(int(np.argmax(got)))
        tok = ref_toks[-1]
        ref = model(torch.tensor([[tok]]), cache)[0, -1].numpy()
        got = engine.decode(tok)
    return ref_toks, got_toks, errs
