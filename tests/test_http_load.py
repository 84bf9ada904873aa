"""bench.http_load: the statistics on synthetic arrival times, the SSE reader, the argument checks, the client loop
over a fake reader (unit); both clients against a small fake SSE server in this process, including broken streams,
and the CLI against ``runtime.serve`` with the shipped model (e2e).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import REPO

from bench import http_load as hl
from bench.http_load import LoadConfig, StreamRecord


def rec(start: float, arrivals: list[float], tokens: int | None = None, finish: str | None = "length", **kw):
    r = StreamRecord(start, list(arrivals), usage_tokens=tokens, finish_reason=finish, **kw)
    r.end = (arrivals[-1] if arrivals else start) + 0.001
    return r


# --- statistics ------------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_is_numpys_linear_percentile(n):
    xs = np.random.default_rng(n).exponential(size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert hl.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert hl.percentile([], 50) is None
    with pytest.raises(ValueError):
        hl.percentile(xs, 101)


@pytest.mark.unit
def test_one_stream_ttft_gaps_and_rate():
    r = rec(10.0, [10.1, 10.15, 10.25, 10.3], tokens=4)
    assert hl.ttft(r) == pytest.approx(0.1)
    assert hl.gaps(r) == pytest.approx([0.05, 0.1, 0.05])
    assert hl.stream_rate(r) == pytest.approx(3 / 0.2)  # (tokens − 1) over first → last text chunk
    assert r.ended and r.tokens == 4
    # the server's usage wins over the chunk count (a chunk may carry several tokens)
    assert hl.stream_rate(rec(0.0, [1.0, 2.0], tokens=5)) == pytest.approx(4.0)
    assert rec(0.0, [1.0, 2.0, 3.0]).tokens == 3  # no usage: chunks
    assert hl.stream_rate(rec(0.0, [1.0], tokens=1)) is None and hl.ttft(rec(0.0, [], tokens=0)) is None


@pytest.mark.unit
def test_chunks_without_text_are_not_tokens():
    """A chat stream's role-only first chunk and the final chunk (finish_reason, usage) carry no text: neither is the
    first token nor a gap."""
    r = StreamRecord(0.0)
    hl.record_chunk(r, 0.01, "", None, None)  # {"role": "assistant", "content": ""}
    hl.record_chunk(r, 0.05, "def", None, None)
    hl.record_chunk(r, 0.07, " f", None, None)
    hl.record_chunk(r, 0.08, None, "length", 2)
    assert r.arrivals == [0.05, 0.07] and hl.ttft(r) == pytest.approx(0.05)
    assert r.finish_reason == "length" and r.usage_tokens == 2


@pytest.mark.unit
def test_level_summary_on_synthetic_streams():
    # two streams at 10 ms per token, one at 20 ms, one failed after its first token; the level took 1 s
    a = rec(0.0, [0.10, 0.11, 0.12, 0.13], tokens=4)
    b = rec(0.0, [0.20, 0.21, 0.22, 0.23], tokens=4)
    c = rec(0.5, [0.55, 0.57, 0.59], tokens=3)
    d = rec(0.5, [0.9], tokens=None, finish=None, error="stream_error", detail="boom")
    s = hl.summarize_level([a, b, c, d], wall_s=1.0, concurrency=2, client_cpu_s=0.25)
    assert s["requests"] == 4 and s["tokens"] == 4 + 4 + 3 + 1 and s["aggregate_tok_s"] == pytest.approx(12.0)
    assert s["token_count"] == "mixed"
    assert s["errors"] == {"stream_error": 1} and s["error_examples"] == ["stream_error: boom"]
    assert s["streams_ended"] == 3 and not s["all_ended"] and s["streams_done"] is None
    assert s["finish_reasons"] == {"None": 1, "length": 3}
    assert s["per_stream_tok_s"] == pytest.approx(100.0)  # median of 100, 100, 100 (d has one token: no rate)
    assert s["ttft_p50_ms"] == pytest.approx(float(np.percentile([100, 200, 50, 400], 50)))
    assert s["ttft_p99_ms"] == pytest.approx(float(np.percentile([100, 200, 50, 400], 99)))
    pooled = [10] * 6 + [20, 20]  # the gaps of every stream together
    assert s["tbt_p50_ms"] == pytest.approx(float(np.percentile(pooled, 50)))
    assert s["tbt_p99_ms"] == pytest.approx(float(np.percentile(pooled, 99)))
    assert s["client_cpu_s"] == 0.25


@pytest.mark.unit
def test_steady_rate_counts_only_while_every_client_is_busy():
    a = rec(0, list(range(1, 11)), tokens=10, client=0)  # client 0: two requests back to back
    b = rec(10.001, list(range(11, 16)), tokens=5, client=0)
    c = rec(2, list(range(3, 21)), tokens=36, client=1)  # client 1 starts late, ends late; two tokens a chunk
    lo, hi = hl.steady_window([a, b, c], 2)
    assert (lo, hi) == (2, pytest.approx(15.001))  # client 1's first request → client 0's last answer
    # inside: a's chunks 2..10 (9 tokens), all of b (5), c's chunks 3..15 (13 chunks × 2 tokens)
    assert hl.steady_rate([a, b, c], 2) == pytest.approx((9 + 5 + 26) / 13.001)
    assert hl.steady_rate([a, b, c], 3) is None  # a client that sent nothing: never all busy
    assert hl.steady_rate([rec(0, [1, 2], tokens=2, client=0), rec(5, [6], tokens=1, client=1)], 2) is None
    assert hl.summarize_level([a, b, c], 20.0, 2)["steady_tok_s"] == pytest.approx(40 / 13.001)


@pytest.mark.unit
def test_empty_level_and_streams_done():
    s = hl.summarize_level([], wall_s=0.0, concurrency=1)
    assert s["requests"] == 0 and s["aggregate_tok_s"] is None and s["ttft_p50_ms"] is None and s["all_ended"]
    done = [rec(0, [0.1], tokens=1, done=True), rec(0, [0.1], tokens=1, done=False)]
    s = hl.summarize_level(done, wall_s=1.0, concurrency=2)
    assert s["streams_done"] == 1 and s["streams_ended"] == 1  # a stream without [DONE] did not end properly


@pytest.mark.unit
def test_repeats_give_median_and_spread():
    runs = []
    for i, tps in enumerate([10.0, 30.0, 20.0, 50.0, 40.0]):
        s = hl.summarize_level([rec(0, [0.1, 0.2], tokens=2)], wall_s=1.0, concurrency=1)
        s["aggregate_tok_s"], s["server"] = tps, {"http_5xx": i % 2, "completion_tokens": 2}
        runs.append(s)
    runs[2]["errors"] = {"http_500": 2}
    lv = hl.combine_runs(runs)
    assert lv["figures"]["aggregate_tok_s"] == {"median": 30.0, "min": 10.0, "max": 50.0, "n": 5}
    assert lv["figures"]["ttft_p50_ms"]["n"] == 5 and lv["requests"] == 5
    assert lv["errors"] == {"http_500": 2} and lv["server_5xx"] == 2 and lv["finish_reasons"] == {"length": 5}
    assert lv["inprocess"] is None and len(lv["runs"]) == 5
    assert hl.spread([None, None]) == {"median": None, "min": None, "max": None, "n": 0}


@pytest.mark.unit
def test_metrics_delta_counts_5xx_and_tokens():
    before = {'ternary_requests_total{route="/v1/completions",status="200"}': 3, "ternary_completion_tokens_total": 10}
    after = before | {'ternary_requests_total{route="/v1/completions",status="500"}': 2,
                      'ternary_requests_total{route="/v1/completions",status="429"}': 5,
                      "ternary_completion_tokens_total": 74}  # fmt: skip
    assert hl.metrics_delta(before, after) == {"http_5xx": 2, "completion_tokens": 64}
    assert hl.metrics_delta(None, after) is None


# --- SSE, requests, arguments ----------------------------------------------------------------------------------------
@pytest.mark.unit
def test_sse_lines():
    pending: list[str] = []
    got = [hl.parse_sse_line(x, pending) for x in ['data: {"a": 1}', "", ": keep-alive", "", "data: x", "data: y", ""]]
    assert [g for g in got if g is not None] == ['{"a": 1}', "x\ny"]
    for bad in ("{}", "hello: world"):
        with pytest.raises(hl.SSEError):
            hl.parse_sse_line(bad, [])


@pytest.mark.unit
def test_chunk_fields_of_both_endpoints():
    comp = {"choices": [{"index": 0, "text": "ab", "finish_reason": None}]}
    assert hl.chunk_fields(comp, chat=False) == ("ab", None, None)
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 7}}
    assert hl.chunk_fields(last, chat=True) == (None, "stop", 7)
    assert hl.chunk_fields({"choices": [], "usage": {"completion_tokens": 3}}, chat=True) == (None, None, 3)


@pytest.mark.unit
def test_request_bodies():
    cfg = LoadConfig(url="http://127.0.0.1:1/v1", prompts=("p0", "p1"), max_tokens=8, ignore_eos=True)
    b = hl.request_body(cfg, "m", 3)
    assert b["prompt"] == "p1" and b["seed"] == 3 and b["max_tokens"] == 8 and b["temperature"] == 0
    assert b["stream"] and b["stream_options"] == {"include_usage": True} and b["ignore_eos"] is True
    chat = hl.request_body(LoadConfig(url="http://127.0.0.1:1/v1", endpoint="chat"), "m", 0)
    assert chat["messages"] == [{"role": "user", "content": hl.PROMPTS[0]}] and "prompt" not in chat
    assert "ignore_eos" not in chat


@pytest.mark.unit
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:80/v1",
                                 "http://127.0.0.2:9/v1"])  # fmt: skip
def test_loopback_urls_are_accepted(url):
    hl.check_loopback(url)


@pytest.mark.unit
@pytest.mark.parametrize("url", ["http://10.0.0.1:8000/v1", "http://example.com/v1", "ftp://127.0.0.1/v1",
                                 "http://0.0.0.0:8000/v1", "127.0.0.1:8000"])  # fmt: skip
def test_other_urls_are_refused(url):
    with pytest.raises(ValueError, match="--url"):
        hl.check_loopback(url)


@pytest.mark.unit
@pytest.mark.parametrize(
    "args,message",
    [
        ([], "one of the arguments --url --model is required"),
        (["--url", "http://10.1.2.3:80/v1"], "loopback"),
        (["--model", "m.gguf", "--server-args", "--host 0.0.0.0"], "--host"),
        (["--model", "m.gguf", "--server-args=--port=80"], "--port"),
        (["--model", "m.gguf", "--concurrency", "0,4"], "--concurrency"),
        (["--model", "m.gguf", "--concurrency", "a"], "comma-separated"),
        (["--model", "m.gguf", "--requests", "0"], "--requests 0"),
        (["--model", "m.gguf", "--duration", "-1"], "--duration"),
        (["--model", "m.gguf", "--repeats", "0"], "--repeats"),
        (["--model", "m.gguf", "--timeout", "nan"], "--timeout"),
        (["--model", "m.gguf", "--prompts", "/nonexistent/prompts.txt"], "prompts.txt"),
    ],
)
def test_bad_arguments_are_refused(args, message, capsys):
    with pytest.raises(SystemExit):
        hl.parse_args(args)
    assert message in capsys.readouterr().err


@pytest.mark.unit
def test_arguments_and_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("def a():\\n    \n\nclass B:\n")
    cfg, _ = hl.parse_args(["--model", "m.gguf", "--prompts", str(f), "--concurrency", "1,2,8", "--threads", "2",
                            "--server-args", "--max-batch 8 --kv-tokens 4096"])  # fmt: skip
    assert cfg.prompts == ("def a():\n    ", "class B:") and cfg.concurrency == (1, 2, 8)
    assert cfg.requests_for(8) == 32 and cfg.repeats == 5
    cmd = hl.server_command(cfg, 1234)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "1234"
    assert cmd[-4:] == ["--max-batch", "8", "--kv-tokens", "4096"] and "--metrics" in cmd and "--threads" in cmd
    assert cmd[cmd.index("--max-queue") + 1] == "16"  # the server's default already holds 8 clients
    cmd = hl.server_command(LoadConfig(model="m", concurrency=(1, 64)), 1234)
    assert cmd[cmd.index("--max-queue") + 1] == "64"  # every client may wait: no 429
    cmd = hl.server_command(LoadConfig(model="m", concurrency=(64,), server_args=("--max-queue=4",)), 1234)
    assert cmd.count("--max-queue") == 0 and cmd[-1] == "--max-queue=4"
    assert LoadConfig(model="m", duration_s=5).requests_for(4) is None


@pytest.mark.unit
def test_api_keys_stay_out_of_the_json():
    assert (
        hl.redact("python -m bench.http_load --api-key s3cret --url u")
        == "python -m bench.http_load --api-key *** --url u"
    )
    assert hl.redact("x --api-key=s3cret") == "x --api-key=***" and hl.redact(None) is None


@pytest.mark.unit
def test_isa_summary():
    assert hl.isa_summary(["avx2", "avx512f", "avx512_vnni", "avx512_vbmi"]) == "avx512+vnni+vbmi"
    assert hl.isa_summary(["avx2", "avx_vnni"]) == "avx2+vnni" and hl.isa_summary([]) == "no avx2"


# --- the client loop over a fake reader ------------------------------------------------------------------------------
def fake_reader(step_s: float, tokens: int, in_flight: list[int]):
    """A stream reader without a network: ``tokens`` text chunks ``step_s`` apart; records the peak concurrency."""

    async def read(r: StreamRecord, body: dict) -> None:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            for _ in range(tokens):
                await asyncio.sleep(step_s)
                hl.record_chunk(r, time.perf_counter(), "x", None, None)
            hl.record_chunk(r, time.perf_counter(), None, "length", tokens)
        finally:
            in_flight[0] -= 1

    return read


@pytest.mark.unit
def test_run_level_sends_the_budget_at_the_concurrency():
    cfg = LoadConfig(url="http://127.0.0.1:1/v1")
    in_flight = [0, 0]
    recs, wall = asyncio.run(hl.run_level(fake_reader(0.002, 3, in_flight), cfg, "m", 3, requests=7))
    assert len(recs) == 7 and in_flight[1] == 3 and all(r.ended and r.tokens == 3 for r in recs)
    assert wall >= 3 * 3 * 0.002  # 7 requests over 3 clients: 3 rounds of 3 chunks
    s = hl.summarize_level(recs, wall, 3)
    assert s["tokens"] == 21 and s["aggregate_tok_s"] == pytest.approx(21 / wall)
    assert sorted({r.client for r in recs}) == [0, 1, 2] and s["steady_tok_s"] > 0


@pytest.mark.unit
def test_run_level_duration_and_level_timeout():
    cfg = LoadConfig(url="http://127.0.0.1:1/v1", level_timeout_s=10)
    recs, wall = asyncio.run(hl.run_level(fake_reader(0.001, 2, [0, 0]), cfg, "m", 2, duration_s=0.05))
    assert len(recs) >= 2 and all(r.ended for r in recs) and wall < 5  # no request starts after the duration
    assert max(r.start for r in recs) - min(r.start for r in recs) < 0.05 + 0.5  # (a loaded machine lags)
    cfg.level_timeout_s = 0.3
    recs, _ = asyncio.run(hl.run_level(fake_reader(10.0, 2, [0, 0]), cfg, "m", 2, requests=4))  # never finishes
    assert [r.error for r in recs] == ["level_timeout"] * 2 and all(r.end is not None for r in recs)


@pytest.mark.unit
def test_a_stream_without_finish_reason_is_an_error():
    async def read(r, body):
        hl.record_chunk(r, time.perf_counter(), "x", None, None)

    recs, _ = asyncio.run(hl.run_level(read, LoadConfig(url="http://127.0.0.1:1/v1"), "m", 1, requests=1))
    assert recs[0].error == "no_finish" and not recs[0].ended


# --- a fake OpenAI-compatible SSE server -----------------------------------------------------------------------------
MARKS = ("@500", "@error", "@nodone", "@after")  # a prompt with one of these breaks its stream that way


def fake_app():
    """/health, /v1/models, streaming /v1/completions and /v1/chat/completions (one token a millisecond, the last
    chunk with finish_reason and usage, then [DONE]) and /metrics, as plain Starlette routes; a prompt with a
    :data:`MARKS` mark misbehaves."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    counts = {"500": 0, "tokens": 0}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(body: dict, chat: bool):
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        n = body["max_tokens"]
        if chat:
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for i in range(n):
            await asyncio.sleep(0.001)
            if "@error" in text and i == 1:
                yield sse({"error": {"message": "failed on purpose", "type": "server_error"}})
                yield "data: [DONE]\n\n"
                return
            piece = f"t{i}"
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            yield sse({"choices": [choice | {"finish_reason": None}]})
        counts["tokens"] += n
        last = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        yield sse({"choices": [last | {"finish_reason": "length"}], "usage": {"completion_tokens": n}})
        if "@nodone" not in text:
            yield "data: [DONE]\n\n"
        if "@after" in text:
            yield sse({"choices": []})

    async def answer(request, chat: bool):
        body = await request.json()
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        if "@500" in text:
            counts["500"] += 1
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    async def completions(request):
        return await answer(request, False)

    async def chat_completions(request):
        return await answer(request, True)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                         "owned_by": "t"}]})  # fmt: skip

    async def metrics(request):
        return PlainTextResponse(f'ternary_requests_total{{route="/v1/completions",status="500"}} {counts["500"]}\n'
                                 f"ternary_completion_tokens_total {counts['tokens']}\n")  # fmt: skip

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/health", health), Route("/v1/models", models),
                             Route("/metrics", metrics)])  # fmt: skip


@contextlib.contextmanager
def fake_server():
    import uvicorn

    port = hl.free_port()
    server = uvicorn.Server(uvicorn.Config(fake_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        hl.wait_ready(url, 20)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def fake_url():
    with fake_server() as url:
        yield url


def fake_run(url: str, *args: str, prompts: tuple[str, ...] = ("p",)) -> dict:
    cfg, _ = hl.parse_args(["--url", url, "--concurrency", "1,3", "--requests", "6", "--max-tokens", "5",
                            "--repeats", "2", *args])  # fmt: skip
    cfg.prompts = prompts
    return hl.run(cfg, [], log=lambda s: None)


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("check_done", [False, True])
def test_both_clients_on_a_well_behaved_server(fake_url, endpoint, check_done):
    doc = fake_run(fake_url, "--endpoint", endpoint, *(["--check-done"] if check_done else []))
    assert doc["ok"] and doc["model"] == "fake" and doc["git"]["commit"] and doc["machine"]["cores"] >= 1
    for lv in doc["levels"]:
        assert lv["requests"] == 12 and lv["errors"] == {} and lv["all_ended"] and lv["server_5xx"] == 0
        assert lv["streams_done"] == (12 if check_done else None) and lv["finish_reasons"] == {"length": 12}
        for run in lv["runs"]:
            assert run["tokens"] == 30 and run["token_count"] == "usage" and run["server"]["completion_tokens"] == 30
            # chunks leave a millisecond apart, but a busy client reads several at once: gaps are only > 0
            assert run["ttft_p50_ms"] > 0.5 and 0 < run["tbt_p50_ms"] <= run["tbt_p99_ms"] < 500
            assert run["per_stream_tok_s"] > 0
        assert lv["figures"]["aggregate_tok_s"]["n"] == 2
    text = hl.table(doc)
    assert "agg tok/s" in text and len(text.splitlines()) == 2 + len(doc["levels"])
    json.dumps(hl.rounded(doc))
    assert doc["config"]["api_key"] == "x"


@pytest.mark.e2e
def test_broken_streams_are_errors(fake_url):
    prompts = ("ok", "@500", "@error", "@nodone", "@after")
    lv = fake_run(fake_url, "--check-done", "--repeats", "1", prompts=prompts)["levels"][1]
    assert lv["errors"] == {"http_500": 1, "no_done": 1, "sse_framing": 1, "stream_error": 1}, lv["runs"][0]
    # six requests over five prompts: "ok" twice; [DONE] came after "ok", "@error" and "@after"
    assert lv["streams_ended"] == 2 and lv["streams_done"] == 4 and lv["server_5xx"] == 1
    # the openai client ends quietly without [DONE] (so done is unknown there) and ignores what follows it
    doc = fake_run(fake_url, "--repeats", "1", prompts=prompts)
    lv = doc["levels"][1]
    assert lv["errors"] == {"http_500": 1, "stream_error": 1} and lv["streams_done"] is None and not doc["ok"]


@pytest.mark.e2e
def test_a_server_that_does_not_start_is_one_error_line(capsys):
    assert hl.main(["--model", "/dev/null", "--repeats", "1"]) == 2  # runtime.serve refuses it and exits
    err = capsys.readouterr().err
    assert "error: runtime.serve exited with 1" in err and "not a regular file" in err  # with the server's log
    assert hl.main(["--url", f"http://127.0.0.1:{hl.free_port()}/v1", "--start-timeout", "0.5"]) == 2
    assert "did not answer 200 within 0.5 s" in capsys.readouterr().err


# --- the CLI against runtime.serve with the shipped model ------------------------------------------------------------
@pytest.mark.e2e
def test_cli_against_the_shipped_model(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "bench.http_load", "--model", "models/small.gguf", "--concurrency", "1,2",
           "--requests", "2", "--max-tokens", "8", "--repeats", "1", "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=hl.START_TIMEOUT_S + 120)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["model"] == "small" and doc["server"]["returncode"] in (0, -15)
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2]
    for lv in doc["levels"]:
        assert lv["requests"] == 2 and lv["errors"] == {} and lv["server_5xx"] == 0
        assert lv["all_ended"] and lv["streams_ended"] == 2
        run = lv["runs"][0]
        assert run["token_count"] == "usage" and 0 < run["tokens"] <= 16 and run["aggregate_tok_s"] > 0
        assert run["ttft_p50_ms"] > 0 and run["tbt_p50_ms"] > 0
    assert "agg tok/s" in p.stdout
    with pytest.raises(httpx.TransportError):  # the server it started is gone
        httpx.get(doc["server"]["url"].removesuffix("/v1") + "/health", timeout=2)
