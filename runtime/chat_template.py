"""Chat messages → one prompt string, by the GGUF's ``tokenizer.chat_template`` (Jinja, rendered as HF transformers
renders it: sandboxed, ``trim_blocks`` + ``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``).

    render_chat([{"role": "user", "content": "hi"}], template)   # "<|user|>\\nhi<|end|>\\n<|assistant|>\\n"

A GGUF without a template gets :data:`DEFAULT_CHAT_TEMPLATE`, the project's own (``train.tokenizer.CHAT_TEMPLATE``;
the runtime may not import ``train/``, so a test keeps the two equal).
"""

from __future__ import annotations

import functools

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation (``raise_exception``) or failed to render."""


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(messages: list[dict], template: str | None = None, bos_token="", eos_token="", generation_prompt=True):
    from jinja2 import TemplateError

    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=generation_prompt, bos_token=bos_token, eos_token=eos_token
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e
