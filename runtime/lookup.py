"""Prompt-lookup drafts: guess the next tokens by finding the context's last few tokens earlier in the context and
copying what followed them there (Saxena's "prompt lookup decoding"; llama.cpp's ``lookup``, vLLM's n-gram
speculator). Code repeats itself (names, signatures, the line just written), and so does a small model's greedy
output, so these drafts are often right, cost no model call, and need no MTP heads: any model can use them.

:class:`NgramIndex` holds one generation's tokens (the prompt, then each generated token) and, for every n-gram of
``n_min .. n_max`` tokens, where it last ended *with a token after it*. :meth:`NgramIndex.propose` looks up the
context's last ``n_max`` tokens, then shorter suffixes down to ``n_min``, and returns up to ``k`` tokens that followed
the latest match. Appending a token costs ``n_max − n_min + 1`` dictionary writes; the index holds at most that many
entries per token of the context, which the context length bounds.

The drafts are a deterministic function of the tokens so far, so greedy speculation with them keeps plain decoding's
tokens exactly. :mod:`runtime.spec_decode` makes them for greedy generations only: sampled at a temperature they were
accepted too rarely to pay (docs/speculative.md).

    python -m runtime.lookup models/small.gguf "def add(a, b):\\n    return a + b\\n\\ndef sub(a, b):\\n    return a"
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

N_MAX = 4  # the longest suffix looked up
N_MIN = 3  # the shortest: shorter matches are right less often (docs/speculative.md, "Prompt-lookup drafts")


class NgramIndex:
    """The tokens of one generation and where each of their n-grams last ended with a token after it."""

    def __init__(self, tokens: Iterable[int] = (), n_min: int = N_MIN, n_max: int = N_MAX) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram lengths {n_min} .. {n_max}: need 1 <= n_min <= n_max")
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self._end: dict[tuple[int, ...], int] = {}  # n-gram → the index after its latest occurrence with a follower
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        """One more token of the context. The n-grams that end just before it now have a follower: record them."""
        t, end = self.tokens, len(self.tokens)
        for n in range(self.n_min, min(self.n_max, end) + 1):
            self._end[tuple(t[end - n : end])] = end
        t.append(int(token))

    def extend(self, tokens: Iterable[int]) -> None:
        for tok in tokens:
            self.append(tok)

    def sync(self, prompt_len: int, generated: list[int]) -> None:
        """Catch up with a generation whose tokens after the first ``prompt_len`` are ``generated`` (appended only)."""
        if len(self.tokens) < prompt_len + len(generated):
            self.extend(generated[len(self.tokens) - prompt_len :])

    def propose(self, k: int, then: list[int] = ()) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix (``n_max`` down to
        ``n_min`` tokens) seen before; ``[]`` when none was. ``then``: tokens guessed past the context (another
        draft's), as if appended: the proposal continues after them (they are not indexed, nor returned)."""
        t = self.tokens
        if k < 1:
            return []
        end_of = len(t) + len(then)
        for n in range(min(self.n_max, end_of), self.n_min - 1, -1):
            key = tuple(then[-n:]) if n <= len(then) else tuple(t[len(t) - (n - len(then)) :]) + tuple(then)
            end = self._end.get(key)
            if end is not None:
                return t[end : end + k]
        return []


def main(argv: list[str] | None = None) -> None:
    """Show the drafts the index would make at every step of a text's own tokens (the shipped model's tokenizer)."""
    import argparse

    from model.gguf_io import read_gguf
    from model.tokenizer import hf_from_spec

    ap = argparse.ArgumentParser(prog="python -m runtime.lookup", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="the GGUF whose tokenizer to use")
    ap.add_argument("text")
    ap.add_argument("-k", type=int, default=3, help="tokens drafted at most")
    a = ap.parse_args(argv)
    tok = hf_from_spec(read_gguf(a.model, check_values=False).tokenizer)
    ids = tok.encode(a.text).ids
    index, right = NgramIndex(), 0
    for i, t in enumerate(ids):
        d = index.propose(a.k)
        ok = 0
        while ok < len(d) and i + ok < len(ids) and d[ok] == ids[i + ok]:
            ok += 1
        right += ok
        if d:
            print(f"{i:4d} {tok.decode(ids[max(0, i - 4) : i])!r:>24} → {tok.decode(d)!r} ({ok}/{len(d)} right)")
        index.append(t)
    print(f"{len(ids)} tokens, {right} drafted right", file=sys.stderr)


if __name__ == "__main__":
    main()
