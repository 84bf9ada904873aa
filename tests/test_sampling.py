"""Repetition controls shared by the PyTorch loop and the compiled runtime (``model.sampling.penalize``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.sampling import SamplingParams, penalize


def ngrams(seq, n):
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


@pytest.mark.unit
@given(gen=st.lists(st.integers(0, 5), max_size=40), n=st.integers(2, 5))
def test_no_repeat_ngram_bans_exactly_the_completions(gen, n):
    out = penalize(np.zeros(6, np.float32), gen, SamplingParams(no_repeat_ngram=n))
    for t in range(6):
        repeats = len(gen) >= n - 1 and tuple([*gen[len(gen) - n + 1 :], t]) in set(ngrams(gen, n))
        assert (out[t] == -np.inf) == repeats


@pytest.mark.unit
@given(gen=st.lists(st.integers(0, 5), max_size=30), f=st.floats(-2, 2), p=st.floats(-2, 2))
def test_frequency_and_presence_penalties(gen, f, p):
    logits = np.arange(6, dtype=np.float32)
    out = penalize(logits, gen, SamplingParams(frequency_penalty=f, presence_penalty=p))
    counts = np.bincount(np.asarray(gen, int), minlength=6)
    want = logits - (f * counts + p * (counts > 0)).astype(np.float32)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    assert out is not logits


@pytest.mark.unit
def test_plain_params_change_nothing_and_bad_ones_are_refused():
    logits = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(penalize(logits, [1, 1, 1], SamplingParams()), logits)
    for bad in ({"no_repeat_ngram": 1}, {"no_repeat_ngram": -2}, {"frequency_penalty": 3.0}, {"presence_penalty": -9},
                {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": -1.0},
                {"top_p": float("nan")}, {"frequency_penalty": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.unit
def test_greedy_generation_never_repeats_an_ngram():
    """Through the PyTorch loop on a random tiny model (greedy loops are what it breaks)."""
    import torch

    from model.config import get_config
    from model.generate import generate
    from model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).eval()
    plain = generate(model, [5, 6], SamplingParams(max_new_tokens=48)).tokens
    toks = generate(model, [5, 6], SamplingParams(max_new_tokens=48, no_repeat_ngram=3)).tokens
    assert len(set(ngrams(toks, 3))) == len(ngrams(toks, 3))
    assert len(set(ngrams(plain, 3))) < len(ngrams(plain, 3))  # the control did something on this model


@pytest.mark.build
def test_incremental_detokenization_equals_whole_decode():
    """Engine.stream_text decodes only the tokens after the last character boundary: for byte-level BPE that is the
    whole decode's suffix, also across multi-byte characters split over tokens."""
    from model.gguf_io import read_gguf
    from model.tokenizer import hf_from_spec

    tok = hf_from_spec(read_gguf("models/small.gguf", check_values=False).tokenizer)
    text = "def f(x):\n    return 'héllo → wörld 🙂' * x  # ünïcode\n"
    ids = tok.encode(text).ids
    out, read, held = "", 0, 0
    for n in range(1, len(ids) + 1):
        piece = tok.decode(ids[read:n], skip_special_tokens=False)
        if piece.endswith("\ufffd"):
            held += 1
            continue
        out, read = out + piece, n
    assert out == tok.decode(ids, skip_special_tokens=False) == text
    assert held, "no character was split across tokens: the case this test is for did not occur"
