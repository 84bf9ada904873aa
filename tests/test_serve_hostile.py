"""runtime.serve against hostile requests and a hostile chat template, through the real server (issue 13).

    pytest -q tests/test_serve_hostile.py

The ``hostile`` server is ``python -m runtime.serve`` with the shipped model, ``--read-timeout 1`` and a chat template
(``--chat-template``) that renders like the default one unless a message's content is a trigger (``@spin``,
``@center``, ...), which makes it misbehave in that way. Every user-input failure must be a 4xx in OpenAI's error shape
with no stack trace in the server's log, and ``/health`` must answer in under 100 ms while a runaway template or a
large tokenize is being handled. The in-process app over a fake engine (``serve_helpers.run_app``) covers a generation
that fails mid-stream and a template refused when the model loads.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import FAIL, FakeBackend, assert_error, run_app, start_server, stop_server

from runtime.chat_template import DEFAULT_CHAT_TEMPLATE
from runtime.serve import MAX_DETOKENIZE_TOKENS, MAX_TOKENIZE_CHARS, ServeConfig

pytestmark = pytest.mark.e2e

HEALTH_BOUND_S = 0.1  # issue 13: /health answers in < 100 ms while a hostile request is handled
STALL_S = 0.5  # a stalled event loop (the template or tokenizer in it) took 0.5 to 3 s and more per request
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SPIN = "{% for i in range(9000) %}{% for j in range(9000) %}{% for k in range(9000) %}" + "{% endfor %}" * 3
TRIGGERS = {  # content → what the template does with it
    "@spin": SPIN,  # ~7e11 empty iterations: only the wall-time budget stops it
    "@range_float": "{{ range(1e8) | length }}",  # a TypeError in jinja2 (was a 500)
    "@range_big": "{% for i in range(99999) %}{% endfor %}",
    "@repeat": "{{ 'x' * 10**9 }}",
    "@center": "{{ 'x' | center(10**9) }}",  # a 1 GB string in one filter call: the memory budget
    "@double": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s }}",
    "@output": "{% for i in range(9000) %}{{ 'y' * 1000 }}{% endfor %}",  # 9 MB of prompt
    "@recurse": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "@unsafe": "{{ ''.__class__.__mro__ }}",
    "@raise": "{{ raise_exception('this template refuses @raise') }}",
}
HOSTILE_TEMPLATE = (
    "{% for m in messages %}"
    + "".join(f"{{% if m['content'] == '{t}' %}}{body}{{% endif %}}" for t, body in TRIGGERS.items())
    + "{% endfor %}"
    + DEFAULT_CHAT_TEMPLATE
)
TEXT = "def f(x):\n    return x * 2  # ünïcode ✓\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hostile.jinja"
    template.write_text(HOSTILE_TEMPLATE)
    srv = start_server("--chat-template", str(template), "--read-timeout", "1", "--template-timeout", "1")
    yield srv
    stop_server(srv)


def assert_clean_log(srv) -> None:
    log = srv.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log, srv.log_tail()


def post_raw(srv, path: str, body: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(srv.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=timeout)


def health_while(url: str, busy: threading.Thread, max_s: float = 60) -> list[float]:
    """/health round trips (seconds, on one keep-alive connection) for as long as ``busy`` runs."""
    out = []
    deadline = time.monotonic() + max_s
    with httpx.Client(base_url=url, timeout=5) as c:
        c.get("/health")  # connect first: the latencies are the server's, not the TCP handshake's
        while busy.is_alive() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            out.append(time.perf_counter() - t0)
    return out


def assert_health_fast(latencies: list[float]) -> None:
    """Every /health under 100 ms, but for one in 50 (at least one) under 500 ms: on a loaded machine the scheduler
    alone delays a few answers that much (measured: 106 ms worst of 300 with no request in flight, load average 7 on
    2 cores), where a stalled event loop delays every answer due while it is stalled by 0.5 s or more."""
    slow = [t for t in latencies if t >= HEALTH_BOUND_S]
    assert len(slow) <= max(1, len(latencies) // 50) and max(latencies) < STALL_S, (len(latencies), sorted(slow))


def in_thread(fn) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    thread.start()
    return thread, results


def chat(srv, content: str, timeout: float = 30, **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0} | kw
    return httpx.post(srv.url + CHAT, json=body, timeout=timeout)


# --- the chat template -------------------------------------------------------------------------------------------
def test_runaway_template_is_400_and_health_stays_fast(hostile):
    def spin_twice():
        return [chat(hostile, "@spin") for _ in range(2)]

    thread, results = in_thread(spin_twice)
    latencies = health_while(hostile.url, thread)
    thread.join(30)
    assert not thread.is_alive() and len(results) == 1
    for resp in results[0]:
        err = assert_error(resp, 400, "messages", "chat_template_budget")
        assert "1 s budget" in err["message"]
    assert len(latencies) >= 10, latencies  # two renders of 1 s each: /health was asked all along
    assert_health_fast(latencies)
    assert chat(hostile, "hi").status_code == 200  # the renderer was restarted
    assert_clean_log(hostile)


@pytest.mark.parametrize(
    ("trigger", "code", "says"),
    [
        ("@range_float", "chat_template_error", "TypeError"),
        ("@range_big", "chat_template_budget", "range"),
        ("@repeat", "chat_template_budget", "repetition"),
        ("@center", "chat_template_budget", "memory"),
        # doubling a string to 512 MiB copies and faults in ~0.5 GB in the niced child: on a loaded 2-core VM that can
        # take past the 1 s wall budget, so either budget may stop it (@center checks the memory message itself)
        ("@double", "chat_template_budget", ("memory budget", "1 s budget")),
        ("@output", "chat_template_budget", "characters"),
        ("@recurse", "chat_template_error", "RecursionError"),
        ("@unsafe", "chat_template_error", "unsafe"),
        ("@raise", "chat_template_raised", "this template refuses @raise"),
    ],
)
def test_template_failures_are_400(hostile, trigger, code, says):
    t0 = time.perf_counter()
    err = assert_error(chat(hostile, trigger), 400, "messages", code)
    assert any(w in err["message"] for w in ((says,) if isinstance(says, str) else says)), err
    assert time.perf_counter() - t0 < 10
    ok = chat(hostile, "hi")  # the same server, a benign conversation
    assert ok.status_code == 200, ok.text
    assert_clean_log(hostile)


def test_template_refused_when_the_model_loads():
    """A template that cannot render one user turn within its budget is refused once, at load: chat requests get a
    400 at once (no render), completions still work."""
    backend = FakeBackend(ServeConfig(chat_template=SPIN, template_timeout_s=0.5))
    with run_app(backend) as url:
        t0 = time.perf_counter()
        resp = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        err = assert_error(resp, 400, "messages", "chat_template_refused")
        assert "budget" in err["message"] and time.perf_counter() - t0 < 0.5
        assert httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}, timeout=10).status_code == 200


def test_renders_waiting_behind_a_runaway_template_are_bounded():
    """A flood of chat requests that each take the whole budget: one renders, ``max_queue`` wait, the rest get 429 at
    once, and every request is answered."""
    import asyncio

    backend = FakeBackend(ServeConfig(chat_template=HOSTILE_TEMPLATE, template_timeout_s=1.0, max_queue=2))

    async def flood(url):
        body = {"messages": [{"role": "user", "content": "@spin"}], "max_tokens": 1}
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(c.post(CHAT, json=body) for _ in range(8)))

    with run_app(backend) as url:
        answers = asyncio.run(asyncio.wait_for(flood(url), 60))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {400, 429} and codes.count(400) >= 3, codes  # 3 when all 8 arrive within the first render
    assert all(r.json()["error"]["code"] in ("chat_template_budget", "queue_full") for r in answers)


# --- tokenize and long prompts ------------------------------------------------------------------------------------
def test_tokenize_and_detokenize_are_capped(hostile):
    at_cap = (TEXT * (MAX_TOKENIZE_CHARS // len(TEXT) + 1))[:MAX_TOKENIZE_CHARS]
    with httpx.Client(base_url=hostile.url, timeout=30) as c:
        ok = c.post("/tokenize", json={"content": at_cap, "with_pieces": True})
        assert ok.status_code == 200, ok.text
        pieces = ok.json()["tokens"]
        assert [p["id"] for p in pieces] == c.post("/tokenize", json={"content": at_cap}).json()["tokens"]
        assert_error(c.post("/tokenize", json={"content": at_cap + "x"}), 413, "content", "request_too_large")
        assert_error(c.post("/detokenize", json={"tokens": [1] * (MAX_DETOKENIZE_TOKENS + 1)}), 413, "tokens")
        ids = [p["id"] for p in pieces]
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"content": at_cap}


def test_health_stays_fast_during_large_tokenizes_and_prompts(hostile):
    at_cap = (TEXT * (MAX_TOKENIZE_CHARS // len(TEXT) + 1))[:MAX_TOKENIZE_CHARS]
    near_1mib = ("def f(x):\n    return x * 2  # a comment\n" * 30000)[:990_000]  # ASCII: 1 MB, under 1 MiB
    bodies = [
        ("/tokenize", {"content": at_cap, "with_pieces": True}),  # the largest accepted, with a piece per token
        ("/tokenize", {"content": near_1mib, "with_pieces": True}),
        (COMPLETIONS, {"prompt": near_1mib[:300_000], "max_tokens": 1}),  # tokenized, then over the context
        (COMPLETIONS, {"prompt": near_1mib, "max_tokens": 1}),
        (CHAT, {"messages": [{"role": "user", "content": near_1mib}], "max_tokens": 1}),
    ]

    def send_all():
        with httpx.Client(base_url=hostile.url, timeout=60) as c:
            return [c.post(path, json=body).status_code for _ in range(3) for path, body in bodies]

    thread, results = in_thread(send_all)
    latencies = health_while(hostile.url, thread)
    thread.join(60)
    assert results and results[0] == [200, 413, 400, 400, 400] * 3
    assert len(latencies) >= 10, latencies
    assert_health_fast(latencies)
    assert_clean_log(hostile)


# --- text that is not Unicode, numbers that are not numbers ---------------------------------------------------------
LONE = "a\ud800b"  # json.dumps writes it as the escape \ud800, which Python's JSON reader turns back into a surrogate
PART = {"type": "text", "text": LONE}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": LONE}, "prompt"),
        (COMPLETIONS, {"prompt": [LONE]}, "prompt.0"),
        (COMPLETIONS, {"prompt": "x", "stop": [LONE]}, "stop.0"),
        (COMPLETIONS, {"prompt": "x", "model": LONE}, "model"),
        (CHAT, {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
        (CHAT, {"messages": [{"role": "user", "content": [PART]}]}, "messages.0.content.0.text"),
        ("/tokenize", {"content": "\udfff"}, "content"),
    ],
)
def test_lone_surrogates_are_400(hostile, path, body, param):
    err = assert_error(post_raw(hostile, path, json.dumps(body).encode()), 400, param)
    assert "surrogate" in err["message"], err
    assert_clean_log(hostile)


@pytest.mark.parametrize("raw", [b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xed\xa0\x80"}', b'{"content": "caf\xe9"}'])
def test_body_that_is_not_utf8_is_400(hostile, raw):
    path = "/tokenize" if b"content" in raw else COMPLETIONS
    err = assert_error(post_raw(hostile, path, raw), 400, code="invalid_utf8")
    assert "UTF-8" in err["message"]
    assert_clean_log(hostile)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
        (b'{"prompt": "x", "frequency_penalty": -Infinity}', "frequency_penalty"),
        (b'{"prompt": "x", "presence_penalty": 1e308}', "presence_penalty"),
        (b'{"prompt": "x", "top_k": 1000000000000000000000000000000}', "top_k"),
        (b'{"prompt": "x", "max_tokens": -5}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 1000000000000000000000000000000}', "max_tokens"),
        (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
        (b'{"prompt": "x", "seed": -1}', "seed"),
        (b"[" * 100_000 + b"]" * 100_000, None),  # nested past the JSON reader's recursion limit
    ],
)
def test_absurd_numbers_are_400(hostile, raw, param):
    assert_error(post_raw(hostile, COMPLETIONS, raw), 400, param)
    assert_clean_log(hostile)


def test_tiny_temperature_is_greedy_and_huge_top_k_keeps_every_token(hostile):
    body = {"prompt": "def fib(n):", "max_tokens": 8}
    greedy = post_raw(hostile, COMPLETIONS, json.dumps(body | {"temperature": 0}).encode())
    assert greedy.status_code == 200, greedy.text
    for extra in ({"temperature": 1e-45}, {"temperature": 0.001, "top_p": 1e-45}, {"temperature": 0, "top_k": 10**6}):
        resp = post_raw(hostile, COMPLETIONS, json.dumps(body | extra).encode())
        assert resp.status_code == 200, (extra, resp.text)
        assert resp.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"], extra
    with httpx.stream("POST", hostile.url + COMPLETIONS, json=body | {"temperature": 1e-45, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    assert_clean_log(hostile)


# --- slow clients ----------------------------------------------------------------------------------------------------
def _closed_within(sock: socket.socket, trickle: bytes | None, bound_s: float) -> tuple[float | None, bytes]:
    """Seconds until the server closes ``sock`` (None: not within ``bound_s``), sending ``trickle`` every 0.2 s,
    and what it answered."""
    t0, got = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < bound_s:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if trickle:
                try:
                    sock.sendall(trickle)
                except OSError:
                    return time.monotonic() - t0, got
            continue
        except ConnectionResetError:
            return time.monotonic() - t0, got
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    return None, got


@pytest.mark.parametrize(
    ("opening", "trickle"),
    [
        (b"", None),  # connects, says nothing
        (b"POST /tokenize HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n"),  # a header line every 0.2 s, forever
        (b"G", b"E"),  # the request line, a byte at a time
    ],
)
def test_slow_header_clients_are_dropped(hostile, opening, trickle):
    port = int(hostile.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(opening)
        elapsed, got = _closed_within(sock, trickle, bound_s=6)
    assert elapsed is not None, "the server kept a slow client for 6 s (--read-timeout 1)"
    assert got == b""  # dropped, not answered
    assert httpx.get(hostile.url + "/health", timeout=5).status_code == 200


def test_slow_body_is_408(hostile):
    port = int(hostile.url.rsplit(":", 1)[1])
    head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b'{"content": "')
        elapsed, got = _closed_within(sock, b"x", bound_s=6)
    assert elapsed is not None and got.startswith(b"HTTP/1.1 408"), got[:200]
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_keep_alive_still_serves_a_second_request(hostile):
    with httpx.Client(base_url=hostile.url, timeout=10) as c:
        assert c.get("/health").status_code == 200
        assert c.post("/tokenize", json={"content": "x"}).status_code == 200  # same connection, within the deadline


# --- a generation that fails mid-stream -----------------------------------------------------------------------------
def test_generation_failing_mid_stream_ends_with_an_error_and_done():
    with run_app(FakeBackend(ServeConfig())) as url:
        for path, body in ((COMPLETIONS, {"prompt": FAIL}), (CHAT, {"messages": [{"role": "user", "content": FAIL}]})):
            with httpx.stream("POST", url + path, json=body | {"max_tokens": 8, "stream": True}, timeout=10) as r:
                events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
            assert r.status_code == 200 and events[-1] == "[DONE]", events
            assert json.loads(events[-2])["error"]["type"] == "server_error", events
        ok = httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 3, "stream": False}, timeout=10)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "okkk"
        whole = httpx.post(url + COMPLETIONS, json={"prompt": FAIL, "max_tokens": 3}, timeout=10)
        assert_error(whole, 500)  # not the client's fault: the engine failed; still OpenAI's shape
