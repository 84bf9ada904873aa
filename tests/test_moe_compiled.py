"""The compiled mixture of experts (issue 21): the expert-indexed GEMV, the router and the whole model.

* ``gemv_i8`` with ``E`` experts reads expert ``e`` of a stack, bit for bit the dense kernel on that expert's matrix;
* the router kernel picks the same experts as :func:`model.exact_reference.route` (ties: the lower index) with the
  same weights;
* a tiny MoE model compiled for each x86 target gives the exact reference's logits (measured: identical) and
  PyTorch's within the int8 rounding tolerance; a decode batch gives every row the logits it gets alone;
* the bytes a decode step reads follow the active experts (one expert's matrix per call, by construction of the
  kernel's indexing: checked on the lowered module, which calls the expert GEMV, never the dense one, in the FFN);
* builds the kernels cannot serve (CUDA, the ``tl`` layout) are refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import X86
from runtime_helpers import assert_pytorch_parity, built, reference, tiny_gguf
from test_exact_reference import _exact, exact_parity

from compiler import cuda_cross
from compiler import graph_kernels as gk
from compiler.lower import Lowering
from compiler.ops import make_op
from compiler.schedule import get_primfunc
from model import exact_reference as er
from model.config import get_config
from model.gguf_io import read_gguf
from model.ternary import ggml
from model.ternary.layouts_x86 import tile_rowmajor4, untile_rowmajor4
from model.ternary.quant import TernaryWeights
from runtime.engine import Engine
from runtime.kv_cache import Sequence
from targets import get_target

MOE = {"n_experts": 4, "n_experts_used": 2}


def _run(func, target: str, *args):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target(target))
    arrays = [tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in args]
    lib["main"](*arrays)
    return [a.numpy() for a in arrays if not isinstance(a, int)]


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
@settings(max_examples=4, deadline=None)
@given(
    m=st.sampled_from([256, 768]), k=st.sampled_from([256, 512]), experts=st.integers(2, 5),
    parts=st.sampled_from([1, 2]), rows=st.sampled_from([0, 3]), seed=st.integers(0, 99),
)  # fmt: skip
def test_expert_gemv_is_the_dense_kernel_on_one_expert(target, m, k, experts, parts, rows, seed):
    """Expert ``e`` of a stack (``parts`` matrices of ``m / parts`` rows each, e.g. gate|up) times activation row
    ``r`` (of ``rows``; 0: a single vector) equals the dense kernel on each of its matrices, bit for bit."""
    dense = make_op("gemv_i8", M=m // parts, K=k, tile=8)
    op = make_op("gemv_i8", M=m, K=k, tile=8, E=experts, P=parts, X=rows)
    assert op.canonical() == make_op("gemv_i8", M=m, K=k, tile=8).canonical()  # the dense record's knobs
    assert op.func_name != make_op("gemv_i8", M=m, K=k, tile=8).func_name
    rng = np.random.default_rng(seed)
    W = np.stack([make_op("gemv_i8", M=m, K=k, tile=8).random_inputs(rng)[0] for _ in range(experts)])
    vectors = [dense.random_inputs(rng)[1:4] for _ in range(max(rows, 1))]
    x, x_sum, x_scale = (np.stack(a) if rows else a[0] for a in zip(*vectors, strict=True))
    if rows:
        x_sum, x_scale = x_sum[:, 0], x_scale[:, 0]
    w_scale = rng.uniform(0.1, 2, (experts, parts)).astype(np.float32)
    func = get_primfunc(op, target, mode="hand").for_relax()
    for e in range(experts):
        r = e % max(rows, 1)
        y = np.zeros(m, np.float32)
        got = _run(func, target, W, x, x_sum, x_scale, w_scale, e, *([r] if rows else []), y)[-1]
        np.testing.assert_array_equal(got, op.reference(W, x, x_sum, x_scale, w_scale, e, r if rows else None)[0])
        if rows:
            x1, s1, c1 = x[r], x_sum[r : r + 1], x_scale[r : r + 1]
        else:
            x1, s1, c1 = x, x_sum, x_scale
        codes = untile_rowmajor4(W[e])
        for p in range(parts):
            part = slice(p * m // parts, (p + 1) * m // parts)
            mine = dense.reference(tile_rowmajor4(codes[part], 8), x1, s1, c1, w_scale[e, p : p + 1])[0]
            np.testing.assert_array_equal(got[part], mine)


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
def test_router_kernel_matches_the_reference_with_ties(target):
    T, D, E, k = 5, 64, 8, 3
    rng = np.random.default_rng(0)
    h = rng.standard_normal((T, D)).astype(np.float32)
    R = rng.standard_normal((E, D)).astype(np.float32)
    R[6] = R[2]  # equal logits: the lower index goes first
    h[4] = 0  # every logit equal: experts 0, 1, 2 with equal weights
    logits = _run(gk.router_logits(T, D, E), target, h, R, np.zeros((T, E), np.float64))[2]
    np.testing.assert_allclose(logits, h.astype(np.float64) @ R.astype(np.float64).T, rtol=1e-12, atol=1e-12)
    ids, w = _run(gk.router_topk(T, E, k), target, logits, np.zeros((T, k), np.int32), np.zeros((T, k), np.float32))[1:]
    for t in range(T):
        want_ids, want_w = er.route(h[t], R, k)
        np.testing.assert_array_equal(ids[t], want_ids)
        np.testing.assert_allclose(w[t], want_w, rtol=1e-6)
    assert ids[4].tolist() == [0, 1, 2] and np.allclose(w[4], 1 / 3)
    assert abs(float(w.sum(axis=1).max()) - 1) < 1e-6


@pytest.mark.unit
def test_stacked_experts_round_trip_through_tq2_0():
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, (3, 16, 256), dtype=np.int8)
    scale = np.array([0.5, 0.25, 0.125], np.float32)
    raw = ggml.pack(TernaryWeights(codes, scale))
    tw = ggml.to_ternary(*ggml.unpack(raw, 256))
    assert tw.stacked and np.array_equal(tw.codes, codes) and np.array_equal(tw.scale, scale)
    np.testing.assert_array_equal(tw.expert(1).dequantize(), codes[1] * np.float32(0.25))


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
def test_tiny_moe_matches_the_exact_reference_and_pytorch(target):
    gguf = tiny_gguf(2, **MOE)
    eng = Engine(built(gguf, target).dir, gguf)
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 512, 13)]
    toks, mine, errs = exact_parity(eng, _exact(gguf, target), prompt, 32)
    assert mine == toks
    assert max(errs) <= 1e-3, errs  # measured: 0.0 (bit-identical logits)
    assert_pytorch_parity(eng, reference(gguf), prompt, 16)


@pytest.mark.build
def test_tiny_moe_decode_batch_rows_equal_alone():
    gguf = tiny_gguf(2, **MOE)
    eng = Engine(built(gguf, "auto").dir, gguf)
    prompts = [[5, 9, 200, 31], [7, 7, 7], [100, 3, 64, 9, 18, 2]]
    alone = []
    for p in prompts:
        seq, out = Sequence(), []
        logits = eng.prefill(p, seq)
        for _ in range(6):
            out.append(logits)
            logits = eng.decode(int(np.argmax(logits)), seq)
        eng.reset(seq)
        alone.append(out)
    seqs = [Sequence() for _ in prompts]
    logits = [eng.prefill(p, s) for p, s in zip(prompts, seqs, strict=True)]
    for step in range(6):
        for i in range(len(prompts)):
            np.testing.assert_array_equal(logits[i], alone[i][step], err_msg=f"sequence {i}, step {step}")
        logits = eng.decode_batch(seqs, [int(np.argmax(x)) for x in logits])


@pytest.mark.build
def test_lowered_ffn_calls_only_expert_kernels():
    """Every ternary call of an MoE block's FFN goes through the expert-indexed kernel (never a dense kernel over the
    stack), so a decode step reads ``k`` experts' bytes per block."""
    g = read_gguf(tiny_gguf(2, **MOE))
    low = Lowering(g.config, "avx2")
    low.function("decode_b1")
    text = low.bb.get()["decode_b1"].script()
    k, layers = MOE["n_experts_used"], g.config.n_layers
    assert text.count("ternary_gemv_i8_M1024_K256_tile8_E4_P2_X1,") == k * layers  # gate|up of each slot
    assert text.count("ternary_gemv_i8_M256_K512_tile8_E4_X2,") == k * layers  # down of each slot
    assert "strided_slice" not in text  # each kernel reads its activation row: no slice per slot
    assert "ffn_gate_up_exps" in text and "ternary_gemv_i8_M512_K256_tile8," not in text  # no dense FFN kernel


@pytest.mark.unit
def test_unsupported_moe_builds_are_refused():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        Lowering(get_config("tiny", **MOE), "avx512", weights="tl")


@pytest.mark.build
@pytest.mark.parametrize(
    "slots, M, K, experts, parts, rows",
    [(2, 1536, 512, 8, 2, 1), (2, 512, 768, 8, 1, 2), (6, 256, 256, 4, 2, 3), (32, 512, 1536, 8, 1, 32)],
)
def test_cuda_experts_kernel_twin_is_bit_exact(slots, M, K, experts, parts, rows):
    """:func:`graph_kernels_gpu.experts_dp4a` with serial loops (its CPU twin): every slot equals the dense kernel's
    reference on its expert's matrices, for gate|up (a row per token, ``k`` slots each) and down (a row per slot)."""
    from compiler import graph_kernels_gpu as gkg
    from compiler.ops.ternary_gemv import random_packed
    from model.ternary.layouts_gpu import rowmajor4_to_dp4a

    rng = np.random.default_rng(slots)
    packed = [random_packed(rng, M, K) for _ in range(experts)]
    x = rng.integers(-127, 128, (rows, K), dtype=np.int8)
    x_sum, x_scale = x.astype(np.int32).sum(1).astype(np.int32), rng.uniform(0.5, 50, rows).astype(np.float32)
    w_scale = rng.uniform(0.1, 2, (experts, parts)).astype(np.float32)
    ids = rng.integers(0, experts, slots).astype(np.int32)
    W = np.stack([rowmajor4_to_dp4a(w) for w in packed])
    func = gkg.experts_dp4a(slots, M, K, experts, parts, rows, gpu=False)
    y = _run(func, "avx2", W, np.ascontiguousarray(x).view("<i4"), x_sum,
             x_scale, w_scale, ids, np.zeros((slots, M), np.float32))[-1]  # fmt: skip
    op = make_op("gemv_i8", M=M, K=K, E=experts, P=parts)
    per = slots // rows
    for s in range(slots):
        r = slice(s // per, s // per + 1)
        want = op.reference(np.stack(packed), x[s // per], x_sum[r], x_scale[r], w_scale, int(ids[s]))[0]
        np.testing.assert_array_equal(y[s], want)


@pytest.mark.build
@pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc) here")
def test_tiny_moe_builds_for_cuda_as_one_graph(tmp_path):
    """The CUDA build of an MoE model: every function one captured graph, no host launch, no allocation per call
    (the experts' ids never leave the device)."""
    from compiler.build import build

    r = build(tiny_gguf(2, **MOE), "cuda", tmp_path)
    assert r.compiled and b"__global__" not in r.so.read_bytes()  # cubin, not CUDA source
    for name, c in r.meta["census"].items():
        assert (c["graphs"], c["kernels_outside"], c["allocations"]) == (1, 0, 0), (name, c)
        assert c["kernels_in_graphs"] > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    "keys, match",
    [
        ({"bitnet-mhc.expert_count": 1000}, "n_experts=1000"),
        ({"bitnet-mhc.expert_used_count": 9}, "n_experts_used=9"),
        ({"bitnet-mhc.expert_count": 0}, "tensor set does not match"),  # a dense config: the stacks are extra
    ],
)
def test_hostile_expert_counts_are_refused_by_name(tmp_path, keys, match):
    """A file whose expert counts are absurd or inconsistent ends in one GGUFError naming the key, before any stack
    is allocated."""
    import gguf
    from test_gguf_io import rewrite

    from model.gguf_io import GGUFError

    dst = tmp_path / "bad.gguf"
    rewrite(tiny_gguf(2, **MOE), dst, set_keys={k: (v, gguf.GGUFValueType.UINT32) for k, v in keys.items()})
    with pytest.raises(GGUFError, match=match):
        read_gguf(dst)


@pytest.mark.unit
def test_an_expert_with_two_scales_is_refused(tmp_path):
    """Each expert of a stack must carry one scale (BitNet absmean per matrix): a block with another scale inside
    expert 1 is refused, naming the tensor."""
    from test_gguf_io import rewrite

    from model.gguf_io import GGUFError, parse_gguf

    src = tiny_gguf(2, **MOE)
    name = "blk.0.ffn_up_exps.weight"
    raw = np.array(parse_gguf(src).tensors[name].data)  # [E, rows, bytes]: TQ2_0 blocks of 66 bytes, scale last
    raw[1, 0, 64:66] = np.frombuffer(np.float16(0.125).tobytes(), np.uint8)
    rewrite(src, tmp_path / "bad.gguf", patch_tensors={name: raw})
    with pytest.raises(GGUFError, match=name):
        read_gguf(tmp_path / "bad.gguf")
