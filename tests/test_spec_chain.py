"""Speculative chains on the device (``spec_chain_b{K+1}``, ``Engine.chain(drafts=K)``): each call verifies the last
token and ``K`` MTP drafts in one step, keeps the picks up to the first wrong draft and drafts the next call's rows,
with no host round trip between calls. The tokens must be exactly the plain chain's (greedy: plain decoding's;
sampled: the same Gumbel draws), the cache must hold what step-by-step decoding leaves, and a generation that stops
inside a burst must end as it would have step by step.

The accept step itself (:func:`compiler.graph_kernels.spec_advance`) is checked against a scalar reference on every
accept length and across the ring's wrap, since a random model's heads are rarely right.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import built, stepwise_greedy, tiny_gguf

from compiler.constants import CHAIN_RING
from runtime.engine import Engine, Generation, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")

PROMPT = [1, 5, 9, 33, 7, 200, 31]
SMALL = "models/small.gguf"
RING = 8  # the kernel test's ring: small, so that it wraps


def spec_advance_reference(at, toks, pos, ring, R):
    """What one accept step leaves: ``(toks, pos, ring, sel)`` (see ``graph_kernels.spec_advance``)."""
    toks, pos, ring = list(toks), list(pos), list(ring)
    n = 0
    while n < len(toks) - 1 and at[n] == toks[n + 1]:
        n += 1
    for j in range(n + 1):
        ring[(ring[R] + j) % R] = at[j]
    ring[R] += n + 1
    toks[0] = at[n]
    pos = [p + n + 1 for p in pos]
    return toks, pos, ring, n


@pytest.fixture(scope="module")
def advance_kernels():
    import tvm

    from compiler import graph_kernels as gk

    def build(T):
        return tvm.compile(gk.spec_advance(T, RING).with_attr("global_symbol", "main"), target="llvm")

    return {T: build(T) for T in (2, 3, 4)}


@pytest.mark.build
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_spec_advance_matches_the_reference(advance_kernels, data):
    """Random drafts and picks, biased towards matches so that every accept length occurs; the ring starts anywhere
    (it wraps)."""
    import tvm

    T = data.draw(st.sampled_from([2, 3, 4]))
    toks = data.draw(st.lists(st.integers(0, 5), min_size=T, max_size=T))
    at = [t if data.draw(st.booleans()) else data.draw(st.integers(0, 5)) for t in toks[1:]]
    at.append(data.draw(st.integers(0, 5)))
    pos = [data.draw(st.integers(0, 100)) + j for j in range(T)]
    ring = [*data.draw(st.lists(st.integers(0, 5), min_size=RING, max_size=RING)), data.draw(st.integers(0, 50))]
    want = spec_advance_reference(at, toks, pos, ring, RING)
    arrs = [tvm.runtime.tensor(np.array(a, np.int32)) for a in (at, toks, pos, ring)]
    sel = tvm.runtime.tensor(np.zeros(1, np.int32))
    advance_kernels[T](*arrs, sel)
    got = (arrs[1].numpy().tolist(), arrs[2].numpy().tolist(), arrs[3].numpy().tolist(), int(sel.numpy()[0]))
    assert got == want


@pytest.fixture(scope="module")
def gguf():
    return tiny_gguf(2, mtp_heads=2)


@pytest.fixture(scope="module")
def engines(gguf):
    entry = built(gguf).dir
    # no host drafts: a sampled generation then takes its tokens by chains (host drafts sample by the speculative
    # rule, another random stream; AVX-512's default drafts one)
    chained = Engine(entry, gguf, chain_burst=5, chain_drafts=2, draft_tokens=0, lookup_tokens=0)
    return chained, Engine(entry, gguf, chain_burst=0, draft_tokens=0)


def _generate(eng: Engine, prompt: list[int], params: SamplingParams) -> Generation:
    g = Generation()
    for _ in eng.generate_tokens(prompt, params, g):
        pass
    return g


@pytest.mark.build
@pytest.mark.parametrize("drafts", [1, 2])
def test_spec_chain_gives_the_step_by_step_tokens_across_ring_wraps(engines, drafts):
    """More tokens than the ring holds, then a plain decode: the step-by-step tokens (as many as the chain gave),
    and the cache as step-by-step decoding leaves it (the next logits bit-identical), although rejected drafts
    wrote keys past the sequence."""
    eng, _ = engines
    n = 2 * CHAIN_RING + 7
    first, ref, ref_logits = stepwise_greedy(eng, PROMPT, n + 3 * drafts + 1)
    eng.reset()
    assert int(np.argmax(eng.prefill(PROMPT))) == first
    stats = Generation()
    got = eng.chain(first, n, drafts=drafts, stats=stats)
    assert len(got) >= n and got == ref[: len(got)]
    assert eng.pos == len(PROMPT) + len(got)
    assert stats.drafted == drafts * stats.spec_steps and stats.accepted == len(got) - stats.spec_steps
    np.testing.assert_array_equal(eng.decode(got[-1]), ref_logits[len(got)])


@pytest.mark.build
def test_spec_chain_accepts_the_shipped_models_drafts_and_keeps_them_for_the_next_chain():
    """The shipped model's trained heads are right about half the time (a random model's almost never): its chains
    gain more than one token a call for every number of drafts, the tokens are plain greedy decoding's, and a
    second chain starts from the drafts the first left on the device."""
    eng = Engine(built(SMALL).dir, SMALL, kv_tokens=1024, draft_tokens=0, chain_burst=0)
    prompt = eng.tokenize('def mean(xs):\n    """The arithmetic mean of a list of numbers."""\n')
    first, ref, _ = stepwise_greedy(eng, prompt, 120)
    for k in range(1, eng.mtp_heads + 1):
        eng.reset()
        eng.prefill(prompt)
        stats = Generation()
        a = eng.chain(first, 40, drafts=k, stats=stats)
        assert eng.seq.drafts is not None and eng.seq.drafts_after == a[-1]
        b = eng.chain(a[-1], 40, drafts=k, stats=stats)
        assert a + b == ref[: len(a) + len(b)], k
        assert 0 < stats.accepted < stats.drafted and stats.accepted == len(a) + len(b) - stats.spec_steps, k


@pytest.mark.build
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_generation_through_spec_chains_equals_step_by_step(engines, temperature, monkeypatch):
    """Whole generations with token limits that end inside a call's accepted drafts, and a stop token: the same
    tokens and finish reasons as the step-by-step Engine (sampled: the same seeded Gumbel draws, by plain chains)."""
    chained, plain = engines
    calls = []
    chain = chained.chain
    monkeypatch.setattr(chained, "chain", lambda *a, **k: calls.append(k.get("drafts")) or chain(*a, **k))
    for limit, seed in ((1, 0), (2, 1), (9, 2), (23, 3)):
        calls.clear()
        params = SamplingParams(max_new_tokens=limit, temperature=temperature, seed=seed, ignore_eos=True)
        want, got = _generate(plain, PROMPT, params), _generate(chained, PROMPT, params)
        assert (got.tokens, got.finish_reason) == (want.tokens, want.finish_reason), (limit, seed)
        # by chains: greedy ones speculate (but for a call of one token), sampled ones do not
        assert len(calls) >= (limit > 1) and set(calls) <= {0, 2 if temperature == 0 else 0}, calls
        assert temperature or limit < 9 or 2 in calls, calls
    stop = _generate(plain, PROMPT, SamplingParams(max_new_tokens=30, ignore_eos=True)).tokens[12]
    params = SamplingParams(max_new_tokens=30, stop_token_ids=(stop,))
    want, got = _generate(plain, PROMPT, params), _generate(chained, PROMPT, params)
    assert (got.tokens, got.finish_reason) == (want.tokens, want.finish_reason)


@pytest.mark.build
def test_batcher_runs_a_lone_greedy_request_through_spec_chains(engines, monkeypatch):
    """The server's continuous batch: a lone greedy request goes through speculative chains (drafts counted in its
    timings), two at once step by step; tokens and finish reasons are the step-by-step Engine's either way."""
    from runtime.batch import Request

    chained, plain = engines
    calls = []
    chain = chained.chain
    monkeypatch.setattr(chained, "chain", lambda *a, **k: calls.append(k.get("drafts")) or chain(*a, **k))

    def requests(n):
        return [Request(None, SamplingParams(max_new_tokens=21, ignore_eos=True), prompt_ids=PROMPT[: 7 - i])
                for i in range(n)]  # fmt: skip

    for n in (1, 2):
        calls.clear()
        got, want = chained.batcher().run(requests(n)), plain.batcher().run(requests(n))
        assert [(g.tokens, g.finish_reason) for g in got] == [(g.tokens, g.finish_reason) for g in want]
        if n == 1:
            # two drafts a call, fewer only in a call that ends at the token limit
            steps = got[0].spec_steps
            assert calls and calls[0] == 2 and 0 < steps and 2 * (steps - 1) < got[0].drafted <= 2 * steps


@pytest.mark.build
def test_sampled_spec_chain_draws_the_plain_chains_tokens(engines):
    """At a temperature each row's pick is the Gumbel-max draw of its position, so a speculative chain keeps the
    plain chain's draws exactly (generations sample through plain chains by default: drafts pay only greedy)."""
    eng, _ = engines
    for seed in (1, 2, 3):
        runs = []
        for drafts in (0, 1, 2):
            eng.reset()
            first = int(np.argmax(eng.prefill(PROMPT)))
            runs.append(eng.chain(first, 40, temperature=0.8, seed=seed, drafts=drafts))
        n = min(map(len, runs))
        assert runs[1][:n] == runs[0][:n] == runs[2][:n] and n >= 40, seed


@pytest.mark.build
def test_spec_chain_near_the_context_end_finishes_with_plain_calls(engines):
    """With fewer free positions than a call's rows, the last tokens come from plain calls: still exact, and never
    past the context."""
    eng, _ = engines
    prompt = (PROMPT * 200)[: eng.ctx - 6]
    first, ref, _ = stepwise_greedy(eng, prompt, 5)
    eng.reset()
    eng.prefill(prompt)
    got = eng.chain(first, 5, drafts=2)
    assert got == ref and eng.pos == eng.ctx - 1
