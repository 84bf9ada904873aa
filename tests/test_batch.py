"""Batched decode and continuous batching (runtime.kv_cache, Engine.decode_batch, runtime.batch.Batcher).

The exactness of batching: a sequence's logits, hence its greedy (and seeded) tokens, are the same whether it runs
alone or in a batch with any other sequences, with mixed prompt lengths, joins and leaves mid-stream, cancellations
and padding rows; on the shipped model (a real GGUF) through the compiled module of this machine's target.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import built

from model.sampling import SamplingParams
from runtime.batch import Batcher, Request
from runtime.engine import Engine
from runtime.kv_cache import BlockPool, Sequence

SMALL = "models/small.gguf"
PROMPTS = [
    "def fib(n):",
    "import os\nimport sys\n\n",
    'class Stack:\n    """A LIFO stack."""\n\n    def push(self, item):\n',
    "# sum the squares of a list\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description=",
]


# --- the block pool ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_pool_reserves_and_releases_blocks():
    pool = BlockPool(tokens=64, block=16, ctx=48)
    assert (pool.n_blocks, pool.width, pool.free) == (4, 3, 4)
    a, b = Sequence(), Sequence()
    assert pool.reserve(a, 17) and a.blocks == [0, 1]
    assert pool.reserve(a, 32) and a.blocks == [0, 1]  # already held
    assert not pool.reserve(b, 48) and b.blocks == []  # 3 needed, 2 free: nothing taken
    assert pool.reserve(b, 20) and pool.free == 0
    assert list(a.table(pool.width)) == [0, 1, 0]
    pool.release(a)
    assert a.blocks == [] and a.length == 0 and pool.free == 2
    with pytest.raises(ValueError, match="context"):
        pool.reserve(b, 49)
    with pytest.raises(ValueError, match="full context"):
        BlockPool(tokens=32, block=16, ctx=48)


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 100)), max_size=40))
def test_pool_never_hands_out_a_block_twice(ops):
    pool = BlockPool(tokens=160, block=16, ctx=100)
    seqs = [Sequence() for _ in range(6)]
    for i, n in ops:
        if n == 0:
            pool.release(seqs[i])
        else:
            before = list(seqs[i].blocks)
            ok = pool.reserve(seqs[i], n)
            assert seqs[i].blocks[: len(before)] == before
            assert not ok or len(seqs[i].blocks) >= -(-n // 16)
        held = [b for s in seqs for b in s.blocks]
        assert len(held) == len(set(held)) and pool.used == len(held) and pool.free + pool.used == pool.n_blocks


@pytest.mark.unit
def test_pool_hands_first_blocks_from_the_reserved_state_range():
    """With recurrent states (``sequences > 0``) a sequence's first block, whose id is its state slot, comes from
    ``[0, n_states)`` and its later blocks from the rest while any is free; with no reserved block free a new sequence
    is refused (nothing taken) while those holding one still grow; released blocks go back to their range."""
    pool = BlockPool(tokens=128, block=16, ctx=48, sequences=3)
    assert (pool.n_blocks, pool.n_states, pool.free, pool.free_states) == (8, 3, 8, 3)
    a, b, c, d = Sequence(), Sequence(), Sequence(), Sequence()
    assert pool.reserve(a, 40) and a.blocks == [0, 3, 4]
    assert pool.reserve(b, 1) and b.blocks == [1]
    assert pool.reserve(c, 17) and c.blocks == [2, 5]
    assert pool.free_states == 0 and pool.free == 2
    assert not pool.can_hold(d, 1) and not pool.reserve(d, 1) and d.blocks == []  # blocks free, no state slot
    assert pool.free == 2
    assert pool.reserve(b, 33) and b.blocks == [1, 6, 7]  # a sequence holding a slot grows as before
    assert pool.free == 0
    pool.release(b)
    assert (pool.free, pool.free_states) == (3, 1)
    assert pool.reserve(d, 20) and d.blocks == [1, 6]  # b's slot and its first later block again
    pool.release(a)
    e = Sequence()
    assert pool.reserve(e, 48) and e.blocks == [0, 3, 4]  # a's blocks again, each from its own range
    pool.release(c), pool.release(d), pool.release(e)
    assert (pool.free, pool.free_states) == (8, 3)


@pytest.mark.unit
def test_pool_later_blocks_fall_back_to_the_reserved_range():
    """When the rest is used up a sequence's later blocks come from the reserved range (fewer slots for new
    sequences, never a refusal the pool could have served); ``sequences`` beyond the blocks is capped: a sequence
    needs at least one block."""
    pool = BlockPool(tokens=64, block=16, ctx=64, sequences=2)
    a, b = Sequence(), Sequence()
    assert pool.reserve(a, 64) and a.blocks == [0, 2, 3, 1]
    assert not pool.reserve(b, 1)
    assert BlockPool(tokens=64, block=16, ctx=64, sequences=100).n_states == 4
    assert BlockPool(tokens=64, block=16, ctx=64).n_states == 0
    with pytest.raises(ValueError, match="sequences"):
        BlockPool(tokens=64, block=16, ctx=64, sequences=-1)


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 100)), max_size=40))
def test_pool_with_states_gives_each_live_sequence_its_own_slot(ops):
    """Whatever the reserves and releases: no block twice, every holding sequence's first block a distinct state slot
    below ``n_states``, and a refusal only when the blocks are short or no slot is free for a new sequence."""
    pool = BlockPool(tokens=160, block=16, ctx=100, sequences=3)
    seqs = [Sequence() for _ in range(6)]
    for i, n in ops:
        if n == 0:
            pool.release(seqs[i])
        else:
            before = list(seqs[i].blocks)
            need = -(-n // 16) - len(before)
            short = need > pool.free or (not before and pool.free_states == 0)
            ok = pool.reserve(seqs[i], n)
            assert ok != short and seqs[i].blocks[: len(before)] == before
            assert not ok or len(seqs[i].blocks) >= -(-n // 16)
        held = [b for s in seqs for b in s.blocks]
        assert len(held) == len(set(held)) and pool.used == len(held) and pool.free + pool.used == pool.n_blocks
        firsts = [s.blocks[0] for s in seqs if s.blocks]
        assert all(b < pool.n_states for b in firsts) and pool.free_states <= pool.n_states - len(firsts)


@pytest.mark.unit
def test_cache_layout_reads_each_tensors_leading_dimension():
    """``meta.json["cache"]``: ``[name, shape, dtype, dim]``; an entry of a module built before the state pool (no
    ``dim``) has ``n_blocks`` rows (its states were per block, which stays correct); an unknown ``dim`` asks for a
    rebuild instead of allocating the wrong rows."""
    from runtime.kv_cache import cache_layout

    got = cache_layout([["state_0", [2, 64, 64], "float32", "n_states"], ["kc_1", [2, 16, 64], "float32", "n_blocks"]])
    assert got == [("state_0", "n_states", (2, 64, 64), "float32"), ("kc_1", "n_blocks", (2, 16, 64), "float32")]
    assert cache_layout([["state_0", [2, 64, 64], "float32"]]) == [("state_0", "n_blocks", (2, 64, 64), "float32")]
    with pytest.raises(ValueError, match="rebuild"):
        cache_layout([["state_0", [2, 64, 64], "float32", "n_slots"]])


# --- the compiled module ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    eng = Engine(built(SMALL).dir, SMALL, kv_tokens=4096)
    eng.token_healing = False
    return eng


def _alone(eng: Engine, ids: list[int], steps: int) -> list[tuple[int, np.ndarray]]:
    seq = Sequence()
    logits, out = eng.prefill(ids, seq), []
    for _ in range(steps):
        tok = int(np.argmax(logits))
        out.append((tok, logits))
        logits = eng.decode(tok, seq)
    eng.reset(seq)
    return out


@pytest.mark.e2e
def test_decode_batch_rows_equal_decode_alone(small):
    """Every batch size (padding rows included) gives each row the logits it gets alone, bit for bit, with
    sequences at different positions, joining and leaving between steps."""
    ids = [small.tokenize(p) for p in PROMPTS]
    ref = [_alone(small, p, 10) for p in ids]
    seqs = [Sequence() for _ in ids]
    logits = [small.prefill(p, s) for p, s in zip(ids, seqs, strict=True)]
    done = [0] * len(ids)
    for step in range(14):
        live = [i for i in range(len(ids)) if done[i] < 10 and (step >= i or i == 0)]  # i joins at step i
        live = [i for i in live if not (i == 1 and 3 <= step < 6)]  # 1 sits out three steps
        if not live:
            break
        for i in live:
            want = ref[i][done[i]][1]
            np.testing.assert_array_equal(logits[i], want, err_msg=f"sequence {i}, token {done[i]}, batch {live}")
        out = small.decode_batch([seqs[i] for i in live], [ref[i][done[i]][0] for i in live])
        for r, i in enumerate(live):
            logits[i], done[i] = out[r], done[i] + 1
    assert done == [10] * len(ids)
    for s in seqs:
        small.reset(s)


@pytest.mark.e2e
def test_batcher_tokens_equal_alone_with_joins_leaves_and_cancellation(small):
    """Greedy and seeded sampling, mixed limits and stop strings: the Batcher's tokens and text are what each
    request gets alone; a request cancelled midway frees its blocks and the others are unaffected."""
    params = [
        SamplingParams(max_new_tokens=24),
        SamplingParams(max_new_tokens=6),
        SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_new_tokens=17, stop_strings=("\n\n",)),
        SamplingParams(max_new_tokens=20, temperature=1.2, top_k=40, seed=3, frequency_penalty=0.5),
    ]
    alone = [small.generate(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    events: list[list] = [[] for _ in PROMPTS]
    cancel = {"go": False}
    reqs = [Request(p, sp, emit=lambda k, v, i=i: events[i].append((k, v))) for i, (p, sp) in
            enumerate(zip(PROMPTS, params, strict=True))]  # fmt: skip
    victim = Request(PROMPTS[0], SamplingParams(max_new_tokens=200), cancelled=lambda: cancel["go"])
    b = Batcher(small)
    free = small.pool.free
    assert b.admit(reqs[0]) and b.admit(victim)
    for step in range(200):  # the others join one per 2 steps; the victim goes at step 9
        if step % 2 == 0 and step // 2 + 1 < len(reqs):
            assert b.admit(reqs[step // 2 + 1])
        cancel["go"] = step >= 9
        if not b.running:
            break
        stats = b.step()
        assert stats.batch <= b.max_batch
    assert not b.running and small.pool.free == free
    for i, (want, ev) in enumerate(zip(alone, events, strict=True)):
        assert ev[-1][0] == "done", ev[-1]
        got = ev[-1][1]
        assert got.tokens == want.tokens and got.finish_reason == want.finish_reason, i
        assert "".join(v for k, v in ev if k == "text") == want.text == got.text
    assert victim.result.tokens and len(victim.result.tokens) < 200


@pytest.mark.e2e
def test_prefill_interleaves_with_decode(small):
    """A long prompt is prefilled a chunk per step while the running stream gets a token (or, speculating, more)
    every step."""
    b = Batcher(small)
    first = Request(PROMPTS[0], SamplingParams(max_new_tokens=400))  # still running at the end, drafts or not
    assert b.admit(first)
    b.step()  # its prompt (< one chunk) and first token
    long_prompt = "x = 1\n" * 60
    late = Request(long_prompt, SamplingParams(max_new_tokens=4))
    assert b.admit(late)
    n_chunks = -(-len(small.tokenize(long_prompt)) // small.chunk)
    for _ in range(n_chunks):
        before = len(first.result.tokens)
        stats = b.step()
        assert stats.prefill_tokens > 0 and len(first.result.tokens) >= before + 1
    b.run([])
    assert len(late.result.tokens) == 4


@pytest.mark.e2e
def test_admission_waits_for_cache_and_running_requests_never_fail():
    """With room for one full context only, a second request waits until the first ends; both complete."""
    eng = Engine(built(SMALL).dir, SMALL, kv_tokens=1024)
    eng.token_healing = False
    b = Batcher(eng)
    big = SamplingParams(max_new_tokens=1024 - 16)
    r1, r2 = Request(PROMPTS[0], big), Request(PROMPTS[1], SamplingParams(max_new_tokens=8))
    assert b.admit(r1) and not b.admit(r2)
    assert r2.seq.blocks == [] and eng.pool.free < eng.pool.blocks_for(8 + len(eng.tokenize(PROMPTS[1])))
    while b.running:
        b.step()
    assert len(r1.result.tokens) > 0 and eng.pool.free == eng.pool.n_blocks
    b.run([r2])
    assert len(r2.result.tokens) == 8


@pytest.mark.e2e
def test_bad_requests_error_without_touching_the_batch(small):
    b = Batcher(small)
    good = Request(PROMPTS[0], SamplingParams(max_new_tokens=5))
    errors = []
    bad = Request(None, SamplingParams(max_new_tokens=5), emit=lambda k, v: errors.append((k, v)),
                  prompt_ids=[small.vocab + 3])  # fmt: skip
    empty = Request("", SamplingParams(max_new_tokens=5), emit=lambda k, v: errors.append((k, v)))
    assert b.admit(good) and b.admit(bad) and b.admit(empty)
    assert b.running == 1 and [k for k, _ in errors] == ["error", "error"]
    b.run([])
    assert len(good.result.tokens) == 5
