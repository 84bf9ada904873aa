"""HTTP load generator for ``runtime.serve``: concurrent streaming clients (the real ``openai`` client), end to end.

    python -m bench.http_load --model models/small.gguf --threads 2 --concurrency 1,4,16 --requests 64 \\
        --max-tokens 64 --repeats 5 --out docs/runtime/http_load_small.json
    python -m bench.http_load --url http://127.0.0.1:8000/v1 --concurrency 8 --duration 30 --endpoint chat
    python -m bench.http_load --model models/small.gguf --concurrency 1,2 --requests 2 --max-tokens 8 --repeats 1 \\
        --check-done

The server: with ``--model`` this starts ``python -m runtime.serve`` itself (``--threads``,
``--server-args="--max-batch 8 --kv-tokens 8192"``) on a free loopback port with ``--metrics`` and a
``--max-queue`` that holds every client (unless ``--server-args`` sets one), waits until
``/health`` answers 200 (``--start-timeout``: the first start compiles the model; a server that exits or does not
become ready is one error line and its log's tail) and stops it at the end; with ``--url`` it talks to a running
server. Loopback only: a URL whose host is not ``127.0.0.1``, ``localhost`` or ``::1`` is refused.

Each concurrency level of ``--concurrency`` is a phase: that many clients send streaming requests back to back until
the level has sent ``--requests`` (default 4 per client) or ``--duration`` seconds have passed (whichever comes first
when both are given); every level is bounded by ``--level-timeout`` and every request by ``--timeout``. Request ``i``
of a level uses prompt ``i mod len(prompts)`` (a built-in list of code prompts, or ``--prompts FILE``: one prompt per
non-empty line, ``\\n`` escapes allowed) and ``seed=i``, ``--max-tokens``, ``--temperature`` (0: greedy). Before the
measured runs, ``--warmup`` bursts of ``c`` short requests per level page the weights in and start every batch size.
``--repeats`` runs every level that many times (levels interleaved: repeat 1 of every level, then repeat 2, ...), and
each figure is reported as the median over the runs with its min and max.

Figures per run of a level (:func:`summarize_level`):

* ``aggregate_tok_s``: generated tokens of every stream / the level's wall time (first request sent → last stream
  ended). Tokens are the server's ``usage.completion_tokens`` from the stream's last chunk (``runtime.serve`` always
  sends it; ``stream_options={"include_usage": true}`` is sent too, for other servers); a stream without usage
  counts its text chunks (``token_count`` says which).
* ``steady_tok_s``: the same over only the span when every client had a request in flight (from the last client's
  first request to the first client's last answer; a stream's tokens spread evenly over its text chunks): the rate
  at the full concurrency, without the ramp-up and the tail. None when the span is empty (fewer requests than
  clients, or one request per client).
* ``per_stream_tok_s``: the median over streams of (tokens − 1) / (last text chunk − first text chunk): the decode rate
  one user sees, time to first token excluded.
* ``ttft_p50_ms`` / ``ttft_p99_ms``: request sent → first chunk with text (a chat stream's role-only first chunk does
  not count), over the level's streams.
* ``tbt_p50_ms`` / ``tbt_p99_ms``: the gaps between consecutive text chunks of a stream, pooled over the level's
  streams (a chunk that carries several tokens is one gap, as vLLM's inter-token latency counts it).
* ``e2e_p50_ms``, ``requests``, ``tokens``, ``wall_s``, ``client_cpu_s`` (this process's CPU time during the level:
  the load generator shares the machine with the server), ``errors`` by kind (``http_<status>``, ``timeout``,
  ``connection``, ``stream_error`` for an error event mid-stream, ``no_finish`` for a stream that ended without a
  finish_reason, ``level_timeout``, with ``--check-done`` also ``no_done`` and ``sse_framing``, or the exception's
  name; a 5xx is an ``http_5..`` error), ``finish_reasons``, ``streams_ended`` (no error and a
  finish_reason) and, when the server has ``--metrics``, its own count of 5xx answers and of generated tokens during
  the level (``server``).

``[DONE]``: the ``openai`` client stops at ``data: [DONE]`` but also ends quietly when the connection closes cleanly
without it, so with the default client ``done`` is unknown (null). ``--check-done`` reads the streams with raw httpx
instead (:func:`parse_sse_line`): every event must be ``data: ...`` lines between blank lines, the stream must end
with ``[DONE]`` after a chunk with a finish_reason, and nothing may follow it (``streams_done`` counts them).

``--ignore-eos`` sends ``"ignore_eos": true`` (vLLM's and llama.cpp's extension) so that every stream runs to
``--max-tokens``; a server without it (``runtime.serve`` ignores unknown fields) ends greedy streams at end-of-text,
which ``finish_reasons`` shows as ``stop``. ``--compare-inprocess`` reserves the JSON's ``inprocess`` field for the
in-process figure of ``python -m runtime.bench`` at the same concurrency (not filled in yet).

The JSON (``--out``) holds the machine (CPU model, cores, ISA flags), the command line, the git commit, the server
command and, per level, every run's figures and each figure's median/min/max (``levels[].figures``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench.machine import REPO, git_commit, machine

PROMPTS = (
    "def fib(n):",
    'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n',
    "import json\n\n\ndef load_config(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def binary_search(items, target):\n",
    "# Read a CSV file and print the sum of the second column\nimport csv\n\n",
    "def quicksort(xs):\n",
    "def word_count(text: str) -> dict[str, int]:\n",
)
LOOPBACK_HOSTS = ("localhost",)
MAX_CONCURRENCY = 1024
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
MAX_REPEATS = 100
START_TIMEOUT_S = 900.0  # a clean machine compiles the model on the server's first start
URL_WAIT_S = 30.0  # for --url: a server that is still loading gets this long to answer /health 200
STOP_TIMEOUT_S = 15.0
WARMUP_MAX_TOKENS = 4
SERVER_MAX_QUEUE = 16  # runtime.serve's default --max-queue
FIGURES = ("aggregate_tok_s", "steady_tok_s", "per_stream_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms",
           "tbt_p99_ms", "e2e_p50_ms", "requests", "tokens", "wall_s", "client_cpu_s")  # fmt: skip


@dataclass
class LoadConfig:
    url: str | None = None  # a running server's base URL (".../v1"); None: start one with `model`
    model: str | None = None  # GGUF for the server this starts
    threads: int | None = None  # the started server's --threads
    server_args: tuple[str, ...] = ()
    api_key: str = "x"
    endpoint: str = "completions"  # or "chat"
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int | None = None  # per level; None (and no duration): 4 per client
    duration_s: float | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    prompts: tuple[str, ...] = PROMPTS
    ignore_eos: bool = False
    check_done: bool = False  # raw httpx SSE client instead of openai's, checking [DONE]
    repeats: int = 5
    warmup: int = 1  # bursts of `c` short requests per level before the measured runs
    timeout_s: float = 300.0  # one request
    level_timeout_s: float = 900.0  # one run of one level
    start_timeout_s: float | None = None  # None: START_TIMEOUT_S for a server this starts, URL_WAIT_S for --url
    compare_inprocess: bool = False

    def requests_for(self, concurrency: int) -> int | None:
        """The level's request budget: ``requests``, else 4 per client unless a duration bounds it."""
        if self.requests is not None:
            return self.requests
        return None if self.duration_s is not None else 4 * concurrency

    @property
    def wait_s(self) -> float:
        """How long to wait for ``/health`` to answer 200."""
        if self.start_timeout_s is not None:
            return self.start_timeout_s
        return URL_WAIT_S if self.url is not None else START_TIMEOUT_S

    def check(self) -> None:
        """Raises ValueError naming the first out-of-range setting."""
        if (self.url is None) == (self.model is None):
            raise ValueError("give exactly one of --url and --model")
        if self.url is not None:
            check_loopback(self.url)
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"--endpoint {self.endpoint}: expected completions or chat")
        if not self.concurrency or not all(1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise ValueError(f"--concurrency: expected levels in 1..{MAX_CONCURRENCY}")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"--requests {self.requests}: expected 1..{MAX_REQUESTS}")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration {self.duration_s}: expected (0, {MAX_DURATION_S:g}] seconds")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ValueError(f"--repeats {self.repeats}: expected 1..{MAX_REPEATS}")
        if self.max_tokens < 1 or self.warmup < 0:
            raise ValueError("--max-tokens must be ≥ 1 and --warmup ≥ 0")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"--temperature {self.temperature}: expected 0..2")
        if not all(t > 0 and math.isfinite(t) for t in (self.timeout_s, self.level_timeout_s, self.wait_s)):
            raise ValueError("--timeout, --level-timeout and --start-timeout must be positive")
        if not self.prompts:
            raise ValueError("no prompts")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ValueError(f"--threads {self.threads}: expected 1..1024")
        bad = [a for a in self.server_args if a.split("=")[0] in ("--host", "--port")]
        if bad:
            raise ValueError(f"--server-args {bad[0]}: the load generator picks the loopback host and a free port")


# --- statistics ------------------------------------------------------------------------------------------------------
@dataclass
class StreamRecord:
    """One streamed request, timed with ``time.perf_counter``."""

    start: float
    arrivals: list[float] = field(default_factory=list)  # when each chunk carrying text arrived
    end: float | None = None
    usage_tokens: int | None = None  # the server's usage.completion_tokens
    finish_reason: str | None = None
    error: str | None = None  # the kind; None: no error
    detail: str = ""  # the error's message
    done: bool | None = None  # [DONE] seen (only the raw client knows; None: not checked)
    client: int = 0  # which of the level's clients sent it

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.arrivals)

    @property
    def ended(self) -> bool:
        """Read to its end without an error, with a finish_reason (and [DONE], when checked)."""
        return self.error is None and self.finish_reason is not None and self.done is not False


def record_chunk(rec: StreamRecord, t: float, text: str | None, finish: str | None, usage_tokens: int | None) -> None:
    """Fold one parsed chunk that arrived at ``t`` into ``rec``."""
    if text:
        rec.arrivals.append(t)
    if finish is not None:
        rec.finish_reason = finish
    if usage_tokens is not None:
        rec.usage_tokens = usage_tokens


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), interpolating linearly between order statistics (numpy's default method);
    None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q}: expected 0..100")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ttft(rec: StreamRecord) -> float | None:
    """Seconds from the request to its first text chunk (None: no text arrived)."""
    return rec.arrivals[0] - rec.start if rec.arrivals else None


def gaps(rec: StreamRecord) -> list[float]:
    """Seconds between consecutive text chunks."""
    return [b - a for a, b in zip(rec.arrivals, rec.arrivals[1:], strict=False)]


def stream_rate(rec: StreamRecord) -> float | None:
    """Decode tokens/s of one stream: (tokens − 1) over the time from its first text chunk to its last (None with
    fewer than 2 tokens or no time between them)."""
    if rec.tokens < 2 or len(rec.arrivals) < 2:
        return None
    span = rec.arrivals[-1] - rec.arrivals[0]
    return (rec.tokens - 1) / span if span > 0 else None


def steady_window(records: list[StreamRecord], concurrency: int) -> tuple[float, float] | None:
    """The span during which every client had a request in flight: from the last client's first request to the
    first client's last answer (None when some client sent nothing or the span is empty)."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for r in records:
        first[r.client] = min(first.get(r.client, math.inf), r.start)
        last[r.client] = max(last.get(r.client, -math.inf), r.end if r.end is not None else r.start)
    if len(first) < concurrency:
        return None
    lo, hi = max(first.values()), min(last.values())
    return (lo, hi) if hi > lo else None


def steady_rate(records: list[StreamRecord], concurrency: int) -> float | None:
    """Tokens/s that arrived inside :func:`steady_window` (a stream's tokens spread evenly over its text chunks):
    the aggregate at the full concurrency, without the ramp-up and the tail where clients run out of work."""
    window = steady_window(records, concurrency)
    if window is None:
        return None
    lo, hi = window
    tokens = sum(r.tokens / len(r.arrivals) * sum(lo <= t <= hi for t in r.arrivals) for r in records if r.arrivals)
    return tokens / (hi - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def summarize_level(records: list[StreamRecord], wall_s: float, concurrency: int, client_cpu_s: float = 0.0) -> dict:
    """One run of one level: the figures of the module docstring."""
    firsts = [t for t in map(ttft, records) if t is not None]
    all_gaps = [g for r in records for g in gaps(r)]
    rates = [x for x in map(stream_rate, records) if x is not None]
    e2e = [r.end - r.start for r in records if r.end is not None]
    tokens = sum(r.tokens for r in records)
    kinds = {r.usage_tokens is not None for r in records}
    checked = [r.done for r in records if r.done is not None]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": dict(sorted(Counter(r.error for r in records if r.error).items())),
        "error_examples": sorted({f"{r.error}: {r.detail}"[:300] for r in records if r.error})[:5],
        "streams_ended": sum(r.ended for r in records),
        "all_ended": all(r.ended for r in records),
        "streams_done": sum(checked) if checked else None,
        "finish_reasons": dict(sorted(Counter(str(r.finish_reason) for r in records).items())),
        "tokens": tokens,
        "token_count": "usage" if kinds == {True} else "chunks" if kinds == {False} else "mixed",
        "wall_s": wall_s,
        "aggregate_tok_s": tokens / wall_s if wall_s > 0 else None,
        "steady_tok_s": steady_rate(records, concurrency),
        "per_stream_tok_s": statistics.median(rates) if rates else None,
        "ttft_p50_ms": _ms(percentile(firsts, 50)),
        "ttft_p99_ms": _ms(percentile(firsts, 99)),
        "tbt_p50_ms": _ms(percentile(all_gaps, 50)),
        "tbt_p99_ms": _ms(percentile(all_gaps, 99)),
        "e2e_p50_ms": _ms(percentile(e2e, 50)),
        "client_cpu_s": client_cpu_s,
    }


def spread(values: Iterable[float | None]) -> dict:
    """Median, min and max of the runs' values (None values left out; all None: all None)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def combine_runs(runs: list[dict]) -> dict:
    """A level over its repeats: each figure's spread, the errors and finish reasons summed, every stream ended?"""
    errors: Counter = Counter()
    reasons: Counter = Counter()
    server_5xx = 0
    for r in runs:
        errors.update(r["errors"])
        reasons.update(r["finish_reasons"])
        server_5xx += (r.get("server") or {}).get("http_5xx", 0)
    done = [r["streams_done"] for r in runs if r["streams_done"] is not None]
    return {
        "concurrency": runs[0]["concurrency"],
        "repeats": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "errors": dict(sorted(errors.items())),
        "server_5xx": server_5xx,
        "streams_ended": sum(r["streams_ended"] for r in runs),
        "all_ended": all(r["all_ended"] for r in runs),
        "streams_done": sum(done) if done else None,
        "finish_reasons": dict(sorted(reasons.items())),
        "figures": {k: spread(r[k] for r in runs) for k in FIGURES},
        "inprocess": None,  # python -m runtime.bench at this concurrency (--compare-inprocess; not filled in yet)
        "runs": runs,
    }


# --- SSE -------------------------------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """The server did not start or did not become ready."""


class SSEError(ValueError):
    """The stream broke the ``data: ...`` + blank line framing."""


class StatusError(RuntimeError):
    """A non-200 answer to a raw request."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def parse_sse_line(line: str, pending: list[str]) -> str | None:
    """Feed one line of an SSE body (without its line ending); returns an event's data when a blank line completes
    it. ``pending`` holds the data lines seen so far (multi-line data joins with ``\\n``, as the SSE spec says);
    comments (``:...``) and ``event:``/``id:``/``retry:`` fields are allowed; anything else raises :class:`SSEError`."""
    if line == "":
        if not pending:
            return None
        data = "\n".join(pending)
        pending.clear()
        return data
    if line.startswith(":"):
        return None
    name, _, value = line.partition(":")
    value = value.removeprefix(" ")
    if name == "data":
        pending.append(value)
    elif name not in ("event", "id", "retry"):
        raise SSEError(f"not an SSE line: {line[:80]!r}")
    return None


def chunk_fields(obj: dict, chat: bool) -> tuple[str | None, str | None, int | None]:
    """(text, finish_reason, usage.completion_tokens) of a chunk as the server sent it (JSON)."""
    choices = obj.get("choices") or []
    text = finish = None
    if choices:
        c = choices[0]
        text = (c.get("delta") or {}).get("content") if chat else c.get("text")
        finish = c.get("finish_reason")
    usage = obj.get("usage") or {}
    return text, finish, usage.get("completion_tokens")


# --- clients ---------------------------------------------------------------------------------------------------------
def request_body(cfg: LoadConfig, model: str, i: int) -> dict:
    """The JSON of request ``i`` of a level."""
    prompt = cfg.prompts[i % len(cfg.prompts)]
    body = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def _classify(e: BaseException) -> tuple[str, str]:
    import httpx
    import openai

    if isinstance(e, openai.APIStatusError):
        return f"http_{e.status_code}", str(e)
    if isinstance(e, StatusError):
        return f"http_{e.status}", str(e)
    if isinstance(e, openai.APITimeoutError | httpx.TimeoutException | TimeoutError):
        return "timeout", str(e) or type(e).__name__
    if isinstance(e, openai.APIConnectionError | httpx.TransportError):
        return "connection", str(e) or type(e).__name__
    if isinstance(e, openai.APIError):  # an error event inside a 200 stream
        return "stream_error", str(e)
    if isinstance(e, SSEError):
        return "sse_framing", str(e)
    return type(e).__name__, str(e)


async def _timed(rec: StreamRecord, coro) -> StreamRecord:
    """Run a stream reader, recording how it ended (an error kind, or no_finish) and when."""
    try:
        await coro
        if rec.finish_reason is None and rec.error is None:
            rec.error, rec.detail = "no_finish", "the stream ended without a finish_reason"
    except asyncio.CancelledError:
        rec.error, rec.detail = "level_timeout", "still running when the level's time ran out"
        raise
    except Exception as e:
        rec.error, rec.detail = _classify(e)
    finally:
        rec.end = time.perf_counter()
    return rec


def openai_streamer(client, cfg: LoadConfig) -> Callable[[StreamRecord, dict], object]:
    """A reader of one stream with the ``openai`` client's ``completions`` / ``chat.completions``."""
    chat = cfg.endpoint == "chat"
    create = client.chat.completions.create if chat else client.completions.create
    std = ("model", "max_tokens", "temperature", "seed", "stream", "stream_options", "messages", "prompt")

    async def read(rec: StreamRecord, body: dict) -> None:
        kwargs = {k: v for k, v in body.items() if k in std}
        extra = {k: v for k, v in body.items() if k not in std}
        stream = await create(**kwargs, extra_body=extra or None)
        async for chunk in stream:
            t = time.perf_counter()
            text = finish = None
            if chunk.choices:
                c = chunk.choices[0]
                text, finish = (c.delta.content, c.finish_reason) if chat else (c.text, c.finish_reason)
            usage = getattr(chunk, "usage", None)
            record_chunk(rec, t, text, finish, usage.completion_tokens if usage is not None else None)

    return read


def raw_streamer(http, cfg: LoadConfig) -> Callable[[StreamRecord, dict], object]:
    """A reader of one stream with raw httpx that checks the SSE framing and the final ``[DONE]``."""
    chat = cfg.endpoint == "chat"
    path = "chat/completions" if chat else "completions"

    async def read(rec: StreamRecord, body: dict) -> None:
        rec.done = False
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise StatusError(r.status_code, r.text[:300])
            pending: list[str] = []
            async for line in r.aiter_lines():
                t = time.perf_counter()
                data = parse_sse_line(line, pending)
                if data is None:
                    continue
                if rec.done:
                    raise SSEError(f"data after [DONE]: {data[:80]!r}")
                if data == "[DONE]":
                    rec.done = True
                    continue
                obj = json.loads(data)
                if isinstance(obj, dict) and obj.get("error"):
                    rec.error, rec.detail = "stream_error", str(obj["error"].get("message", obj["error"]))[:300]
                    continue
                if rec.finish_reason is not None:
                    raise SSEError("a chunk after the one with finish_reason")
                record_chunk(rec, t, *chunk_fields(obj, chat))
            if pending:
                raise SSEError("the stream ended inside an event (no blank line after it)")
            if not rec.done and rec.error is None:
                rec.error, rec.detail = "no_done", "the stream ended without data: [DONE]"

    return read


async def run_level(read, cfg: LoadConfig, model: str, concurrency: int, max_tokens: int | None = None,
                    requests: int | None = None, duration_s: float | None = None):  # fmt: skip
    """``concurrency`` clients sending requests back to back until ``requests`` were sent or ``duration_s`` passed;
    returns (the records in the order they were sent, the wall time in seconds)."""
    records: list[StreamRecord] = []
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + duration_s if duration_s is not None else math.inf

    async def client(k: int) -> None:
        nonlocal sent
        while (requests is None or sent < requests) and time.perf_counter() < deadline:
            i, sent = sent, sent + 1
            body = request_body(cfg, model, i)
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            rec = StreamRecord(time.perf_counter(), client=k)
            records.append(rec)
            await _timed(rec, read(rec, body))

    limit = cfg.level_timeout_s + (duration_s or 0)
    tasks = [asyncio.ensure_future(client(k)) for k in range(concurrency)]
    _, late = await asyncio.wait(tasks, timeout=limit)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ends = [r.end for r in records if r.end is not None]
    return records, (max(ends) if ends else time.perf_counter()) - t0


# --- the server ------------------------------------------------------------------------------------------------------
def check_loopback(url: str) -> None:
    """Raises ValueError unless ``url`` is http(s) on a loopback host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--url {url}: expected http://127.0.0.1:PORT/v1")
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host in LOOPBACK_HOSTS
    if not ok:
        raise ValueError(f"--url {url}: only a loopback server (127.0.0.1, localhost, ::1) may be loaded")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root(url: str) -> str:
    """The server's root (``/health``, ``/metrics``) from its API base URL."""
    return re.sub(r"/v1/?$", "", url.rstrip("/"))


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/health`` until 200; raises :class:`ServerError` when the process exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"runtime.serve exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(_root(url) + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise ServerError(f"{url}: /health did not answer 200 within {timeout_s:g} s")


def server_command(cfg: LoadConfig, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "runtime.serve", "--model", str(cfg.model), "--host", "127.0.0.1", "--port",
           str(port), "--log-level", "warning"]  # fmt: skip
    if cfg.threads is not None:
        cmd += ["--threads", str(cfg.threads)]
    if "--metrics" not in cfg.server_args:
        cmd.append("--metrics")
    if not any(a.split("=")[0] == "--max-queue" for a in cfg.server_args):  # every client may wait: no 429
        cmd += ["--max-queue", str(max(SERVER_MAX_QUEUE, *cfg.concurrency))]
    if cfg.api_key != "x" and "--api-key" not in cfg.server_args:
        cmd += ["--api-key", cfg.api_key]
    return cmd + list(cfg.server_args)


@contextlib.contextmanager
def serving(cfg: LoadConfig, info: dict) -> Iterator[str]:
    """The API base URL: ``cfg.url`` once ready, or a ``runtime.serve`` this starts (and stops on the way out)."""
    if cfg.url is not None:
        wait_ready(cfg.url, cfg.wait_s)
        yield cfg.url.rstrip("/")
        return
    port = free_port()
    cmd = server_command(cfg, port)
    info["command"] = shlex.join(["python", *cmd[1:]])
    env = {k: v for k, v in os.environ.items() if k != "TERNARY_TVM_API_KEY"}  # the key is ours, or none
    fd, log_path = tempfile.mkstemp(prefix="http_load-serve-", suffix=".log")
    ok = False
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        t0 = time.perf_counter()
        wait_ready(url, cfg.wait_s, proc)
        info["start_s"] = time.perf_counter() - t0
        yield url
        ok = True
    except BaseException:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        print(f"runtime.serve log ({log_path}):\n{tail}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        info["returncode"] = proc.returncode
        if ok:
            Path(log_path).unlink(missing_ok=True)


async def server_metrics(http) -> dict[str, float] | None:
    """The server's ``/metrics`` as {"name{labels}": value}; None without ``--metrics``."""
    import httpx

    try:
        r = await http.get(_root(str(http.base_url)) + "/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def metrics_delta(before: dict | None, after: dict | None) -> dict | None:
    """The server's 5xx answers and generated tokens between two ``/metrics`` reads."""
    if before is None or after is None:
        return None

    def diff(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    five = sum(diff(k) for k in after if k.startswith("ternary_requests_total") and re.search(r'status="5\d\d"', k))
    return {"http_5xx": int(five), "completion_tokens": int(diff("ternary_completion_tokens_total"))}


# --- the run ---------------------------------------------------------------------------------------------------------
async def measure(cfg: LoadConfig, url: str, log=print) -> tuple[str, list[dict]]:
    """Warm up, then every level ``cfg.repeats`` times (interleaved); returns the model id and the levels."""
    import httpx
    import openai

    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 8, max_keepalive_connections=max(cfg.concurrency))
    timeout = httpx.Timeout(cfg.timeout_s, connect=30)
    async with (
        httpx.AsyncClient(base_url=url + "/", headers=headers, limits=limits, timeout=timeout) as http,
        openai.AsyncOpenAI(base_url=url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout_s,
                           http_client=_openai_http_client(max(cfg.concurrency) + 8)) as client,
    ):  # fmt: skip
        model = (await client.models.list()).data[0].id
        read = raw_streamer(http, cfg) if cfg.check_done else openai_streamer(client, cfg)
        for c in cfg.concurrency:
            for _ in range(cfg.warmup):
                recs, _ = await run_level(read, cfg, model, c, max_tokens=min(WARMUP_MAX_TOKENS, cfg.max_tokens),
                                          requests=c)  # fmt: skip
                bad = Counter(r.error for r in recs if r.error)
                if bad:
                    log(f"warm-up at concurrency {c}: errors {dict(bad)}")
        for c in cfg.concurrency:
            n = cfg.requests_for(c)
            if n is not None and n < c:
                log(f"concurrency {c} with {n} requests per level: only {n} clients will be busy")
        runs: dict[int, list[dict]] = {c: [] for c in cfg.concurrency}
        for rep in range(cfg.repeats):
            for c in cfg.concurrency:
                before = await server_metrics(http)
                cpu0 = time.process_time()
                recs, wall = await run_level(read, cfg, model, c, requests=cfg.requests_for(c),
                                             duration_s=cfg.duration_s)  # fmt: skip
                summary = summarize_level(recs, wall, c, time.process_time() - cpu0)
                summary["server"] = metrics_delta(before, await server_metrics(http))
                runs[c].append(summary)
                log(f"run {rep + 1}/{cfg.repeats} concurrency {c}: {summary['requests']} requests, "
                    f"{_fmt(summary['aggregate_tok_s'])} tok/s, errors {summary['errors'] or 0}")  # fmt: skip
    return model, [combine_runs(runs[c]) for c in cfg.concurrency]


def run(cfg: LoadConfig, argv: list[str] | None = None, log=print) -> dict:
    """The whole benchmark: the JSON document."""
    cfg.check()
    server: dict = {"url": cfg.url}
    t0 = time.perf_counter()
    with serving(cfg, server) as url:
        server["url"] = url
        model, levels = asyncio.run(measure(cfg, url, log))
    settings = dataclasses.asdict(cfg)
    settings["prompts"] = len(cfg.prompts)
    settings["api_key"] = "***" if cfg.api_key != "x" else "x"
    server["command"] = redact(server.get("command"))
    return {
        "command": redact(shlex.join(["python", "-m", "bench.http_load", *(sys.argv[1:] if argv is None else argv)])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "git": git_commit(),
        "machine": machine(),
        "server": server,
        "model": model,
        "client": "httpx (raw SSE, [DONE] checked)" if cfg.check_done else "openai " + _openai_version(),
        "config": settings,
        "elapsed_s": time.perf_counter() - t0,
        "inprocess": {"source": "python -m runtime.bench", "levels": None} if cfg.compare_inprocess else None,
        "ok": all(lv["all_ended"] and not lv["errors"] and not lv["server_5xx"] for lv in levels),
        "levels": levels,
    }


def redact(command: str | None) -> str | None:
    """``command`` with the value of ``--api-key`` hidden (the JSON gets committed)."""
    if command is None:
        return None
    return re.sub(r"(--api-key[= ])('[^']*'|\S+)", r"\1***", command)


def _openai_http_client(connections: int):
    """openai's own HTTP client, keeping every connection alive (its default keeps 100: more clients than that would
    reconnect for every request)."""
    import openai

    try:  # openai 3 runs on httpx2, earlier versions on httpx
        import httpx2 as hx
    except ImportError:
        import httpx as hx
    return openai.DefaultAsyncHttpxClient(limits=hx.Limits(max_connections=connections,
                                                           max_keepalive_connections=connections))  # fmt: skip


def _openai_version() -> str:
    import openai

    return openai.__version__


def isa_summary(isa: list[str]) -> str:
    """``avx512+vnni+vbmi``-like: the widest vector ISA and its integer dot-product extensions."""
    base = "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa else "no avx2"
    ext = [x for x in ("vnni", "vbmi") if f"avx512_{x}" in isa] if base == "avx512" else []
    if base == "avx2" and "avx_vnni" in isa:
        ext = ["vnni"]
    return "+".join([base, *ext])


def rounded(obj, digits: int = 4):
    """``obj`` with every float rounded to ``digits`` decimals (the JSON stays readable)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(doc: dict) -> str:
    """The levels as a text table: each figure's median [min–max] over the repeats."""
    cols = [("agg tok/s", "aggregate_tok_s"), ("steady tok/s", "steady_tok_s"), ("stream tok/s", "per_stream_tok_s"),
            ("TTFT p50", "ttft_p50_ms"), ("TTFT p99", "ttft_p99_ms"), ("TBT p50", "tbt_p50_ms"),
            ("TBT p99", "tbt_p99_ms")]  # fmt: skip
    m, c = doc["machine"], doc["config"]
    lines = [f"{m['cpu']} ({m['cores_usable']} cores, {isa_summary(m['isa'])}); {doc['model']} via "
             f"{c['endpoint']}, max_tokens {c['max_tokens']}, temperature {c['temperature']:g}, {c['repeats']} "
             f"repeat(s): median [min-max], times in ms"]  # fmt: skip
    rows = [["conc", "reqs", *(h for h, _ in cols), "errors", "ended", "finish"]]
    for lv in doc["levels"]:
        cells = [str(lv["concurrency"]), str(lv["requests"])]
        for _, k in cols:
            f = lv["figures"][k]
            cell = _fmt(f["median"])
            if f["n"] > 1:
                cell += f" [{_fmt(f['min'])}-{_fmt(f['max'])}]"
            cells.append(cell)
        errs = dict(lv["errors"]) | ({"server_5xx": lv["server_5xx"]} if lv["server_5xx"] else {})
        ended = f"{lv['streams_ended']}/{lv['requests']}"
        if lv["streams_done"] is not None:
            ended += f" done {lv['streams_done']}"
        finish = " ".join(f"{k}:{v}" for k, v in lv["finish_reasons"].items())
        cells += [" ".join(f"{k}:{v}" for k, v in errs.items()) or "0", ended, finish]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:  # numbers right-aligned, the last column (finish reasons) left
        cells = [x.rjust(w) for x, w in zip(r[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, r[-1]]))
    return "\n".join(lines)


def read_prompts(path: str) -> tuple[str, ...]:
    """One prompt per non-empty line; ``\\n`` and ``\\t`` escapes are expanded."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(ln.replace("\\n", "\n").replace("\\t", "\t") for ln in lines if ln.strip())


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of integers") from None


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.http_load", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server's API base, http://127.0.0.1:PORT/v1 (loopback only)")
    src.add_argument("--model", help="start runtime.serve with this GGUF on a free loopback port")
    p.add_argument("--threads", type=int, default=None, help="the started server's --threads (default: its own)")
    p.add_argument(
        "--server-args",
        default="",
        help='more arguments for the started server, one shell string: --server-args="--max-batch 8"',
    )
    p.add_argument("--api-key", default="x", help="Bearer key (sent to a started server too unless 'x')")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--concurrency", type=_levels, default=(1, 4, 16), help="levels, e.g. 1,4,16; each is a phase")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 per client)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level (instead of, or with, --requests)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts", default=None, help="a file with one prompt per line (default: built-in code prompts)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/llama.cpp; runtime.serve ignores)")
    p.add_argument("--check-done", action="store_true", help="read streams with raw httpx and check data: [DONE]")
    p.add_argument("--repeats", type=int, default=5, help="runs of every level; figures are medians over them")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured bursts of c short requests per level")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--level-timeout", type=float, default=900.0, help="seconds one run of a level may take")
    p.add_argument("--start-timeout", type=float, default=None,
                   help=f"seconds to wait for /health 200 (default: {START_TIMEOUT_S:g} for a server this starts, "
                   f"{URL_WAIT_S:g} for --url)")  # fmt: skip
    p.add_argument(
        "--compare-inprocess",
        action="store_true",
        help="reserve the JSON's 'inprocess' field for runtime.bench's figures (not filled in yet)",
    )
    p.add_argument("--out", default=None, help="write the JSON here (e.g. docs/runtime/http_load_<name>.json)")
    a = p.parse_args(argv)
    try:
        prompts = read_prompts(a.prompts) if a.prompts else PROMPTS
        server_args = tuple(shlex.split(a.server_args))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        p.error(str(e))
    cfg = LoadConfig(a.url, a.model, a.threads, server_args, a.api_key, a.endpoint, a.concurrency, a.requests,
                     a.duration, a.max_tokens, a.temperature, prompts, a.ignore_eos, a.check_done, a.repeats, a.warmup,
                     a.timeout, a.level_timeout, a.start_timeout, a.compare_inprocess)  # fmt: skip
    try:
        cfg.check()
    except ValueError as e:
        p.error(str(e))
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, a = parse_args(argv)
    try:
        doc = run(cfg, argv, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(doc))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rounded(doc), indent=1) + "\n")
        print(f"wrote {out}")
    if not doc["ok"]:
        print("errors, 5xx or streams that did not end properly: see the table", file=sys.stderr)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
