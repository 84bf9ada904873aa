"""Continuous batching: many generations over one :class:`runtime.engine.Engine`, joined and left between steps.

Each :meth:`Batcher.step` does, in order:

1. drops the requests whose clients went away (their cache blocks are free for the next admission);
2. prefills **one chunk** of the oldest request that still has prompt tokens (so a long prompt delays the running
   streams by one chunk per step, never by its whole length); a request whose prompt is done samples its first token;
3. decodes **one token for every other running request in one call** (:meth:`Engine.step`: each ternary matrix is
   read once for the whole batch), and each samples its next token with its own parameters, seed, stop strings,
   penalties, token healing and limit (:mod:`runtime.decoding`). On a model with multi-token-prediction heads each
   request also verifies its drafted tokens in that call and may gain several tokens (:mod:`runtime.spec_decode`).
   A request running alone whose next pick is plain greedy runs a burst of steps on the device instead
   (:meth:`Engine.chain_burst_for`: no host round trip between them; the same tokens).

Admission (:meth:`Batcher.admit`) reserves a request's cache blocks for its whole possible length (prompt plus
``max_new_tokens``, at most the context) up front, so a running request never fails for lack of cache: when the
pool is short (or, on a model with DeltaNet layers, every recurrent-state slot is held: :mod:`runtime.kv_cache`) the
request is refused and the caller keeps it waiting. A request's events go to its ``emit``
callback: ``("text", piece)`` as its text grows, then ``("done", Generation)``, ``("error", message)`` or, once its
client is gone, ``("cancelled", None)``.

A sequence's tokens are the same alone or in any batch (the compiled rows are independent: ``tests/test_batch.py``).

    batcher = Batcher(engine)
    batcher.admit(Request("def fib(n):", SamplingParams(max_new_tokens=32), emit=print))
    while batcher.running:
        batcher.step()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from model.sampling import Generation, SamplingParams
from runtime.decoding import TextStream, TokenPicker
from runtime.kv_cache import Sequence
from runtime.spec_decode import advance

log = logging.getLogger("runtime.batch")


def _never() -> bool:
    return False


@dataclass
class Request:
    """One generation: a text prompt (token healing as the Engine's default unless ``token_healing`` says) or
    ``prompt_ids`` (no healing), its sampling parameters, where its events go, and whether its client is gone."""

    prompt: str | None
    params: SamplingParams
    emit: Callable[[str, object], None] = lambda kind, value: None
    cancelled: Callable[[], bool] = _never
    prompt_ids: list[int] | None = None
    token_healing: bool | None = None
    result: Generation = field(default_factory=Generation)
    # the Batcher's state
    seq: Sequence = field(default_factory=Sequence)
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet prefilled
    next_token: int | None = None  # sampled, to be decoded next step
    picker: TokenPicker | None = None
    text: TextStream | None = None


@dataclass
class StepStats:
    """What the last step did (for ``/metrics`` and the benchmarks)."""

    batch: int = 0  # sequences decoded
    prefill_tokens: int = 0
    seconds: float = 0.0


class Batcher:
    """Requests in flight over one Engine (not thread-safe: one thread admits and steps). ``max_batch``: at most
    this many running requests (default: the largest compiled decode batch)."""

    def __init__(self, engine, max_batch: int | None = None) -> None:
        self.engine = engine
        self.max_batch = int(max_batch or engine.batch_sizes[-1])
        self.requests: list[Request] = []  # admission order
        self.last = StepStats()

    @property
    def running(self) -> int:
        return len(self.requests)

    def admit(self, req: Request) -> bool:
        """Start ``req`` if there is room (a batch slot and cache blocks for its whole length); False leaves it to
        the caller to retry after a step. A request that can never run (a prompt beyond the context, a bad token
        id) gets an ``error`` event and counts as handled (True)."""
        if len(self.requests) >= self.max_batch:
            return False
        eng = self.engine
        try:
            if req.prompt_ids is not None:
                ids, heal = [int(t) for t in req.prompt_ids], None
                eng._check(ids)
            else:
                ids, heal = eng.plan_prompt(req.prompt, req.params, req.token_healing)
            keep = ids[: heal.keep] if heal else ids
            if not keep:
                raise ValueError("the prompt is empty")
            if len(keep) >= eng.ctx:
                raise ValueError(f"prompt of {len(keep)} tokens leaves no room in the context of {eng.ctx}")
            picker = TokenPicker(eng, req.params, req.result, heal, keep)
        except ValueError as exc:
            req.emit("error", str(exc))
            return True
        if not eng.pool.reserve(req.seq, min(eng.ctx, len(keep) + picker.limit)):
            return False
        req.todo, req.picker, req.text = keep, picker, TextStream(eng, req.params, req.result)
        self.requests.append(req)
        return True

    def step(self) -> StepStats:
        """One round: drop cancelled requests, prefill one chunk, decode every running sequence once (a request
        running alone with plain greedy decoding: a burst of ``Engine.chain_burst`` steps on the device)."""
        t0 = time.perf_counter()
        eng, stats = self.engine, StepStats()
        for req in [r for r in self.requests if r.cancelled()]:
            self._end(req, None)
        pre = next((r for r in self.requests if r.todo), None)
        if pre is not None:
            part, pre.todo = pre.todo[: eng.chunk], pre.todo[eng.chunk :]
            logits = eng.prefill_chunk(pre.seq, part, logits=not pre.todo)  # the prompt's last chunk: its logits
            stats.prefill_tokens = len(part)
            if not pre.todo:
                self._pick(pre, logits)
        live = [r for r in self.requests if r.next_token is not None]
        if live:
            try:
                if len(live) == 1 and pre is None and eng.chains(live[0].picker):  # alone: a chain of steps
                    out = [eng.chain_burst_for(live[0].picker, live[0].seq, live[0].next_token)]
                else:
                    out = advance(eng, [r.picker for r in live], [r.seq for r in live], [r.next_token for r in live])
            except Exception as exc:  # the step failed for every sequence in it: say so to each, keep serving
                log.exception("decode step failed")
                for r in live:
                    self._end(r, str(exc))
                live, out = [], []
            for r, new in zip(live, out, strict=True):
                r.next_token = new[-1]
                self._emit(r)
        stats.batch, stats.seconds = len(live), time.perf_counter() - t0
        self.last = stats
        return stats

    def _pick(self, req: Request, logits) -> None:
        if not req.picker.done:  # (max_new_tokens = 0 is done before its first token)
            req.next_token = req.picker.pick(logits, req.seq.length)
        self._emit(req)

    def _emit(self, req: Request) -> None:
        """Send the text the new tokens completed; end the request if its generation is done."""
        if not req.picker.done:
            piece = req.text.push()
            if piece:
                req.emit("text", piece)
            return
        piece = req.text.push() + req.text.finish()
        if piece:
            req.emit("text", piece)
        self._end(req, "")

    def abort(self, message: str) -> None:
        """End every running request with an ``error`` event (the step itself failed)."""
        for req in list(self.requests):
            self._end(req, message)

    def _end(self, req: Request, error: str | None) -> None:
        """Free ``req``'s blocks and say how it ended: ``error`` None: cancelled, "": done, else the message."""
        self.requests.remove(req)
        self.engine.pool.release(req.seq)
        req.next_token = None
        if error is None:
            req.emit("cancelled", None)
        elif error:
            req.emit("error", error)
        else:
            req.emit("done", req.result)

    def run(self, requests: list[Request]) -> list[Generation]:
        """Every request to its end (admitting as room frees up); their results in order. For benchmarks and
        tests: the server admits from its queue between steps instead."""
        waiting = list(requests)
        while waiting or self.requests:
            while waiting and self.admit(waiting[0]):
                waiting.pop(0)
            if not self.requests and waiting:
                raise RuntimeError("a request needs more KV cache than the pool holds")
            self.step()
        return [r.result for r in requests]
