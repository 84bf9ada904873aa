"""Special tokens never reach the text a user sees, and end-of-generation tokens stop every path of the Engine.

Issue 23: the shipped model (models/small.gguf) completed the prompt that ends after a docstring's newline with the
literal text ``<|endoftext|>``. Checked on Engine.generate, Engine.stream_text and runtime.chat's output, plus a scan
over many prompts; on a random tiny model (whose logits are forced) that unused tokens are never sampled and that the
control tokens named as end of turn stop generation without stop ids.

    pytest -q tests/test_special_tokens.py
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import REPO
from runtime_helpers import built, tiny_gguf

from model.gguf_io import read_gguf
from model.tokenizer import TOKEN_CONTROL, TOKEN_UNUSED
from runtime import chat
from runtime.engine import Engine, Generation, SamplingParams

pytestmark = [pytest.mark.build, pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")]

SMALL = REPO / "models" / "small.gguf"
EOS_PROMPT = 'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same backwards."""\n'
PROMPTS = [
    EOS_PROMPT,
    "def fib(n):",
    "import os\n",
    "class Stack:\n    def __init__(self):\n        ",
    "# end of module\n\n\n",
    "if __name__ == '__main__':\n    main()\n",
    "x = 1\n",
    'print("hello")\n',
    "<|user|>\nWrite a function that adds two numbers.<|end|>\n<|assistant|>\n",
]


def special_strings(gguf) -> list[str]:
    spec = read_gguf(gguf, check_values=False).tokenizer
    named = [spec.tokens[i] for i, t in enumerate(spec.token_type) if t in (TOKEN_CONTROL, TOKEN_UNUSED)]
    return [*named, "<|unused", "<|endoftext|>"]


@pytest.fixture(scope="module")
def small():
    eng = Engine(built(SMALL).dir, SMALL)
    eng.token_healing = False  # the prompts as the issue sent them (healing is tested in test_token_healing.py)
    return eng


@pytest.mark.slow
def test_generate_hides_eos_and_stops_there(small):
    res = small.generate(EOS_PROMPT, SamplingParams(max_new_tokens=16, stop_token_ids=(small.eos,)))
    assert res.finish_reason == "stop_token" and res.tokens == [small.eos]
    assert res.text == ""  # was "<|endoftext|>"


@pytest.mark.slow
def test_eos_stops_without_stop_ids(small):
    """EOS ends every generation, even when the caller passes no stop token ids."""
    res = small.generate(EOS_PROMPT, SamplingParams(max_new_tokens=16))
    assert res.finish_reason == "stop_token" and res.tokens == [small.eos] and res.text == ""


@pytest.mark.slow
def test_stream_text_never_yields_a_special_token(small):
    res = Generation()
    pieces = list(small.stream_text(EOS_PROMPT, SamplingParams(max_new_tokens=16), res))
    assert pieces == [] and res.text == "" and res.finish_reason == "stop_token"


@pytest.mark.slow
def test_chat_cli_output_has_no_special_token(small, capsys):
    out = io.StringIO()
    res = chat.run_one(small, EOS_PROMPT, SamplingParams(max_new_tokens=16, stop_token_ids=(small.eos,)), out)
    assert out.getvalue() == EOS_PROMPT + "\n" and res.finish_reason == "stop_token"
    assert "stop_token" in capsys.readouterr().err


@pytest.mark.slow
def test_no_special_token_strings_in_any_generated_text(small):
    """The scan of issue 23's goal: 0 special-token strings over the prompts, greedy and sampled, healed or not."""
    bad = special_strings(SMALL)
    texts = []
    for prompt in PROMPTS:
        for heal in (False, True):
            for params in (SamplingParams(max_new_tokens=24), SamplingParams(24, temperature=1.0, seed=1)):
                small.token_healing = heal
                texts.append(small.generate(prompt, params).text)
    small.token_healing = False
    leaks = [(t, s) for t in texts for s in bad if s in t]
    assert leaks == []


@pytest.mark.slow
def test_detokenize_drops_special_tokens(small):
    ids = small.tokenize("<|endoftext|>def f():<|end|>")
    assert small.eos in ids and len(ids) > 2
    assert small.detokenize(ids) == "def f():"
    assert small.detokenize(ids, skip_special=False) == "<|endoftext|>def f():<|end|>"


# --- a random tiny model whose logits are forced ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    gguf = tiny_gguf(2)
    return Engine(built(gguf).dir, gguf, chain_burst=0)  # step by step: forced() patches the host's decode


def forced(eng: Engine, monkeypatch, order: list[int]) -> None:
    """Every step's logits rank ``order`` first (in that order), the rest below."""
    logits = np.zeros(eng.vocab, np.float32)
    logits[order] = np.arange(len(order), 0, -1, dtype=np.float32) * 10

    def prefill(*_):
        eng.seq.length += 1
        return logits.copy()

    def step(seqs, rows, draft=False):  # Engine.step: every row gets the forced logits
        for seq, r in zip(seqs, rows, strict=True):
            seq.length += len(r)
        return [(np.tile(logits, (len(r), 1)), None, None) for r in rows]

    monkeypatch.setattr(eng, "prefill", prefill)
    monkeypatch.setattr(eng, "step", step)


def test_unused_tokens_are_never_sampled(tiny, monkeypatch):
    spec = read_gguf(tiny_gguf(2), check_values=False).tokenizer
    unused = [i for i, t in enumerate(spec.token_type) if t == TOKEN_UNUSED]
    normal = tiny.tokenize("def")[0]
    forced(tiny, monkeypatch, [*unused[:3], normal])
    toks = list(tiny.generate_tokens([5, 6], SamplingParams(max_new_tokens=4)))
    assert toks == [normal] * 4
    toks = list(tiny.generate_tokens([5, 6], SamplingParams(8, temperature=50.0, top_k=1, seed=0)))
    assert toks == [normal] * 8


def test_end_of_turn_control_tokens_stop_and_never_show(tiny, monkeypatch):
    """``<|end|>`` (a control token named as an end of turn) stops with no stop ids; ``<|user|>`` is hidden."""
    end, user = tiny.tokenizer.token_to_id("<|end|>"), tiny.tokenizer.token_to_id("<|user|>")
    assert end in tiny.eog and tiny.eos in tiny.eog and user not in tiny.eog and user in tiny.hidden
    forced(tiny, monkeypatch, [end])
    res = tiny.generate("x", SamplingParams(max_new_tokens=8))
    assert res.tokens == [end] and res.finish_reason == "stop_token" and res.text == ""
    forced(tiny, monkeypatch, [user])
    res = tiny.generate("x", SamplingParams(max_new_tokens=3))
    assert res.tokens == [user] * 3 and res.text == ""
