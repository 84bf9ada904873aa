"""The real server for the serving tests: ``python -m runtime.serve`` with the shipped model in a subprocess, on a free
loopback port, started once per session (the ``server`` fixture; import it into a test module to use it).

The model compiles into the default cache (``$TERNARY_TVM_CACHE`` or ``~/.cache/ternary-tvm``) on first use, as
``runtime.chat`` does; later sessions reuse it.

``run_app(FakeBackend(ServeConfig(...)))`` serves the real app with uvicorn (the server's own config) in a thread on a
free loopback port, over a :class:`FakeEngine` (bytes as tokens, no model): for what the real model cannot be made to
do on demand, such as failing in the middle of a generation.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from helpers import REPO

from runtime.serve import Backend

API_KEY = "test-key"
CORS_ORIGIN = "http://client.test"
MAX_QUEUE = 64
START_TIMEOUT_S = 900  # a clean machine compiles the model first (about a minute on 2 cores)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    health_codes: list[int] = field(default_factory=list)  # /health answers while starting

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, key: str | None = API_KEY, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {"name{labels}": value}."""
        with self.client() as c:
            text = c.get("/metrics").raise_for_status().text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> Server:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "runtime.serve", "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"runtime.serve exited with {proc.returncode}:\n{srv.log_tail()}")
        try:
            code = httpx.get(srv.url + "/health", timeout=5).status_code
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        srv.health_codes.append(code)
        if code == 200:
            return srv
        time.sleep(0.05)
    stop_server(srv)
    raise RuntimeError(f"runtime.serve not ready after {START_TIMEOUT_S} s:\n{srv.log_tail()}")


def stop_server(srv: Server) -> None:
    srv.proc.terminate()
    try:
        srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="session")
def server():
    srv = start_server(
        "--api-key", API_KEY, "--metrics", "--cors", CORS_ORIGIN, "--max-queue", str(MAX_QUEUE), "--draft-tokens", "1"
    )  # speculative on every ISA (the default is per target)
    yield srv
    stop_server(srv)
    if srv.proc.returncode not in (0, -15):
        print(srv.log_tail())


# --- the app over a fake engine, in-process ---------------------------------------------------------------------------
FAIL = "@fail"  # a prompt with this makes FakeEngine fail after its first piece


class FakeBatcher:
    """:class:`runtime.batch.Batcher`'s protocol over :meth:`FakeEngine.stream_text`: every step gives each running
    request its next piece."""

    def __init__(self, engine) -> None:
        self.engine, self.reqs = engine, []

    @property
    def running(self) -> int:
        return len(self.reqs)

    def admit(self, req) -> bool:
        self.reqs.append((req, self.engine.stream_text(req.prompt, req.params, req.result)))
        return True

    def step(self):
        from runtime.batch import StepStats

        for req, pieces in list(self.reqs):
            kind, value = "text", None
            if req.cancelled():
                kind = "cancelled"
            else:
                try:
                    value = next(pieces)
                except StopIteration:
                    kind, value = "done", req.result
                except RuntimeError as e:
                    kind, value = "error", str(e)
            if kind != "text":
                self.reqs.remove((req, pieces))
            req.emit(kind, value)
        return StepStats(batch=len(self.reqs))

    def abort(self, message: str) -> None:
        for req, _ in self.reqs:
            req.emit("error", message)
        self.reqs.clear()


class FakeEngine:
    """What the server uses of :class:`runtime.engine.Engine`: UTF-8 bytes as tokens, and a generation that echoes
    ``"ok"`` pieces (or fails midway when the prompt contains :data:`FAIL`)."""

    ctx, vocab, tokenizer = 1024, 256, None
    pool = types.SimpleNamespace(n_blocks=64, used=0)

    def batcher(self, max_batch=None) -> FakeBatcher:
        return FakeBatcher(self)

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def stream_text(self, prompt, params, result):
        yield "ok"
        if FAIL in prompt:
            raise RuntimeError("the fake engine failed on purpose")
        for _ in range(params.max_new_tokens - 1):
            yield "k"
        result.tokens, result.finish_reason = [111] * params.max_new_tokens, "length"


class FakeBackend(Backend):
    def _open(self):
        self.template = self.config.chat_template
        return FakeEngine()


@contextlib.contextmanager
def run_app(backend: Backend, timeout_s: float = 30) -> Iterator[str]:
    """Serve ``create_app(backend.config, backend)`` with uvicorn on a free loopback port; yields the base URL once
    ``/health`` answers 200."""
    import uvicorn

    from runtime.serve import create_app, uvicorn_config

    config = backend.config
    config.host, config.port = "127.0.0.1", free_port()
    server = uvicorn.Server(uvicorn_config(create_app(config, backend), config, "warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """An error response in OpenAI's shape, with this status (and param/code when given); returns its ``error``."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
