"""Token healing for byte-level BPE: a prompt that ends inside what the tokenizer would merge with the next characters.

A prompt that ends with a newline, indentation or half an identifier is tokenized at a boundary the model never saw in
training: a docstring line followed by a newline ends in the token ``"\\n"``, while the training text (the newline and
the body's indentation, then ``return``) has ``"\\n   "`` + ``" return"``. Seeing the lone ``"\\n"``, the model
predicts what followed it in training (end of file, a top-level statement). Healing backs off the prompt's last
pre-tokenizer word (at most :data:`MAX_TOKENS` tokens and :data:`MAX_BYTES` bytes; those are the only tokens that
characters appended to the prompt can re-merge) and constrains the first generated tokens to spell the removed bytes
again: each one must either start with what is still to be re-spelled or be a prefix of it. Once the removed bytes are
covered generation is free; the text the user sees starts after them, so ``prompt + text`` stays what the model wrote.

All of it is byte-level: a token's bytes come from the GPT-2 byte alphabet (a token may hold part of a UTF-8
character), the removed text starts at a pre-tokenizer word boundary (a character boundary) and ends the prompt.
:class:`TokenTable` is built once per tokenizer: every token's bytes, a dict from bytes to id and a sorted index
(tokens starting with ``p`` are one contiguous range, found by bisection), so one healed step costs a few dict look-ups
and two bisections (cached per remaining prefix). Special and unused tokens never take part.

    from runtime.healing import TokenTable, plan
    table = TokenTable(hf_tokenizer, hidden={0, 1})
    heal = plan(hf_tokenizer.encode(prompt), table)     # None, or keep / removed bytes / removed text
    table.allowed(heal.prefix)                          # ids a first generated token may take

Tests: ``pytest -q tests/test_token_healing.py``.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

MAX_TOKENS = 8  # at most this many prompt tokens are backed off ...
MAX_BYTES = 64  # ... holding at most this many bytes


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the others for chr(256 + i)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


@dataclass(frozen=True)
class Heal:
    """Keep the prompt's first ``keep`` tokens; the ``removed`` after them, ``prefix`` (bytes) = ``text``, are
    generated again under constraint."""

    keep: int
    removed: int
    prefix: bytes
    text: str


class TokenTable:
    """Every token's bytes and a prefix index over them, for one tokenizer (an HF ``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer, hidden: set[int] | frozenset[int] = frozenset()) -> None:
        dec = byte_decoder()
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bytes: list[bytes | None] = [None] * n  # None: special, unused, or not in the byte alphabet
        for i in range(n):
            s = tokenizer.id_to_token(i)
            if i in hidden or not s or any(c not in dec for c in s):
                continue
            self.bytes[i] = bytes(dec[c] for c in s)
        self.by_bytes = {b: i for i, b in enumerate(self.bytes) if b is not None}
        order = sorted(self.by_bytes)
        self._keys = order
        self._ids = np.array([self.by_bytes[b] for b in order], dtype=np.int64)
        # every byte has a token of its own: any remainder can be spelled, so healing can always finish
        self.complete = all(bytes([b]) in self.by_bytes for b in range(256))
        self._cache: dict[bytes, np.ndarray] = {}

    def starting_with(self, p: bytes) -> np.ndarray:
        """Ids of the tokens whose bytes start with ``p`` (a contiguous range of the sorted index)."""
        lo = bisect.bisect_left(self._keys, p)
        stem = p.rstrip(b"\xff")
        hi = bisect.bisect_left(self._keys, stem[:-1] + bytes([stem[-1] + 1])) if stem else len(self._keys)
        return self._ids[lo:hi]

    def allowed(self, p: bytes) -> np.ndarray:
        """Ids a token may take while ``p`` is still to be re-spelled: it starts with ``p``, or is a prefix of it."""
        got = self._cache.get(p)
        if got is None:
            shorter = [self.by_bytes[p[:i]] for i in range(1, len(p)) if p[:i] in self.by_bytes]
            got = np.union1d(self.starting_with(p), np.array(shorter, dtype=np.int64))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[p] = got
        return got

    def advance(self, p: bytes, token: int) -> bytes:
        """What is left to re-spell after ``token`` (one of :meth:`allowed`): empty once ``p`` is covered."""
        b = self.bytes[token] or b""
        return b"" if b.startswith(p) else p[len(b) :]


def plan(encoding, table: TokenTable, max_tokens: int = MAX_TOKENS, max_bytes: int = MAX_BYTES) -> Heal | None:
    """What to back off from a tokenized prompt (an HF ``Encoding``: ids and word ids): the trailing tokens of its
    last pre-tokenizer word, within the limits, keeping at least one token. None when there is nothing to heal (a
    one-token prompt, a prompt that ends with a special token, a tokenizer without every single-byte token)."""
    ids, words = encoding.ids, encoding.word_ids
    if not table.complete or len(ids) < 2:
        return None
    last = words[-1]
    k, size = 0, 0
    while k < min(max_tokens, len(ids) - 1):
        i = len(ids) - 1 - k
        b = table.bytes[ids[i]]
        if b is None or last is None or words[i] != last or size + len(b) > max_bytes:
            break
        k, size = k + 1, size + len(b)
    while k:  # the removed bytes must start on a character boundary (the limits may cut a word mid-character)
        prefix = b"".join(table.bytes[t] for t in ids[len(ids) - k :])
        try:
            return Heal(len(ids) - k, k, prefix, prefix.decode("utf-8"))
        except UnicodeDecodeError:
            k -= 1
    return None
