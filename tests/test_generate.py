"""The PyTorch generation loop: greedy = argmax of the full forward, seeded sampling, filters, stop conditions.

pytest tests/test_generate.py -q
"""

from __future__ import annotations

import pytest
import torch

from model.config import get_config
from model.generate import Generation, SamplingParams, filter_logits, generate, stream
from model.transformer import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_config("tiny", n_streams=2)).eval()


PROMPT = [1, 17, 42, 99]


@pytest.mark.e2e
def test_greedy_equals_argmax_of_full_forward(model):
    out = generate(model, PROMPT, SamplingParams(max_new_tokens=10)).tokens
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(10):  # no cache: recompute the whole sequence every step
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(PROMPT) :]


@pytest.mark.e2e
def test_sampling_is_seeded(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    a = generate(model, PROMPT, params).tokens
    assert a == generate(model, PROMPT, params).tokens
    others = [generate(model, PROMPT, SamplingParams(max_new_tokens=12, temperature=1.0, seed=s)).tokens
              for s in range(8, 12)]  # fmt: skip
    assert any(o != a for o in others)  # 12 draws at T=1 over 512 tokens: equal for 4 seeds would be absurd


@pytest.mark.e2e
def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPT, SamplingParams(max_new_tokens=6)).tokens
    for filters in ({"top_k": 1}, {"top_p": 1e-6}):
        params = SamplingParams(max_new_tokens=6, temperature=2.0, seed=3, **filters)
        assert generate(model, PROMPT, params).tokens == greedy


@pytest.mark.unit
def test_filter_logits():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7))  # 0.5 < 0.7 ≤ 0.75: the two largest
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits[[3, 1, 0, 2]], top_k=0, top_p=0.5))  # order does not matter
    assert kept.tolist() == [False, False, True, False]


@pytest.mark.unit
def test_stop_token_and_stop_string(model):
    greedy = generate(model, PROMPT, SamplingParams(max_new_tokens=10)).tokens
    stop = greedy[3]
    first = greedy.index(stop)
    res = generate(model, PROMPT, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    assert res.tokens == greedy[: first + 1] and res.finish_reason == "stop_token"

    def decode(ids):
        return " ".join(map(str, ids))

    marker = str(greedy[2])
    res = generate(model, PROMPT, SamplingParams(max_new_tokens=10, stop_strings=(marker,)), decode)
    assert res.finish_reason == "stop_string" and marker not in res.text
    assert res.tokens == greedy[: len(res.tokens)] and len(res.tokens) <= 3


@pytest.mark.unit
def test_stream_yields_incrementally_and_respects_context():
    torch.manual_seed(0)
    small = Transformer(get_config("tiny", max_seq_len=8)).eval()
    finish = Generation()
    it = stream(small, [1, 2, 3], SamplingParams(max_new_tokens=100), finish=finish)
    assert isinstance(next(it), int)  # a generator: the first token arrives before the rest are computed
    rest = list(it)
    assert 1 + len(rest) == 6 and finish.finish_reason == "context"  # 3 prompt + 5 fed tokens fill 8 positions
    with pytest.raises(ValueError, match="decode"):
        list(stream(small, [1], SamplingParams(stop_strings=("x",))))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
