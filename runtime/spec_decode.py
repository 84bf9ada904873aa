"""Self-speculative decoding: draft, verify in one step, accept. :func:`advance` moves any number of generations
forward by one step; without drafts (``Engine.draft_tokens = Engine.lookup_tokens = 0``) it is plain batched decoding.
The drafts of a greedy generation come first from prompt lookup (:mod:`runtime.lookup`: the tokens that followed the
context's last 3–4 tokens where they occurred before, up to ``Engine.lookup_tokens``), else from the model's own
multi-token-prediction (MTP) heads.

Per step and sequence, ``t`` being the token picked last (not in the cache yet) and ``h`` the normed hidden state at
the cache's last position (the one whose logits gave ``t``):

1. **draft**: a prompt-lookup match, else the recurrent MTP heads on ``h`` and ``t``
   (:meth:`runtime.engine.Engine.draft`, one call for every sequence) give ``k`` greedy tokens for the positions
   after ``t``, each step fed the previous one's draft;
2. **verify**: ``t`` and the drafts go into one ``decode_b{B}`` call as consecutive rows of the sequence
   (:meth:`~runtime.engine.Engine.step`): row ``j`` holds the main model's logits after ``t, d_1 .. d_j``;
3. **accept**: row by row, the generation's own :class:`~runtime.decoding.TokenPicker` (penalties, stop conditions)
   decides. Greedy picks the argmax and goes on while it equals the draft, so the tokens are exactly those of plain
   greedy decoding (a row's logits do not depend on the other rows of its call). Sampling accepts draft ``d_j`` with
   probability ``min(1, p(d_j) / q(d_j))`` and otherwise samples the residual ``max(0, p − q)``
   (:func:`runtime.speculative.accept`; the drafts are argmaxes, so ``q`` is one-hot: accept with probability
   ``p(d_j)``, else sample ``p`` without ``d_j``), which keeps the main model's distribution exactly. The row after
   the last accepted draft gives one more token, so a step yields 1 .. k + 1 tokens. The cache keeps the rows up to
   the last accepted draft: ``seq.length`` is set back past the rest, whose keys are overwritten later (nothing is
   copied).

Drafts per sequence: ``Engine.lookup_tokens`` or ``Engine.draft_tokens``, fewer when the step's rows would not fit
the largest compiled batch (the verify rows of all sequences share it, so speculation gives way as the batch fills),
none while token healing constrains the tokens, never past the context or the token limit.

Tests: ``pytest -q tests/test_spec_decode.py tests/test_speculative_rule.py tests/test_lookup.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.decoding import GREEDY_BELOW, TokenPicker, distribution
from runtime.kv_cache import Sequence
from runtime.speculative import accept


@dataclass
class Draft:
    """The drafted tokens of one sequence and the distribution each was drawn from (None: deterministic, the heads'
    argmax)."""

    tokens: list[int]
    q: list[np.ndarray | None]


def draft_room(engine, pickers: list[TokenPicker], seqs: list[Sequence]) -> list[int]:
    """The most drafts each sequence may take this step: its share of the largest compiled batch (the verify rows
    of all sequences go in one call), the room left in the context and below the token limit; none while token
    healing constrains the tokens."""
    share = max(0, engine.batch_sizes[-1] // len(seqs) - 1)
    out = []
    for picker, seq in zip(pickers, seqs, strict=True):
        room = engine.ctx - seq.length - 1  # the verify rows t, d_1 .. d_k must fit the context
        left = picker.limit - len(picker.result.tokens) - 1  # drafts past the token limit could never be used
        out.append(0 if picker.pending else max(0, min(share, room, left)))
    return out


def make_drafts(engine, pickers: list[TokenPicker], seqs: list[Sequence], tokens: list[int]) -> list[Draft]:
    """Each sequence's drafts after ``tokens[i]`` (its last pick, the end of ``pickers[i]``'s tokens): greedy, the
    prompt-lookup drafts when the context's end occurred before (up to ``Engine.lookup_tokens``,
    :mod:`runtime.lookup`; sampled at 0.8 they were accepted too rarely to pay: docs/speculative.md), else the MTP
    heads' greedy drafts from ``seq.hidden`` (up to ``Engine.draft_tokens``; one :meth:`Engine.draft` call for all
    sequences that take any); greedy, either is continued by lookup as if its drafts were in the context, up to
    ``Engine.lookup_tokens`` drafts in all. Within :func:`draft_room`."""
    rooms = draft_room(engine, pickers, seqs)
    drafts = [Draft([], []) for _ in seqs]
    need, heads = [], 0
    for i, (picker, seq, room) in enumerate(zip(pickers, seqs, rooms, strict=True)):
        if not room:
            continue
        if engine.lookup_tokens and picker.lookup is not None:  # a greedy generation (TokenPicker)
            picker.lookup.sync(picker.prompt_len, picker.result.tokens)
            d = picker.lookup.propose(min(engine.lookup_tokens, room))
            if d:
                drafts[i] = Draft(d, [None] * len(d))
                continue
        c = min(engine.draft_tokens, room) if seq.hidden is not None else 0
        if c and seq.drafts is not None and seq.drafts_after == tokens[i]:  # the last step drafted after this token
            drafts[i] = Draft([int(t) for t in seq.drafts[:c]], [None] * c)
        elif c:
            need.append((i, c))
            heads = max(heads, c)
    if need:
        out = engine.draft(np.stack([seqs[i].hidden for i, _ in need]), [tokens[i] for i, _ in need], heads)
        for (i, c), row in zip(need, out, strict=True):
            drafts[i] = Draft([int(t) for t in row[:c]], [None] * c)
    for i, (picker, room) in enumerate(zip(pickers, rooms, strict=True)):
        d = drafts[i].tokens  # continued by lookup from the context and these drafts, up to lookup_tokens in all
        if d and picker.lookup is not None and engine.lookup_tokens and min(engine.lookup_tokens, room) > len(d):
            more = picker.lookup.propose(min(engine.lookup_tokens, room) - len(d), then=d)
            drafts[i] = Draft(d + more, [None] * (len(d) + len(more)))
    return drafts


def settle(picker: TokenPicker, seq: Sequence, base: int, rows: tuple, draft: Draft) -> list[int]:
    """Accept the verified rows ``(logits, hidden, fused drafts or None)`` of one sequence (``base``: its cache
    length before the step); the new tokens, in order (already recorded by ``picker``). Sets ``seq.length``, and
    ``seq.hidden`` (and the fused drafts) to the last kept row's."""
    logits, hidden, fused = rows
    k, sampled = len(draft.tokens), picker.params.temperature >= GREEDY_BELOW
    new, kept = [], 0
    for j in range(k + 1):
        length = base + 1 + j  # tokens in the cache once row j's token is chosen
        if j < k and sampled:
            p = distribution(picker.processed(logits[j]), picker.params)
            tok, ok = accept(p, draft.tokens[j], draft.q[j], picker.rng)
            picker.push(tok, length)
        else:
            tok = picker.pick(logits[j], length)
            ok = j < k and tok == draft.tokens[j]
        new.append(tok)
        if not ok:
            break
        kept = j + 1
        if picker.done:
            break
    if k:
        picker.result.drafted += k
        picker.result.accepted += kept
        picker.result.spec_steps += 1
    seq.length = base + 1 + kept
    if hidden is not None:
        seq.hidden = hidden[kept]
    seq.drafts = fused[:, kept] if fused is not None else None  # made after the row's argmax: used if it is picked
    seq.drafts_after = int(np.argmax(logits[kept])) if fused is not None else -1
    return new


def advance(engine, pickers: list[TokenPicker], seqs: list[Sequence], tokens: list[int]) -> list[list[int]]:
    """One step for every generation: ``tokens[i]`` (picked last, not in the cache) goes into ``seqs[i]`` with its
    drafts; the tokens each generation gained (1 .. k + 1; ``pickers[i].done`` says whether it has ended)."""
    drafts = make_drafts(engine, pickers, seqs, tokens)
    bases = [s.length for s in seqs]
    fused = bool(engine.draft_tokens) and any(d.tokens for d in drafts)  # the next step's MTP drafts, where fused
    out = engine.step(seqs, [[t, *d.tokens] for t, d in zip(tokens, drafts, strict=True)], draft=fused)
    return [settle(p, s, b, rows, d) for p, s, b, rows, d in zip(pickers, seqs, bases, out, drafts, strict=True)]
