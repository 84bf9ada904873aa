"""The compiled gated DeltaNet hybrid (issue 21): its kernels against numpy, and the whole model against PyTorch.

* the gates kernel and the recurrent state update — in its CPU form and in its CUDA form run with serial loops —
  against a float64 numpy loop of the maths (:mod:`model.deltanet`): rows in order within a chunk, a fresh state at
  position 0, a state carried over from earlier calls, padding rows that touch nothing, a state slot per sequence;
* a tiny hybrid compiled for each x86 target gives PyTorch's logits within the int8 rounding tolerance; a decode batch
  gives each row the logits it gets alone (each sequence its own state);
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
    random_prompt,
    reference,
    tiny_gguf,
)

from compiler import cuda_cross
from compiler import graph_kernels_deltanet as gkd
from runtime.engine import Engine
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


@pytest.mark.build
@pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc) here")
def test_tiny_deltanet_builds_for_cuda_as_one_graph(tmp_path):
    """The CUDA build of the tiny hybrid: every decode step one graph replay, no host launch, no allocation."""
    from compiler.build import build

    res = build(tiny_gguf(**HYBRID), "cuda", tmp_path)
    for name, c in res.meta["census"].items():
        if name.startswith("decode_b"):
            assert (c["graphs"], c["kernels_outside"], c["allocations"]) == (1, 0, 0), (name, c)
