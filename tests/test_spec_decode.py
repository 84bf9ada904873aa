"""Self-speculative decoding (runtime.spec_decode) on a tiny random model with two MTP heads, compiled for this CPU.

The heads' compiled logits match the PyTorch heads; the verify step's rows equal one-token decoding; greedy speculative
decoding gives exactly plain greedy's tokens (alone, with penalties and stop strings, and in a batch); the accept
paths are driven by oracle drafts (the plain run's own future tokens, every third one wrong), since a random model's
heads are rarely right. Sampling keeps the main model's distribution: a goodness-of-fit test over seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_helpers import built, one_torch_thread, reference, tiny_gguf
from scipy import stats

from model.sampling import Generation, SamplingParams
from runtime import spec_decode
from runtime.batch import Request
from runtime.engine import Engine
from runtime.kv_cache import Sequence

pytestmark = [pytest.mark.build, pytest.mark.slow]

PROMPTS = [[5, 9, 33, 100, 7], [300, 2, 2, 41], [17] * 11]


@pytest.fixture(scope="module")
def gguf():
    return tiny_gguf(2, mtp_heads=2)


@pytest.fixture(scope="module")
def entry(gguf):
    return built(gguf).dir


def engine(entry, gguf, draft_tokens: int, lookup_tokens: int = 0) -> Engine:
    return Engine(entry, gguf, threads=2, draft_tokens=draft_tokens, chain_burst=0,  # no chains: they skip drafting
                  lookup_tokens=lookup_tokens)  # fmt: skip


def test_drafts_and_hidden_match_pytorch(entry, gguf):
    eng, model = engine(entry, gguf, 0), reference(gguf)
    for prompt in PROMPTS:
        eng.reset()
        logits = eng.prefill(prompt)
        tok = int(np.argmax(logits))
        drafts = eng.draft(eng.seq.hidden[None], [tok])[0]
        with torch.no_grad(), one_torch_thread():
            h = model.hidden(torch.tensor([prompt]))
            ref_logits = model.head(h)[0, -1].numpy()
            g, t, ref = h[:, -1:], tok, []
            for step in model.mtp:  # the recurrent heads, fed their own argmax
                g = step(g, model.tok_emb(torch.tensor([[t]])))
                t = int(model.head(g)[0, -1].argmax())
                ref.append(t)
        np.testing.assert_allclose(eng.seq.hidden, h[0, -1].numpy(), atol=1e-5)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        assert drafts.tolist() == ref
        assert eng.draft(eng.seq.hidden[None], [tok], 1).tolist() == [ref[:1]]


def test_verify_rows_equal_one_token_decoding(entry, gguf):
    eng = engine(entry, gguf, 0)
    prompt, rows = PROMPTS[0], [11, 250, 3]
    eng.reset()
    eng.prefill(prompt)
    plain = [eng.decode(t) for t in rows]
    hidden = [eng.seq.hidden]
    eng.reset()
    eng.prefill(prompt)
    ((logits, h, fused),) = eng.step([eng.seq], [rows])
    assert fused is None  # the CPU build drafts in its own call
    assert np.array_equal(logits, np.stack(plain)) and eng.seq.length == len(prompt) + 3
    assert np.array_equal(h[-1], hidden[0]) and np.array_equal(eng.seq.hidden, h[-1])
    eng.seq.length -= 2  # reject the last two rows: the next decode overwrites their keys
    again = eng.decode(250)
    assert np.array_equal(again, plain[1])


def oracle(plan: dict[int, tuple[int, list[int]]], wrong_every: int = 3):
    """make_drafts that proposes each sequence's own plain-run future (``plan``: id(seq) → (prompt length, plain
    tokens)), every ``wrong_every``-th proposal replaced by a wrong token."""

    def make(engine, pickers, seqs, tokens):
        out = []
        rooms = spec_decode.draft_room(engine, pickers, seqs)
        for seq, room in zip(seqs, rooms, strict=True):
            c = min(room, engine.draft_tokens) if seq.hidden is not None else 0
            start, future = plan[id(seq)]
            n = seq.length - start + 1  # tokens generated so far (the last one is not in the cache yet)
            toks = [future[i] if i < len(future) else 0 for i in range(n, n + c)]
            toks = [(t + 1) % engine.vocab if (n + i) % wrong_every == 0 else t for i, t in enumerate(toks)]
            out.append(spec_decode.Draft(toks, [None] * c))
        return out

    return make


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=40),
    SamplingParams(max_new_tokens=40, frequency_penalty=0.7, presence_penalty=0.3),
    SamplingParams(max_new_tokens=40, no_repeat_ngram=2),
])  # fmt: skip
@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_greedy_is_plain_greedy(entry, gguf, monkeypatch, params, draft_tokens):
    plain, spec = engine(entry, gguf, 0), engine(entry, gguf, draft_tokens)
    for prompt in PROMPTS:
        want = list(plain.generate_tokens(prompt, params))
        real = Generation()  # the model's own (random) heads
        assert list(spec.generate_tokens(prompt, params, real)) == want
        assert real.drafted > 0
        with monkeypatch.context() as m:
            got = Generation()
            m.setattr(spec_decode, "make_drafts", oracle({id(spec.seq): (len(prompt), want)}))
            assert list(spec.generate_tokens(prompt, params, got)) == want
            assert got.accepted > got.drafted // 3  # two of three proposals are right
            assert got.drafted >= len(want) // (draft_tokens + 1)


def test_stop_inside_accepted_drafts(entry, gguf, monkeypatch):
    plain, spec = engine(entry, gguf, 0), engine(entry, gguf, 2)
    want = list(plain.generate_tokens(PROMPTS[1], SamplingParams(max_new_tokens=30)))
    stop = want[7]
    params = SamplingParams(max_new_tokens=30, stop_token_ids=(stop,))
    cut = list(plain.generate_tokens(PROMPTS[1], params))
    assert cut == want[: want.index(stop) + 1]
    got = Generation()
    monkeypatch.setattr(spec_decode, "make_drafts", oracle({id(spec.seq): (len(PROMPTS[1]), want)}, 1000))
    assert list(spec.generate_tokens(PROMPTS[1], params, got)) == cut and got.finish_reason == "stop_token"
    for limit in (1, 2, 3, 4, 5):  # the token limit inside a step's accepted drafts
        got = Generation()
        assert list(spec.generate_tokens(PROMPTS[1], SamplingParams(max_new_tokens=limit), got)) == want[:limit]


def test_batch_gives_solo_tokens(entry, gguf, monkeypatch):
    plain, spec = engine(entry, gguf, 0), engine(entry, gguf, 2)
    params = [SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=17, frequency_penalty=0.5),
              SamplingParams(max_new_tokens=30)]  # fmt: skip
    want = [list(plain.generate_tokens(p, sp)) for p, sp in zip(PROMPTS, params, strict=True)]
    reqs = [Request(None, sp, prompt_ids=p) for p, sp in zip(PROMPTS, params, strict=True)]
    plan = {id(r.seq): (len(p), w) for r, p, w in zip(reqs, PROMPTS, want, strict=True)}
    monkeypatch.setattr(spec_decode, "make_drafts", oracle(plan))
    got = spec.batcher().run(reqs)
    assert [g.tokens for g in got] == want
    assert all(g.accepted > 0 for g in got)


def test_draft_room_respects_batch_context_and_limit(entry, gguf):
    spec = engine(entry, gguf, 2)
    from runtime.decoding import TokenPicker

    def picker(n):
        return TokenPicker(spec, SamplingParams(max_new_tokens=n), Generation())

    top = spec.batch_sizes[-1]
    seq = Sequence(length=10, hidden=np.zeros(1, np.float32))
    assert spec_decode.draft_room(spec, [picker(50)], [seq]) == [top - 1]
    assert spec_decode.draft_room(spec, [picker(2)], [seq]) == [1]  # one token left after this step's first
    assert spec_decode.draft_room(spec, [picker(50)], [Sequence(length=spec.ctx - 2, hidden=seq.hidden)]) == [1]
    full = [Sequence(hidden=seq.hidden) for _ in range(top)]  # a full batch leaves no rows for drafts
    assert spec_decode.draft_room(spec, [picker(50)] * top, full) == [0] * top
    ((d,),) = [spec_decode.make_drafts(spec, [picker(50)], [Sequence(length=3)], [5])]
    assert d.tokens == []  # no hidden state yet: no MTP drafts
    spec.draft_tokens = 0  # prompt-lookup drafts alone: the prompt's 3-gram ending in the last pick recurs
    spec.lookup_tokens = 4
    p = TokenPicker(spec, SamplingParams(max_new_tokens=50), Generation(), prompt=[1, 2, 3, 4, 5, 6, 1, 2])
    p.push(3, 9)
    ((d,),) = [spec_decode.make_drafts(spec, [p], [Sequence(length=8)], [3])]
    assert d.tokens == [4, 5, 6, 1] and d.q == [None] * 4
    p = TokenPicker(spec, SamplingParams(max_new_tokens=3), Generation(), prompt=[1, 2, 3, 4, 5, 6, 1, 2])
    p.push(3, 9)
    ((d,),) = [spec_decode.make_drafts(spec, [p], [Sequence(length=8)], [3])]
    assert d.tokens == [4]  # the token limit: two tokens left, one of them this step's first


def _joint_fit(spec, plain, prompt, n: int, top_k: int = 3) -> tuple[float, int]:
    """(p-value of the chi-square test that the first two sampled tokens follow the main model's joint
    distribution — 0 if a token outside its support came out, drafts accepted in all) over ``n`` seeds."""
    from runtime.decoding import distribution

    params = dict(max_new_tokens=3, temperature=1.0, top_k=top_k)  # the step after the first token drafts one
    plain.reset()
    p1 = distribution(plain.prefill(prompt), SamplingParams(**params))
    joint = {}
    for t in np.flatnonzero(p1):
        plain.reset()
        plain.prefill(prompt)
        p2 = distribution(plain.decode(int(t)), SamplingParams(**params))
        joint |= {(int(t), int(u)): p1[t] * p2[u] for u in np.flatnonzero(p2)}
    counts, accepted = dict.fromkeys(joint, 0), 0
    for seed in range(n):
        g = Generation()
        key = tuple(list(spec.generate_tokens(prompt, SamplingParams(**params, seed=seed), g))[:2])
        accepted += g.accepted
        if key not in counts:
            return 0.0, accepted
        counts[key] += 1
    keys = sorted(joint)
    obs, exp = np.array([counts[x] for x in keys], float), np.array([joint[x] for x in keys]) * n
    return float(stats.chisquare(obs, exp).pvalue), accepted


def _accept_always(p, draft, q, rng):  # a wrong rule: the test must catch it
    return draft, True


@pytest.mark.parametrize("rule", ["exact", "accept_always"])
def test_sampling_keeps_the_main_distribution(entry, gguf, monkeypatch, rule):
    """Drafts from the model's own heads; alpha = 1e-3 over 1500 seeds. The exact rule passes (with drafts accepted,
    so the rule is exercised), a wrong one fails the same test."""
    if rule != "exact":
        monkeypatch.setattr(spec_decode, "accept", _accept_always)
    pvalue, accepted = _joint_fit(engine(entry, gguf, 2), engine(entry, gguf, 0), PROMPTS[0], 1500)
    assert accepted > 0
    assert (pvalue > 1e-3) == (rule == "exact")


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=60),
    SamplingParams(max_new_tokens=60, frequency_penalty=0.7, presence_penalty=0.3),
])  # fmt: skip
@pytest.mark.parametrize("heads", [0, 2])
def test_lookup_greedy_is_plain_greedy(entry, gguf, params, heads):
    """Prompt-lookup drafts (the random model's greedy output repeats itself, so they are made and some accepted,
    without penalties), alone or before the heads' drafts: plain greedy's tokens, alone and in a batch."""
    plain, spec = engine(entry, gguf, 0), engine(entry, gguf, heads, lookup_tokens=3)
    want = [list(plain.generate_tokens(p, params)) for p in PROMPTS]
    gens = [Generation() for _ in PROMPTS]
    assert [list(spec.generate_tokens(p, params, g)) for p, g in zip(PROMPTS, gens, strict=True)] == want
    assert sum(g.accepted for g in gens) > 0 or params.penalized  # penalties keep this model from repeating
    reqs = [Request(None, params, prompt_ids=p) for p in PROMPTS]
    assert [g.tokens for g in spec.batcher().run(reqs)] == want


def test_lookup_drafts_only_greedy(entry, gguf):
    """Sampled generation takes no prompt-lookup drafts (accepted too rarely at a temperature to pay), greedy does."""
    spec = engine(entry, gguf, 0, lookup_tokens=3)
    sampled, greedy = Generation(), Generation()
    list(spec.generate_tokens(PROMPTS[2], SamplingParams(max_new_tokens=40, temperature=0.7, seed=1), sampled))
    list(spec.generate_tokens(PROMPTS[2], SamplingParams(max_new_tokens=40), greedy))
    assert sampled.drafted == 0 and greedy.drafted > 0


def test_shipped_model_speculation_keeps_greedy_tokens():
    """The shipped model's own MTP heads (1 and 3 drafted tokens per step) and prompt-lookup drafts give plain
    greedy's tokens exactly on held-out code prompts, with drafts accepted, and so do device chains
    (bench.speculative measures the speed)."""
    import json
    from pathlib import Path

    gguf = "models/small.gguf"
    eng = Engine(built(gguf).dir, gguf, threads=2, draft_tokens=0, lookup_tokens=0)
    assert eng.mtp_heads == 3
    prompts = [p["prompt"] for p in json.loads(Path("bench/data/heldout_code_prompts.json").read_text())["prompts"][:3]]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    eng.chain_burst = 0
    plain = [eng.generate(p, params).tokens for p in prompts]
    eng.chain_burst = 16  # plain greedy as device chains (Engine.chain): the same tokens
    assert [eng.generate(p, params).tokens for p in prompts] == plain
    eng.chain_burst = 0  # chains take every plain greedy generation: off, so that the drafts run
    for k, lookup in ((1, 0), (3, 0), (0, 7), (1, 7)):  # MTP drafts, prompt-lookup drafts, both
        eng.draft_tokens, eng.lookup_tokens = k, lookup
        gens = [eng.generate(p, params) for p in prompts]
        assert [g.tokens for g in gens] == plain, (k, lookup)
        assert sum(g.accepted for g in gens) > 0
