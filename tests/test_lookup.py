"""Prompt-lookup drafts (runtime.lookup): the incremental n-gram index against a brute-force scan of the context."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.lookup import NgramIndex

pytestmark = pytest.mark.unit


def scan(tokens: list[int], k: int, n_min: int, n_max: int, then: list[int] = ()) -> list[int]:
    """The reference: for the longest suffix of ``tokens + then`` first, the latest occurrence in ``tokens`` that has
    a token after it there; what follows it."""
    full = tokens + list(then)
    for n in range(min(n_max, len(full)), n_min - 1, -1):
        suffix = full[len(full) - n :]
        for end in range(len(tokens) - 1, n - 1, -1):  # an occurrence ending at `end` (exclusive), end < len
            if tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=60), st.integers(0, 9), st.integers(1, 3), st.integers(0, 3))
def test_index_matches_scan(tokens, k, n_min, extra):
    n_max = n_min + extra
    index = NgramIndex(n_min=n_min, n_max=n_max)
    for i, t in enumerate(tokens):  # after every token, incrementally
        assert index.propose(k) == scan(tokens[:i], k, n_min, n_max)
        index.append(t)
    assert index.propose(k) == scan(tokens, k, n_min, n_max)
    assert NgramIndex(tokens, n_min, n_max).propose(k) == scan(tokens, k, n_min, n_max)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40), st.lists(st.integers(0, 4), max_size=5), st.integers(0, 6))
def test_proposal_after_guessed_tokens_matches_scan(tokens, then, k):
    """``propose(k, then)``: as if ``then`` (another draft's tokens) followed the context, which stays unchanged."""
    index = NgramIndex(tokens, 2, 4)
    assert index.propose(k, then) == scan(tokens, k, 2, 4, then)
    assert index.tokens == tokens


def test_longest_suffix_wins_and_latest_occurrence():
    index = NgramIndex([1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3], n_min=2, n_max=3)
    assert index.propose(2) == [9, 7]  # (1, 2, 3) matches at the start; (2, 3) alone would give 8 (later)
    index = NgramIndex([4, 2, 3, 9, 5, 2, 3, 8, 6, 2, 3], n_min=2, n_max=3)
    assert index.propose(3) == [8, 6, 2]  # only (2, 3) matches: its latest earlier occurrence
    assert NgramIndex([1, 2, 3], n_min=2).propose(4) == []


def test_sync_appends_generated_tokens_once():
    index = NgramIndex([5, 6, 7, 5, 6])
    gen = [7]
    index.sync(5, gen)
    index.sync(5, gen)
    assert index.tokens == [5, 6, 7, 5, 6, 7]
    assert index.propose(3) == [5, 6, 7]


def test_bad_lengths():
    with pytest.raises(ValueError):
        NgramIndex(n_min=0)
    with pytest.raises(ValueError):
        NgramIndex(n_min=3, n_max=2)
