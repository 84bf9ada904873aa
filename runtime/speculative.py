"""Speculative sampling's exact acceptance rule (Leviathan et al. 2023; Chen et al. 2023), in numpy.

A cheap draft model proposes k tokens, the target model scores them in one forward pass, and this module decides
which drafts to keep so that the emitted tokens are distributed exactly as if the target model had sampled them one
at a time. At one position, with p the target's probabilities (after every sampling transform) and q the
probabilities the draft token x was sampled from:

    accept x with probability  min(1, p(x) / q(x));
    on rejection, emit a token from the residual  r(y) = max(0, p(y) − q(y)) / Σ_z max(0, p(z) − q(z)).

Why it is exact: P(reject) = Σ_x max(0, q(x) − p(x)) = Σ_z max(0, p(z) − q(z)) (both are 1 − Σ min(p, q)), so
P(emit y) = q(y)·min(1, p(y)/q(y)) + P(reject)·r(y) = min(p(y), q(y)) + max(0, p(y) − q(y)) = p(y).
A deterministic (argmax) draft is q = one-hot at x: keep x with probability p(x), else sample p with x removed.

:func:`accept` is one position, :func:`accept_batch` many independent positions at once (rows; ``accept`` is its
one-row case), :func:`accept_chain` a step's k drafts: the accepted prefix, then the residual sample at the first
rejection or, when all k are kept, a bonus token from p_k (:func:`sample`, plain sampling from one distribution).

Randomness: only ``rng.random`` is used. Each position draws two uniforms u, w in [0, 1): it accepts iff
u·q(x) < p(x) (the division-free form of u < p(x)/q(x), so q(x) = 0 accepts whenever p(x) > 0 and p(x) = 0 always
rejects), and w picks the residual token by inverse CDF: the first index whose cumulative weight exceeds w·total
(zero weights are never picked). The bonus token draws one uniform the same way.

Numerics: when Σ max(0, p − q) ≤ TINY_RESIDUAL (p = q up to rounding) a rejection is that unlikely, and if one
happens the token comes from p instead of the rounding noise; that changes the emitted distribution by at most
TINY_RESIDUAL in total variation. Nothing divides by a probability, so no input of valid shape gives NaN.

Tests: ``.venv/bin/python -m pytest -q tests/test_speculative_rule.py`` (chi-square goodness of fit at α = 1e-3,
with a check that the same test catches plausible wrong rules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TINY_RESIDUAL = 1e-9  # below this the residual is rounding noise (p = q): a rejection then samples from p


def _rows(x, name: str) -> np.ndarray:
    """``x`` as a float64 (B, V) array whose rows are finite, non-negative weights with positive sums (else
    ValueError)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (rows, vocab) array, got shape {x.shape}")
    if x.size and not (x.min() >= 0 and x.max() < np.inf and x.sum(axis=1).min() > 0):  # False for NaN too
        raise ValueError(f"{name} must be finite and non-negative with positive mass in every row")
    return x


def _inverse_cdf(weights: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One index per row of non-negative (B, V) weights with positive sums, from one uniform w[b] in [0, 1) each:
    the first index whose cumulative weight exceeds w·total (searchsorted 'right'), so zero weights are never picked."""
    c = np.cumsum(weights, axis=1)
    picked = (c <= (w * c[:, -1])[:, None]).sum(axis=1)
    return np.minimum(picked, weights.shape[1] - 1)  # w·total < total already; this only guards the index


def accept_batch(
    p: np.ndarray, drafts: np.ndarray, q: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The rule at B independent positions: p (B, V), drafts (B,), q (B, V) or None (every draft deterministic).
    Returns (tokens (B,) int64, accepted (B,) bool). Draws ``rng.random((2, B))``: acceptance uniforms, then
    residual uniforms."""
    p = _rows(p, "p")
    drafts = np.asarray(drafts)
    b, vocab = p.shape
    if drafts.shape != (b,) or not np.issubdtype(drafts.dtype, np.integer):
        raise ValueError(f"drafts must be {b} integer token ids, got {drafts.dtype} {drafts.shape}")
    if np.any((drafts < 0) | (drafts >= vocab)):
        raise ValueError(f"draft token id out of range [0, {vocab}): {drafts.tolist()}")
    rows = np.arange(b)
    if q is None:
        q = np.zeros_like(p)
        q[rows, drafts] = 1.0
    else:
        q = _rows(q, "q")
        if q.shape != p.shape:
            raise ValueError(f"q has shape {q.shape}, p has {p.shape}")
    u, w = rng.random((2, b))
    accepted = u * q[rows, drafts] < p[rows, drafts]
    tokens = drafts.astype(np.int64)
    rejected = ~accepted
    if rejected.any():
        p, q = p[rejected], q[rejected]
        residual = np.maximum(p - q, 0.0)
        noise = residual.sum(axis=1) <= TINY_RESIDUAL
        residual[noise] = p[noise]
        tokens[rejected] = _inverse_cdf(residual, w[rejected])
    return tokens, accepted


def accept(p: np.ndarray, draft: int, q: np.ndarray | None, rng: np.random.Generator) -> tuple[int, bool]:
    """One draft position. p: the target model's probabilities at this position (float64, sums to 1, after every
    sampling transform: temperature, top-k/top-p, penalties). draft: the drafted token id. q: the probabilities the
    draft was sampled from, or None when the draft is deterministic (an argmax: q is one-hot at draft).
    Accept with probability min(1, p[draft] / q[draft]); on acceptance return (draft, True); else return
    (token sampled from the residual r = max(0, p - q) / sum(...), False). The emitted token is then distributed
    exactly as p. Draws two uniforms (module docstring); ValueError for a draft out of range or malformed input."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p must be one distribution (1-D), got shape {p.shape}")
    q_row = None if q is None else np.asarray(q, dtype=np.float64)[None]
    tokens, accepted = accept_batch(p[None], np.asarray([draft]), q_row, rng)
    return int(tokens[0]), bool(accepted[0])


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from p (1-D, non-negative, positive sum) by inverse CDF on one ``rng.random()`` uniform."""
    p = _rows(np.asarray(p, dtype=np.float64)[None], "p")
    return int(_inverse_cdf(p, rng.random(1))[0])


def accept_chain(
    ps: Callable[[int], np.ndarray] | Sequence[np.ndarray],
    drafts: Sequence[int],
    qs: Sequence[np.ndarray | None],
    rng: np.random.Generator,
) -> tuple[list[int], int]:
    """ps: a callable i -> p_i (the target distribution at draft position i, given drafts[:i] accepted; called lazily
    only while drafts are accepted, because p_i may depend on the accepted tokens, e.g. penalties), or a list of k+1
    arrays. drafts: k ids; qs: k arrays or Nones. Returns (emitted tokens, number of drafts accepted): emitted = the
    accepted drafts followed by one more token: the residual sample at the first rejection, or, if all k were
    accepted, a sample from p_k (the bonus token). So 1 ≤ len(emitted) ≤ k + 1."""
    k = len(drafts)
    if len(qs) != k:
        raise ValueError(f"{k} drafts but {len(qs)} draft distributions")
    if not callable(ps) and len(ps) != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} target distributions, got {len(ps)}")
    p_at = ps if callable(ps) else ps.__getitem__
    emitted = []
    for i, (draft, q) in enumerate(zip(drafts, qs, strict=True)):
        token, accepted = accept(p_at(i), draft, q, rng)
        emitted.append(token)
        if not accepted:
            return emitted, i
    emitted.append(sample(p_at(k), rng))
    return emitted, k
