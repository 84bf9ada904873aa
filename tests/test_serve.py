"""runtime.serve, end to end: uvicorn with the shipped model on loopback (``serve_helpers.server``), spoken to with
the real ``openai`` client and with raw HTTP (httpx) for what a well-behaved client never sends; a load test of 64
concurrent streaming clients, some of which hang up early.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from serve_helpers import API_KEY, CORS_ORIGIN, MAX_QUEUE, assert_error, rss_kib, server  # noqa: F401 (server is a fixture)

from runtime.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat

MODEL = "small"


@pytest.fixture(scope="module")
def oai(server):  # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def sse_events(lines) -> list[str]:
    """The ``data:`` payloads of a server-sent-event stream, checking the framing (``data: x`` then a blank line)."""
    out, expect_blank = [], False
    for line in lines:
        if expect_blank:
            assert line == "", f"an event must end with a blank line, got {line!r}"
            expect_blank = False
            continue
        assert line.startswith("data: "), line
        out.append(line[len("data: ") :])
        expect_blank = True
    return out


# --- the openai client ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_health_was_503_while_loading_then_200(server):  # noqa: F811
    assert server.health_codes[-1] == 200
    assert 503 in server.health_codes, server.health_codes  # the model takes seconds to load; /health answered


@pytest.mark.e2e
def test_models_lists_the_shipped_model(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["meta"]["n_ctx"] == 1024
    assert models[0].model_extra["meta"]["chat_tuned"] is True  # the shipped GGUF is instruction-tuned (train.sft)


@pytest.mark.e2e
def test_completion_whole_and_streamed_agree(oai):
    whole = oai.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    t = whole.model_extra["timings"]
    assert t["prompt_n"] == whole.usage.prompt_tokens and t["predicted_n"] == whole.usage.completion_tokens
    assert t["prompt_ms"] > 0 and (t["predicted_per_second"] or 0) > 0
    chunks = list(oai.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text  # greedy: the same text, in pieces
    assert [c.choices[0].finish_reason for c in chunks][-1] == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.e2e
def test_chat_whole_and_streamed_agree_with_the_gguf_template(oai, server):  # noqa: F811
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert whole.choices[0].finish_reason in ("length", "stop")
    with server.client() as c:  # the prompt is the GGUF's chat template, rendered, then tokenized
        ids = c.post("/tokenize", json={"content": render_chat(messages, DEFAULT_CHAT_TEMPLATE)}).json()["tokens"]
    assert whole.usage.prompt_tokens == len(ids)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.e2e
def test_stop_string_cuts_the_text_and_finishes_with_stop(oai):
    full = oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    got = oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


@pytest.mark.e2e
def test_frequency_penalty_breaks_a_greedy_loop(oai):
    """OpenAI's penalties reach the sampler (model.sampling.penalize): the penalized text differs and repeats less."""
    kw = {"model": MODEL, "prompt": "    if tags is None:\n        tags = {}\n", "max_tokens": 40, "temperature": 0}
    plain = oai.completions.create(**kw).choices[0].text
    pen = oai.completions.create(**kw, frequency_penalty=1.0, presence_penalty=0.5).choices[0].text
    assert pen != plain
    assert len(set(pen.split())) / max(1, len(pen.split())) >= len(set(plain.split())) / max(1, len(plain.split()))


@pytest.mark.e2e
def test_seeded_sampling_is_reproducible(oai):
    def run(seed):
        return oai.completions.create(model=MODEL, prompt="class ", max_tokens=12, temperature=1.0, seed=seed,
                                      extra_body={"top_k": 40}).choices[0].text  # fmt: skip

    assert run(7) == run(7)


@pytest.mark.e2e
def test_openai_client_errors(server, oai):  # noqa: F811
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)


# --- raw HTTP: malformed and refused requests ----------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, b'{"prompt": "x", ', None),  # bad JSON
        (COMPLETIONS, b"[1, 2]", None),  # JSON, but not an object
        (COMPLETIONS, b"", None),  # no body
        (COMPLETIONS, {"max_tokens": 4}, "prompt"),  # missing field
        (COMPLETIONS, {"prompt": 3}, "prompt"),  # wrong types
        (COMPLETIONS, {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
        (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (CHAT, {"messages": []}, "messages"),
        (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, "temperature"),  # out of range
        (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"prompt": "x", "top_k": -1}, "top_k"),
        (COMPLETIONS, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (COMPLETIONS, {"prompt": "x", "n": 2}, "n"),  # supported by OpenAI, not here: said, not ignored
        (COMPLETIONS, {"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
        (CHAT, {"messages": USER, "logprobs": True}, None),
    ],
)
def test_malformed_requests_are_400(server, path, body, param):  # noqa: F811
    with server.client() as c:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = c.post(path, content=content, headers={"Content-Type": "application/json"})
    err = assert_error(resp, 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.e2e
def test_context_limits_are_400(server):  # noqa: F811
    with server.client() as c:
        err = assert_error(c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 10**6}), 400, "max_tokens",
                           "context_length_exceeded")  # fmt: skip
        assert "1024" in err["message"] and "at most" in err["message"]
        assert_error(c.post(CHAT, json={"messages": USER, "max_completion_tokens": 5000}), 400, "max_tokens")
        long_prompt = "x = 1\n" * 2000  # ~4000 tokens: more than the context
        assert_error(c.post(COMPLETIONS, json={"prompt": long_prompt, "max_tokens": 1}), 400, "prompt",
                     "context_length_exceeded")  # fmt: skip
        # without max_tokens a chat answer may fill the rest of the context: the default is capped, not refused
        k = 400
        while True:
            messages = [{"role": "user", "content": "x = 1\n" * k}]
            n = len(c.post("/tokenize", json={"content": render_chat(messages)}).json()["tokens"])
            if n <= 1014:
                break
            k -= max(1, (n - 1014) // 4)
        ok = c.post(CHAT, json={"messages": messages, "temperature": 0})
        assert ok.status_code == 200, ok.text
        usage = ok.json()["usage"]
        assert usage["prompt_tokens"] == n and usage["total_tokens"] <= 1024


@pytest.mark.e2e
def test_empty_prompt_starts_a_new_document(server):  # noqa: F811
    with server.client() as c:
        r = c.post(COMPLETIONS, json={"prompt": "", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 1  # <|endoftext|>


@pytest.mark.e2e
def test_api_key_is_required_except_for_health_and_the_page(server):  # noqa: F811
    with server.client(key=None) as c:
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.post(COMPLETIONS, json={"prompt": "x"}), 401)
        assert_error(c.post(COMPLETIONS, content=b"{bad json"), 401)  # the key is checked first
        assert_error(c.post("/tokenize", json={"content": "x"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": API_KEY}), 401)  # no scheme
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200


@pytest.mark.e2e
def test_unknown_model_route_and_method(server):  # noqa: F811
    with server.client() as c:
        assert_error(c.post(COMPLETIONS, json={"prompt": "x", "model": "gpt-4"}), 404, "model", "model_not_found")
        assert_error(c.get("/v2/nothing"), 404)
        assert_error(c.get(COMPLETIONS), 405)


@pytest.mark.e2e
def test_body_over_the_limit_is_413(server):  # noqa: F811
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    with server.client() as c:
        assert_error(c.post(COMPLETIONS, content=big), 413, code="request_too_large")

        def chunked():  # no Content-Length: the server counts the bytes as they come
            for i in range(0, len(big), 1 << 16):
                yield big[i : i + (1 << 16)]

        assert_error(c.post(COMPLETIONS, content=chunked()), 413)
        assert c.get("/health").status_code == 200


@pytest.mark.e2e
def test_tokenize_detokenize_round_trip(server):  # noqa: F811
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    with server.client() as c:
        ids = c.post("/tokenize", json={"content": text}).json()["tokens"]
        assert ids and all(isinstance(i, int) for i in ids)
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"content": text}
        pieces = c.post("/tokenize", json={"content": "def f", "with_pieces": True}).json()["tokens"]
        assert "".join(p["piece"] for p in pieces) == "def f"
        assert_error(c.post("/detokenize", json={"tokens": [1, 10**6]}), 400, "tokens")
        assert_error(c.post("/detokenize", json={"tokens": ["a"]}), 400)


@pytest.mark.e2e
def test_raw_sse_framing_usage_and_done(server):  # noqa: F811
    with server.client() as c, c.stream("POST", CHAT, json={"messages": USER, "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("length", "stop") and last["usage"]["completion_tokens"] <= 8
    assert last["timings"]["predicted_n"] == last["usage"]["completion_tokens"]
    assert all(ch["choices"][0]["finish_reason"] is None and "usage" not in ch for ch in chunks[:-1])


@pytest.mark.e2e
def test_speculation_reports_drafts_in_timings_and_metrics(server):  # noqa: F811
    """The server speculates (--draft-tokens 1 on the shipped model's MTP heads, and prompt-lookup drafts, 3 a step
    on the CPUs): the final timings say how many drafted tokens were accepted, /metrics has the totals."""
    body = {"prompt": "def add(a, b):\n    return", "max_tokens": 32, "temperature": 0}
    with server.client() as c:
        r = c.post(COMPLETIONS, json=body)
        r.raise_for_status()
        t = r.json()["timings"]
        text = c.get("/metrics").text
    assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]
    assert 1.0 <= t["tokens_per_step"] <= 4.0  # the last token and at most 3 accepted drafts a step
    assert t["draft_acceptance"] == round(t["draft_n_accepted"] / t["draft_n"], 4)
    assert "ternary_draft_tokens_total" in text and "ternary_tokens_per_speculative_step" in text


@pytest.mark.e2e
def test_metrics_are_prometheus_text(server):  # noqa: F811
    with server.client() as c:
        c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}).raise_for_status()
        text = c.get("/metrics").text
    for name in ("requests_total", "completion_tokens_total", "tokens_per_second", "queue_depth",
                 "requests_processing", "rejected_total"):  # fmt: skip
        assert f"# TYPE ternary_{name} " in text
    m = server.metrics()
    assert m['ternary_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert m["ternary_completion_tokens_total"] >= 2 and m["ternary_tokens_per_second"] > 0
    assert m['ternary_requests_total{route="/metrics",status="200"}'] >= 1  # the fetch of `text` above


@pytest.mark.e2e
def test_cors_when_enabled(server):  # noqa: F811
    with server.client(key=None) as c:
        pre = c.options(CHAT, headers={"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == CORS_ORIGIN
        denied = c.get("/v1/models", headers={"Origin": CORS_ORIGIN})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == CORS_ORIGIN
        other = c.get("/health", headers={"Origin": "http://elsewhere.test"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.e2e
def test_chat_page_is_one_self_contained_file(server):  # noqa: F811
    with server.client(key=None) as c:
        page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing fetched from elsewhere


@pytest.mark.e2e
def test_health_answers_while_generating(server):  # noqa: F811
    with server.client() as c, c.stream("POST", COMPLETIONS, json={"prompt": "def main():", "max_tokens": 400,
                                                                   "temperature": 0, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        next(lines)  # generation has started
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert time.perf_counter() - t0 < 2.0  # the event loop is not the generation thread


@pytest.mark.e2e
def test_hangup_mid_stream_stops_the_generation(server):  # noqa: F811
    before = server.metrics()
    body = {"prompt": "def main():", "max_tokens": 1000, "temperature": 0, "stream": True}
    with server.client() as c, c.stream("POST", COMPLETIONS, json=body) as r:
        lines = r.iter_lines()
        for _ in range(4):  # two chunks
            next(lines)
    t0 = time.perf_counter()
    while (m := server.metrics())["ternary_requests_processing"] and time.perf_counter() - t0 < 10:
        time.sleep(0.02)
    assert m["ternary_requests_processing"] == 0
    key = 'ternary_generations_total{outcome="cancelled"}'
    assert m[key] - before.get(key, 0) == 1
    assert m["ternary_completion_tokens_total"] - before["ternary_completion_tokens_total"] < 1000


@pytest.mark.e2e
def test_queue_full_is_429_and_hangups_free_their_slots(server):  # noqa: F811
    """Hold streams that each want the whole context until one is refused; hang up on all: every job is cancelled
    (a waiting one before it starts, the running one within a token) and the queue drains at once."""
    before = server.metrics()

    async def run():
        body = {"prompt": "def main():", "max_tokens": 1000, "temperature": 0, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=MAX_QUEUE + 32)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=30) as c:
            held, refused = [], None
            for _ in range(MAX_QUEUE + 16):
                r = await c.send(c.build_request("POST", COMPLETIONS, json=body), stream=True)
                if r.status_code != 200:
                    refused = (r.status_code, json.loads(await r.aread()))
                    await r.aclose()
                    break
                held.append(r)
            for r in held:
                await r.aclose()
            return len(held), refused

    n_held, refused = asyncio.run(run())
    assert refused is not None, "the queue never filled"
    assert refused[0] == 429 and refused[1]["error"]["code"] == "queue_full"
    assert n_held >= MAX_QUEUE + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["ternary_queue_depth"] == 0 and m["ternary_requests_processing"] == 0:
            break
        time.sleep(0.1)
    assert m["ternary_queue_depth"] == 0 and m["ternary_requests_processing"] == 0, m
    key = 'ternary_generations_total{outcome="cancelled"}'
    assert m[key] - before.get(key, 0) >= n_held - 2  # all but a job or two that finished before the hang-up
    assert m["ternary_rejected_total"] > before["ternary_rejected_total"]


@pytest.mark.e2e
def test_concurrent_streams_run_in_one_batch_with_their_solo_tokens(oai, server):  # noqa: F811
    """Four streams at once, each with its own sampling parameters: every one starts before any ends (they share
    decode steps: continuous batching), each gets exactly the text it gets alone, and their cache blocks are freed."""
    prompts = ["def fib(n):", "import os\n", "class Stack:\n", "def parse(line):"]
    params = [{"temperature": 0}, {"temperature": 0.9, "seed": 5}, {"temperature": 0, "frequency_penalty": 0.8},
              {"temperature": 0.7, "top_p": 0.9, "seed": 11}]  # fmt: skip
    body = {"max_tokens": 40, "ignore_eos": True}
    solo = [oai.completions.create(model=MODEL, prompt=p, max_tokens=40, extra_body={"ignore_eos": True}, **kw)
            .choices[0].text for p, kw in zip(prompts, params, strict=True)]  # fmt: skip

    async def stream(c: httpx.AsyncClient, prompt: str, kw: dict):
        times, events = [], []
        async with c.stream("POST", COMPLETIONS, json={"prompt": prompt, "stream": True, **body, **kw}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    events.append(json.loads(line[len("data: ") :]))
        return times, "".join(e["choices"][0]["text"] for e in events)

    async def run():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            return await asyncio.gather(*(stream(c, p, kw) for p, kw in zip(prompts, params, strict=True)))

    results = asyncio.run(run())
    assert [text for _, text in results] == solo
    assert max(t[0] for t, _ in results) < min(t[-1] for t, _ in results), "a stream ended before another started"
    m = server.metrics()
    assert m["ternary_kv_cache_blocks"] > 0 and m["ternary_kv_cache_used_blocks"] == 0  # all freed


@pytest.mark.e2e
@pytest.mark.slow
def test_load_64_streaming_clients_some_hanging_up(server):  # noqa: F811
    """64 concurrent streaming clients (chat and completions), every fourth hanging up after its first token: no 5xx,
    every stream read to the end ends in [DONE] after a chunk with finish_reason and usage, the server's memory
    stays put, and it answers afterwards."""
    n_clients, n_hangup = 64, 16
    with server.client() as c:  # warm up, then measure
        c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 4}).raise_for_status()
    rss0, before = rss_kib(server.pid), server.metrics()

    async def client(c: httpx.AsyncClient, i: int):
        hang_up = i % 4 == 3
        if i % 2:
            path, body = CHAT, {"messages": [{"role": "user", "content": f"task {i}"}]}
        else:
            path, body = COMPLETIONS, {"prompt": f"def task_{i}(x):"}
        body |= {"max_tokens": 16, "temperature": 0.8, "seed": i, "stream": True}
        async with c.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return r.status_code, None
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if hang_up and line.startswith("data: {") and '"finish_reason": null' in line and len(lines) > 2:
                    return 200, "hung up"
            return 200, sse_events(lines)

    async def run():
        limits = httpx.Limits(max_connections=n_clients + 8)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=120) as c:
            return await asyncio.wait_for(asyncio.gather(*(client(c, i) for i in range(n_clients))), 300)

    t0 = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert [s for s, _ in results] == [200] * n_clients
    completed = [ev for _, ev in results if ev != "hung up"]
    hung_up = n_clients - len(completed)  # at most n_hangup: a stream that ends at once is read to the end
    assert n_hangup // 2 <= hung_up <= n_hangup
    for events in completed:
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] in ("length", "stop") and last["usage"]["completion_tokens"] <= 16
    m = server.metrics()
    errors = {k: v - before.get(k, 0) for k, v in m.items() if re.search(r'status="5\d\d"', k) and v > before.get(k, 0)}
    assert not errors, errors
    with server.client() as c:
        assert c.get("/health").status_code == 200
        assert c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}).status_code == 200
    growth_mib = (rss_kib(server.pid) - rss0) / 1024
    cancelled = m['ternary_generations_total{outcome="cancelled"}'] - before.get(
        'ternary_generations_total{outcome="cancelled"}', 0)  # fmt: skip
    print(f"\n{n_clients} streaming clients in {elapsed:.1f} s ({hung_up} hung up, {cancelled:.0f} jobs cancelled); "
          f"server RSS {rss0 / 1024:.0f} MiB, +{growth_mib:.1f} MiB")  # fmt: skip
    assert growth_mib < 64, f"server RSS grew by {growth_mib:.0f} MiB under load"


# --- the app without the flags, in-process (no model: it never leaves "loading") -----------------------------------
@pytest.mark.e2e
def test_without_flags_no_key_no_metrics_no_cors_and_503_while_loading():
    from starlette.testclient import TestClient

    from runtime.serve import ServeConfig, create_app

    c = TestClient(create_app(ServeConfig()))  # not entered: the lifespan (and the model) never start
    health = c.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert_error(c.post(COMPLETIONS, json={"prompt": "x"}), 503, code="model_not_ready")
    assert c.get("/v1/models").json()["data"][0]["id"] == MODEL  # open: no key configured
    assert_error(c.get("/metrics"), 404)
    assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": CORS_ORIGIN}).headers


@pytest.mark.unit
def test_chat_template_is_the_training_one():
    from train.tokenizer import CHAT_TEMPLATE

    assert DEFAULT_CHAT_TEMPLATE == CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat(msgs, CHAT_TEMPLATE) == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent.gguf"], "no such file"),
        (["--max-queue", "0"], "must be positive"),
        (["--read-timeout", "nan"], "must be positive"),
        (["--chat-template", "/nonexistent.jinja"], "--chat-template /nonexistent.jinja"),
        (["--model", "/dev/zero"], "--model"),
        (["--model", "/"], "--model"),
        (["--threads", "-1"], "--threads -1"),
        (["--threads", "0"], "--threads 0"),
        (["--port", "70000"], "--port 70000"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading(args, message, monkeypatch):
    """The command line is checked before a model is loaded or a port is bound: one error line, no traceback."""
    from runtime import serve

    monkeypatch.setattr(serve, "create_app", lambda *a, **k: pytest.fail("the server started"))
    with pytest.raises(SystemExit, match=message):
        serve.main(args)
