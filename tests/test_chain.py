"""Greedy chains on the device (``chain_b1``, ``Engine.chain``): each call feeds its own argmax to the next, so the
host queues steps without reading logits in between. The tokens must be exactly the step-by-step greedy tokens, the
cache must hold what step-by-step decoding leaves, and a generation that stops inside a burst must end as it would
have step by step."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import built, stepwise_greedy, tiny_gguf

from compiler.constants import CHAIN_RING
from runtime.engine import Engine, Generation, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")

PROMPT = [1, 5, 9, 33, 7, 200, 31]


@pytest.fixture(scope="module")
def engines():
    gguf = tiny_gguf(2)
    entry = built(gguf).dir
    return Engine(entry, gguf, chain_burst=5, lookup_tokens=0), Engine(entry, gguf, chain_burst=0, lookup_tokens=0)


@pytest.mark.build
def test_chain_gives_the_step_by_step_tokens_across_ring_wraps(engines):
    """More steps than the ring holds (two bursts and a part), then a plain decode: the same tokens, and the cache
    as step-by-step decoding leaves it (the next logits bit-identical)."""
    eng, _ = engines
    n = 2 * CHAIN_RING + 7
    assert len(PROMPT) + n + 1 <= eng.ctx
    first, ref, ref_logits = stepwise_greedy(eng, PROMPT, n + 1)
    eng.reset()
    assert int(np.argmax(eng.prefill(PROMPT))) == first
    got = eng.chain(first, n)
    assert got == ref[:n]
    assert eng.pos == len(PROMPT) + n
    np.testing.assert_array_equal(eng.decode(got[-1]), ref_logits[n])


@pytest.mark.build
def test_chain_then_chain_continues_the_sequence(engines):
    """Chains of 1, 3 and 11 steps one after another (the device's token and position reset from the host each
    time) give the one long chain's tokens."""
    eng, _ = engines
    first, ref, _ = stepwise_greedy(eng, PROMPT, 15)
    eng.reset()
    eng.prefill(PROMPT)
    got, t = [], first
    for n in (1, 3, 11):
        got += eng.chain(t, n)
        t = got[-1]
    assert got == ref


@pytest.mark.build
def test_chain_refuses_what_does_not_fit(engines):
    eng, _ = engines
    eng.reset()
    eng.prefill(PROMPT)
    for n in (0, eng.ctx - len(PROMPT) + 1):
        with pytest.raises(ValueError, match="chain of"):
            eng.chain(3, n)
    with pytest.raises(ValueError, match="out of range"):
        eng.chain(eng.vocab, 2)
    for temperature, seed in ((-1.0, 0), (float("nan"), 0), (float("inf"), 0), (1.0, -1), (1.0, 1 << 24)):
        with pytest.raises(ValueError, match="chain temperature"):
            eng.chain(3, 2, temperature=temperature, seed=seed)
    assert eng.pos == len(PROMPT)


def _stop_inside_second_burst(eng: Engine) -> tuple[list[int], int]:
    """A prompt of the random tiny model and a token whose first greedy pick is generated token 7, 8 or 9 (the
    first comes from the prefill, then bursts of 5): its stop ends a generation inside the second burst."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt = [int(t) for t in rng.integers(0, eng.vocab, 7)]
        first, toks, _ = stepwise_greedy(eng, prompt, 10)
        seen = [first, *toks]
        for j in (6, 7, 8):
            if seen[j] not in seen[:j]:
                return prompt, seen[j]
    raise AssertionError("no prompt of 50 picks a new token inside the second burst")


@pytest.mark.build
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=23, temperature=0, ignore_eos=True),  # 23: not a multiple of the burst
        SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=("STOP",)),  # a stop token inside a burst
        SamplingParams(max_new_tokens=40, temperature=0, frequency_penalty=0.5),  # penalized: step by step
        SamplingParams(max_new_tokens=23, temperature=0.9, seed=5, ignore_eos=True),  # drawn on the device
        SamplingParams(max_new_tokens=23, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),  # top-p: by the host
    ],
    ids=["limit", "stop-token", "penalty", "sampled", "top-p"],
)
def test_generation_with_bursts_equals_step_by_step(engines, params, monkeypatch):
    """``generate_tokens`` with chains of 5 against the step-by-step Engine: the same tokens, finish reason and
    sequence length (a stop inside a burst drops the rest), and the cache fit to go on (the next decode's logits
    bit-identical). Plain temperature sampling goes in bursts too: the device draws the host's Gumbel noise."""
    chained, plain = engines
    prompt = PROMPT
    if params.stop_token_ids == ("STOP",):  # a token first picked inside the 2nd burst (generated tokens 7-9)
        prompt, stop = _stop_inside_second_burst(plain)
        params = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=(stop,))
    bursts = []
    chain = chained.chain
    monkeypatch.setattr(chained, "chain", lambda *a, **k: bursts.append(a[1]) or chain(*a, **k))
    runs = []
    for eng in (chained, plain):
        res = Generation()
        toks = list(eng.generate_tokens(prompt, params, res))
        runs.append((toks, res.finish_reason, eng.pos, eng.decode(toks[-1])))
    (a, ra, pa, la), (b, rb, pb, lb) = runs
    assert (a, ra, pa) == (b, rb, pb)
    np.testing.assert_array_equal(la, lb)
    if params.penalized or params.top_p < 1:
        assert bursts == []
    else:  # the first token comes from the prefill, the rest in bursts of 5
        assert bursts[:-1] == [5] * (len(bursts) - 1) and 1 <= bursts[-1] <= 5
        assert (ra, len(a) < 10) == ("stop_token", True) if params.stop_token_ids else (ra, len(a)) == ("length", 23)


def _argmax_kernel(B: int, V: int, sampled: bool):
    import tvm

    from compiler import graph_kernels as gk
    from targets import detect, get_target

    f = gk.argmax(B, V, sampled=sampled).with_attr("global_symbol", "main")
    run = tvm.compile(tvm.IRModule({"main": f}), target=get_target(detect()))["main"]
    dev = tvm.cpu()

    def call(*inputs):
        at, best = tvm.runtime.empty((B,), "int32", dev), tvm.runtime.empty((B,), "float32", dev)
        run(*[tvm.runtime.tensor(np.asarray(a), dev) for a in inputs], at, best)
        return at.numpy(), best.numpy()

    return call


@pytest.mark.build
@pytest.mark.parametrize("V", [1, 7, 300])
def test_chain_argmax_kernel_greedy_is_the_first_maximum_of_the_allowed_ids(V):
    """``graph_kernels.argmax(sampled=True)`` at inverse temperature 0 (the chain's greedy pick, CPU form) against
    numpy: ``-inf`` ids are never picked while another id is finite, ties go to the smaller id; the plain kernel
    takes the raw first maximum."""
    rng = np.random.default_rng(V)
    x = np.round(rng.standard_normal((2, V)) * 2).astype(np.float32)  # coarse values: ties
    x[1, : V // 2] = 50.0  # the maximum on ids that the bias forbids
    bias = np.zeros(V, np.float32)
    bias[: V // 2] = -np.inf
    at, best = _argmax_kernel(2, V, True)(x, bias, np.array([0, 7], np.float32), np.array([3, 4], np.int32))
    want = np.argmax(x + bias, axis=1)
    np.testing.assert_array_equal(at, want)
    np.testing.assert_array_equal(best, (x + bias)[[0, 1], want])
    at, _ = _argmax_kernel(2, V, False)(x)
    np.testing.assert_array_equal(at, np.argmax(x, axis=1))


@pytest.mark.build
def test_chain_argmax_kernel_draws_the_hosts_gumbel_noise():
    """The device's noise is the host's (``runtime.decoding.gumbel_noise``, the numpy twin of
    ``graph_kernels.gumbel``): with zero logits at inverse temperature 1, each row's pick and value are the argmax and
    the maximum of the host's noise for that row's (seed, position)."""
    from runtime.decoding import gumbel_noise

    B, V = 64, 1000
    rng = np.random.default_rng(0)
    seeds, pos = rng.integers(0, 1 << 24, B), rng.integers(0, 4096, B).astype(np.int32)
    for seed in seeds[:8]:
        at, best = _argmax_kernel(B, V, True)(np.zeros((B, V), np.float32), np.zeros(V, np.float32),
                                              np.array([1.0, seed], np.float32), pos)  # fmt: skip
        noise = np.stack([gumbel_noise(int(seed), int(p), V) for p in pos])
        np.testing.assert_array_equal(at, noise.argmax(1))
        np.testing.assert_allclose(best, noise.max(1), rtol=1e-6)


@pytest.mark.unit
def test_gumbel_noise_is_finite_at_the_extreme_hashes():
    """The noise of the smallest and the largest hash is finite (a uniform that rounds to 1 in float32 would give an
    infinite draw: that id picked whatever the logits), and the noise is a standard Gumbel's (mean γ, variance π²/6)."""
    from model.sampling import GUMBEL_SPAN
    from runtime.decoding import gumbel_noise, gumbel_of_hash

    edge = gumbel_of_hash(np.array([0, 1, 511, 512, 0xFFFFFE00, 0xFFFFFFFF], np.uint32))
    assert np.isfinite(edge).all() and edge[0] == edge[2] and edge[-1] == edge[-2] and edge[0] < edge[3] < edge[-1]
    assert edge[-1] - edge[0] < GUMBEL_SPAN - 0.5  # the pruning's bound holds, with room for float32 rounding
    g = gumbel_noise(7, 3, 200_000).astype(np.float64)
    assert abs(g.mean() - np.euler_gamma) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.03


@pytest.mark.build
def test_chain_argmax_kernel_skips_only_ids_that_cannot_win():
    """With spread logits most ids lie more than GUMBEL_SPAN below the top and get no noise; the picks are still
    exactly the full draw's, the first maximum of ``x·s + noise`` over every id (numpy, no pruning), and the host's."""
    from runtime.decoding import gumbel_noise, gumbel_pick

    B, V = 256, 3000
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((B, V)) * 6).astype(np.float32)
    pos = rng.integers(0, 4096, B).astype(np.int32)
    for t, seed in ((0.8, 11), (0.3, 12), (3.0, 13)):
        s = np.float32(1 / t)
        at, _ = _argmax_kernel(B, V, True)(x, np.zeros(V, np.float32), np.array([s, seed], np.float32), pos)
        full = [int(np.argmax(x[b] * s + gumbel_noise(seed, int(pos[b]), V))) for b in range(B)]
        assert at.tolist() == full == [gumbel_pick(x[b], t, seed, int(pos[b])) for b in range(B)]
        kept = (x * s >= (x * s).max(1, keepdims=True) - 20).mean()
        assert t > 1 or kept < 0.5, kept  # the case where the pruning matters


@pytest.mark.build
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_chain_argmax_kernel_samples_the_softmax(temperature):
    """Goodness of fit: the sampled kernel's picks over 20 000 (position, seed) draws of fixed logits follow
    ``softmax(x / T)`` over the allowed ids (chi-square at significance 0.001; a forbidden id is never drawn). A rule
    that ignored the temperature or the noise, or reused a draw across positions, fails it."""
    from scipy import stats

    B, V = 20000, 6
    x = np.tile(np.array([0.0, 1.0, -1.0, 2.0, 0.5, 9.0], np.float32), (B, 1))
    bias = np.array([0, 0, 0, 0, 0, -np.inf], np.float32)  # the likeliest id is forbidden
    p = np.exp(x[0, :5].astype(np.float64) / temperature)
    p /= p.sum()
    run = _argmax_kernel(B, V, True)
    for seed in (0, 99):
        at, _ = run(x, bias, np.array([1 / temperature, seed], np.float32), np.arange(B, dtype=np.int32))
        counts = np.bincount(at, minlength=V)
        assert counts[5] == 0
        assert stats.chisquare(counts[:5], p * B).pvalue > 1e-3, (seed, counts, p * B)


@pytest.mark.build
def test_sampled_chains_follow_the_seed(engines):
    """A chained temperature draw: the same seed gives the same tokens, another seed or greedy other tokens (the
    noise reaches the pick), and no unused id is ever drawn."""
    chained, _ = engines

    def run(**kw):
        return list(chained.generate_tokens(PROMPT, SamplingParams(max_new_tokens=30, ignore_eos=True, **kw)))

    a = run(temperature=1.5, seed=1)
    assert a == run(temperature=1.5, seed=1)
    assert a != run(temperature=1.5, seed=2) and a != run(temperature=0)
    assert not set(a) & set(chained.never_ids)


@pytest.mark.build
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_batcher_runs_a_lone_request_in_bursts(engines, monkeypatch, temperature):
    """The server's continuous batch: a greedy or plainly sampled request running alone goes in bursts, two at once
    step by step; the tokens and texts are the step-by-step Engine's either way."""
    from runtime.batch import Request

    chained, plain = engines
    bursts = []
    burst_for = chained.chain_burst_for
    monkeypatch.setattr(chained, "chain_burst_for", lambda *a: bursts.append(a) or burst_for(*a))

    def requests(n):
        return [Request(None, SamplingParams(max_new_tokens=21, temperature=temperature, seed=i, ignore_eos=True),
                        prompt_ids=PROMPT[: 7 - i]) for i in range(n)]  # fmt: skip

    for n, chained_steps in ((1, True), (2, False)):
        bursts.clear()
        got, want = chained.batcher().run(requests(n)), plain.batcher().run(requests(n))
        assert [(g.tokens, g.finish_reason) for g in got] == [(g.tokens, g.finish_reason) for g in want]
        assert all(len(g.tokens) == 21 for g in got)
        assert (len(bursts) > 1) == chained_steps  # two: at most the last one, alone for its last step


@pytest.mark.unit
def test_chain_burst_arguments():
    """``--chain-burst``: default per target, an explicit value wins (drafts no longer turn chains off: a chain
    verifies them, ``--draft-tokens`` sets its drafts too), out-of-range values are refused in one line."""
    import argparse

    from runtime.chat import add_draft_args, chain_burst, chain_drafts, check_draft_args

    ap = argparse.ArgumentParser()
    add_draft_args(ap)
    for argv, want, drafts in (([], None, None), (["--draft-tokens", "1"], None, 1),
                               (["--draft-tokens", "1", "--chain-burst", "8"], 8, 1), (["--chain-burst", "0"], 0, None),
                               (["--no-speculative"], None, 0)):  # fmt: skip
        a = ap.parse_args(argv)
        assert check_draft_args(a) is None and (chain_burst(a), chain_drafts(a)) == (want, drafts), argv
    for bad in ("-1", "257"):
        assert "--chain-burst must be in 0..256" in check_draft_args(ap.parse_args(["--chain-burst", bad]))
    from runtime.chat import lookup_tokens

    for argv, want in (([], None), (["--lookup-tokens", "3"], 3), (["--no-speculative"], 0)):
        assert lookup_tokens(ap.parse_args(argv)) == want, argv
    for argv in (["--lookup-tokens", "16"], ["--lookup-tokens", "-1"], ["--no-speculative", "--lookup-tokens", "3"]):
        assert "--lookup-tokens" in check_draft_args(ap.parse_args(argv)), argv
