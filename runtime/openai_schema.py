"""OpenAI's wire format for :mod:`runtime.serve`: the request bodies (pydantic, validated) and the response, chunk and
error bodies (plain dicts, ready for ``json.dumps``).

Requests are strict (``"10"`` is not an int, ``"true"`` is not a bool) and range-checked like OpenAI's API; the
parameters this server cannot honour (``n > 1``, ``logprobs``, ``logit_bias``, tools, ``echo``...) are refused with a
message rather than silently ignored, and unknown fields are ignored, as most OpenAI-compatible servers do. ``top_k``
and ``ignore_eos`` are extensions (llama.cpp and vLLM have them too). ``frequency_penalty`` and ``presence_penalty``
have OpenAI's meaning over the generated tokens (:func:`model.sampling.penalize`). ``timings`` follows llama.cpp's
server: ``prompt_ms`` runs from the start of prefill to the first sampled token, ``predicted_ms`` over the tokens after
it, and ``predicted_per_second`` = (predicted_n − 1) / predicted_ms.

Bounds (every violation is a 400 naming the field): ``temperature`` in [0, 2], and below :data:`MIN_TEMPERATURE` it
means greedy (0), as vLLM does for tiny temperatures (dividing logits by 1e-45 overflows); ``top_p`` in (0, 1];
``top_k`` in [0, 2^31); penalties in [-2, 2]; ``max_tokens`` ≥ 1; ``seed`` in [0, 2^63). NaN and ±Infinity (which
Python's JSON reader accepts) are refused, and so is any text with a lone surrogate (``"\ud800"``: JSON can spell
it, UTF-8 cannot).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MIN_TEMPERATURE = 1e-2  # a smaller positive temperature samples greedily
MAX_TOP_K = 2**31 - 1


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text has a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string a request carries
STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = STRICT

    model: Text | None = None  # optional here (curl users); the openai client always sends it
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False  # extension (vLLM, llama.cpp): generate max_tokens whatever the tokens (benchmarks)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_below_min(cls, v: float) -> float:
        return 0.0 if v < MIN_TEMPERATURE else v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Request):
    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = None
    suffix: Text | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request (batches of prompts are not supported)")
        return v

    @model_validator(mode="after")
    def _unsupported_completion(self):
        if self.echo or self.logprobs is not None or self.suffix or self.best_of not in (None, 1):
            raise ValueError("echo, logprobs, suffix and best_of are not supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported_chat(self):
        if self.logprobs or self.tools:
            raise ValueError("logprobs and tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = STRICT
    content: Text
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    tokens: list[int]


# --- responses -------------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def timings(prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float, queue_s: float,
            draft_n: int = 0, draft_accepted: int = 0, spec_steps: int = 0) -> dict:  # fmt: skip
    """llama.cpp's ``timings`` (plus ``queue_ms``); with speculative decoding also its ``draft_n`` and
    ``draft_n_accepted`` (tokens drafted by the MTP heads, and those accepted), their ratio ``draft_acceptance`` and
    ``tokens_per_step`` (tokens per verify step: accepted drafts + 1)."""

    def rate(n, s):
        return round(n / s, 2) if n > 0 and s > 0 else None

    drafts = {}
    if draft_n and spec_steps:
        drafts = {"draft_n": draft_n, "draft_n_accepted": draft_accepted,
                  "draft_acceptance": round(draft_accepted / draft_n, 4),
                  "tokens_per_step": round((draft_accepted + spec_steps) / spec_steps, 3)}  # fmt: skip
    return drafts | {"queue_ms": round(queue_s * 1e3, 3),
            "prompt_n": prompt_n, "prompt_ms": round(prompt_s * 1e3, 3), "prompt_per_second": rate(prompt_n, prompt_s),
            "predicted_n": predicted_n, "predicted_ms": round(predicted_s * 1e3, 3),
            "predicted_per_second": rate(predicted_n - 1, predicted_s)}  # fmt: skip


def completion(rid: str, created: int, model: str, text: str, finish: str | None) -> dict:
    """A ``text_completion``: the whole answer, or one streamed chunk of it (same shape)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_message(rid: str, created: int, model: str, text: str, finish: str) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}  # fmt: skip
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None) -> dict:
    """A ``chat.completion.chunk``: the first delta is ``{"role": "assistant", "content": ""}``, the last ``{}``."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
