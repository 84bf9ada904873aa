"""Chat messages → one prompt string, by the GGUF's ``tokenizer.chat_template`` (Jinja, rendered as HF transformers
renders it: sandboxed, ``trim_blocks`` + ``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``).

    render_chat([{"role": "user", "content": "hi"}], template)   # "<|user|>\\nhi<|end|>\\n<|assistant|>\\n"
    Renderer().render([{"role": "user", "content": "hi"}], template)   # the same, in a child process under a budget

A GGUF without a template gets :data:`DEFAULT_CHAT_TEMPLATE`, the project's own (``train.tokenizer.CHAT_TEMPLATE``;
the runtime may not import ``train/``, so a test keeps the two equal).

A template is a program written by whoever made the GGUF, so it runs under a budget. :func:`render_chat` (in this
process) has jinja2's immutable sandbox, ``range`` of at most :data:`MAX_RANGE` items, ``*`` and ``**`` refused when
their result would be huge, and at most :data:`MAX_OUTPUT_CHARS` characters of output. :class:`Renderer`, which the
server uses, adds a wall-time and a memory budget: it renders in a child process (``python -m runtime.chat_template
--worker``, JSON lines on stdin/stdout) whose address space is capped at :data:`MAX_MEMORY_BYTES` and which is killed,
then restarted on the next call, when a render runs past ``timeout_s`` (:data:`TIMEOUT_S`). Every failure is a
:class:`ChatTemplateError` whose ``code`` says which kind: ``chat_template_raised`` (the template's own
``raise_exception``), ``chat_template_error`` (it failed to compile or render), ``chat_template_budget``.
"""

from __future__ import annotations

import functools
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MAX_RANGE = 10_000  # items in one range(): far more turns than a 1k-token context holds
MAX_OUTPUT_CHARS = 4 << 20  # the rendered prompt (a request body is at most 1 MiB)
MAX_INT_BITS = 1 << 16  # the largest integer `*` or `**` may make
TIMEOUT_S = 1.0  # wall time of one render in the child (a real template takes well under a millisecond)
MAX_MEMORY_BYTES = 512 << 20  # the child's address space
START_TIMEOUT_S = 30.0  # the child imports jinja2, then says "ready"
BUDGET, ERROR, RAISED = "chat_template_budget", "chat_template_error", "chat_template_raised"
OUT_OF_MEMORY = f"chat template: ran past its {MAX_MEMORY_BYTES >> 20} MiB memory budget"


class ChatTemplateError(ValueError):
    """The template refused the conversation (``raise_exception``), failed to render, or ran past its budget."""

    def __init__(self, message: str, code: str = ERROR) -> None:
        super().__init__(message)
        self.code = code


def _range(*args):
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise ChatTemplateError(f"chat template: range() of more than {MAX_RANGE} items", BUDGET)
    return r


def _raise_exception(message):
    raise ChatTemplateError(str(message), RAISED)


@functools.lru_cache(maxsize=1)
def _environment_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox plus size checks on ``*`` and ``**`` (``'x' * 10**9``, ``10 ** 10**9``)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            ints = isinstance(left, int) and isinstance(right, int)
            if operator == "**" and ints and right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
                raise ChatTemplateError(f"chat template: a power of more than {MAX_INT_BITS} bits", BUDGET)
            if operator == "*":
                if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise ChatTemplateError(f"chat template: a product of more than {MAX_INT_BITS} bits", BUDGET)
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                        raise ChatTemplateError(f"chat template: a repetition of more than {MAX_OUTPUT_CHARS} items",
                                                BUDGET)  # fmt: skip
            return super().call_binop(context, operator, left, right)

    return BudgetedEnvironment


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    env = _environment_class()(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["range"] = _range
    return env.from_string(template)


def render_chat(messages: list[dict], template: str | None = None, bos_token="", eos_token="", generation_prompt=True):
    """The prompt for ``messages``, in this process: the sandbox, range, operator and output limits, no time limit."""
    try:
        pieces, n = [], 0
        context = {"messages": messages, "add_generation_prompt": generation_prompt, "bos_token": bos_token,
                   "eos_token": eos_token}  # fmt: skip
        for piece in _compile(template or DEFAULT_CHAT_TEMPLATE).generate(context):
            n += len(piece)
            if n > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"chat template: the prompt passed {MAX_OUTPUT_CHARS} characters", BUDGET)
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except MemoryError:
        raise ChatTemplateError(OUT_OF_MEMORY, BUDGET) from None
    except Exception as e:  # the template is a program from the GGUF: whatever it does wrong is its own failure
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None


# --- the child process -----------------------------------------------------------------------------------------------
class Renderer:
    """:func:`render_chat` in a child process under a wall-time and a memory budget. Thread-safe (one render at a
    time) and blocking: the server calls it off the event loop. ``close()`` ends the child."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def render(self, messages: list[dict], template: str | None = None, bos_token="", eos_token="",
               generation_prompt=True) -> str:  # fmt: skip
        request = {"messages": messages, "template": template, "bos_token": bos_token, "eos_token": eos_token,
                   "generation_prompt": generation_prompt}  # fmt: skip
        line = json.dumps(request).encode() + b"\n"  # ASCII: lone surrogates travel as \ud800 escapes
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
                reply = json.loads(self._read_line(time.monotonic() + self.timeout_s))
            except TimeoutError:
                self._kill()
                raise ChatTemplateError(f"chat template: ran past its {self.timeout_s:g} s budget", BUDGET) from None
            except (OSError, EOFError, ValueError):  # the child died (or wrote nonsense): start a fresh one next time
                message = f"chat template: the renderer exited ({self._kill()}) while rendering"
                raise ChatTemplateError(message, BUDGET) from None
        if "error" in reply:
            raise ChatTemplateError(reply["error"], reply["code"])
        return reply["text"]

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "runtime.chat_template", "--worker"]
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            if self._read_line(time.monotonic() + START_TIMEOUT_S) != b"ready\n":
                raise EOFError
        except (TimeoutError, EOFError):
            code = self._kill()
            raise ChatTemplateError(f"chat template: the renderer did not start ({code})", BUDGET) from None

    def _read_line(self, deadline: float) -> bytes:
        fd, buf = self._proc.stdout.fileno(), bytearray()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.kill()
        code = proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        return code


def _worker() -> None:
    """The child: cap the address space, lower the priority, then render one JSON request per line until stdin
    closes (or the parent is gone: a watchdog thread exits then, even in the middle of a runaway render)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MAX_MEMORY_BYTES, MAX_MEMORY_BYTES))
    os.nice(10)  # a runaway render yields the CPU to the server's event loop and generation thread
    parent = os.getppid()

    def watchdog():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.stack_size(256 << 10)
    threading.Thread(target=watchdog, daemon=True).start()
    _compile(DEFAULT_CHAT_TEMPLATE)  # imports jinja2 before "ready"
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            reply = {"text": render_chat(**json.loads(line))}
        except ChatTemplateError as e:
            reply = {"error": str(e), "code": e.code}
        except MemoryError:
            reply = {"error": OUT_OF_MEMORY, "code": BUDGET}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        raise SystemExit("usage: python -m runtime.chat_template --worker  (the server starts it; JSON lines on stdin)")
    _worker()
