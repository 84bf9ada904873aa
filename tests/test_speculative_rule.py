"""The speculative-sampling acceptance rule (:mod:`runtime.speculative`): the emitted tokens are distributed as p.

Goodness of fit is Pearson's chi-square at ALPHA = 1e-3 with fixed seeds, so every run draws the same samples and
gets the same verdict. The p-value comes from the chi-square survival function in closed form (:func:`chi2_sf`,
integer degrees of freedom) because scipy is not a project dependency; a test checks it against critical values
computed with scipy. :func:`test_wrong_rules_are_caught` shows the check has power:
it rejects plausible wrong rules at the same ALPHA and sample size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.speculative import TINY_RESIDUAL, accept, accept_batch, accept_chain, sample

pytestmark = pytest.mark.unit

ALPHA = 1e-3
N = 200_000  # draws per single-position case (vectorised through accept_batch: about 0.1 s each)
SEED = 20261130


def chi2_sf(x: float, df: int) -> float:
    """P(X ≥ x) for X ~ chi-square with integer df ≥ 1, in closed form:
    even df: e^(−x/2) Σ_{0≤i<df/2} (x/2)^i / i!;  odd df: erfc(√(x/2)) + e^(−x/2) Σ_{1≤i≤(df−1)/2} (x/2)^(i−½) / Γ(i+½).
    """
    assert df >= 1
    h = x / 2
    if df % 2 == 0:
        term = total = math.exp(-h)
        for i in range(1, df // 2):
            term *= h / i
            total += term
        return total
    total = math.erfc(math.sqrt(h))
    term = math.exp(-h) * math.sqrt(h) / math.gamma(1.5)
    for i in range(1, (df + 1) // 2):
        total += term
        term *= h / (i + 0.5)
    return total


def gof_pvalue(tokens: np.ndarray, p: np.ndarray) -> float:
    """Pearson chi-square p-value of the tokens' counts against len(tokens)·p. Any token with p = 0 gives 0.
    Tokens expected fewer than 5 times are pooled (smallest first, until the pool expects 5) so the chi-square
    approximation holds."""
    p = p / p.sum()
    observed = np.bincount(tokens, minlength=len(p)).astype(np.float64)
    expected = len(tokens) * p
    if observed[expected == 0].any():
        return 0.0
    order = np.argsort(expected[expected > 0])
    observed, expected = observed[expected > 0][order], expected[expected > 0][order]
    n_small = int(np.sum(expected < 5))
    if n_small:
        k = max(n_small, int(np.searchsorted(np.cumsum(expected), 5.0)) + 1)
        observed = np.r_[observed[:k].sum(), observed[k:]]
        expected = np.r_[expected[:k].sum(), expected[k:]]
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return chi2_sf(statistic, len(expected) - 1)


def softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


# 8-token distributions; q is what the draft is sampled from (None: a deterministic draft, the given token)
P = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
Q = np.array([0.05, 0.10, 0.25, 0.05, 0.20, 0.15, 0.10, 0.10])
P_ZEROS = np.array([0.40, 0.0, 0.25, 0.0, 0.20, 0.0, 0.15, 0.0])  # zeros where Q has mass
Q_ZEROS = np.array([0.0, 0.0, 0.50, 0.0, 0.30, 0.20, 0.0, 0.0])  # zeros where P has mass
Q_DISJOINT = np.array([0.0, 0.5, 0.0, 0.3, 0.0, 0.2, 0.0, 0.0])  # no overlap with P_ZEROS: every draft is rejected
P_SHARP = softmax([8, 2, 1, 0, -1, -2, -4, -8])  # 0.997 on token 0; the last tokens are pooled by gof_pvalue
CASES = {  # name: (p, q, the draft when q is None)
    "q differs from p": (P, Q, None),
    "argmax draft (q None), not p's mode": (P, None, 4),
    "argmax draft (q None), p's mode": (P, None, 0),
    "q equals p": (P, P, None),
    "p has zeros where q has mass": (P_ZEROS, Q, None),
    "q has zeros where p has mass": (P, Q_ZEROS, None),
    "disjoint supports": (P_ZEROS, Q_DISJOINT, None),
    "sharp p": (P_SHARP, Q, None),
    "sharp p, argmax draft elsewhere": (P_SHARP, None, 2),
}


def drafts_for(q: np.ndarray | None, draft: int | None, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.full(n, draft) if q is None else rng.choice(len(q), size=n, p=q)


def first_tokens(p: np.ndarray, q: np.ndarray | None, draft: int | None, n: int, seed: int) -> np.ndarray:
    """The emitted token of n independent single-position steps (drafts from q, or the fixed draft), vectorised."""
    rng = np.random.default_rng(seed)
    drafts = drafts_for(q, draft, n, rng)
    q_rows = None if q is None else np.broadcast_to(q, (n, len(q)))
    tokens, accepted = accept_batch(np.broadcast_to(p, (n, len(p))), drafts, q_rows, rng)
    assert np.all(tokens[accepted] == drafts[accepted])
    return tokens


@pytest.mark.parametrize(("p", "q", "draft"), list(CASES.values()), ids=list(CASES))
def test_emitted_token_is_distributed_as_p(p, q, draft):
    assert gof_pvalue(first_tokens(p, q, draft, N, SEED), p) >= ALPHA


def test_the_one_position_function_too():
    """The same check through accept() itself, one call per draw (fewer draws: a call costs tens of µs)."""
    rng = np.random.default_rng(SEED)
    for p, q, draft, n in [(P, Q, None, 12_000), (P, None, 4, 4_000)]:
        tokens = [accept(p, d, q, rng)[0] for d in drafts_for(q, draft, n, rng)]
        assert gof_pvalue(np.array(tokens), p) >= ALPHA


# --- power: the same check, the same draws, applied to plausible wrong rules ---------------------------------------


def harness_tokens(p, q, draft, accept_prob, residual, n: int = N, seed: int = SEED) -> np.ndarray:
    """A vectorised single-position step with a pluggable rule: keep the draft x with probability
    accept_prob(p(x), q(x)), else sample residual(p, q) (p itself when that is rounding noise)."""
    rng = np.random.default_rng(seed)
    drafts = drafts_for(q, draft, n, rng)
    q = np.eye(len(p))[draft] if q is None else q
    u, w = rng.random((2, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = u < accept_prob(p[drafts], q[drafts])
    r = residual(p, q)
    c = np.cumsum(p if r.sum() <= TINY_RESIDUAL else r)
    resampled = np.minimum(np.searchsorted(c, w * c[-1], side="right"), len(p) - 1)
    return np.where(keep, drafts, resampled)


def ratio(pd, qd):
    return np.minimum(1.0, pd / qd)


def clipped(p, q):
    return np.maximum(p - q, 0.0)


# "accept with probability p/q without the min" is not among them: for u in [0, 1), u < p/q and u < min(1, p/q) are
# the same event, so that rule is the right one.
WRONG_RULES = {
    "accept always": (lambda pd, qd: np.ones_like(pd), clipped),
    "on rejection sample from p": (ratio, lambda p, q: p),
    "accept with probability p(x) (q ignored)": (lambda pd, qd: pd, clipped),
    "accept with probability q(x)/p(x) (inverted)": (lambda pd, qd: np.minimum(1.0, qd / pd), clipped),
    "residual |p - q| (no clipping)": (ratio, lambda p, q: np.abs(p - q)),
}


def test_the_harness_with_the_right_rule_is_accept_batch():
    """Same seed, same draws: the harness with the right parts emits exactly accept_batch's tokens."""
    for p, q, draft in CASES.values():
        assert np.array_equal(harness_tokens(p, q, draft, ratio, clipped), first_tokens(p, q, draft, N, SEED))


@pytest.mark.parametrize("rule", list(WRONG_RULES))
def test_wrong_rules_are_caught(rule):
    accept_prob, residual = WRONG_RULES[rule]
    pvalues = [gof_pvalue(harness_tokens(p, q, draft, accept_prob, residual), p) for p, q, draft in CASES.values()]
    assert min(pvalues) < ALPHA, dict(zip(CASES, pvalues, strict=True))


# scipy.stats.chi2.isf(1e-3, df) (scipy 1.17.1): the critical values at ALPHA, so chi2_sf must give back 1e-3
CRITICAL_AT_ALPHA = {1: 10.827566170662733, 2: 13.815510557964274, 3: 16.26623619623813, 4: 18.466826952903173,
                     7: 24.321886347856854, 10: 29.58829844507442, 35: 66.61882884370104}  # fmt: skip


def test_chi2_sf_gives_alpha_at_the_critical_values():
    for df, critical in CRITICAL_AT_ALPHA.items():
        assert chi2_sf(critical, df) == pytest.approx(ALPHA, rel=1e-9)
    assert chi2_sf(0.0, 5) == 1.0 and chi2_sf(1e4, 35) == 0.0


# --- two positions: the joint distribution of the first two generated tokens -------------------------------------

V6 = 6
_chains = np.random.default_rng(7)
P_START, P_NEXT = _chains.dirichlet(np.full(V6, 3.0)), _chains.dirichlet(np.full(V6, 3.0), size=V6)
Q_START, Q_NEXT = _chains.dirichlet(np.full(V6, 1.0)), _chains.dirichlet(np.full(V6, 1.0), size=V6)


def after(start: np.ndarray, rows: np.ndarray, token: int | None) -> np.ndarray:
    """A Markov chain's distribution after ``token`` (None: at the start)."""
    return start if token is None else rows[token]


def speculative_step(context: int | None, rng: np.random.Generator) -> list[int]:
    """One step after ``context``: 1 or 2 drafts from the Q chain, verified against the P chain."""
    drafts, qs = [], []
    for _ in range(int(rng.integers(1, 3))):
        qs.append(after(Q_START, Q_NEXT, drafts[-1] if drafts else context))
        drafts.append(sample(qs[-1], rng))
    emitted, _ = accept_chain(lambda i: after(P_START, P_NEXT, drafts[i - 1] if i else context), drafts, qs, rng)
    return emitted


def test_two_generated_tokens_follow_the_target_chain():
    """Generate two tokens (a step that emits one is followed by another from it, as in real generation): the pair
    is distributed as P_START(a)·P_NEXT(a, b), checked over the 36 outcomes."""
    rng = np.random.default_rng(SEED)
    pairs = []
    for _ in range(8_000):
        out = speculative_step(None, rng)
        if len(out) == 1:
            out += speculative_step(out[0], rng)
        pairs.append(out[0] * V6 + out[1])
    assert gof_pvalue(np.array(pairs), (P_START[:, None] * P_NEXT).ravel()) >= ALPHA


# --- edge cases ----------------------------------------------------------------------------------------------------


class FixedUniforms:
    """Stands in for np.random.Generator: random() returns the given uniforms in order."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self, size=None):
        n = 1 if size is None else math.prod(np.atleast_1d(size))
        out, self.values = np.array(self.values[:n]), self.values[n:]
        return float(out[0]) if size is None else out.reshape(size)


def test_a_draft_the_target_rules_out_is_always_rejected():
    rng = np.random.default_rng(SEED)
    for q in (Q, None):
        for _ in range(300):
            token, accepted = accept(P_ZEROS, 1, q, rng)
            assert not accepted and P_ZEROS[token] > 0


def test_an_argmax_draft_is_kept_with_probability_p_and_never_resampled():
    rng = np.random.default_rng(SEED)
    results = [accept(P, 4, None, rng) for _ in range(2000)]
    assert all(token != 4 for token, accepted in results if not accepted)
    assert all(token == 4 for token, accepted in results if accepted)
    assert accept(np.eye(8)[4], 4, None, rng) == (4, True)  # p one-hot at the draft: always kept


def test_q_equal_to_p_always_accepts():
    rng = np.random.default_rng(SEED)
    assert all(accept(P, sample(P, rng), P, rng)[1] for _ in range(1000))


def test_a_rejection_when_p_equals_q_up_to_rounding_samples_p():
    q = P + 1e-13 * np.array([1, -1, 1, -1, 1, -1, 1, -1])  # the residual is noise on tokens 1, 3, 5, 7: 4e-13 in all
    assert 0 < np.maximum(P - q, 0).sum() <= TINY_RESIDUAL
    token, accepted = accept(P, 0, q, FixedUniforms(1 - 2**-53, 0.05))  # u rejects the draft, then w = 0.05 ...
    assert not accepted and token == 0  # ... picks token 0 from p (never from the noise, where it has no weight)


def test_out_of_range_or_malformed_input_is_refused():
    rng = np.random.default_rng(SEED)
    for draft in (-1, 8, 100):
        with pytest.raises(ValueError, match="out of range"):
            accept(P, draft, Q, rng)
        with pytest.raises(ValueError, match="out of range"):
            accept_chain([P, P], [draft], [None], rng)
    for p, q, draft in [(P, Q[:4], 0), (P.reshape(2, 4), None, 0), (np.full(8, np.nan), None, 0), (P, None, 1.0)]:
        with pytest.raises(ValueError):
            accept(p, draft, q, rng)
    with pytest.raises(ValueError):
        accept_chain([P], [0], [None], rng)  # k = 1 draft needs 2 target distributions
    with pytest.raises(ValueError):
        accept_chain([P, P], [0], [], rng)


def test_chain_lengths_and_lazy_targets():
    """Certain outcomes: p_i one-hot at an argmax draft keeps it; p_i(draft) = 0 rejects it."""
    drafts, k = [3, 1, 5], 3
    for reject_at in [0, 1, 2, None]:
        targets = [np.eye(8)[d] for d in drafts] + [P]
        if reject_at is not None:
            targets[reject_at] = P_ZEROS  # P_ZEROS(3) = P_ZEROS(1) = P_ZEROS(5) = 0
        calls: list[int] = []

        def ps(i, targets=targets, calls=calls):
            calls.append(i)
            return targets[i]

        emitted, n = accept_chain(ps, drafts, [None] * k, np.random.default_rng(SEED))
        want = k if reject_at is None else reject_at
        assert n == want and len(emitted) == want + 1 and emitted[:n] == drafts[:n]
        assert calls == list(range(want + 1))  # p_i only once drafts[:i] are accepted
        assert targets[n][emitted[-1]] > 0
        assert accept_chain(targets, drafts, [None] * k, np.random.default_rng(SEED)) == (emitted, n)
    emitted, n = accept_chain([P], [], [], np.random.default_rng(SEED))  # no drafts: just the bonus token
    assert n == 0 and len(emitted) == 1


# --- properties ----------------------------------------------------------------------------------------------------


def distributions(vocab: int):
    weights = st.lists(st.floats(0, 1), min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0)
    return weights.map(lambda w: np.array(w) / np.sum(w))


@st.composite
def positions(draw, vocab: int | None = None):
    vocab = vocab or draw(st.integers(1, 8))
    return draw(distributions(vocab)), draw(st.integers(0, vocab - 1)), draw(st.none() | distributions(vocab))


@given(position=positions(), seed=st.integers(0, 2**32 - 1))
def test_the_token_is_possible_under_p_and_accepted_means_the_draft(position, seed):
    p, draft, q = position
    token, accepted = accept(p, draft, q, np.random.default_rng(seed))
    assert 0 <= token < len(p) and p[token] > 0
    assert not accepted or token == draft
    assert not accepted or p[draft] > 0


@given(data=st.data(), vocab=st.integers(1, 6), k=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_chain_properties(data, vocab, k, seed):
    ps = [data.draw(distributions(vocab)) for _ in range(k + 1)]
    steps = [data.draw(positions(vocab)) for _ in range(k)]
    drafts, qs = [d for _, d, _ in steps], [q for _, _, q in steps]
    emitted, n = accept_chain(ps, drafts, qs, np.random.default_rng(seed))
    assert 0 <= n <= k and len(emitted) == n + 1 and emitted[:n] == drafts[:n]
    assert all(ps[i][t] > 0 for i, t in enumerate(emitted))
