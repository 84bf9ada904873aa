"""Serve the compiled model over an OpenAI-compatible HTTP API (FastAPI + uvicorn), with a chat page at ``/``.

    python -m runtime.serve                                   # models/small.gguf on http://127.0.0.1:8000
    python -m runtime.serve --model X.gguf --port 8080 --api-key K --metrics --cors '*' --max-queue 32
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'

Endpoints: ``GET /v1/models``; ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream": true`` for
server-sent events: ``data: <json>\\n\\n`` chunks, the last with ``finish_reason``, ``usage`` and ``timings``, then
``data: [DONE]``); ``POST /tokenize`` ``{"content"}``, ``POST /detokenize`` ``{"tokens"}``; ``GET /health`` (503
while the model loads, 200 once it is ready); ``GET /metrics`` (Prometheus text, with ``--metrics``); ``GET /``, the
chat page (``runtime/static/chat.html``).

The model loads (and compiles, on first use) on the generation thread that the app's lifespan starts, so the server
answers ``/health`` at once; ``--jit-policy`` (``on``/``off``/``redo``/``readonly``,
:func:`runtime.engine.ensure_built`) says when it compiles, and with ``off`` a model without a compiled module ends
the server before it listens. Generation runs on that one thread (:mod:`runtime.worker`) as continuous batching
(:mod:`runtime.batch`): requests join and leave the running batch between steps, each step decodes a token for every
running request at once (at most ``--max-batch``) and prefills one chunk of a new prompt; a request waits in a bounded
queue (``--max-queue``; full → 429) until the batch has a slot and the KV cache (``--kv-tokens``) has room for its
prompt + ``max_tokens``, so running requests never fail for lack of cache. A client that disconnects frees its slot
within a step. ``/metrics`` shows running requests, queue depth, batch size and KV-cache occupancy.
Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 invalid request (bad JSON, wrong types, out-of-range
parameters, prompt + max_tokens over the context), 401 missing or wrong API key (``--api-key`` or
``$TERNARY_TVM_API_KEY``; ``/``, ``/health`` stay open), 404 unknown model or route, 413 body over ``--max-body-bytes``,
429 queue full, 503 not loaded. The wire format is :mod:`runtime.openai_schema`; the chat template is the GGUF's
(:mod:`runtime.chat_template`) or ``--chat-template FILE``.

Hostile requests and templates: the chat template renders in a child process under a wall-time (``--template-timeout``,
1 s), memory and output budget (:class:`runtime.chat_template.Renderer`), one render at a time, never in the event
loop; a template that fails a trial render when the model loads is refused (chat requests then get 400
``chat_template_refused``), one that runs past its budget on a request gets 400 ``chat_template_budget``; more than
``--max-queue`` renders waiting: 429. Tokenizing
runs in threads with the GIL released (``encode_batch``); ``/tokenize`` takes at most :data:`MAX_TOKENIZE_CHARS`
characters and ``/detokenize`` :data:`MAX_DETOKENIZE_TOKENS` ids (more: 413), and a prompt too long to fit the context
whatever its tokens is refused before it is tokenized. A connection must deliver its request line and headers within
``--read-timeout`` seconds (10) of opening (or of its previous response), and its body within as many again, or it
is closed (a slow body gets 408). Text that is not valid UTF-8, lone surrogates, NaN and infinities are 400s.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from model.sampling import SamplingParams
from runtime import openai_schema as oai
from runtime.chat import (
    DEFAULT_MODEL,
    add_draft_args,
    chain_burst,
    chain_drafts,
    check_draft_args,
    draft_tokens,
    lookup_tokens,
)
from runtime.chat_template import TIMEOUT_S, ChatTemplateError, Renderer
from runtime.engine import JIT_POLICIES, JITError, ensure_built
from runtime.worker import Job, NotReady, QueueFull, Stats, Worker

log = logging.getLogger("runtime.serve")
CHAT_TUNED_KEY = "training.chat_tuned"  # bool; an instruction-tuning stage writes it true (docs/gguf.md)

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: the context holds ~1k tokens, a few kB of text
MAX_QUEUE = 16  # requests waiting behind the running one
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens (as OpenAI); chat defaults to the rest of the context
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
READ_TIMEOUT_S = 10.0  # for a request's line and headers, and again for its body
MAX_TOKENIZE_CHARS = 1 << 16  # /tokenize content (64× what the 1k-token context holds)
MAX_DETOKENIZE_TOKENS = 1 << 16
TRIAL_MESSAGES = [{"role": "user", "content": "Hello"}]  # rendered once when the model loads
PUBLIC_PATHS = ("/", "/health")  # open without the API key
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
          "/detokenize")  # fmt: skip
FINISH = {"length": "length", "context": "length", "stop_token": "stop", "stop_string": "stop"}


def default_threads() -> int:
    """TVM threads: every core but one, which the event loop needs (all cores decoded slower under the server: the
    loop's wake-ups stall TVM's parallel sections; docs/architecture.md, "Measurements behind the code")."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


@dataclass
class ServeConfig:
    model: str = str(DEFAULT_MODEL)
    target: str = "auto"
    cache_dir: str | None = None
    threads: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = MAX_QUEUE
    max_body_bytes: int = MAX_BODY_BYTES
    metrics: bool = False
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers
    model_id: str = field(default="")  # the name clients use; "" → the GGUF's file stem
    chat_template: str | None = None  # instead of the GGUF's
    template_timeout_s: float = TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    jit_policy: str = "on"  # when the model is compiled: runtime.engine.ensure_built
    max_batch: int | None = None  # requests decoded together (None: the largest compiled decode batch)
    kv_tokens: int | None = None  # KV-cache capacity in tokens over all requests (None: the Engine's default)
    draft_tokens: int | None = None  # speculative decoding with the MTP heads (None: the Engine's default; 0: off)
    head: str = "auto"  # the LM head as the GGUF stores it, or "int8" (compiler.build --head)
    chain_burst: int | None = None  # plain greedy/temperature steps per device chain (None: Engine's default; 0: off)
    chain_drafts: int | None = None  # MTP drafts per call of a device chain (None: the Engine's default; 0: plain)
    lookup_tokens: int | None = None  # prompt-lookup drafts per step (None: the Engine's default; 0: off)

    def __post_init__(self) -> None:
        self.model_id = self.model_id or Path(self.model).stem


class APIError(Exception):
    def __init__(self, status: int, message: str, type="invalid_request_error", param=None, code=None) -> None:
        super().__init__(message)
        self.status, self.body = status, oai.error_body(message, type, param, code)


def _error(status: int, message: str, type="invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse(oai.error_body(message, type, param, code), status_code=status, headers=headers)


# --- the model behind the API ----------------------------------------------------------------------------------------
class Backend:
    """The worker plus what requests need from the GGUF: context length, chat template, stop tokens."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.created = int(time.time())
        self.template: str | None = None
        self.template_error: str | None = None  # why the template was refused when the model loaded
        self.eos_ids: tuple[int, ...] = ()
        self.eos_text = ""
        self.bos_text = ""
        self.control_ids: tuple[int, ...] = ()  # every control token ends an assistant turn
        self.max_token_bytes = 0  # the longest token: a prompt over ctx × this many characters cannot fit
        self.chat_tuned = False  # the GGUF's training.chat_tuned: the chat page opens in chat mode only then
        self.worker = Worker(self._load, config.max_queue, Stats(), config.max_batch)
        self.renderer = Renderer(config.template_timeout_s)
        self._render_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chat-template")
        self._renders = 0  # renders running or waiting (at most max_queue + 1)

    def _open(self):
        """The Engine; sets the template and the stop tokens from the GGUF."""
        from model.gguf_io import read_gguf
        from model.tokenizer import TOKEN_CONTROL
        from runtime.engine import Engine

        c = self.config
        g = read_gguf(c.model, check_values=False)
        spec = g.tokenizer
        self.chat_tuned = bool(g.metadata.get(CHAT_TUNED_KEY, False))
        self.template = c.chat_template if c.chat_template is not None else spec.chat_template
        self.eos_ids = (spec.eos_id,) if spec.eos_id is not None else ()
        self.eos_text = spec.tokens[spec.eos_id] if spec.eos_id is not None else ""
        self.bos_text = spec.tokens[spec.bos_id] if spec.bos_id is not None else ""  # Llama 3 templates open with it
        self.control_ids = tuple(i for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL)
        return Engine.from_gguf(c.model, c.target, c.cache_dir, c.threads or default_threads(), c.jit_policy,
                                head=c.head, kv_tokens=c.kv_tokens, draft_tokens=c.draft_tokens,
                                max_seqs=c.max_batch + 1 if c.max_batch else None,
                                chain_burst=c.chain_burst, chain_drafts=c.chain_drafts,
                                lookup_tokens=c.lookup_tokens)  # fmt: skip

    def _load(self):
        engine = self._open()
        self.max_token_bytes = _longest_token_bytes(engine)
        try:  # a template that cannot render one user turn within its budget is refused now, once
            self.renderer.render(TRIAL_MESSAGES, self.template, bos_token=self.bos_text, eos_token=self.eos_text)
        except ChatTemplateError as e:
            if e.code != "chat_template_raised":  # its own raise_exception: it may just want another conversation
                self.template_error = f"the model's chat template was refused when it loaded: {e}"
                log.warning("%s", self.template_error)
        return engine

    def close(self) -> None:
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        self.renderer.close()

    async def render(self, messages: list[dict]) -> str:
        """The chat prompt, rendered in the template's child process (one at a time, off the event loop)."""
        if self.template_error:
            raise APIError(400, self.template_error, param="messages", code="chat_template_refused")
        if self._renders > self.config.max_queue:
            raise APIError(429, f"{self.config.max_queue} chat templates are already waiting to render; retry later",
                           "rate_limit_error", code="queue_full")  # fmt: skip
        render = functools.partial(self.renderer.render, messages, self.template, bos_token=self.bos_text,
                                   eos_token=self.eos_text)  # fmt: skip
        self._renders += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._render_pool, render)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages", code=e.code) from None
        finally:
            self._renders -= 1

    def engine(self):
        if self.worker.state != "ready":
            raise APIError(503, self.worker.error or "the model is loading; retry shortly", "server_error",
                           code="model_not_ready")  # fmt: skip
        return self.worker.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.config.model_id, self.config.model, Path(self.config.model).name):
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.config.model_id}'",
                           param="model", code="model_not_found")  # fmt: skip

    async def submit(self, prompt: str, req: oai._Request, limit: int | None, default_limit: int | None, chat: bool):
        """Check the prompt and limits against the context, then queue the job: (job, prompt tokens)."""
        eng = self.engine()
        if not prompt and self.eos_text:  # an empty prompt starts a new document, as GPT-2's <|endoftext|> does
            prompt = self.eos_text
        param = "messages" if chat else "prompt"
        if len(prompt) > eng.ctx * max(1, self.max_token_bytes):  # more tokens than the context, whatever they are
            raise APIError(400, f"the prompt is {len(prompt)} characters: more than the model's context of {eng.ctx} "
                           "tokens holds", param=param, code="context_length_exceeded")  # fmt: skip
        n_prompt = len(await asyncio.to_thread(_tokenize, eng, prompt))
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param)
        room = eng.ctx - n_prompt
        if room <= 0:
            raise APIError(400, f"the prompt is {n_prompt} tokens; the model's context holds {eng.ctx}", param=param,
                           code="context_length_exceeded")  # fmt: skip
        if limit is None:
            limit = min(default_limit or room, room)
        elif limit > room:
            raise APIError(400, f"max_tokens={limit} plus the prompt's {n_prompt} tokens exceed the model's context of "
                           f"{eng.ctx} tokens; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        stop_ids = () if req.ignore_eos else self.control_ids if chat else self.eos_ids
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        params = SamplingParams(
            limit,
            req.temperature,
            req.top_k if req.top_k < eng.vocab else 0,  # a top_k at or above the vocabulary keeps every token
            req.top_p,
            seed,
            stop_ids,
            req.stop_strings(),
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            ignore_eos=req.ignore_eos,
        )
        try:
            return self.worker.submit(prompt, params, asyncio.get_running_loop(), n_prompt), n_prompt
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except NotReady as e:
            raise APIError(503, str(e), "server_error", code="model_not_ready") from None


def _tokenize(eng, text: str) -> list[int]:
    """``eng.tokenize(text)`` with the GIL released: the HF tokenizer's ``encode`` holds it (about 0.5 s per MiB, which
    stalls the event loop even from another thread); ``encode_batch`` does not."""
    tok = getattr(eng, "tokenizer", None)
    if hasattr(tok, "encode_batch"):
        return tok.encode_batch([text])[0].ids
    return eng.tokenize(text)


def _longest_token_bytes(eng) -> int:
    """The most UTF-8 bytes one token stands for (a byte of a split character counts as U+FFFD's 3: an upper bound)."""
    tok, ids = getattr(eng, "tokenizer", None), [[i] for i in range(eng.vocab)]
    if hasattr(tok, "decode_batch"):
        texts = tok.decode_batch(ids, skip_special_tokens=False)
    else:
        texts = map(eng.detokenize, ids)
    return max(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def completion_tokens(gen) -> int:
    """The tokens a generation added to the prompt's: token healing backs off the prompt's last ``healed_tokens``
    tokens and generates them again, so those count as prompt (the n_prompt the request was checked with)."""
    return max(0, len(gen.tokens) - getattr(gen, "healed_tokens", 0))


async def _events(request: Request, job: Job) -> AsyncIterator[tuple[str, object]]:
    """The job's events until done/error; cancels the job when the client goes away."""
    while True:
        if job.events.empty():  # wait (checking the client now and then); a ready event needs no timer
            try:
                async with asyncio.timeout(DISCONNECT_POLL_S):
                    kind, value = await job.events.get()
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return
                continue
        else:
            kind, value = job.events.get_nowait()
        yield kind, value
        if kind != "text":
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """One request's answer, whole or streamed, in the completion or the chat format."""

    def __init__(self, backend: Backend, job: Job, n_prompt: int, chat: bool) -> None:
        self.job, self.n_prompt, self.chat = job, n_prompt, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created, self.model = int(time.time()), backend.config.model_id

    def _chunk(self, text: str, finish: str | None) -> dict:
        if not self.chat:
            return oai.completion(self.id, self.created, self.model, text, finish)
        return oai.chat_chunk(self.id, self.created, self.model, {"content": text} if text else {}, finish)

    def _accounting(self, gen) -> dict:
        job = self.job
        queue_s, n = (job.started or job.submitted) - job.submitted, completion_tokens(gen)
        return {"usage": oai.usage(self.n_prompt, n),
                "timings": oai.timings(self.n_prompt, gen.prefill_s, n, gen.decode_s, queue_s, gen.drafted,
                                       gen.accepted, gen.spec_steps)}  # fmt: skip

    async def whole(self, request: Request) -> Response:
        pieces: list[str] = []
        async for kind, value in _events(request, self.job):
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise APIError(500, f"generation failed: {value}", "server_error")
            else:
                text, finish = "".join(pieces), FINISH[value.finish_reason]
                body = (oai.chat_message if self.chat else oai.completion)(self.id, self.created, self.model, text,
                                                                           finish)  # fmt: skip
                return JSONResponse(body | self._accounting(value))
        return Response(status_code=499)  # the client left; nobody reads this

    async def stream(self, request: Request) -> AsyncIterator[str]:
        """The SSE events; whatever happens after the first byte, a stream read to its end ends in ``[DONE]`` (after an
        error event when generation failed)."""
        try:
            if self.chat:
                role = {"role": "assistant", "content": ""}
                yield _sse(oai.chat_chunk(self.id, self.created, self.model, role, None))
            async for kind, value in _events(request, self.job):
                if kind == "text":
                    yield _sse(self._chunk(value, None))
                elif kind == "error":
                    yield _sse(oai.error_body(f"generation failed: {value}", "server_error"))
                    yield "data: [DONE]\n\n"
                else:
                    yield _sse(self._chunk("", FINISH[value.finish_reason]) | self._accounting(value))
                    yield "data: [DONE]\n\n"
        except Exception as e:  # a bug here must not leave the client waiting for [DONE]
            log.exception("streaming failed")
            yield _sse(oai.error_body(f"streaming failed: {type(e).__name__}", "server_error"))
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # a no-op once finished; frees the slot when the client went away mid-stream


# --- routes ----------------------------------------------------------------------------------------------------------
router = APIRouter()


def _backend(request: Request) -> Backend:
    return request.app.state.backend


async def _answer(request: Request, backend: Backend, job: Job, n_prompt: int, chat: bool, stream: bool):
    reply = _Reply(backend, job, n_prompt, chat)
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(reply.stream(request), media_type="text/event-stream", headers=headers)
    try:
        return await reply.whole(request)
    finally:
        job.cancel()


@router.post("/v1/completions")
async def completions(req: oai.CompletionRequest, request: Request):
    backend = _backend(request)
    backend.check_model(req.model)
    job, n = await backend.submit(req.prompt_text(), req, req.max_tokens, COMPLETION_MAX_TOKENS, chat=False)
    return await _answer(request, backend, job, n, False, req.stream)


@router.post("/v1/chat/completions")
async def chat_completions(req: oai.ChatCompletionRequest, request: Request):
    backend = _backend(request)
    backend.check_model(req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    prompt = await backend.render(messages)
    job, n = await backend.submit(prompt, req, req.limit(), None, chat=True)
    return await _answer(request, backend, job, n, True, req.stream)


@router.get("/v1/models")
async def models(request: Request):
    backend = _backend(request)
    card = {"id": backend.config.model_id, "object": "model", "created": backend.created, "owned_by": "ternary-tvm"}
    if backend.worker.state == "ready":
        card["meta"] = {"n_ctx": backend.worker.engine.ctx, "n_vocab": backend.worker.engine.vocab,
                        "chat_tuned": backend.chat_tuned}  # fmt: skip
    return {"object": "list", "data": [card]}


def _json_bytes(obj) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False).encode(), media_type="application/json")


@router.post("/tokenize")
async def tokenize(req: oai.TokenizeRequest, request: Request):
    eng = _backend(request).engine()
    if len(req.content) > MAX_TOKENIZE_CHARS:
        raise APIError(413, f"content is {len(req.content)} characters; /tokenize takes at most {MAX_TOKENIZE_CHARS}",
                       param="content", code="request_too_large")  # fmt: skip

    def run() -> Response:  # tokens, pieces and the JSON all off the event loop
        ids = _tokenize(eng, req.content)
        if req.with_pieces:
            pieces = [eng.detokenize([i]) for i in ids]  # short calls: the GIL changes hands between them
            return _json_bytes({"tokens": [{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)]})
        return _json_bytes({"tokens": ids})

    return await asyncio.to_thread(run)


@router.post("/detokenize")
async def detokenize(req: oai.DetokenizeRequest, request: Request):
    eng = _backend(request).engine()
    if len(req.tokens) > MAX_DETOKENIZE_TOKENS:
        raise APIError(413, f"{len(req.tokens)} tokens; /detokenize takes at most {MAX_DETOKENIZE_TOKENS}",
                       param="tokens", code="request_too_large")  # fmt: skip
    bad = [t for t in req.tokens if not 0 <= t < eng.vocab]
    if bad:
        raise APIError(400, f"token ids outside the vocabulary [0, {eng.vocab}): {bad[:5]}", param="tokens")
    return await asyncio.to_thread(lambda: _json_bytes({"content": eng.detokenize(req.tokens)}))


@router.get("/health")
async def health(request: Request):
    w = _backend(request).worker
    if w.state == "ready":
        return {"status": "ok"}
    return JSONResponse({"status": w.state, "error": w.error}, status_code=503)


def metrics_text(backend: Backend) -> str:
    """Prometheus text exposition (version 0.0.4) of the counters in :class:`runtime.worker.Stats`."""
    s, w = backend.worker.stats, backend.worker
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: dict[str, float]) -> None:
        lines.extend([f"# HELP ternary_{name} {help}", f"# TYPE ternary_{name} {kind}"])
        lines.extend(f"ternary_{name}{labels} {value:g}" for labels, value in samples.items())

    with s.lock:
        reqs = {f'{{route="{r}",status="{c}"}}': n for (r, c), n in sorted(s.requests.items())}
        gens = {f'{{outcome="{o}"}}': n for o, n in sorted(s.generations.items())}
        tps = s.completion_tokens / s.busy_seconds if s.busy_seconds > 0 else 0.0
        metric("requests_total", "counter", "HTTP requests by route and status.", reqs)
        metric("generations_total", "counter", "Generations by outcome (finish reason, cancelled, error).", gens)
        metric("rejected_total", "counter", "Requests refused with 429 because the queue was full.", {"": s.rejected})
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", {"": s.prompt_tokens})
        metric("completion_tokens_total", "counter", "Tokens generated.", {"": s.completion_tokens})
        metric("prompt_seconds_total", "counter", "Time spent in prefill.", {"": s.prompt_seconds})
        metric("decode_seconds_total", "counter", "Time spent decoding.", {"": s.decode_seconds})
        metric("tokens_per_second", "gauge", "Generated tokens per second of batch steps (all streams), since start.",
               {"": tps})  # fmt: skip
        metric("last_decode_tokens_per_second", "gauge", "Decode tokens/s of the last generation.",
               {"": s.last_decode_tps})  # fmt: skip
        metric("draft_tokens_total", "counter", "Tokens drafted (MTP heads and prompt lookup; speculative decoding).",
               {"": s.drafted})  # fmt: skip
        metric("draft_accepted_tokens_total", "counter", "Drafted tokens the main model accepted.", {"": s.accepted})
        metric("speculative_steps_total", "counter", "Verify steps with drafts (each gives its accepted drafts + 1).",
               {"": s.spec_steps})  # fmt: skip
        metric("draft_acceptance", "gauge", "Accepted / drafted tokens, since start.",
               {"": s.accepted / s.drafted if s.drafted else 0.0})  # fmt: skip
        metric("tokens_per_speculative_step", "gauge", "Tokens per verify step with drafts, since start.",
               {"": (s.accepted + s.spec_steps) / s.spec_steps if s.spec_steps else 0.0})  # fmt: skip
        metric("queue_depth", "gauge", "Requests waiting for a batch slot or KV-cache blocks.", {"": w.depth})
        metric("requests_processing", "gauge", "Requests in the running batch.", {"": s.running})
        metric("batch_size", "gauge", "Sequences decoded by the last batch step.", {"": s.batch})
        metric("kv_cache_blocks", "gauge", "KV-cache blocks (of the engine's block size in tokens).",
               {"": s.cache_blocks})  # fmt: skip
        metric("kv_cache_used_blocks", "gauge", "KV-cache blocks held by running requests.", {"": s.cache_used})
        metric("kv_cache_occupancy", "gauge", "Fraction of the KV cache held by running requests.",
               {"": s.cache_used / s.cache_blocks if s.cache_blocks else 0.0})  # fmt: skip
        metric("model_loaded", "gauge", "1 once the model is ready.", {"": float(w.state == "ready")})
    return "\n".join(lines) + "\n"


async def _metrics(request: Request):
    return PlainTextResponse(metrics_text(_backend(request)), media_type="text/plain; version=0.0.4")


# --- errors, limits, auth --------------------------------------------------------------------------------------------
_TYPE_TAG = re.compile(r"str|int|float|bool|.*\[.*\]")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # a value error says what is wrong ("a lone surrogate"); prefer it to a union's other member's type mismatch
    values = [e for e in errors if e.get("type") == "value_error"]
    first = (values or errors or [{"loc": (), "msg": "invalid request", "type": ""}])[0]
    # the location without "body" and without pydantic's union-member tags ("str", "list[str]")
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.fullmatch(str(x))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    elif param is None and first.get("type") in ("missing", "model_attributes_type", "model_type"):
        message = "the request body must be a JSON object"
    else:
        msg = str(first.get("msg", "")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return _error(400, message, param=param)


def _http_error(exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(oai.error_body(str(exc.detail), "invalid_request_error", None, code),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))  # fmt: skip


class GuardMiddleware:
    """ASGI middleware: counts requests per route and status, checks the Bearer key, caps the body size and the time
    to send it (read whole, then replayed to the app, so a chunked upload is capped too) and checks it is UTF-8."""

    def __init__(self, app, config: ServeConfig, stats: Stats) -> None:
        self.app, self.config, self.stats = app, config, stats
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.stats.count_request(route, message["status"])
            await send(message)

        reject = self._check_key(scope, path)
        if reject is None and scope["method"] in ("POST", "PUT", "PATCH"):
            reject, receive = await self._read_body(scope, receive)
        if reject is not None:
            return await reject(scope, receive, counted_send)
        await self.app(scope, receive, counted_send)

    def _check_key(self, scope, path: str) -> JSONResponse | None:
        if self.key is None or path in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            return None
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return None
        message = "Incorrect API key provided" if auth else "Missing API key: send 'Authorization: Bearer <key>'"
        return _error(401, message, code="invalid_api_key")

    async def _read_body(self, scope, receive):
        limit = self.config.max_body_bytes
        too_big = _error(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return _error(400, "invalid Content-Length header"), receive
            if int(length) > limit:
                return too_big, receive
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.config.read_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left while sending
                        return Response(status_code=400), receive
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        return too_big, receive
                    more = message.get("more_body", False)
        except TimeoutError:
            slow = f"the request body did not arrive within {self.config.read_timeout_s:g} s"
            return _error(408, slow, code="request_timeout", headers={"Connection": "close"}), receive
        body, replayed = b"".join(chunks), False
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:  # JSON between systems is UTF-8 (RFC 8259)
            return _error(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8"), receive
        # every POST body here is JSON: read it as JSON whatever its Content-Type (curl -d sends a form's)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope["headers"].append((b"content-type", b"application/json"))

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request line and headers: a connection that has not sent them
    ``read_timeout_s`` after it opened, or after its previous response, is closed (uvicorn itself waits forever for a
    first request, and restarts its keep-alive timer at every byte, so a client sending one byte a second never
    leaves)."""

    read_timeout_s = READ_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on this keep-alive connection

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, config: ServeConfig, log_level: str = "info"):
    """The uvicorn config the server runs with (the tests use it too): the header deadline, graceful shutdown."""
    import uvicorn

    protocol = type("Protocol", (ReadTimeoutH11Protocol,), {"read_timeout_s": config.read_timeout_s})
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, http=protocol,
                          timeout_graceful_shutdown=5)  # fmt: skip


# --- the app ---------------------------------------------------------------------------------------------------------
def create_app(config: ServeConfig | None = None, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the generation thread, which loads the model in the background."""
    config = config or ServeConfig()
    backend = backend or Backend(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving %s as '%s' (target %s, %d TVM threads, queue %d)", config.model, config.model_id,
                 config.target, config.threads or default_threads(), config.max_queue)  # fmt: skip
        backend.worker.start()
        yield
        backend.worker.stop()
        backend.close()

    app = FastAPI(title="ternary-tvm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.include_router(router)
    page = CHAT_PAGE.read_text()
    app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    if config.metrics:
        app.add_api_route("/metrics", _metrics, methods=["GET"])
    app.add_exception_handler(APIError, lambda r, e: JSONResponse(e.body, status_code=e.status))
    app.add_exception_handler(RequestValidationError, lambda r, e: _validation_error(e))
    app.add_exception_handler(StarletteHTTPException, lambda r, e: _http_error(e))
    app.add_exception_handler(Exception, lambda r, e: _error(500, f"internal error: {e}", "server_error"))
    app.add_middleware(GuardMiddleware, config=config, stats=backend.worker.stats)
    if config.cors_origins:  # outermost: preflights and 401s get CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF to serve (default: the shipped model)")
    ap.add_argument("--target", default="auto", choices=["auto", "avx512", "avx2"])
    ap.add_argument("--cache-dir", default=None, help="compiled-module cache (default: $TERNARY_TVM_CACHE or ~/.cache)")
    ap.add_argument("--threads", type=int, default=None, help="TVM threads (default: all cores but one)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("TERNARY_TVM_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $TERNARY_TVM_API_KEY; none: open)")  # fmt: skip
    ap.add_argument("--model-id", default="", help="the model's name in the API (default: the GGUF's file stem)")
    ap.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests that may wait; more get 429")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="requests decoded together, each step (default: the largest compiled batch, 16 on CPU)",
    )
    ap.add_argument("--kv-tokens", type=int, default=None,
                    help="KV-cache capacity in tokens, over all running requests (default: 4 contexts); a request "
                    "waits until its prompt + max_tokens fit")  # fmt: skip
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    ap.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    ap.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the GGUF's")
    ap.add_argument("--template-timeout", type=float, default=TIMEOUT_S,
                    help=f"seconds one chat-template render may take (default {TIMEOUT_S:g})")  # fmt: skip
    ap.add_argument(
        "--read-timeout",
        type=float,
        default=READ_TIMEOUT_S,
        help=f"seconds a client has to send its headers, and then its body (default {READ_TIMEOUT_S:g})",
    )
    ap.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allow this origin ('*': any)")
    ap.add_argument("--jit-policy", default="on", choices=JIT_POLICIES,
                    help="on: reuse the cached module, compile it if absent (default); off: never compile (exit at "
                    "once if absent); redo: always recompile; readonly: compile into a temporary directory if absent, "
                    "never write the cache")  # fmt: skip
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--head", default="auto", choices=["auto", "int8"],
                    help="the LM head as the GGUF stores it, or int8 rows (half an F16 head's bytes)")  # fmt: skip
    add_draft_args(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from model.gguf_io import GGUFError, check_model_file

    try:  # a regular file with the GGUF magic, before anything loads (not /dev/zero, a directory, a FIFO)
        check_model_file(a.model)
    except GGUFError as e:
        raise SystemExit(f"error: --model {e}") from None
    if a.threads is not None and not 1 <= a.threads <= 1024:
        raise SystemExit(f"error: --threads {a.threads}: expected 1..1024")
    if not 0 <= a.port <= 65535:
        raise SystemExit(f"error: --port {a.port}: expected 0..65535")
    if a.max_queue < 1 or a.max_body_bytes < 1:
        raise SystemExit("error: --max-queue and --max-body-bytes must be positive")
    if a.max_batch is not None and not 1 <= a.max_batch <= 4096:
        raise SystemExit(f"error: --max-batch {a.max_batch}: expected 1..4096")
    if a.kv_tokens is not None and not 1 <= a.kv_tokens <= 1 << 24:
        raise SystemExit(f"error: --kv-tokens {a.kv_tokens}: expected 1..16777216")
    why = check_draft_args(a)
    if why:
        raise SystemExit(f"error: {why}")
    if a.draft_tokens:
        from model.gguf_io import read_gguf

        try:
            heads = read_gguf(a.model, check_values=False).config.mtp_heads
        except (GGUFError, ValueError) as e:
            raise SystemExit(f"error: --model {e}") from None
        if a.draft_tokens > heads:
            raise SystemExit(f"error: --draft-tokens {a.draft_tokens}: {a.model} has {heads} MTP heads")
    if not (a.template_timeout > 0 and a.read_timeout > 0):  # NaN too
        raise SystemExit("error: --template-timeout and --read-timeout must be positive")
    template = None
    if a.chat_template:
        try:
            template = Path(a.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: --chat-template {a.chat_template}: {e}") from None
    config = ServeConfig(a.model, a.target, a.cache_dir, a.threads, a.host, a.port, a.api_key, a.max_queue,
                         a.max_body_bytes, a.metrics, tuple(a.cors), a.model_id, template, a.template_timeout,
                         a.read_timeout, a.jit_policy, a.max_batch, a.kv_tokens, draft_tokens(a), a.head,
                         chain_burst(a), chain_drafts(a), lookup_tokens(a))  # fmt: skip
    if a.jit_policy == "off":  # nothing to compile in the background: a missing module fails now, not on /health
        try:
            ensure_built(config.model, config.target, config.cache_dir, config.threads or default_threads(), "off",
                         head=config.head)  # fmt: skip
        except (JITError, ValueError) as e:  # ValueError: GGUFError (not a model file) or an unknown target
            raise SystemExit(f"error: {e}") from None
    if config.api_key is None and a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", a.host)
    import uvicorn

    uvicorn.Server(uvicorn_config(create_app(config), config, a.log_level)).run()


if __name__ == "__main__":
    main()
