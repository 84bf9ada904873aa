"""Batched decode on CUDA without a GPU: the paged attention and the batched LM head of
:mod:`compiler.graph_kernels_gpu` run on the CPU as their serial twins (``gpu=False``: the same loop body, thread
bindings replaced by serial loops, the block barriers' phases run in order), against numpy and against themselves
one row at a time (a row's result does not depend on the batch: bit-identical); the CUDA versions compile to one
device kernel each; the shipped model builds for CUDA with every ``decode_b{B}``.

Running the kernels needs a GPU: ``scripts/gpu_batch.sh`` checks greedy tokens alone against batched on the H200
and times the batch sizes (``docs/runtime/cuda_batch.json``). Tests that compile CUDA need the toolkit (nvcc) and
skip with a reason without it.

    pytest tests/test_cuda_batch.py -q
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from compiler import cuda_cross

needs_nvcc = pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc + headers) on this machine")


def _run_cpu(func, args):
    """Compile a PrimFunc for this CPU and run it in place on numpy ``args``; the arrays after the call."""
    import tvm

    from targets import detect, get_target

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target(detect()))
    ts = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    ex["main"](*ts)
    return [t.numpy() for t in ts]


def _attention_cpu(T, H, Hkv, hd, ctx, block, q, kc, vc, pos, table):
    from compiler.graph_kernels_gpu import attention, attention_scratch

    o = np.full((T, H * hd), np.nan, np.float32)  # every element must be written (padding rows: zeros)
    part, st = (np.full(s, np.nan, np.float32) for s in attention_scratch(T, H, hd, ctx))  # only valid chunks read
    cos, sin = np.ones((ctx, hd // 2), np.float32), np.zeros((ctx, hd // 2), np.float32)  # RoPE as the identity
    args = [q.reshape(T, H * hd), kc, vc, pos, table, cos, sin, o, part, st]
    return _run_cpu(attention(T, H, Hkv, hd, ctx, block, gpu=False), args)[7]


def _attention_reference(q, kc, vc, pos, table, block):
    """float64 softmax attention of each row over its own sequence's keys 0..pos through its block table."""
    T, H, hd = q.shape
    g = H // kc.shape[1]
    out = np.zeros((T, H * hd))
    for t in range(T):
        if pos[t] < 0:
            continue
        js = np.arange(pos[t] + 1)
        K = kc[table[t, js // block], :, js % block].astype(np.float64)  # [n, Hkv, hd]
        V = vc[table[t, js // block], :, js % block].astype(np.float64)
        for h in range(H):
            s = K[:, h // g] @ q[t, h] / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h * hd : (h + 1) * hd] = (p / p.sum()) @ V[:, h // g]
    return out


@pytest.mark.build
@pytest.mark.parametrize("H,Hkv,hd", [(4, 2, 16), (8, 8, 32), (4, 2, 128)])  # 1 and 4 threads per key
def test_paged_attention_rows_do_not_depend_on_the_batch(H, Hkv, hd):
    """Rows at their own positions, through their own (shuffled) block tables, with padding rows between: each row
    equals the reference, is bit-identical to the same row run alone (T = 1), and a padding row is zeros."""
    ctx, block, n_blocks = 80, 16, 23
    W = -(-ctx // block)
    rng = np.random.default_rng(H * hd)
    kc = rng.standard_normal((n_blocks, Hkv, block, hd)).astype(np.float32)
    vc = rng.standard_normal((n_blocks, Hkv, block, hd)).astype(np.float32)
    pos = np.array([0, 37, -1, 79, 15, 16, -1], np.int32)  # block edges, a full context, padding
    T = len(pos)
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    table = np.stack([rng.permutation(n_blocks)[:W] for _ in range(T)]).astype(np.int32)
    o = _attention_cpu(T, H, Hkv, hd, ctx, block, q, kc, vc, pos, table)
    np.testing.assert_allclose(o, _attention_reference(q, kc, vc, pos, table, block), rtol=1e-5, atol=1e-5)
    assert not o[pos < 0].any()
    for t in range(T):
        alone = _attention_cpu(1, H, Hkv, hd, ctx, block, q[t : t + 1], kc, vc, pos[t : t + 1], table[t : t + 1])
        np.testing.assert_array_equal(alone[0], o[t])


@pytest.mark.build
def test_attention_with_rope_equals_rope_then_attention():
    """The CUDA build's attention rotates the query itself: bit-identical to compiler.graph_kernels' rope_q followed
    by the same kernel with the identity rotation (cos 1, sin 0), padding rows included."""
    from compiler.graph_kernels import rope_q, rope_tables
    from compiler.graph_kernels_gpu import attention, attention_scratch

    T, H, Hkv, hd, ctx, block, n_blocks = 5, 4, 2, 32, 96, 16, 20
    rng = np.random.default_rng(3)
    kc = rng.standard_normal((n_blocks, Hkv, block, hd)).astype(np.float32)
    vc = rng.standard_normal((n_blocks, Hkv, block, hd)).astype(np.float32)
    pos = np.array([0, 50, -1, 95, 17], np.int32)
    table = np.stack([rng.permutation(n_blocks)[: ctx // block] for _ in range(T)]).astype(np.int32)
    q = rng.standard_normal((T, H * hd)).astype(np.float32)
    cos, sin = rope_tables(hd, ctx, 10000.0)
    qr = _run_cpu(rope_q(T, H, hd, ctx), [q, pos, cos, sin, np.zeros((T, H, hd), np.float32)])[4]
    want = _attention_cpu(T, H, Hkv, hd, ctx, block, qr, kc, vc, pos, table)
    o = np.full((T, H * hd), np.nan, np.float32)
    part, st = (np.full(s, np.nan, np.float32) for s in attention_scratch(T, H, hd, ctx))
    f = attention(T, H, Hkv, hd, ctx, block, gpu=False)
    got = _run_cpu(f, [q, kc, vc, pos, table, cos, sin, o, part, st])[7]
    np.testing.assert_array_equal(got, want)


@pytest.mark.build
def test_stacked_qkv_rows_feed_the_cache_write_and_the_attention():
    """With q|k|v as one stacked GEMV output ``[T, D + 2·KV]`` (compiler.lower.stacked), the cache write reads the key
    and value columns and the attention the query columns of that one tensor: bit-identical to the kernels given the
    three separate tensors, padding rows included."""
    from compiler.graph_kernels import kv_update, rope_tables
    from compiler.graph_kernels_gpu import attention, attention_scratch

    T, H, Hkv, hd, ctx, block, n_blocks = 4, 4, 2, 32, 96, 16, 20
    D, KV = H * hd, Hkv * hd
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((T, D + 2 * KV)).astype(np.float32)
    pos = np.array([0, 40, -1, 95], np.int32)
    table = np.stack([rng.permutation(n_blocks)[: ctx // block] for _ in range(T)]).astype(np.int32)
    cos, sin = rope_tables(hd, ctx, 10000.0)
    cache = rng.standard_normal((2, n_blocks, Hkv, block, hd)).astype(np.float32)
    alone = kv_update(T, Hkv, hd, ctx, block)
    kc, vc = _run_cpu(alone, [qkv[:, D : D + KV], qkv[:, D + KV :], pos, table, cos, sin, *cache.copy()])[6:]
    fused = kv_update(T, Hkv, hd, ctx, block, width=D + 2 * KV, k_at=D, v_at=D + KV)
    kc2, vc2 = _run_cpu(fused, [qkv, qkv, pos, table, cos, sin, *cache.copy()])[6:]
    np.testing.assert_array_equal(kc2, kc)
    np.testing.assert_array_equal(vc2, vc)
    outs = []
    for q, width in ((qkv[:, :D], None), (qkv, D + 2 * KV)):
        o = np.full((T, D), np.nan, np.float32)
        part, st = (np.full(s, np.nan, np.float32) for s in attention_scratch(T, H, hd, ctx))
        f = attention(T, H, Hkv, hd, ctx, block, gpu=False, q_width=width)
        outs.append(_run_cpu(f, [q, kc, vc, pos, table, cos, sin, o, part, st])[7])
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.isfinite(outs[0]).all()
    with pytest.raises(ValueError, match="do not fit"):
        kv_update(T, Hkv, hd, ctx, block, width=D + KV, k_at=D, v_at=D + KV)


@pytest.mark.build
@pytest.mark.parametrize("H,Hkv,hd", [(4, 2, 32), (8, 8, 16), (4, 1, 64)])
@pytest.mark.parametrize("quant", [False, True])
def test_one_row_attention_writes_the_cache_itself(H, Hkv, hd, quant):
    """``write_kv`` (the one-token step): the attention rotates and writes the new key and value itself and reads them
    from shared memory, never from the slot it writes (here NaN before the call): the cache and the output are
    bit-identical to the cache write followed by the attention, at the first, a middle and the last position."""
    from compiler.graph_kernels import kv_update, rope_tables
    from compiler.graph_kernels_gpu import attention, attention_scratch

    ctx, block, n_blocks = 96, 16, 9
    D, KV = H * hd, Hkv * hd
    rng = np.random.default_rng(H + hd)
    cos, sin = rope_tables(hd, ctx, 10000.0)
    table = rng.permutation(n_blocks)[None, : ctx // block].astype(np.int32)
    for p in (0, 37, ctx - 1):
        qkv = rng.standard_normal((1, D + 2 * KV)).astype(np.float32)
        pos = np.array([p], np.int32)
        cache = rng.standard_normal((2, n_blocks, Hkv, block, hd)).astype(np.float32)
        cache[:, table[0, p // block], :, p % block] = np.nan  # the slot being written: never read
        outs = [((1, D), "int8" if quant else "float32")] + ([((1,), "float32"), ((1,), "int32")] if quant else [])
        outs += [(sh, "float32") for sh in attention_scratch(1, H, hd, ctx)]

        def run(f, kc, vc, qkv=qkv, pos=pos, outs=outs):
            return _run_cpu(f, [qkv, kc, vc, pos, table, cos, sin, *(np.zeros(sh, dt) for sh, dt in outs)])

        upd = kv_update(1, Hkv, hd, ctx, block, width=D + 2 * KV, k_at=D, v_at=D + KV)
        kc, vc = _run_cpu(upd, [qkv, qkv, pos, table, cos, sin, *cache.copy()])[6:]
        want = run(attention(1, H, Hkv, hd, ctx, block, gpu=False, quant=quant, q_width=D + 2 * KV), kc, vc)
        got = run(attention(1, H, Hkv, hd, ctx, block, gpu=False, quant=quant, q_width=D + 2 * KV, write_kv=True),
                  *cache.copy())  # fmt: skip
        for a, b in zip(got[1:3] + got[7 : 10 if quant else 8], want[1:3] + want[7 : 10 if quant else 8], strict=True):
            np.testing.assert_array_equal(a, b)
        assert np.isfinite(got[1]).all() and np.isfinite(got[7].astype(np.float32)).all()
    with pytest.raises(ValueError, match="write_kv"):
        attention(2, H, Hkv, hd, ctx, block, q_width=D + 2 * KV, write_kv=True)


@pytest.mark.build
def test_paged_attention_reads_only_its_own_blocks():
    """Blocks of other sequences (here: NaN) are never read, and neither are a row's table entries past its
    position: a batch of sequences on disjoint blocks attends exactly as the reference."""
    H, Hkv, hd, ctx, block = 4, 2, 16, 64, 16
    rng = np.random.default_rng(1)
    kc = np.full((12, Hkv, block, hd), np.nan, np.float32)
    vc = np.full_like(kc, np.nan)
    pos = np.array([20, 3], np.int32)
    table = np.full((2, ctx // block), 11, np.int32)  # unused entries point at a NaN block
    table[0, :2], table[1, :1] = [4, 7], [2]
    for t, p in enumerate(pos):
        for j in range(p + 1):
            kc[table[t, j // block], :, j % block] = rng.standard_normal((Hkv, hd))
            vc[table[t, j // block], :, j % block] = rng.standard_normal((Hkv, hd))
    q = rng.standard_normal((2, H, hd)).astype(np.float32)
    o = _attention_cpu(2, H, Hkv, hd, ctx, block, q, kc, vc, pos, table)
    assert np.isfinite(o).all()
    np.testing.assert_allclose(o, _attention_reference(q, kc, vc, pos, table, block), rtol=1e-5, atol=1e-5)


@pytest.mark.build
def test_attention_quantized_output_equals_attention_then_quantize():
    """``attention(..., quant=True)`` (the CUDA decode's attention with the o projection's input quantize fused into
    its combine) gives exactly the int8 codes, scale and row sum of the plain kernel's output quantized per token;
    a padding row quantizes to zeros. Rows through shuffled tables, at block edges."""
    from compiler.graph_kernels_gpu import attention, attention_scratch
    from model.ternary.quant import quantize_activations

    T, H, Hkv, hd, ctx, block, n_blocks = 5, 8, 2, 32, 96, 16, 20
    rng = np.random.default_rng(7)
    kc = rng.standard_normal((n_blocks, Hkv, block, hd)).astype(np.float32)
    vc = rng.standard_normal((n_blocks, Hkv, block, hd)).astype(np.float32)
    pos = np.array([0, 47, -1, 95, 16], np.int32)
    table = np.stack([rng.permutation(n_blocks)[: ctx // block] for _ in range(T)]).astype(np.int32)
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    plain = _attention_cpu(T, H, Hkv, hd, ctx, block, q, kc, vc, pos, table)
    part, st = (np.full(s, np.nan, np.float32) for s in attention_scratch(T, H, hd, ctx))
    cos, sin = np.ones((ctx, hd // 2), np.float32), np.zeros((ctx, hd // 2), np.float32)
    outs = [np.full((T, H * hd), 99, np.int8), np.full(T, np.nan, np.float32), np.full(T, -7, np.int32)]
    f = attention(T, H, Hkv, hd, ctx, block, gpu=False, quant=True)
    got = _run_cpu(f, [q.reshape(T, H * hd), kc, vc, pos, table, cos, sin, *outs, part, st])[7:10]
    want = quantize_activations(plain)
    np.testing.assert_array_equal(got[0], want.q)
    np.testing.assert_array_equal(got[1], want.scale)
    np.testing.assert_array_equal(got[2], want.total)
    assert not got[0][pos < 0].any() and not got[2][pos < 0].any()


@pytest.mark.build
@pytest.mark.parametrize("S,first", [(2, True), (2, False), (4, False)])
def test_mhc_site_fused_with_the_next_norm(S, first):
    """``mhc_post_norm`` (a decode mHC site and the next block's RMSNorm + int8 quantize in one CUDA kernel), run as
    its CPU twin: the streams and ``u`` equal the site's float64 reference; the codes are the per-token quantize of
    ``RMSNorm(u) · w`` (off by at most one code, at a rounding tie of the float sums' order), the scale within
    float32 rounding, and the row sum the codes' exact sum."""
    from compiler.graph_kernels_gpu import mhc_post_norm
    from compiler.ops.mhc import mhc_reference
    from model.ternary.quant import quantize_activations

    D, eps = 512, 1e-5
    rng = np.random.default_rng(S + first)
    rows = 1 if first else S
    x = rng.standard_normal((rows, D)).astype(np.float32)
    y = rng.standard_normal(D).astype(np.float32)
    h_res = rng.uniform(0, 1, (S, S)).astype(np.float32)
    h_post, h_pre = (rng.uniform(0, 1, S).astype(np.float32) for _ in range(2))
    w = rng.uniform(0.5, 1.5, D).astype(np.float32)

    def run(T, xs, ys):  # T rows: x [T, rows, D], y [T, D] → [x_out [T, S, D], u [T, D], q, scale, q_sum]
        outs = [np.full((T, S, D), np.nan, np.float32), np.full((T, D), np.nan, np.float32),
                np.full((T, D), 99, np.int8), np.full(T, np.nan, np.float32), np.full(T, -7, np.int32)]  # fmt: skip
        return _run_cpu(mhc_post_norm(D, S, first, eps, gpu=False, T=T), [xs, ys, h_res, h_post, h_pre, w, *outs])[6:]

    got = [a[0] for a in run(1, x[None], y[None])]
    # three rows, the middle one ours: each row's results are the one-row kernel's, bit for bit
    xs = np.stack([rng.standard_normal((rows, D)).astype(np.float32), x, x[::-1].copy()])
    ys = np.stack([y[::-1].copy(), y, rng.standard_normal(D).astype(np.float32)])
    three = run(3, xs, ys)
    for a, b in zip(got, three, strict=True):
        np.testing.assert_array_equal(b[1], a)
    X = np.repeat(x, S, axis=0) if first else x  # the first site expands the embedding into every stream
    xo, u, _ = mhc_reference(X, y, h_res, h_post, h_pre)
    np.testing.assert_allclose(got[0], xo, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], u, rtol=1e-5, atol=1e-5)
    u64 = got[1].astype(np.float64)
    want = quantize_activations((u64 / np.sqrt((u64 * u64).mean() + eps) * w).astype(np.float32)[None])
    assert np.abs(got[2].astype(np.int32) - want.q).max() <= 1 and (got[2] != want.q).mean() < 0.01
    np.testing.assert_allclose(got[3], want.scale, rtol=1e-6)
    assert got[4] == got[2].astype(np.int32).sum()
    with pytest.raises(ValueError, match="multiple"):
        mhc_post_norm(500, S, first, eps)


@pytest.mark.build
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("B,V", [(5, 333), (16, 334), (16, 333)])  # one head row per thread, two, one (V odd)
def test_lm_head_rows_do_not_depend_on_the_batch(dtype, B, V):
    """logits [B, V] == h @ E^T within float32 rounding, and each row bit-identical to B = 1 on that row alone;
    V not a multiple of the kernel's thread block (the tail rows)."""
    from compiler.graph_kernels_gpu import lm_head

    D = 64
    rng = np.random.default_rng(2)
    E = rng.standard_normal((V, D)).astype(dtype)
    h = rng.standard_normal((B, D)).astype(np.float32)
    out = _run_cpu(lm_head(B, V, D, dtype, gpu=False), [h, E, np.full((B, V), np.nan, np.float32)])[2]
    np.testing.assert_allclose(out, h.astype(np.float64) @ E.astype(np.float64).T, rtol=1e-4, atol=1e-4)
    for b in range(B):
        one = _run_cpu(lm_head(1, V, D, dtype, gpu=False), [h[b : b + 1], E, np.zeros((1, V), np.float32)])[2]
        np.testing.assert_array_equal(one[0], out[b])
    with pytest.raises(ValueError, match="multiple"):
        lm_head(2, V, 60, "float16")


@pytest.mark.build
@needs_nvcc
def test_cuda_attention_and_head_are_one_kernel_each():
    """The CUDA versions: attention is two kernels (the split over chunks of keys, then the combine; each declared
    and defined: 4 mentions), the first with its query, keys and values in shared memory and three block barriers
    (after staging them, after the partial dot products, after the scores), the chunk's max and Σ exp as two warp
    shuffle trees of log2(chunk) steps; the head is one kernel that reads its float16 rows with 16-byte loads (a
    warp's lanes side by side along a row), keeps the batch's sums in registers and adds the lanes' sums by register
    shuffles (no shared memory, no barrier)."""
    import tvm

    from compiler import schedule as S
    from compiler.graph_kernels_gpu import attention, attention_chunk, lm_head

    def source(f):
        return S.compile_mod(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), "cuda").mod.imports[0]

    att = source(attention(4, 16, 4, 128, 2048, 16)).inspect_source()
    steps = attention_chunk(128).bit_length() - 1
    assert att.count("__global__") == 4 and "__shared__" in att and att.count("__syncthreads()") == 3
    assert len(re.findall(r"= .*__shfl_down_sync\(", att)) == 2 * steps  # calls, not the header's #define
    head = source(lm_head(8, 32000, 2048, "float16")).inspect_source()
    assert head.count("__global__") == 2 and "uint4" in head and "__syncthreads" not in head
    assert len(re.findall(r"= .*__shfl_down_sync\(", head)) == 8 * 5  # each row's sum over a warp's 32 lanes


@pytest.mark.build
@needs_nvcc
@pytest.mark.parametrize("sampled", [False, True])
def test_cuda_argmax_reduces_by_shuffles_with_one_barrier(sampled):
    """The CUDA argmax (a chain's pick, the drafts' greedy tokens): one kernel whose block reduces (value, id) pairs
    by register shuffles, in each warp and then in warp 0 (2 × 2 × 5 shuffles), with a single block barrier between;
    the sampled form computes the noise only behind its inverse temperature's test (no log on the greedy path)."""
    import tvm

    from compiler import schedule as S
    from compiler.graph_kernels_gpu import argmax

    f = argmax(2, 32000, sampled=sampled).with_attr("global_symbol", "main")
    src = S.compile_mod(tvm.IRModule({"main": f}), "cuda").mod.imports[0].inspect_source()
    assert src.count("__global__") == 2 and src.count("__syncthreads()") == 1
    assert len(re.findall(r"= __shfl_down_sync\(", src)) == 20
    assert src.count("logf(") == (2 if sampled else 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        argmax(1, 100, threads=48)


@pytest.mark.build
@needs_nvcc
def test_shipped_model_builds_for_cuda_with_every_batch(tmp_path):
    """models/small.gguf compiles for CUDA to device code with decode_b{B} for every CUDA batch size: the one-token
    step keeps the tuned GEMVs, a batch runs the GEMM (N = B), and the head is the batched kernel. Graph hygiene:
    every call of every function (decode, verify, draft, chain, speculative chain, prefill) replays one CUDA graph,
    launches no kernel of its own and allocates nothing."""
    from compiler.build import build
    from compiler.constants import CUDA_BATCH_SIZES

    model = Path(__file__).resolve().parents[1] / "models" / "small.gguf"
    r = build(model, "cuda", tmp_path / "cache", dump_ir=tmp_path / "ir")
    assert r.compiled and r.meta["batch_sizes"] == list(CUDA_BATCH_SIZES) and r.meta["kv_block"] == 16
    kernels = r.meta["kernels"]
    assert all(s == "tuned" for k, s in kernels.items() if k.startswith("gemv_dp4a"))
    assert {f"gemm_dp4a:N={b}" for b in CUDA_BATCH_SIZES if b > 1} <= {k.split(":M=")[0] for k in kernels}
    assert b"__global__" not in r.so.read_bytes()  # cubin, not CUDA source
    relax = (tmp_path / "ir" / "lower.relax.py").read_text()
    for b in CUDA_BATCH_SIZES:
        assert f"def decode_b{b}(" in relax and f"def lm_head_{b}(" in relax
    # one CUDA graph per call: every kernel of every function is inside its captured graph, and a call allocates
    # nothing (the results go into the caller's tensors): checked on the module after the Relax pipeline, both by
    # the build's census (meta.json, what bench.runtime reports on the GPU host) and on the dumped IR
    census = r.meta["census"]
    names = {f"{f}_b{b}" for f in ("decode", "verify", *(f"draft{k}" for k in (1, 2, 3))) for b in CUDA_BATCH_SIZES}
    assert set(census) == names | {
        "prefill",
        "prefill_kv",
        "chain_b1",
        "spec_chain_b2",
        "spec_chain_b3",
        "spec_chain_b4",
    }
    for name, c in census.items():
        assert (c["graphs"], c["kernels_outside"], c["allocations"]) == (1, 0, 0), (name, c)
        assert c["kernels_in_graphs"] > 0
    compiled = (tmp_path / "ir" / "compile.relax.py").read_text()
    for name in (
        "decode_b1",
        "decode_b64",
        "verify_b4",
        "prefill",
        "prefill_kv",
        "draft3_b2",
        "chain_b1",
        "spec_chain_b3",
    ):
        body = re.search(rf"def {name}\(.*?(?=\n    @R\.function|\Z)", compiled, re.S).group(0)
        assert body.count("vm.builtin.cuda_graph.run_or_capture") == 1
        assert not re.findall(r"cls\.(\w+)\(", body), name  # no kernel launched outside the graph
        assert "alloc_storage" not in body and "R.builtin.alloc_tensor" not in body


@pytest.mark.build
@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_block_reduce_sums_in_the_warp_shuffles_order(threads):
    """``block_reduce``'s CPU twin sums in the order its GPU shuffles do, bit for bit: a tree within each warp of 32
    (lane l adds lane l + s, s = 16 .. 1), then a tree over the warps' sums (the same strides over the warps)."""
    from tvm.script import tirx as Tx

    from compiler.graph_kernels_gpu import block_reduce

    part, finish, _ = block_reduce(threads, lambda a, b: a + b, Tx.float32(0), gpu=False)

    @Tx.prim_func
    def total(x: Tx.Buffer((threads,), "float32"), out: Tx.Buffer((1,), "float32")):
        red = Tx.alloc_buffer((threads,), "float32")
        for tx in Tx.serial(threads):
            v = Tx.alloc_buffer((1,), "float32", scope="local")
            v[0] = x[tx]
            part(v, red, tx)
        finish(red, out)

    def tree(v):  # lane l += lane l + s, for s = n/2 .. 1; lane 0's result
        v = v.copy()
        s = len(v) // 2
        while s:
            v[:s] = v[:s] + v[s : 2 * s]
            s //= 2
        return v[0]

    rng = np.random.default_rng(threads)
    for _ in range(5):
        x = (rng.standard_normal(threads) * 10.0 ** rng.integers(-3, 4, threads)).astype(np.float32)
        got = _run_cpu(total, [x, np.zeros(1, np.float32)])[1][0]
        warps = np.array([tree(x[w : w + 32]) for w in range(0, threads, 32)], np.float32)
        assert got == tree(warps)
    with pytest.raises(ValueError, match="multiple of 32"):
        block_reduce(48, lambda a, b: a + b, Tx.float32(0))
