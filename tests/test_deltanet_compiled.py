"""The compiled gated DeltaNet hybrid (issue 21): its kernels against numpy, and the whole model against PyTorch.

* the gates kernel and the recurrent state update — in its CPU form and in its CUDA form run with serial loops —
  against a float64 numpy loop of the maths (:mod:`model.deltanet`): rows in order within a chunk, a fresh state at
  position 0, a state carried over from earlier calls, padding rows that touch nothing, a state slot per sequence;
* a tiny hybrid compiled for each x86 target gives PyTorch's logits within the int8 rounding tolerance; a decode batch
  gives each row the logits it gets alone (each sequence its own state);
* the state pool (``n_states`` slots, first blocks from ``[0, n_states)``): with more sequences started and ended over
  time than there are slots, the tiny hybrid and a random ``small-deltanet`` give each sequence the tokens it gets
  alone; one sequence beyond the slots is a clean ``CacheFull`` that leaves the live ones as they were;
* a CUDA build of it is one graph per step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from kernel_helpers import X86
from runtime_helpers import (
    assert_batch_rows_equal_alone,
    assert_pytorch_parity,
    built,
    cache_dir,
    random_prompt,
    reference,
    tiny_gguf,
)

from compiler import cuda_cross
from compiler import graph_kernels_deltanet as gkd
from model.sampling import SamplingParams
from runtime.batch import Batcher, Request
from runtime.engine import Engine
from runtime.kv_cache import CacheFull, Sequence
from targets import get_target

HYBRID = {"full_attention_interval": 2}  # on tiny: layer 0 DeltaNet, layer 1 softmax attention
BLOCK = 16
FORMS = [pytest.param(False, id="cpu"), pytest.param(True, id="cuda-twin")]


def _run(func, *args):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("avx2"))
    arrays = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*arrays)
    return [a.numpy() for a in arrays]


def _reference(q, k, v, gl, a_log, dt_bias, pos, table, state, H: int, Hk: int, hd: int):
    """float64 loop of the gated delta rule (model.deltanet's maths), updating ``state`` in place."""
    G, T = H // Hk, q.shape[0]
    o = np.zeros((T, H * hd))
    for t in range(T):
        if pos[t] < 0:
            continue
        b = table[t, 0]
        if pos[t] == 0:
            state[b] = 0
        for g in range(Hk):
            kk = k[t, g * hd : (g + 1) * hd].astype(np.float64)
            kk = kk / math.sqrt((kk * kk).sum() + 1e-6)
            alpha = math.exp(-math.exp(a_log[g]) * math.log1p(math.exp(gl[t, g] + dt_bias[g])))
            beta = 1 / (1 + math.exp(-gl[t, Hk + g]))
            S = state[b, g] * alpha
            u = S.T @ kk
            S = S + np.outer(kk, beta * (v[t, g * hd : (g + 1) * hd] - u))
            state[b, g] = S
            for h in range(g * G, (g + 1) * G):
                qq = q[t, h * hd : (h + 1) * hd].astype(np.float64)
                o[t, h * hd : (h + 1) * hd] = S.T @ (qq / math.sqrt((qq * qq).sum() + 1e-6) / math.sqrt(hd))
    return o


@pytest.mark.build
def test_gates():
    """``gl = (W · q8) / a`` per row."""
    rng = np.random.default_rng(0)
    T, G, D = 3, 8, 512
    q8 = rng.integers(-127, 128, (T, D), dtype=np.int8)
    a = rng.uniform(10, 100, T).astype(np.float32)
    W = rng.standard_normal((G, D)).astype(np.float32) / 20
    got = _run(gkd.gates(T, G, D), q8, a, W, np.zeros((T, G), np.float32))[-1]
    np.testing.assert_allclose(got, (q8.astype(np.float64) @ W.T) / a[:, None], rtol=1e-5, atol=1e-5)


@pytest.mark.build
@pytest.mark.parametrize("gpu", FORMS)
@pytest.mark.parametrize("case", ["chunk", "batch"])
def test_recurrent_state_update(gpu, case):
    """``chunk``: a prefill chunk of one sequence, rows at consecutive positions (the first at 0: a fresh state), then
    a second chunk continuing it from the stored state. ``batch``: three sequences at their own positions, each its
    own state slot, and a padding row that writes nothing."""
    H, Hk, hd, ctx = 4, 2, 64, 64
    rng = np.random.default_rng(1 if case == "chunk" else 2)
    nb = 6
    state0 = rng.standard_normal((nb, Hk, hd, hd)).astype(np.float32) * 0.1  # garbage: position 0 must reset it
    calls = []
    if case == "chunk":
        T = 5
        table = np.tile(np.array([4, 1, 2, 3], np.int32), (T, 1))
        calls = [(np.arange(T, dtype=np.int32), table), (np.arange(T, 2 * T, dtype=np.int32), table)]
    else:
        T = 4
        table = np.array([[3, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [5, 0, 0, 0]], np.int32)
        calls = [(np.array([0, 0, -1, 0], np.int32), table), (np.array([1, 1, -1, 1], np.int32), table)]
    func = gkd.recurrent(T, H, Hk, hd, ctx, BLOCK, gpu=gpu, bind=False)
    st, want_st = state0.copy(), state0.astype(np.float64)
    for pos, tab in calls:
        q = rng.standard_normal((T, H * hd)).astype(np.float32)
        k = rng.standard_normal((T, Hk * hd)).astype(np.float32)
        v = rng.standard_normal((T, Hk * hd)).astype(np.float32)
        gl = rng.standard_normal((T, 2 * Hk)).astype(np.float32)
        a_log = np.log(rng.uniform(1, 16, Hk)).astype(np.float32)
        dt = rng.uniform(-7, -2, Hk).astype(np.float32)
        want = _reference(q, k, v, gl, a_log, dt, pos, tab, want_st, H, Hk, hd)
        *_, st, o = _run(func, q, k, v, gl, a_log, dt, pos, tab, st, np.full((T, H * hd), 9, np.float32))
        np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st, want_st, rtol=1e-4, atol=1e-5)  # untouched slots keep their garbage


@pytest.mark.e2e
@pytest.mark.parametrize("target", X86)
def test_tiny_deltanet_hybrid_matches_pytorch(target):
    """Teacher-forced over a prompt longer than a prefill chunk: logits within the int8 tolerance at every step."""
    path = tiny_gguf(**HYBRID)
    engine = Engine(built(path, target).dir, path)
    assert_pytorch_parity(engine, reference(path), random_prompt(21), steps=24)


@pytest.mark.e2e
def test_tiny_deltanet_decode_batch_rows_equal_alone():
    """Each row of ``decode_b{B}`` (sequences at different positions, each its own state) gets the logits it gets
    decoded alone."""
    path = tiny_gguf(**HYBRID)
    engine = Engine(built(path, "avx2").dir, path)
    assert_batch_rows_equal_alone(engine)


def assert_interleaved_equal_alone(engine: Engine, n: int, steps: int, monkeypatch) -> None:
    """``n`` greedy requests (mixed prompt and generation lengths, so they end at different steps) through a Batcher
    that would admit two more than the engine's state slots: the pool refuses a request while every slot is held, the
    request waits and starts in a slot a finished one gave back, and each gets the tokens it gets alone."""
    slots = engine.pool.n_states
    assert 0 < slots < n
    prompts = [random_prompt(2 + 7 * (i % 3), 40 + i) for i in range(n)]

    def requests():
        return [Request(None, SamplingParams(max_new_tokens=steps + 3 * (i % 3), ignore_eos=True), prompt_ids=p)
                for i, p in enumerate(prompts)]  # fmt: skip

    alone = [Batcher(engine, 1).run([r])[0].tokens for r in requests()]
    firsts, reserve = [], engine.pool.reserve

    def spy(seq, length):
        fresh = not seq.blocks
        ok = reserve(seq, length)
        if ok and fresh and seq.blocks:
            firsts.append(seq.blocks[0])
        return ok

    monkeypatch.setattr(engine.pool, "reserve", spy)
    batcher, reqs, most = Batcher(engine, slots + 2), requests(), 0
    waiting = list(reqs)
    while waiting or batcher.running:
        while waiting and batcher.admit(waiting[0]):
            waiting.pop(0)
        most = max(most, batcher.running)
        batcher.step()
    assert [r.result.tokens for r in reqs] == alone
    assert most == slots and len(firsts) == n and sorted(set(firsts)) == list(range(slots))  # every slot reused
    assert engine.pool.free == engine.pool.n_blocks and engine.pool.free_states == slots


def assert_one_beyond_the_slots_is_cache_full(engine: Engine) -> None:
    """With every state slot held, a new sequence's prefill raises ``CacheFull`` and takes nothing; the live sequences
    decode on as they would have; one released, a new sequence starts in its slot with the logits it gets alone."""
    slots, prompts = engine.pool.n_states, [random_prompt(5 + 3 * i, 60 + i) for i in range(engine.pool.n_states + 1)]

    def alone(p):
        seq = Sequence()
        first = engine.prefill(p, seq)
        out = [first, engine.decode(int(np.argmax(first)), seq)]
        engine.reset(seq)
        return out

    want = [alone(p) for p in prompts]
    seqs = [Sequence() for _ in range(slots)]
    got = [engine.prefill(p, s) for p, s in zip(prompts, seqs, strict=False)]
    extra, free = Sequence(), engine.pool.free
    with pytest.raises(CacheFull, match="recurrent-state slots"):
        engine.prefill(prompts[-1], extra)
    assert extra.blocks == [] and extra.length == 0 and engine.pool.free == free
    rows = engine.decode_batch(seqs, [int(np.argmax(g)) for g in got])
    for i in range(slots):
        np.testing.assert_array_equal(got[i], want[i][0])
        np.testing.assert_array_equal(rows[i], want[i][1])
    slot = seqs[0].blocks[0]
    engine.reset(seqs[0])
    first = engine.prefill(prompts[-1], extra)
    assert extra.blocks[0] == slot
    np.testing.assert_array_equal(first, want[-1][0])
    np.testing.assert_array_equal(engine.decode(int(np.argmax(first)), extra), want[-1][1])
    for s in [extra, *seqs[1:]]:
        engine.reset(s)


@pytest.fixture(scope="module")
def pooled():
    """The tiny hybrid (avx2) with 3 state slots."""
    path = tiny_gguf(**HYBRID)
    engine = Engine(built(path, "avx2").dir, path, max_seqs=3)
    assert engine.pool.n_states == 3 and engine.cache[0].shape[0] == 3  # state_0 [n_states, Hk, hd, hd]
    assert engine.cache[1].shape[0] == engine.pool.n_blocks  # kc_1
    return engine


@pytest.mark.build
def test_tiny_deltanet_interleaved_sequences_equal_alone(pooled, monkeypatch):
    assert_interleaved_equal_alone(pooled, n=8, steps=5, monkeypatch=monkeypatch)


@pytest.mark.build
def test_tiny_deltanet_sequence_beyond_the_state_slots_is_cache_full(pooled):
    assert_one_beyond_the_slots_is_cache_full(pooled)


@pytest.mark.build
def test_default_state_slots_are_the_largest_batch_and_one():
    """By default a hybrid keeps a state slot per sequence of the largest decode batch plus the Engine's own, at most
    one per block; a model without DeltaNet layers has no reserved range."""
    from runtime.engine import default_max_seqs

    path = tiny_gguf(**HYBRID)
    engine = Engine(built(path, "avx2").dir, path)
    assert engine.pool.n_states == default_max_seqs(engine.batch_sizes) == max(engine.batch_sizes) + 1
    assert Engine(built(path, "avx2").dir, path, kv_tokens=engine.ctx, max_seqs=10_000).pool.n_states == (
        engine.pool.width
    )
    plain = tiny_gguf()
    assert Engine(built(plain, "avx2").dir, plain, max_seqs=3).pool.n_states == 0


@pytest.mark.build
@pytest.mark.slow
def test_small_deltanet_interleaved_sequences_equal_alone(tmp_path_factory, monkeypatch):
    """The ``small-deltanet`` preset (random weights), 4 state slots, 9 sequences through them."""
    from compiler.build import build
    from model.random_model import write_random_gguf

    path = write_random_gguf("small-deltanet", tmp_path_factory.mktemp("small-deltanet") / "small-deltanet.gguf")
    engine = Engine(build(path, "avx2", cache_dir()).dir, path, max_seqs=4)
    assert_interleaved_equal_alone(engine, n=9, steps=4, monkeypatch=monkeypatch)
    assert_one_beyond_the_slots_is_cache_full(engine)


@pytest.mark.build
@pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc) here")
def test_tiny_deltanet_builds_for_cuda_as_one_graph(tmp_path):
    """The CUDA build of the tiny hybrid: every decode step one graph replay, no host launch, no allocation."""
    from compiler.build import build

    res = build(tiny_gguf(**HYBRID), "cuda", tmp_path)
    for name, c in res.meta["census"].items():
        if name.startswith("decode_b"):
            assert (c["graphs"], c["kernels_outside"], c["allocations"]) == (1, 0, 0), (name, c)
