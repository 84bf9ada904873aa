"""Run a compiled model with TVM's runtime only: prefill, decode (one sequence or a batch) over the paged KV cache,
sampling, streaming text.

    from runtime.engine import Engine, SamplingParams
    eng = Engine.from_gguf("models/small.gguf")          # JIT: builds into the cache on first use (compiler.build)
    for piece in eng.stream_text("def fib(n):", SamplingParams(max_new_tokens=64)):
        print(piece, end="", flush=True)

:class:`Engine` needs ``model.so`` + ``params.npz`` + ``meta.json`` (a cache entry of :mod:`compiler.build`) and the
GGUF (for the tokenizer). It imports ``tvm.runtime`` only (set ``TVM_USE_RUNTIME_LIB=1`` and ``libtvm_compiler`` is
never loaded); the one exception is :func:`ensure_built`, the lazy JIT entry point, which imports
:mod:`compiler.build` when the cache has no usable entry.

The KV cache is paged (:mod:`runtime.kv_cache`: 16-token blocks shared by every sequence, ``kv_tokens`` of them in
all); a model with DeltaNet layers also keeps ``max_seqs`` recurrent-state slots, one per live sequence.
:meth:`Engine.prefill` / :meth:`Engine.decode` advance one :class:`~runtime.kv_cache.Sequence` (the Engine's own by
default); :meth:`Engine.decode_batch` advances several by a token each in one call of the compiled ``decode_b{B}``,
with the logits each would get alone; :meth:`Engine.batcher` gives the continuous-batching scheduler
(:mod:`runtime.batch`) that the server runs.

Sampling is numpy (no torch): greedy at a temperature below :data:`GREEDY_BELOW` (1e-5: at that scale a 0.01 logit
gap is already a factor e^1000); plain temperature sampling is a Gumbel-max draw whose noise is a hash of the seed,
the position and the id (:func:`runtime.decoding.gumbel_pick`), drawn the same way on the device by chains
(:meth:`Engine.chain`), so a seeded generation is the same alone, batched or chained; with top-k or top-p, float64
temperature → top-k → top-p (same filter rules as :func:`model.generate.filter_logits`) from a seeded
``numpy.random.Generator``. Any finite setting works: NaN logits
count as -inf, +inf logits share the mass between them, the maximum is subtracted before dividing by the temperature,
``top_k`` above the vocabulary keeps everything; sampling never raises and never sees a NaN probability.

The text the user sees never holds a special token: end-of-generation tokens (the GGUF's EOS, EOT, EOM and control
tokens named like ``<|end|>``) stop every generation whatever the stop ids, unused tokens are never sampled, and
:meth:`Engine.detokenize` drops control tokens. :meth:`Engine.stream_text` heals the prompt's last word
(:mod:`runtime.healing`; on by default, ``Engine(token_healing=False)``, ``stream_text(..., token_healing=False)`` or a
``token_healing`` field on the sampling parameters turn it off) and yields text pieces that never split a UTF-8
character.

Tests: ``pytest -q tests/test_runtime_engine.py tests/test_token_healing.py tests/test_special_tokens.py
tests/test_batch.py``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.sampling import SAMPLE_SEEDS, Generation, SamplingParams  # re-exported
from runtime.decoding import (  # noqa: F401 (the sampling functions are re-exported)
    GREEDY_BELOW,
    TextStream,
    TokenPicker,
    constrain,
    filter_logits,
    sample,
    softmax,
)
from runtime.healing import Heal, TokenTable, plan
from runtime.kv_cache import STATE_DIM, BlockPool, CacheFull, Sequence, cache_layout, cache_shapes
from runtime.spec_decode import advance
from targets.cpu import check_flags
from targets.cuda import load_cuda_runtime
from targets.hugepages import empty_tensor, host_tensor

log = logging.getLogger("runtime")

# control tokens that end a generation by their name alone (as llama.cpp treats them), besides the GGUF's EOS/EOT/EOM
EOG_NAMES = frozenset({"<|endoftext|>", "<|end|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "</s>"})
EOG_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


JIT_POLICIES = ("on", "off", "redo", "readonly")  # as mlc-llm's JIT cache: see ensure_built


class JITError(RuntimeError):
    """``jit_policy="off"`` and no usable compiled module: the message names the build command."""


def ensure_built(
    gguf: Path | str,
    target: str = "auto",
    cache_dir: Path | str | None = None,
    cores: int | None = None,
    jit_policy: str = "on",
    head: str = "auto",
) -> Path:
    """The cache entry for ``gguf`` on ``target`` (key: :func:`compiler.cache.cache_key`, the one place it is
    computed); ``cores``: the thread count it will run with (default TVM's pool size; see docs/threads.md).
    ``jit_policy`` says when ``compiler.build`` (the runtime's one lazy JIT into the compiler) runs:

    * ``on``: reuse a usable entry, compile into the cache if there is none;
    * ``off``: never compile; no usable entry is a :class:`JITError` naming the ``compiler.build`` command;
    * ``redo``: always compile, replacing the cache entry;
    * ``readonly``: reuse a usable entry, else compile into a temporary directory (removed at exit); the cache is
      never written.

    ``head``: the LM head as the GGUF stores it (``auto``) or ``int8`` (``compiler.build --head``)."""
    from compiler.build import cache  # the JIT entry point and its cache: the runtime's one way into the compiler
    from targets import resolve

    if jit_policy not in JIT_POLICIES:
        raise ValueError(f"jit_policy must be one of {', '.join(JIT_POLICIES)}; got {jit_policy!r}")
    from compiler.build import entry_key

    target = resolve(target)
    key = entry_key(gguf, target, cores=cores, head=head)
    d = cache.entry_dir(cache_dir, key)
    ok, why = cache.check_entry(d, key)
    if ok and jit_policy != "redo":
        return d
    if jit_policy == "off":
        cmd = f"python -m compiler.build --model {gguf} --target {target}"
        cmd += f" --head {head}" if head != "auto" else ""
        cmd += f" --cache-dir {cache_dir}" if cache_dir else ""
        raise JITError(f"no usable compiled module for {gguf} on {target} in {d.parent} ({why}) and the JIT policy "
                       f"is off; build it first: {cmd}")  # fmt: skip
    from compiler.build import build  # the JIT exception: only here does the runtime reach the compiler

    if jit_policy == "readonly":
        import atexit
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix="ternary-tvm-jit-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        log.warning("no usable compiled module for %s on %s (%s): compiling into %s (read-only cache)", gguf, target,
                    why, tmp)  # fmt: skip
        return build(gguf, target, tmp, cores=cores, head=head).dir
    if jit_policy == "on":
        log.warning("no usable compiled module for %s on %s (%s): compiling (first use)", gguf, target, why)
    return build(gguf, target, cache_dir, cores=cores, force=jit_policy == "redo", head=head).dir


KV_CONTEXTS = 4  # the default KV cache holds this many full contexts' worth of tokens
# default MTP drafts per step, by target: the setting that decoded fastest on the shipped model (docs/speculative.md;
# AVX2: the heads' drafts did not pay there, 0.98x at one draft, nor after lookup drafts, 1.31x with or without;
# the H200 since its step got cheaper: 0.95x at one, 0.90x at three). Where lookup drafts are off, plain greedy
# generation takes device chains instead (CHAIN_BURST).
DRAFT_TOKENS = {"cuda": 0, "avx512": 1, "avx2": 0}
# plain greedy (or plain temperature) steps per burst of Engine.chain, by target (0: step by step through the host):
# chains beat speculation on every target (docs/speculative.md)
CHAIN_BURST = {"cuda": 16, "avx512": 16, "avx2": 16}
# MTP drafts per call of a greedy chain (spec_chain_b{K+1}: verify, accept and draft on the device), by target: the
# fastest on the shipped model, 0 where no speculative chain beat the plain one (docs/speculative.md, "Speculative
# chains": measured on the H200, Zen 3 AVX2 and Zen 4 AVX-512)
CHAIN_DRAFTS = {"cuda": 2, "avx512": 0, "avx2": 0}
CHAIN_BURST_MAX = 256  # the most steps of one burst (a stop inside it wastes the rest)
# prompt-lookup drafts per step at most, by target (runtime.lookup; 0: none), greedy only: tried before the MTP
# heads' drafts, and continuing them. With them plain greedy generation runs step by step through the host, not in
# chains: on the CPUs 3 beat chains and 7; on CUDA 7 beat chains with two MTP drafts a call, 2.30x against 1.92x plain
# decoding (docs/speculative.md, "Prompt-lookup drafts", "On CUDA")
LOOKUP_TOKENS = {"cuda": 7, "avx512": 3, "avx2": 3}


def load_params(entry: Path, specs: list, dev) -> list:
    """The weights of the cache entry ``entry`` as device tensors (host ones in huge pages), in the order of
    ``meta.json``'s ``specs`` (``[name, shape, dtype]``). Each array must have the name, shape and dtype recorded
    there, else a ValueError says which: the compiled CPU functions do not check their weights on every call
    (:mod:`compiler.vm_pipeline`), so this is where a damaged or mismatched ``params.npz`` is caught."""
    with np.load(entry / "params.npz", allow_pickle=False) as z:  # read an array at a time
        return [host_tensor(a, dev) for a in checked_params(z, specs, f"{entry}/params.npz")]


def checked_params(arrays, specs: list, where: str):
    """Yields ``arrays``' (name → array) arrays in the order of ``specs``, each with the name, shape and dtype
    recorded there; a ValueError naming ``where`` and the first mismatch otherwise."""
    for name, shape, dtype in specs:
        if name not in arrays:
            raise ValueError(f"{where} has no {name!r}, which the module takes: rebuild the entry")
        a = np.asarray(arrays[name])
        if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
            raise ValueError(f"{where}: {name!r} is {a.dtype}{list(a.shape)}, the module takes "
                             f"{dtype}{list(shape)}: rebuild the entry")  # fmt: skip
        yield a


def default_max_seqs(batch_sizes) -> int:
    """Sequences live at once by default on a model with recurrent states: the largest compiled decode batch (the
    :class:`runtime.batch.Batcher`'s default ``max_batch``) plus the Engine's own single-sequence API sequence."""
    return max(int(b) for b in batch_sizes) + 1


def default_draft_tokens(target: str, heads: int) -> int:
    """Tokens drafted per step by default: :data:`DRAFT_TOKENS` for the target, at most the model's heads."""
    return min(heads, DRAFT_TOKENS.get(target, 0))


class Engine:
    """A compiled model over a paged KV cache (:mod:`runtime.kv_cache`). One sequence at a time: :meth:`prefill` the
    prompt, then :meth:`decode` a token at a time (the Engine's own :class:`Sequence`, or any other); many at once:
    :meth:`decode_batch` advances several sequences by a token each in one call (:mod:`runtime.batch` schedules
    them)."""

    def __init__(
        self,
        entry: Path | str,
        gguf: Path | str | None = None,
        threads: int | None = None,
        tokenizer=None,
        token_healing: bool = True,
        kv_tokens: int | None = None,
        draft_tokens: int | None = None,
        max_seqs: int | None = None,
        chain_burst: int | None = None,
        chain_drafts: int | None = None,
        lookup_tokens: int | None = None,
    ) -> None:
        """``gguf`` supplies the tokenizer (and its special tokens); or pass an HF ``tokenizer`` directly.
        ``token_healing`` is the default of :meth:`stream_text`. ``kv_tokens``: the KV cache's capacity in tokens
        over all sequences (default :data:`KV_CONTEXTS` full contexts; at least one). ``draft_tokens``: tokens
        drafted per step by the model's multi-token-prediction heads (:mod:`runtime.spec_decode`; default
        :func:`default_draft_tokens`, at most the heads; 0 turns speculative decoding off). ``max_seqs``: on a model
        with DeltaNet layers, the most sequences live at once, hence its recurrent-state slots (default
        :func:`default_max_seqs`: the largest decode batch plus this Engine's own sequence; at most the cache's
        blocks); one more sequence is :class:`CacheFull` until one is released. Ignored without DeltaNet layers.
        ``chain_burst``: plain greedy generation runs up to this many steps at a time on the device, without the
        host between them (:meth:`chain`; default :data:`CHAIN_BURST` for the target; 0 turns it off).
        ``chain_drafts``: MTP drafts verified per call of a greedy chain (a speculative chain; default
        :data:`CHAIN_DRAFTS` for the target, at most the heads; 0: plain chains). ``lookup_tokens``: prompt-lookup
        drafts per step at most (:mod:`runtime.lookup`: the tokens that followed the context's end where it occurred
        before; default :data:`LOOKUP_TOKENS` for the target; 0 turns them off), tried before the MTP heads."""
        os.environ.setdefault("TVM_NUM_THREADS", str(threads or len(os.sched_getaffinity(0))))
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.dir = Path(entry)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        c = self.meta["config"]
        self.n_layers, self.ctx, self.vocab = c["n_layers"], c["max_seq_len"], c["vocab_size"]
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
        self.batch_sizes = tuple(int(b) for b in self.meta["batch_sizes"])
        # a chunk that only fills the cache (no LM head); builds before it lack the function
        self._prefill_kv = "prefill_kv" in self.meta["outputs"]
        self.mtp_heads = int(c.get("mtp_heads", 0))  # compiled functions return (logits, hidden) when > 0
        self.fused_draft = bool(self.meta.get("fused_draft", False))  # verify_b{B}: decode + every row's drafts
        self._draft = {(k, b): self.vm[f"draft{k}_b{b}"] for k in range(1, self.mtp_heads + 1)
                       for b in self.batch_sizes}  # fmt: skip
        if draft_tokens is None:
            draft_tokens = default_draft_tokens(self.target, self.mtp_heads)
        if not 0 <= draft_tokens <= self.mtp_heads:
            raise ValueError(f"draft_tokens={draft_tokens}: this model has {self.mtp_heads} MTP heads")
        self.draft_tokens = int(draft_tokens)
        self.chain_burst = int(CHAIN_BURST.get(self.target, 0) if chain_burst is None else chain_burst)
        if chain_drafts is None:
            chain_drafts = min(self.mtp_heads, CHAIN_DRAFTS.get(self.target, 0))
        if not 0 <= chain_drafts <= self.mtp_heads:
            raise ValueError(f"chain_drafts={chain_drafts}: this model has {self.mtp_heads} MTP heads")
        self.chain_drafts = int(chain_drafts)
        self.lookup_tokens = int(LOOKUP_TOKENS.get(self.target, 0) if lookup_tokens is None else lookup_tokens)
        if not 0 <= self.lookup_tokens < self.batch_sizes[-1]:
            raise ValueError(f"lookup_tokens={lookup_tokens}: 0 (off) to {self.batch_sizes[-1] - 1} (the verify rows "
                             "fit the largest compiled batch)")  # fmt: skip
        if not 0 <= self.chain_burst <= CHAIN_BURST_MAX:
            raise ValueError(f"chain_burst={chain_burst}: 0 (off) to {CHAIN_BURST_MAX} steps")
        self.params = load_params(self.dir, self.meta["params"], self.dev)
        index = {name: i for i, (name, _, _) in enumerate(self.meta["params"])}
        self._draft_params = [self.params[index[n]] for n in self.meta.get("draft_params", [])]  # the heads' only
        layout = cache_layout(self.meta["cache"])
        states = any(dim == STATE_DIM for _, dim, _, _ in layout)  # DeltaNet layers: a state slot per sequence
        if max_seqs is not None and max_seqs < 1:
            raise ValueError(f"max_seqs={max_seqs}: at least one sequence")
        seqs = int(max_seqs or default_max_seqs(self.batch_sizes)) if states else 0
        self.pool = BlockPool(int(kv_tokens or KV_CONTEXTS * self.ctx), int(self.meta["kv_block"]), self.ctx, seqs)
        # never read before written (a position's key is written by the step that reads it first; a state is zeroed
        # at position 0): no zero fill
        self.cache = [empty_tensor(shape, dtype, self.dev) for shape, dtype in cache_shapes(layout, self.pool)]
        self._tvm = tvm
        from tvm.runtime import _ffi_api

        self._copy_from, self._copy_to = _ffi_api.TVMTensorCopyFromBytes, _ffi_api.TVMTensorCopyToBytes
        self._inputs: dict[tuple, tuple] = {}  # per-call input tensors and their host staging arrays (_in)
        self._results: dict[str, list] = {}  # each function's result tensors, written in place (_out)
        self._saved: dict[tuple, object] = {}  # (function, its input tensors) -> the call, every argument bound (_run)
        self._result_specs: dict[str, list] = {}  # their (shape, dtype), for _read
        self._chain_bias = None  # chain_b1's bias over the vocabulary (made at its first call)
        self._ring_count: dict[str, int] = {}  # per chain function, its ring's count (ring[R]) as last read
        self.seq = Sequence()  # the single-sequence API's sequence
        self.token_healing = token_healing
        self.tokenizer = tokenizer
        self.eos = None
        self.hidden: frozenset[int] = frozenset()  # control and unused tokens: never in user-visible text
        self.eog: frozenset[int] = frozenset()  # end-of-generation tokens: every generation stops at them
        unused: list[int] = []  # never sampled
        if gguf is not None:
            from model.gguf_io import read_gguf
            from model.tokenizer import TOKEN_CONTROL, TOKEN_UNUSED, hf_from_spec

            spec = read_gguf(gguf, check_values=False).tokenizer
            self.tokenizer = hf_from_spec(spec)
            self.eos = getattr(spec, "eos_id", None)
            control = {i for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL}
            unused = [i for i, t in enumerate(spec.token_type) if t == TOKEN_UNUSED]
            declared = [self.eos, *(spec.extra.get(k) for k in EOG_KEYS)]
            named = {i for i in control if spec.tokens[i] in EOG_NAMES}
            self.eog = frozenset({int(i) for i in declared if i is not None and 0 <= int(i) < self.vocab} | named)
            self.hidden = frozenset(control | set(unused))
        elif tokenizer is not None:
            special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
            self.hidden = frozenset(special)
            self.eog = frozenset(i for i, name in special.items() if name in EOG_NAMES)
        self._never = np.array([i for i in unused if i < self.vocab], dtype=np.int64)
        self.never_ids = frozenset(int(i) for i in self._never)  # never sampled (the same ids, for lookups)
        if self.tokenizer is not None and token_healing:
            self.token_table.allowed(b"\n")  # built now (~25 ms for 8k tokens), not in the first request's time

    @classmethod
    def from_gguf(
        cls,
        gguf: Path | str,
        target: str = "auto",
        cache_dir=None,
        threads: int | None = None,
        jit_policy: str = "on",
        head: str = "auto",
        **kw,
    ) -> Engine:
        """Build (per ``jit_policy``, see :func:`ensure_built`; ``head``: the LM head's storage) or reuse ``gguf``'s
        module, then load it."""
        entry = ensure_built(gguf, target, cache_dir, cores=threads, jit_policy=jit_policy, head=head)
        return cls(entry, gguf, threads, **kw)

    @functools.cached_property
    def token_table(self) -> TokenTable:
        """Token bytes and prefix index for token healing (built once per Engine)."""
        return TokenTable(self.tokenizer, self.hidden)

    # --- model steps -------------------------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        """The single-sequence API's position (tokens in its cache)."""
        return self.seq.length

    def reset(self, seq: Sequence | None = None) -> None:
        """Free ``seq``'s (default: the Engine's own sequence's) cache blocks; it starts again at position 0."""
        self.pool.release(self.seq if seq is None else seq)

    def _in(self, slot: str, values, dtype=np.int32) -> object:
        """A per-call input as a device tensor: one tensor per (slot, shape), kept with a host staging array, and
        refilled by TVM's C copy (``TVMTensorCopyFromBytes``) without ``Tensor.copyfrom``'s Python around the same
        call, a large share of a small model's GPU step (docs/bench/cuda/README.md, "The host copies")."""
        a = np.asarray(values, dtype)
        key = (slot, a.shape, a.dtype.str)
        link = self._inputs.get(key)
        if link is None:
            host = np.empty(a.shape, a.dtype)
            t = self._tvm.runtime.empty(a.shape, str(a.dtype), self.dev)
            link = self._inputs[key] = (t, host, ctypes.c_void_p(host.ctypes.data), host.nbytes)
        t, host, ptr, nbytes = link
        host[...] = a
        self._copy_from(t, ptr, nbytes)
        return t

    def _run(self, name: str, ins: tuple) -> None:
        """Call function ``name`` (``prefill``, ``prefill_kv``, ``decode_b{B}``, ``verify_b{B}``) on the per-call input
        tensors ``ins`` (:meth:`_in`), its result tensors (:meth:`_out`), the KV cache and the weights. On the CPU the
        call goes through a closure saved once per (function, input tensors) with every argument bound
        (``VirtualMachine.save_function``): the inputs are refilled in place and the rest never change, so the ~170
        arguments are not converted again on every call, a measurable share of a small model's step
        (docs/runtime/README.md, "Saved calls"). CUDA calls pass their arguments (their step is one CUDA graph)."""
        key = (name, *map(id, ins))
        call = self._saved.get(key)
        if call is None:
            args = (*ins, *self._out(name), *self.cache, *self.params)
            if self.target == "cuda":
                call = functools.partial(self.vm[name], *args)
            else:
                saved = f"{name}__saved{len(self._saved)}"
                self.vm.save_function(name, saved, *args, include_return=False)
                call = self.vm[saved]
            self._saved[key] = call
        call()

    def _read(self, name: str, i: int) -> np.ndarray:
        """Result ``i`` of function ``name`` (:meth:`_out`) as a new numpy array, by TVM's C copy
        (``TVMTensorCopyToBytes``, which waits for the device) without ``Tensor.numpy``'s Python (see :meth:`_in`)."""
        shape, dtype = self._result_specs[name][i]
        return self._read_tensor(self._results[name][i], shape, dtype)

    def _out(self, name: str) -> list:
        """The tensors function ``name`` writes its results into (``meta.json`` ``outputs``, from
        ``compiler.lower.output_specs``: logits, with MTP heads the hidden states, drafts). Allocated once per
        function (a CUDA graph replays the addresses it captured) and read right after each call."""
        t = self._results.get(name)
        if t is None:
            specs = self.meta["outputs"][name]
            t = self._results[name] = [self._tvm.runtime.empty(tuple(s), d, self.dev) for s, d in specs]
            self._result_specs[name] = [(tuple(s), np.dtype(d)) for s, d in specs]
        return t

    def _grow(self, seq: Sequence, length: int) -> None:
        if length > self.ctx:
            raise ValueError(f"{length} tokens exceed the context of {self.ctx}")
        if not self.pool.reserve(seq, length):
            if self.pool.n_states and not seq.blocks and not self.pool.free_states:
                raise CacheFull(f"all {self.pool.n_states} recurrent-state slots are held by live sequences (the "
                                "Engine's max_seqs); release one (Engine.reset) to start another")  # fmt: skip
            raise CacheFull(f"the KV cache has {self.pool.free} free blocks of {self.pool.block} tokens; "
                            f"{self.pool.blocks_for(length) - len(seq.blocks)} more are needed")  # fmt: skip

    def prefill(self, tokens: list[int], seq: Sequence | None = None) -> np.ndarray:
        """Append ``tokens`` to ``seq`` (default: the Engine's own; chunks of ``prefill_chunk``); the logits after
        the last one."""
        seq = self.seq if seq is None else seq
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._check(tokens)
        self._grow(seq, seq.length + len(tokens))
        starts = range(0, len(tokens), self.chunk)
        for s in starts:
            logits = self.prefill_chunk(seq, tokens[s : s + self.chunk], logits=s == starts[-1])
        return logits

    def prefill_chunk(self, seq: Sequence, tokens: list[int], logits: bool = True) -> np.ndarray | None:
        """One ``prefill`` call: at most ``prefill_chunk`` tokens appended to ``seq`` (whose blocks must already
        hold them: :meth:`prefill` reserves them); the logits after the last. ``logits=False`` (a chunk that more of
        the prompt follows): only the cache is filled, by ``prefill_kv`` without the LM head where the build has
        it, and None is returned (``seq.hidden`` is unset: the next chunk sets it)."""
        n = len(tokens)
        if not 0 < n <= self.chunk:
            raise ValueError(f"a prefill chunk takes 1..{self.chunk} tokens, not {n}")
        pos = np.full(self.chunk, -1, np.int32)  # padding rows write nothing
        pos[:n] = np.arange(seq.length, seq.length + n)
        table = np.broadcast_to(seq.table(self.pool.width), (self.chunk, self.pool.width))
        ins = (self._in("tokens", list(tokens) + [0] * (self.chunk - n)), self._in("pos", pos),
               self._in("table", table))  # fmt: skip
        kv_only = not logits and self._prefill_kv
        if kv_only:
            self._run("prefill_kv", ins)
        else:
            self._run("prefill", (*ins, self._in("last", [n - 1])))
        seq.length += n
        seq.hidden, seq.drafts = None, None
        if not logits:
            return None
        if self.mtp_heads:
            seq.hidden = self._read("prefill", 1)[0]
        return self._read("prefill", 0)[0]

    def decode(self, token: int, seq: Sequence | None = None) -> np.ndarray:
        """Append one token to ``seq`` (default: the Engine's own); the logits for the next."""
        return self.decode_batch([self.seq if seq is None else seq], [token])[0]

    def decode_batch(self, seqs: list[Sequence], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``seqs[i]`` for every ``i`` in one step per :attr:`batch_sizes` group (the
        smallest compiled batch that holds them, padding rows writing nothing): each ternary matrix is read once
        for the whole batch. The logits ``[len(seqs), V]``; a row equals what :meth:`decode` alone gives."""
        if len(seqs) != len(tokens) or not seqs:
            raise ValueError(f"decode_batch needs one token per sequence; got {len(tokens)} for {len(seqs)}")
        return np.concatenate([r[0] for r in self.step(seqs, [[t] for t in tokens])])

    def step(self, seqs: list[Sequence], rows: list[list[int]], draft: bool = False) -> list[tuple]:
        """Append the tokens ``rows[i]`` (one or more) to ``seqs[i]``, all in as few ``decode_b{B}`` calls as the
        rows need (a sequence's rows in order; a row attends to the rows before it in the same call). Per sequence a
        tuple: its logits ``[len(rows[i]), V]``; on a model with MTP heads the normed hidden states ``[len(rows[i]),
        D]`` (``seq.hidden`` becomes the last row's), else None; with ``draft`` where the build fuses drafting into
        decode (CUDA: ``verify_b{B}``), each row's greedy drafts ``[m, len(rows[i])]`` after that row's argmax, else
        None. Several rows for one
        sequence are the speculative verify step: row ``j`` gives what :meth:`decode` would after ``rows[i][:j +
        1]``; rejected rows are dropped by setting ``seq.length`` back (their keys are overwritten later; nothing is
        copied)."""
        rows = [[int(t) for t in r] for r in rows]
        if len(seqs) != len(rows) or not seqs or not all(rows):
            raise ValueError(f"step needs one non-empty token list per sequence; got {len(rows)} for {len(seqs)}")
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("a sequence appears twice in one decode batch")
        for r in rows:
            self._check(r)
        for seq, r in zip(seqs, rows, strict=True):
            if seq.length + len(r) > self.ctx:
                raise ValueError(f"the context of {self.ctx} tokens is full")
        for seq, r in zip(seqs, rows, strict=True):
            self._grow(seq, seq.length + len(r))
        flat = [(i, seq.length + j, t) for i, (seq, r) in enumerate(zip(seqs, rows, strict=True))
                for j, t in enumerate(r)]  # fmt: skip
        logits, hidden, drafts, top = [], [], [], self.batch_sizes[-1]
        for s in range(0, len(flat), top):
            part = flat[s : s + top]
            B = next(b for b in self.batch_sizes if b >= len(part))
            toks, pos = np.zeros(B, np.int32), np.full(B, -1, np.int32)
            table = np.zeros((B, self.pool.width), np.int32)
            for r, (i, p, t) in enumerate(part):
                toks[r], pos[r], table[r] = t, p, seqs[i].table(self.pool.width)
            fused = draft and self.fused_draft
            ins = (self._in("tokens", toks), self._in("pos", pos), self._in("table", table))
            name = f"{'verify' if fused else 'decode'}_b{B}"
            self._run(name, ins)
            logits.append(self._read(name, 0)[: len(part)])
            if self.mtp_heads:
                hidden.append(self._read(name, 1)[: len(part)])
            if fused:
                drafts.append(self._read(name, 2)[:, : len(part)])
        logits = np.concatenate(logits) if len(logits) > 1 else logits[0]
        hidden = (np.concatenate(hidden) if len(hidden) > 1 else hidden[0]) if hidden else None
        drafts = (np.concatenate(drafts, axis=1) if len(drafts) > 1 else drafts[0]) if drafts else None
        res, start = [], 0
        for seq, r in zip(seqs, rows, strict=True):
            end = start + len(r)
            h = hidden[start:end] if hidden is not None else None
            res.append((logits[start:end], h, drafts[:, start:end] if drafts is not None else None))
            seq.length += len(r)
            if h is not None:
                seq.hidden = h[-1]
            start = end
        return res

    @property
    def has_chain(self) -> bool:
        """Whether the module has ``chain_b1`` (a build of this compiler; an older cache entry may not)."""
        return "chain_b1" in self.meta.get("outputs", {})

    def usable_chain_drafts(self) -> int:
        """Drafts per call of a speculative chain (``spec_chain_b{K+1}``, :meth:`chain`): :attr:`chain_drafts` when
        the build has that function (an older cache entry may not), else 0 (plain chains)."""
        k = self.chain_drafts
        return k if k and f"spec_chain_b{k + 1}" in self.meta.get("outputs", {}) else 0

    def chain(
        self, token: int, n: int, seq: Sequence | None = None, temperature: float = 0.0, seed: int = 0,
        drafts: int = 0, stats: Generation | None = None,
    ) -> list[int]:  # fmt: skip
        """At least ``n`` tokens by calls queued back to back on the device: ``token`` is appended to ``seq``
        (default: the Engine's own), and each token is the first maximum of the logits after the one before it
        (``temperature > 0``: a draw from ``softmax(logits / temperature)`` by the Gumbel-max trick, its noise from
        ``seed`` and the position, :func:`compiler.graph_kernels.gumbel`; unused ids are never drawn); the last is
        not yet in the cache, like :meth:`decode`'s logits. Each call feeds its own pick to the next on the device,
        so the host neither reads logits nor waits between calls: it reads the picks once per round of calls (the
        function's ring of ``CHAIN_RING`` tokens, which counts them: a count the calls cannot give is a
        ``RuntimeError``). Greedy, the same tokens as :meth:`decode` and ``np.argmax``, which also takes the first
        maximum, over the ids a generation may pick (not the unused ones; the logits have no NaN).

        ``drafts = 0``: ``chain_b1``, one token a call, exactly ``n`` tokens. ``drafts = K > 0``: the speculative
        chain ``spec_chain_b{K+1}``. Each call verifies the last token and ``K`` drafts of the model's MTP heads in
        one step, keeps the picks up to the first draft that differs from its row's pick (1 .. K + 1 tokens: the same
        tokens as ``chain_b1``'s), and drafts the next call's rows on the device. It may return more than ``n``
        tokens (the calls of a round run to the end; every token is exact); the sequence's cache holds positions up
        to ``K`` past the last token, which later calls overwrite. Its last drafts are kept in ``seq.drafts`` for
        the next chain; ``stats`` (a :class:`Generation`) counts its drafts and accepted drafts."""
        seq = self.seq if seq is None else seq
        if not self.has_chain:
            raise ValueError(f"{self.dir.name}: no chain_b1 in this build (built by an older compiler: rebuild it)")
        self._check([int(token)])
        if n < 1 or seq.length + n > self.ctx:
            raise ValueError(f"chain of {n} steps from position {seq.length}: 1 .. {self.ctx - seq.length} fit")
        if not (0 <= temperature < math.inf and 0 <= seed < SAMPLE_SEEDS):
            raise ValueError(f"chain temperature {temperature} (finite, >= 0) or seed {seed} (0 .. {SAMPLE_SEEDS - 1})")
        fn, T = ("chain_b1", 1) if not drafts else (f"spec_chain_b{drafts + 1}", drafts + 1)
        if fn not in self.meta.get("outputs", {}):
            raise ValueError(f"{self.dir.name}: no {fn} in this build ({drafts} drafts; the model has "
                             f"{self.mtp_heads} MTP heads)")  # fmt: skip
        inv_t = 1.0 / temperature if temperature >= GREEDY_BELOW else 0.0
        start = seq.length
        # a speculative call writes up to K positions past its last token: hold the room for a round if the pool
        # has it (a reservation taken at admission usually does), else only the n tokens asked for
        if T == 1 or not self.pool.reserve(seq, min(self.ctx, start + n * T)):
            self._grow(seq, start + n)
        cap = min(self.ctx, len(seq.blocks) * self.pool.block)  # positions the sequence's blocks hold
        outs = self._out(fn)
        ring = len(outs) - 1
        R = self._result_specs[fn][ring][0][0] - 1
        if self._chain_bias is None:  # unused tokens are never picked: -inf added to their logits
            bias = np.zeros(self.vocab, np.float32)
            bias[self._never] = -np.inf
            self._chain_bias = self._tvm.runtime.tensor(bias, self.dev)
        rows = [int(token), *self._chain_first_drafts(seq, int(token), T - 1)]
        toks_t = self._in(f"{fn}_token", rows)
        args = (toks_t, self._in(f"{fn}_pos", [start + j for j in range(T)]),
                self._in(f"{fn}_table", np.repeat(seq.table(self.pool.width)[None], T, axis=0)), self._chain_bias,
                self._in(f"{fn}_sampling", [inv_t, seed], np.float32), *outs, *self.cache, *self.params)  # fmt: skip
        self.vm.set_input(fn, *args)  # once: the calls below pass the same tensors
        count = self._ring_count.get(fn)
        if count is None or count > 1 << 30:  # the device's count ring[R] from 0
            self._in_place(outs[ring], np.zeros(R + 1, np.int32))
            count = 0
        picks: list[int] = []
        calls = 0
        while len(picks) < n:
            m = min(R // T, n - len(picks), (cap - start - len(picks)) // T)  # every row of every call fits
            if m < 1:
                break  # fewer than K + 1 positions left: plain calls finish (below)
            self._ring_count.pop(fn, None)  # unknown until the calls are read back
            for _ in range(m):
                self.vm.invoke_stateful(fn)
            got = self._read(fn, ring)  # waits for the calls
            new = int(got[R]) - count
            if not m <= new <= m * T:
                raise RuntimeError(f"{fn}: {m} calls counted {new} tokens (1 .. {T} each)")
            picks += [int(got[(count + j) % R]) for j in range(new)]
            count = self._ring_count[fn] = count + new
            calls += m
        seq.length = start + len(picks)
        seq.hidden, seq.drafts = None, None  # not read back: host-driven drafting resumes after one plain step
        if T > 1:
            if stats is not None:
                stats.drafted += calls * (T - 1)
                stats.accepted += len(picks) - calls
                stats.spec_steps += calls
            if not picks:
                return self.chain(int(token), n, seq, temperature, seed)
            if len(picks) < n:
                return picks + self.chain(picks[-1], n - len(picks), seq, temperature, seed)
            last = self._read_tensor(toks_t, (T,), np.int32)  # the next call's rows: a pick and its drafts
            if int(last[0]) == picks[-1]:
                seq.drafts, seq.drafts_after = last[1:].copy(), int(last[0])
        return picks

    def _chain_first_drafts(self, seq: Sequence, token: int, k: int) -> list[int]:
        """The first call's ``k`` drafts after ``token``: those the last chain or fused step made after it, else the
        MTP heads' from ``seq.hidden``, else ``token`` repeated (rejected, most likely: one call without gain)."""
        if not k:
            return []
        if seq.drafts is not None and seq.drafts_after == token and len(seq.drafts) >= k:
            return [int(t) for t in seq.drafts[:k]]
        if seq.hidden is not None:
            return [int(t) for t in self.draft(seq.hidden[None], [token], k)[0]]
        return [token] * k

    def load_weights(self, arrays) -> None:
        """Replace the weights in place by ``arrays`` (name → array, as this entry's ``params.npz`` holds them; e.g.
        ``compiler.build.pack_for`` of a policy that training moved on). Every name, shape and dtype must match the
        entry's, else a ValueError says which and nothing changes. The compiled calls keep their bound tensors, so
        nothing is rebuilt; sequences prefilled before keep their cached keys and values."""
        new = list(checked_params(arrays, self.meta["params"], "the new weights"))
        for t, a in zip(self.params, new, strict=True):
            self._in_place(t, a)

    def _read_tensor(self, t, shape: tuple, dtype) -> np.ndarray:
        """A device tensor's contents (an input the device wrote in place) by TVM's C copy, which waits for it."""
        a = np.empty(shape, dtype)
        self._copy_to(t, ctypes.c_void_p(a.ctypes.data), a.nbytes)
        return a

    def _in_place(self, t, values: np.ndarray) -> None:
        """Refill the device tensor ``t`` from ``values`` (same shape and dtype) by TVM's C copy."""
        a = np.ascontiguousarray(values)
        self._copy_from(t, ctypes.c_void_p(a.ctypes.data), a.nbytes)

    def draft(self, hidden: np.ndarray, tokens, heads: int | None = None) -> np.ndarray:
        """Greedy draft tokens ``[n, heads]`` (default all heads) from the recurrent MTP heads, for ``n`` sequences:
        ``hidden [n, D]`` the normed hidden state at each one's last cached position (``seq.hidden``) and ``tokens``
        the token picked after it (not yet in the cache); draft ``k`` is the guess for the token ``k + 1`` places
        after that one (one ``draft{heads}_b{B}`` call per :attr:`batch_sizes` group)."""
        heads = self.mtp_heads if heads is None else heads
        if not 1 <= heads <= self.mtp_heads:
            raise ValueError(f"heads={heads}: this model has {self.mtp_heads} multi-token-prediction heads")
        hidden, tokens = np.asarray(hidden, np.float32), [int(t) for t in tokens]
        if len(tokens) != len(hidden):
            raise ValueError(f"draft needs one token per hidden state; got {len(tokens)} for {len(hidden)}")
        self._check(tokens)
        out, top = [], self.batch_sizes[-1]
        for s in range(0, len(hidden), top):
            part = hidden[s : s + top]
            B = next(b for b in self.batch_sizes if b >= len(part))
            h, t = np.zeros((B, hidden.shape[1]), np.float32), np.zeros(B, np.int32)
            h[: len(part)], t[: len(part)] = part, tokens[s : s + top]
            name = f"draft{heads}_b{B}"
            self._draft[heads, B](self._in("hidden", h, np.float32), self._in("token", t), *self._out(name),
                                  *self._draft_params)  # fmt: skip
            out.append(self._read(name, 0)[:, : len(part)].T)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _check(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab}): {bad[:5]}")

    def batcher(self, max_batch: int | None = None):
        """A :class:`runtime.batch.Batcher` over this Engine (continuous batching)."""
        from runtime.batch import Batcher

        b = Batcher(self, max_batch)
        if self.pool.n_states and b.max_batch > self.pool.n_states:
            log.warning("max_batch=%d, but this model keeps %d recurrent-state slots (Engine max_seqs): at most that "
                        "many requests run at once", b.max_batch, self.pool.n_states)  # fmt: skip
        return b

    # --- generation --------------------------------------------------------------------------------------------
    def generate_tokens(
        self, prompt: list[int], params: SamplingParams, result: Generation | None = None, heal: Heal | None = None
    ) -> Iterator[int]:
        """Yield generated ids; ``result`` (if given) gets the tokens, finish reason and timings. With ``heal`` (a
        :func:`runtime.healing.plan` of the prompt, of which ``prompt`` is the kept part) the first tokens are
        constrained to spell ``heal.prefix`` again (:class:`runtime.decoding.TokenPicker`). Generation always stops
        at :attr:`eog` tokens and never samples an unused token."""
        result = result if result is not None else Generation()
        if len(prompt) >= self.ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context of {self.ctx}")
        picker = TokenPicker(self, params, result, heal, prompt)
        self.reset()
        logits = self.prefill(prompt)
        if picker.done:
            return
        tok = picker.pick(logits, self.pos)
        yield tok
        while not picker.done:
            if self.chains(picker):
                new = self.chain_burst_for(picker, self.seq, tok)
            else:
                new = advance(self, [picker], [self.seq], [tok])[0]  # 1 .. draft_tokens + 1 tokens
            yield from new
            tok = new[-1]

    def chains(self, picker: TokenPicker) -> bool:
        """Whether the generation of ``picker`` takes its next tokens by :meth:`chain_burst_for`: chains are on, the
        module has them, and the next pick is plain greedy while the host makes no prompt-lookup drafts (they beat
        chains on the CPUs: docs/speculative.md), or a plain temperature draw while the host drafts nothing with the
        MTP heads (host drafts sample by the speculative rule, whose random stream a chain's Gumbel draws would not
        follow: a seeded sample must be the same alone, where a chain would take it, and in a batch)."""
        if not self.chain_burst or not self.has_chain:
            return False
        if picker.plain_greedy:
            return not self.lookup_tokens
        return picker.plain_sample and not self.draft_tokens

    def chain_burst_for(self, picker: TokenPicker, seq: Sequence, tok: int) -> list[int]:
        """At least :attr:`chain_burst` tokens after ``tok`` for ``seq`` by :meth:`chain` (at most the token limit
        and the context allow; with :meth:`usable_chain_drafts`, a speculative chain, which may give more), each
        pushed to ``picker`` as if picked one step at a time; those after the one that ends the generation are
        dropped, and the sequence's length set back to the tokens it really holds. The same tokens as the
        step-by-step path: greedy (``picker.plain_greedy``), each is the argmax; sampled (``picker.plain_sample``),
        each is the Gumbel-max draw of :func:`runtime.decoding.gumbel_pick` with the picker's noise seed (equal but
        for float32 ties: the device's ``log`` may differ from numpy's in the last bit)."""
        start = seq.length
        n = min(self.chain_burst, picker.limit - len(picker.result.tokens), self.ctx - start)
        p = picker.params
        temp, seed = (p.temperature, picker.noise_seed) if picker.plain_sample else (0.0, 0)
        # greedy only: a sampled token matches the heads' argmax less often (H200, T = 0.8: 31 % against 48 %), and
        # there the speculative chain was slower than the plain one (docs/speculative.md)
        drafts = self.usable_chain_drafts() if n > 1 and picker.plain_greedy else 0
        picks = self.chain(tok, n, seq, temp, seed, drafts=drafts, stats=picker.result)
        out = []
        for j, t in enumerate(picks):
            out.append(t)
            picker.push(t, start + j + 1)
            if picker.done:
                break
        if len(out) < len(picks):  # the dropped picks' keys lie past the length: overwritten later, never read
            seq.length, seq.hidden, seq.drafts = start + len(out), None, None
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def detokenize(self, ids: list[int], skip_special: bool = True) -> str:
        """The text of ``ids``; control and unused tokens are dropped unless ``skip_special=False``."""
        if skip_special:
            ids = [i for i in ids if i not in self.hidden]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def heal_plan(self, prompt: str, enabled: bool = True) -> tuple[list[int], Heal | None]:
        """The prompt's ids and, when ``enabled``, what token healing backs off (None: nothing to heal)."""
        enc = self.tokenizer.encode(prompt)
        return enc.ids, plan(enc, self.token_table) if enabled else None

    def stream_text(
        self,
        prompt: str,
        params: SamplingParams,
        result: Generation | None = None,
        token_healing: bool | None = None,
    ) -> Iterator[str]:
        """Yield the generated text in pieces (:class:`runtime.decoding.TextStream`: never inside a UTF-8
        character, stop strings cut). Token healing (:mod:`runtime.healing`) is on unless ``token_healing`` (else a
        ``token_healing`` attribute of ``params``, else the Engine's default) is False; the healed characters are
        not yielded again."""
        result = result if result is not None else Generation()
        ids, heal = self.plan_prompt(prompt, params, token_healing)
        text = TextStream(self, params, result)
        for _ in self.generate_tokens(ids[: heal.keep] if heal else ids, params, result, heal):
            piece = text.push()
            if piece:
                yield piece
        piece = text.finish()
        if piece:
            yield piece

    def plan_prompt(self, prompt: str, params: SamplingParams, token_healing: bool | None = None):
        """The prompt's ids and its token-healing plan (None: healing off or nothing to heal), ``token_healing``
        resolved as :meth:`stream_text` says."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: construct the Engine with the GGUF")
        for flag in (token_healing, getattr(params, "token_healing", None), self.token_healing):
            if flag is not None:
                break
        return self.heal_plan(prompt, bool(flag) and params.max_new_tokens > 0)

    def generate(self, prompt: str, params: SamplingParams, token_healing: bool | None = None) -> Generation:
        result = Generation()
        for _ in self.stream_text(prompt, params, result, token_healing):
            pass
        return result
