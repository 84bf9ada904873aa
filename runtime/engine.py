"""Run a compiled model with TVM's runtime only: prefill, decode over the KV cache, sampling, streaming text.

    from runtime.engine import Engine, SamplingParams
    eng = Engine.from_gguf("models/small.gguf")          # JIT: builds into the cache on first use (compiler.build)
    for piece in eng.stream_text("def fib(n):", SamplingParams(max_new_tokens=64)):
        print(piece, end="", flush=True)

:class:`Engine` needs ``model.so`` + ``params.npz`` + ``meta.json`` (a cache entry of :mod:`compiler.build`) and the
GGUF (for the tokenizer). It imports ``tvm.runtime`` only (set ``TVM_USE_RUNTIME_LIB=1`` and ``libtvm_compiler`` is
never loaded); the one exception is :func:`ensure_built`, the lazy JIT entry point, which imports
:mod:`compiler.build` when the cache has no usable entry. Sampling is numpy (no torch): greedy at temperature 0,
else temperature → top-k → top-p (same filter rules as :func:`model.generate.filter_logits`) from a seeded
``numpy.random.Generator``. :meth:`Engine.stream_text` yields text pieces that never split a UTF-8 character.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.sampling import SamplingParams, penalize
from runtime.cpu import check_flags

log = logging.getLogger("runtime")


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # length | stop_token | stop_string | context
    prefill_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0


def filter_logits(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """numpy twin of :func:`model.generate.filter_logits`: -inf outside the top-k, then outside the top-p nucleus."""
    logits = logits.astype(np.float64)
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        srt = logits[order]
        p = np.exp(srt - srt[0])
        p /= p.sum()
        drop = np.cumsum(p) - p >= top_p
        logits[order[drop]] = -np.inf
    return logits


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature == 0:
        return int(np.argmax(logits))
    lg = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    p = np.exp(lg - lg.max())
    p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


def load_cuda_runtime():
    """Make TVM's runtime able to run CUDA modules: load ``libtvm_runtime_cuda.so`` (torch, if installed, is imported
    first: its wheels carry the ``libcudart`` that library links against). Returns ``tvm``."""
    import ctypes

    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    import tvm

    if not tvm.runtime.enabled("cuda"):
        ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
        raise RuntimeError("no CUDA device visible to TVM's runtime")
    return tvm


def ensure_built(gguf: Path | str, target: str = "auto", cache_dir: Path | str | None = None) -> Path:
    """The cache entry for ``gguf`` on ``target``; compiles it (``compiler.build``, the one lazy JIT) if absent."""
    from compiler import cache
    from schedules.targets import resolve

    target = resolve(target)
    key = cache.cache_key(gguf, target)
    d = cache.entry_dir(cache_dir, key)
    ok, why = cache.check_entry(d, key)
    if ok:
        return d
    log.warning("no usable compiled module for %s on %s (%s): compiling (first use)", gguf, target, why)
    from compiler.build import build  # the JIT exception: only here does the runtime reach the compiler

    return build(gguf, target, cache_dir).dir


class Engine:
    """One sequence at a time: :meth:`prefill` the prompt, then :meth:`decode` a token at a time."""

    def __init__(
        self, entry: Path | str, gguf: Path | str | None = None, threads: int | None = None, tokenizer=None
    ) -> None:
        """``gguf`` supplies the tokenizer (and end-of-text id); or pass an HF ``tokenizer`` directly."""
        os.environ.setdefault("TVM_NUM_THREADS", str(threads or len(os.sched_getaffinity(0))))
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.dir = Path(entry)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        c = self.meta["config"]
        self.n_layers, self.ctx, self.vocab = c["n_layers"], c["max_seq_len"], c["vocab_size"]
        self.n_kv, self.head_dim = c["n_kv_heads"], c["d_model"] // c["n_heads"]
        self.chunk = int(self.meta["prefill_chunk"])
        self.target = self.meta.get("target", "cpu")
        check_flags(
            self.meta.get("cpu_flags", ()), f"{self.dir.name} ({self.target}, {self.meta.get('weights', 'tile8')})"
        )
        if self.target == "cuda":
            load_cuda_runtime()
            self.dev = tvm.cuda(0)
            devices = [self.dev, tvm.cpu()]  # kernels and tensors on the GPU; the VM's host-side shape work on the CPU
        else:
            self.dev = devices = tvm.cpu()
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.dir / "model.so")), devices)
        self._decode, self._prefill = self.vm["decode"], self.vm["prefill"]
        with np.load(self.dir / "params.npz", allow_pickle=False) as z:
            self.params = [tvm.runtime.tensor(np.ascontiguousarray(z[name]), self.dev) for name, _, _ in
                           self.meta["params"]]  # fmt: skip
        shape = (self.n_kv, self.ctx, self.head_dim)
        self.cache = [tvm.runtime.tensor(np.zeros(shape, np.float32), self.dev) for _ in range(2 * self.n_layers)]
        self._tvm = tvm
        self.pos = 0
        self.tokenizer = tokenizer
        self.eos = None
        if gguf is not None:
            from model.gguf_io import read_gguf
            from model.tokenizer import hf_from_spec

            spec = read_gguf(gguf, check_values=False).tokenizer
            self.tokenizer = hf_from_spec(spec)
            self.eos = getattr(spec, "eos_id", None)

    @classmethod
    def from_gguf(cls, gguf: Path | str, target: str = "auto", cache_dir=None, threads: int | None = None) -> Engine:
        return cls(ensure_built(gguf, target, cache_dir), gguf, threads)

    # --- model steps -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0  # stale cache rows are overwritten before they are read (causal mask)

    def _i32(self, values) -> object:
        return self._tvm.runtime.tensor(np.asarray(values, np.int32), self.dev)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` at the current position (chunks of ``prefill_chunk``); logits after the last one."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._check(tokens)
        if self.pos + len(tokens) > self.ctx:
            raise ValueError(f"{self.pos + len(tokens)} tokens exceed the context of {self.ctx}")
        logits = None
        for s in range(0, len(tokens), self.chunk):
            part = tokens[s : s + self.chunk]
            n = len(part)
            padded = part + [0] * (self.chunk - n)
            out = self._prefill(self._i32(padded), self._i32([self.pos]), self._i32([n - 1]), *self.cache, *self.params)
            self.pos += n
            logits = out
        return logits.numpy()

    def decode(self, token: int) -> np.ndarray:
        """Append one token; the logits for the next."""
        self._check([token])
        if self.pos >= self.ctx:
            raise ValueError(f"the context of {self.ctx} tokens is full")
        out = self._decode(self._i32([token]), self._i32([self.pos]), *self.cache, *self.params)
        self.pos += 1
        return out.numpy()

    def _check(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab}): {bad[:5]}")

    # --- generation --------------------------------------------------------------------------------------------
    def generate_tokens(
        self, prompt: list[int], params: SamplingParams, result: Generation | None = None
    ) -> Iterator[int]:
        """Yield generated ids; ``result`` (if given) gets the tokens, finish reason and timings."""
        result = result if result is not None else Generation()
        if len(prompt) >= self.ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context of {self.ctx}")
        rng = np.random.default_rng(params.seed)
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        t1 = None
        while len(result.tokens) < params.max_new_tokens:
            tok = sample(penalize(logits, result.tokens, params) if params.penalized else logits, params, rng)
            if t1 is None:
                t1 = time.perf_counter()
                result.prefill_s = t1 - t0
            result.tokens.append(tok)
            yield tok
            if tok in params.stop_token_ids:
                result.finish_reason = "stop_token"
                break
            if params.stop_strings and self.tokenizer is not None:
                # a stop string that the newest token completes lies in the last (its bytes + 1) tokens: decode
                # only those (a whole-list decode per token made long generations quadratic)
                window = max(len(s.encode()) for s in params.stop_strings) + 2
                text = self.detokenize(result.tokens[-window:])
                if any(s in text for s in params.stop_strings):
                    result.finish_reason = "stop_string"
                    break
            if self.pos >= self.ctx:
                result.finish_reason = "context"
                break
            if len(result.tokens) >= params.max_new_tokens:
                break
            logits = self.decode(tok)
        if t1 is not None:
            result.decode_s = time.perf_counter() - t1

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stream_text(self, prompt: str, params: SamplingParams, result: Generation | None = None) -> Iterator[str]:
        """Yield the generated text in pieces; a piece never ends inside a UTF-8 character (an incomplete byte
        sequence decodes to U+FFFD and is held back until the following tokens complete it). Stop strings are cut.
        Decoding is incremental: only the tokens after the last character boundary are decoded each step."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: construct the Engine with the GGUF")
        result = result if result is not None else Generation()
        ids = self.tokenize(prompt)
        emitted = text = ""
        read = 0  # tokens[:read] decode to `text`, ending on a character boundary
        held = max((len(s) for s in params.stop_strings), default=1) - 1
        for _ in self.generate_tokens(ids, params, result):
            piece = self.detokenize(result.tokens[read:])  # byte-level BPE: text of tokens[:read] + this
            if piece.endswith("\ufffd"):
                continue
            text, read = text + piece, len(result.tokens)
            cut = _stop_cut(text, params.stop_strings)
            safe = text[:cut] if cut is not None else text[: len(text) - held]  # hold back a stop string's prefix
            if len(safe) > len(emitted) and safe.startswith(emitted):
                yield safe[len(emitted) :]
                emitted = safe
        text += self.detokenize(result.tokens[read:])
        cut = _stop_cut(text, params.stop_strings)
        final = text[:cut] if cut is not None else text.rstrip("\ufffd")
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted) :]
            emitted = final
        result.text = emitted

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        result = Generation()
        for _ in self.stream_text(prompt, params, result):
            pass
        return result


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None
