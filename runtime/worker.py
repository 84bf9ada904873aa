"""The server's one generation thread: a bounded queue of jobs in front of one :class:`runtime.engine.Engine`.

The Engine runs one sequence at a time and is not thread-safe, so every generation runs on this thread, never in the
event loop. The thread first loads the model (``state``: loading → ready, or error), then takes jobs in order. A job
streams ``("text", piece)`` events and ends with ``("done", Generation)`` or ``("error", message)``; they reach the
job's asyncio queue through ``loop.call_soon_threadsafe``. ``Job.cancel()`` (a client went away) is checked between
text pieces and before a queued job starts, so the slot frees within a token. :meth:`Worker.submit` raises
:class:`QueueFull` when ``max_queue`` jobs already wait.

    worker = Worker(lambda: Engine.from_gguf("models/small.gguf"), max_queue=16); worker.start()
    job = worker.submit("def fib(n):", SamplingParams(max_new_tokens=16), asyncio.get_running_loop())
"""

from __future__ import annotations

import asyncio
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
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed (shutdown): nobody is listening
            self.cancel()


@dataclass
class Stats:
    """Counters for ``/metrics``; written by the worker thread and the request middleware under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)  # (route, status) → count
    generations: Counter = field(default_factory=Counter)  # finish reason (or "cancelled", "error") → count
    rejected: int = 0  # queue full (429)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    last_decode_tps: float = 0.0
    busy: int = 0

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[route, status] += 1


class Worker:
    def __init__(self, load: Callable[[], Engine], max_queue: int = 16, stats: Stats | None = None) -> None:
        self._load = load
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.stats = stats or Stats()
        self.state = "loading"  # loading | ready | error
        self.error: str | None = None
        self.engine: Engine | None = None
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

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
            self.state = "ready"
            log.info("model loaded in %.1f s", time.perf_counter() - t0)
        except Exception as e:  # stay up and say why on /health
            log.exception("loading the model failed")
            self.error, self.state = f"loading the model failed: {e}", "error"
            return
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                self._count("cancelled")
                continue
            with self.stats.lock:
                self.stats.busy = 1
            try:
                self._generate(job)
            finally:
                with self.stats.lock:
                    self.stats.busy = 0

    def _generate(self, job: Job) -> None:
        job.started = time.perf_counter()
        result = Generation()
        try:
            with contextlib.closing(self.engine.stream_text(job.prompt, job.params, result)) as pieces:
                for piece in pieces:
                    if job.cancelled:
                        break
                    job.emit("text", piece)
        except Exception as e:
            log.exception("generation failed")
            self._count("error")
            job.emit("error", str(e))
            return
        n = len(result.tokens)
        with self.stats.lock:
            self.stats.prompt_tokens += job.n_prompt
            self.stats.completion_tokens += n
            if not job.cancelled:
                self.stats.prompt_seconds += result.prefill_s
                self.stats.decode_seconds += result.decode_s
                if n > 1 and result.decode_s > 0:
                    self.stats.last_decode_tps = (n - 1) / result.decode_s
        self._count("cancelled" if job.cancelled else result.finish_reason)
        if not job.cancelled:
            job.emit("done", result)

    def _count(self, outcome: str) -> None:
        with self.stats.lock:
            self.stats.generations[outcome] += 1
