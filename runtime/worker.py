"""The server's generation thread: a bounded queue of jobs in front of continuous batching over one Engine.

The Engine is not thread-safe, so all model work runs on this thread, never in the event loop. The thread first loads
the model (``state``: loading → ready, or error), then loops: admit waiting jobs while the batch has a slot and the KV
cache has blocks for them (:meth:`runtime.batch.Batcher.admit`, oldest first), then run one
:meth:`~runtime.batch.Batcher.step` (one prefill chunk, one decode token for every running job). Jobs join and leave the
running batch between steps; each keeps its own sampling parameters and limits. A job streams ``("text", piece)`` events
and ends with ``("done", Generation)`` or ``("error", message)``; a step's events reach their jobs' asyncio queues
together, through one ``loop.call_soon_threadsafe``. ``Job.cancel()`` (a client went away) frees the job's slot and
cache blocks at the next step. :meth:`Worker.submit` raises :class:`QueueFull` when ``max_queue`` jobs already wait
(those not yet admitted: running jobs never count, and never fail for lack of cache).

    worker = Worker(lambda: Engine.from_gguf("models/small.gguf"), max_queue=16); worker.start()
    job = worker.submit("def fib(n):", SamplingParams(max_new_tokens=16), asyncio.get_running_loop())
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from model.sampling import SamplingParams
from runtime.engine import Engine, Generation

log = logging.getLogger("runtime.serve")


class QueueFull(RuntimeError):
    pass


class NotReady(RuntimeError):
    pass


@dataclass
class Job:
    prompt: str
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    n_prompt: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    request: object = None  # its runtime.batch.Request once the worker has looked at it
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def _deliver(events) -> None:
    """On the event loop: put each event in its job's queue."""
    for job, kind, value in events:
        job.events.put_nowait((kind, value))


@dataclass
class Stats:
    """Counters for ``/metrics``; written by the worker thread and the request middleware under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)  # (route, status) → count
    generations: Counter = field(default_factory=Counter)  # finish reason (or "cancelled", "error") → count
    rejected: int = 0  # queue full (429)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0  # summed over requests (they overlap when batched)
    decode_seconds: float = 0.0  # summed over requests
    busy_seconds: float = 0.0  # wall time spent in batch steps
    last_decode_tps: float = 0.0
    drafted: int = 0  # speculative decoding (Generation.drafted, .accepted, .spec_steps summed)
    accepted: int = 0
    spec_steps: int = 0
    running: int = 0  # requests in the batch
    waiting: int = 0  # taken from the queue, waiting for a slot or cache blocks
    batch: int = 0  # sequences decoded by the last step
    cache_blocks: int = 0
    cache_used: int = 0

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[route, status] += 1


class Worker:
    def __init__(
        self, load: Callable[[], Engine], max_queue: int = 16, stats: Stats | None = None, max_batch: int | None = None
    ) -> None:
        self._load = load
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.stats = stats or Stats()
        self.max_batch = max_batch
        self.state = "loading"  # loading | ready | error
        self.error: str | None = None
        self.engine: Engine | None = None
        self.batcher = None
        self._waiting: collections.deque[Job] = collections.deque()  # out of the queue, not yet admitted
        self._outbox: list[tuple[Job, str, object]] = []  # this step's events, delivered together after it
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Jobs waiting to start (the bounded queue plus those at its head waiting for room)."""
        return self._queue.qsize() + len(self._waiting)

    def submit(self, prompt: str, params: SamplingParams, loop: asyncio.AbstractEventLoop, n_prompt: int = 0) -> Job:
        if self.state != "ready":
            raise NotReady(self.error or "the model is still loading")
        job = Job(prompt, params, loop, n_prompt)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self.stats.lock:
                self.stats.rejected += 1
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting; retry later") from None
        return job

    # --- the thread ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            t0 = time.perf_counter()
            self.engine = self._load()
            self.batcher = self.engine.batcher(self.max_batch)
            self.state = "ready"
            log.info("model loaded in %.1f s", time.perf_counter() - t0)
        except Exception as e:  # stay up and say why on /health
            log.exception("loading the model failed")
            self.error, self.state = f"loading the model failed: {e}", "error"
            return
        while self._admit():
            if self.batcher.running:
                try:
                    step = self.batcher.step()
                except Exception:  # a bug, not a request's fault: fail the running jobs, keep serving
                    log.exception("batch step failed")
                    self.batcher.abort("generation failed")
                    step = None
                if step is not None:
                    self._observe(step)
            self._flush()

    def _flush(self) -> None:
        """Hand the step's events to the event loop(s) in one wake-up each (a wake-up per token made the loop and
        this thread trade the GIL once per token: the steps ran 2× slower under 16 streams)."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for job, kind, value in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, kind, value))
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the event loop closed (shutdown): nobody is listening
                for job, _, _ in events:
                    job.cancel()

    def _admit(self) -> bool:
        """Admit waiting jobs while there is room (blocking for the next job when nothing runs); False: stop."""
        while True:
            if not self._waiting:
                try:
                    job = self._queue.get(block=not self.batcher.running)
                except queue.Empty:
                    return True
                if job is None:
                    return False
                self._waiting.append(job)
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                self._count("cancelled")
                continue
            if job.request is None:
                job.request = self._request(job)
            if not self.batcher.admit(job.request):
                return True
            self._waiting.popleft()
            job.started = time.perf_counter()

    def _request(self, job: Job):
        from runtime.batch import Request

        def emit(kind: str, value) -> None:
            if kind == "done":
                self._done(job, value)
            elif kind in ("error", "cancelled"):
                self._count(kind)
            if kind != "cancelled":
                self._outbox.append((job, kind, value))

        return Request(job.prompt, job.params, emit=emit, cancelled=lambda: job.cancelled)

    def _observe(self, step) -> None:
        pool = self.engine.pool
        with self.stats.lock:
            s = self.stats
            s.busy_seconds += step.seconds
            s.running, s.waiting, s.batch = self.batcher.running, self.depth, step.batch
            s.cache_blocks, s.cache_used = pool.n_blocks, pool.used

    def _done(self, job: Job, result: Generation) -> None:
        n = len(result.tokens)
        with self.stats.lock:
            self.stats.prompt_tokens += job.n_prompt
            self.stats.completion_tokens += n
            self.stats.prompt_seconds += result.prefill_s
            self.stats.decode_seconds += result.decode_s
            self.stats.drafted += result.drafted
            self.stats.accepted += result.accepted
            self.stats.spec_steps += result.spec_steps
            if n > 1 and result.decode_s > 0:
                self.stats.last_decode_tps = (n - 1) / result.decode_s
            self.stats.generations[result.finish_reason] += 1

    def _count(self, outcome: str) -> None:
        with self.stats.lock:
            self.stats.generations[outcome] += 1
