"""Greedy chains on the device (``chain_b1``, ``Engine.chain``): each call feeds its own argmax to the next, so the
host queues steps without reading logits in between. The tokens must be exactly the step-by-step greedy tokens, the
cache must hold what step-by-step decoding leaves, and a generation that stops inside a burst must end as it would
have step by step."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import built, tiny_gguf

from compiler.constants import CHAIN_RING
from runtime.engine import Engine, Generation, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")

PROMPT = [1, 5, 9, 33, 7, 200, 31]


@pytest.fixture(scope="module")
def engines():
    gguf = tiny_gguf(2)
    entry = built(gguf).dir
    return Engine(entry, gguf, chain_burst=5), Engine(entry, gguf, chain_burst=0)


def _stepwise(eng: Engine, prompt: list[int], n: int) -> tuple[int, list[int], list[np.ndarray]]:
    """The first pick after the prompt, then ``n`` greedy picks one decode call at a time (and their logits)."""
    eng.reset()
    first = int(np.argmax(eng.prefill(prompt)))
    toks, logits, t = [], [], first
    for _ in range(n):
        logits.append(eng.decode(t))
        t = int(np.argmax(logits[-1]))
        toks.append(t)
    return first, toks, logits


@pytest.mark.build
def test_chain_gives_the_step_by_step_tokens_across_ring_wraps(engines):
    """More steps than the ring holds (two bursts and a part), then a plain decode: the same tokens, and the cache
    as step-by-step decoding leaves it (the next logits bit-identical)."""
    eng, _ = engines
    n = 2 * CHAIN_RING + 7
    assert len(PROMPT) + n + 1 <= eng.ctx
    first, ref, ref_logits = _stepwise(eng, PROMPT, n + 1)
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
    first, ref, _ = _stepwise(eng, PROMPT, 15)
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
    assert eng.pos == len(PROMPT)


def _stop_inside_second_burst(eng: Engine) -> tuple[list[int], int]:
    """A prompt of the random tiny model and a token whose first greedy pick is generated token 7, 8 or 9 (the
    first comes from the prefill, then bursts of 5): its stop ends a generation inside the second burst."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt = [int(t) for t in rng.integers(0, eng.vocab, 7)]
        first, toks, _ = _stepwise(eng, prompt, 10)
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
    ],
    ids=["limit", "stop-token", "penalty"],
)
def test_generation_with_bursts_equals_step_by_step(engines, params, monkeypatch):
    """``generate_tokens`` with chains of 5 against the step-by-step Engine: the same tokens, finish reason and
    sequence length (a stop inside a burst drops the rest), and the cache fit to go on (the next decode's logits
    bit-identical)."""
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
    if params.penalized:
        assert bursts == []
    else:  # the first token comes from the prefill, the rest in bursts of 5
        assert bursts[:-1] == [5] * (len(bursts) - 1) and 1 <= bursts[-1] <= 5
        assert (ra, len(a) < 10) == ("stop_token", True) if params.stop_token_ids else (ra, len(a)) == ("length", 23)


@pytest.mark.build
@pytest.mark.parametrize("V", [1, 7, 300])
def test_biased_argmax_kernel_is_the_first_maximum_of_the_allowed_ids(V):
    """``graph_kernels.argmax(biased=True)`` (the chain's pick, CPU form) against numpy: ``-inf`` ids are never
    picked while another id is finite, ties go to the smaller id, and the unbiased kernel ignores the bias."""
    import tvm

    from compiler import graph_kernels as gk
    from targets import detect, get_target

    rng = np.random.default_rng(V)
    x = np.round(rng.standard_normal((2, V)) * 2).astype(np.float32)  # coarse values: ties
    x[1, : V // 2] = 50.0  # the maximum on ids that the bias forbids
    bias = np.zeros(V, np.float32)
    bias[: V // 2] = -np.inf
    dev = tvm.cpu()
    for biased in (True, False):
        f = gk.argmax(2, V, biased=biased).with_attr("global_symbol", "main")
        run = tvm.compile(tvm.IRModule({"main": f}), target=get_target(detect()))["main"]
        at, best = tvm.runtime.empty((2,), "int32", dev), tvm.runtime.empty((2,), "float32", dev)
        ins = [tvm.runtime.tensor(x, dev)] + ([tvm.runtime.tensor(bias, dev)] if biased else [])
        run(*ins, at, best)
        want = np.argmax(x + bias if biased else x, axis=1)
        np.testing.assert_array_equal(at.numpy(), want)
        np.testing.assert_array_equal(best.numpy(), (x + bias if biased else x)[[0, 1], want])


@pytest.mark.build
def test_batcher_runs_a_lone_greedy_request_in_bursts(engines, monkeypatch):
    """The server's continuous batch: a greedy request running alone goes in bursts, two at once step by step; the
    tokens and texts are the step-by-step Engine's either way."""
    from runtime.batch import Request

    chained, plain = engines
    bursts = []
    burst_for = chained.chain_burst_for
    monkeypatch.setattr(chained, "chain_burst_for", lambda *a: bursts.append(a) or burst_for(*a))

    def requests(n):
        return [Request(None, SamplingParams(max_new_tokens=21, temperature=0, ignore_eos=True),
                        prompt_ids=PROMPT[: 7 - i]) for i in range(n)]  # fmt: skip

    for n, chained_steps in ((1, True), (2, False)):
        bursts.clear()
        got, want = chained.batcher().run(requests(n)), plain.batcher().run(requests(n))
        assert [(g.tokens, g.finish_reason) for g in got] == [(g.tokens, g.finish_reason) for g in want]
        assert all(len(g.tokens) == 21 for g in got)
        assert (len(bursts) > 1) == chained_steps  # two: at most the last one, alone for its last step


@pytest.mark.unit
def test_chain_burst_arguments():
    """``--chain-burst``: default per target, an explicit value wins, explicit drafts alone turn chains off (they would
    take the same generations), out-of-range values are refused in one line."""
    import argparse

    from runtime.chat import add_draft_args, chain_burst, check_draft_args

    ap = argparse.ArgumentParser()
    add_draft_args(ap)
    for argv, want in (([], None), (["--draft-tokens", "1"], 0), (["--draft-tokens", "1", "--chain-burst", "8"], 8),
                       (["--chain-burst", "0"], 0), (["--no-speculative"], None)):  # fmt: skip
        a = ap.parse_args(argv)
        assert check_draft_args(a) is None and chain_burst(a) == want, argv
    for bad in ("-1", "257"):
        assert "--chain-burst must be in 0..256" in check_draft_args(ap.parse_args(["--chain-burst", bad]))
