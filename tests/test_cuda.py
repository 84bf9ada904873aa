"""CUDA without a GPU: the dp4a layout, the GPU ops' integer maths (emulated dp4a, on the CPU), CUDA code generation
and compilation to device code (nvcc), the remote tuning round trip, and a whole-model CUDA build.

Running the kernels needs a GPU (``scripts/gpu_tune.sh`` / ``scripts/gpu_model.sh`` check every kernel and the whole
model against the references there; results in ``docs/bench/cuda``). Here, tests that compile need the CUDA toolkit
(nvcc, which CI has) and skip with a reason without it.

    pytest tests/test_cuda.py -q
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import cuda_cross
from compiler import schedule as S
from compiler.ops import make_op
from model.ternary.layouts import LAYOUTS, pack_rowmajor4
from model.ternary.layouts_gpu import pack_dp4a, rowmajor4_to_dp4a, unpack_dp4a

needs_nvcc = pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc + headers) on this machine")


@pytest.mark.unit
@given(m=st.integers(1, 5), kb=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_dp4a_layout_round_trip_and_planes(m, kb, seed):
    k = 256 * kb
    codes = np.random.default_rng(seed).integers(-1, 2, (m, k)).astype(np.int8)
    packed = pack_dp4a(codes)
    assert packed.dtype == np.int32 and packed.shape == (m, k // 16)
    np.testing.assert_array_equal(unpack_dp4a(packed, k), codes)
    np.testing.assert_array_equal(rowmajor4_to_dp4a(pack_rowmajor4(codes)), packed)
    # the kernel's decode: plane s of word w holds, byte i, the code of weight 16w + 4s + i (stored as code + 1)
    u = packed.view(np.uint32)
    for s in range(4):
        plane = (u >> (2 * s)) & 0x03030303
        for i in range(4):
            got = ((plane >> (8 * i)) & 0xFF).astype(np.int8) - 1
            np.testing.assert_array_equal(got, codes[:, 4 * s + i :: 16])
    assert "dp4a" in LAYOUTS


@pytest.mark.build
@given(mt=st.integers(1, 6), kb=st.integers(1, 3), n=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_gpu_ops_integer_maths_bit_exact(mt, kb, n, seed):
    """The GEMV/GEMM computes, with dp4a spelled out in shifts, == the reference: the dp4a-layout maths is right."""
    import tvm

    from compiler.kernels import Kernel
    from targets import detect, get_target

    M, K = 8 * mt + 3, 256 * kb  # M not a multiple of any tile
    rng = np.random.default_rng(seed)
    for op in (make_op("gemv_dp4a", M=M, K=K, emulate=1), make_op("gemm_dp4a", N=n, M=M, K=K, emulate=1)):
        ins = op.random_inputs(rng)
        ex = tvm.compile(op.compute(), target=get_target(detect()))
        np.testing.assert_array_equal(Kernel(op, ex)(*ins)[0], op.reference(*ins)[0])
    op = make_op("gemv_f32_dp4a", M=M, K=K)  # float activations: within the float32 summation bound
    ins = op.random_inputs(rng)
    got = Kernel(op, tvm.compile(op.compute(), target=get_target(detect())))(*ins)[0]
    np.testing.assert_allclose(got, op.reference(*ins)[0], rtol=0, atol=op.tolerances(*ins)[0])


@pytest.mark.build
@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=3), kb=st.integers(1, 2), n=st.integers(1, 3),
       seed=st.integers(0, 2**31))  # fmt: skip
def test_stacked_matrices_equal_each_matrix_alone(sizes, kb, n, seed):
    """A stacked matrix (``parts``: q|k|v or gate|up read in one pass, a scale each) gives, row block by row block,
    exactly what each matrix's own kernel gives with its own scale: bit-identical, GEMV and GEMM."""
    import tvm

    from compiler.kernels import Kernel
    from targets import detect, get_target

    parts, K = tuple(8 * s + 1 for s in sizes), 256 * kb
    M = sum(parts)
    rng = np.random.default_rng(seed)
    for kind, dims in (("gemv_dp4a", {}), ("gemm_dp4a", {"N": n})):
        op = make_op(kind, M=M, K=K, parts=parts, emulate=1, **dims)
        W, x4, xs, xsc, ws = op.random_inputs(rng)
        assert ws.shape == (len(parts),)
        got = Kernel(op, tvm.compile(op.compute(), target=get_target(detect())))(W, x4, xs, xsc, ws)[0]
        at = 0
        for m, scale in zip(parts, ws, strict=True):
            alone = make_op(kind, M=m, K=K, emulate=1, **dims)
            want = alone.reference(W[at : at + m], x4, xs, xsc, np.array([scale], np.float32))[0]
            np.testing.assert_array_equal(got[..., at : at + m], want)
            at += m
    assert op.canonical().key == f"gemm_dp4a:N={n}:M={M}:K={K}"
    assert op.func_name.endswith("_p" + "x".join(map(str, parts)))
    with pytest.raises(ValueError, match="parts"):
        make_op("gemv_dp4a", M=M + 1, K=K, parts=parts)


@pytest.mark.unit
def test_emulate_is_not_part_of_the_key():
    assert make_op("gemv_dp4a", M=256, K=512, emulate=1).key == "gemv_dp4a:M=256:K=512"


@pytest.mark.build
@needs_nvcc
@pytest.mark.parametrize(
    "key,knobs",
    [("gemv_dp4a:M=4096:K=4096", {}), ("gemv_dp4a:M=256:K=512", {"rows": 1, "ty": 8}),
     ("gemv_dp4a:M=1536:K=512", {"v": 2, "tx": 8, "rows": 4, "ty": 4, "unroll": 2}),
     ("gemm_dp4a:N=16:M=512:K=1536", {}), ("gemm_dp4a:N=16:M=256:K=512", {"tokens": 1, "rows": 1}),
     ("gemv_f32_dp4a:M=4096:K=4096", {})],
)  # fmt: skip
def test_cuda_kernels_compile_to_device_code(tmp_path, key, knobs):
    """Each schedule generates CUDA with dp4a and 16-byte weight loads, and nvcc turns it into device code: the
    exported module embeds no CUDA source (it loads on a GPU host with TVM's runtime alone)."""
    from compiler.ops import parse_key

    op = parse_key(key)
    sch = S.manual(op, "cuda", knobs)
    ex = S.compile_mod(sch.mod, "cuda")
    src = ex.mod.imports[0].inspect_source()
    assert ("__dp4a(" in src or op.kind == "gemv_f32_dp4a") and "__shfl_down_sync" in src
    v = knobs.get("v", {k.name: k.default for k in S.schedule_module("cuda").space(op)}["v"])
    assert f"*(int{v}*)(W_local" in src  # one vector load of v weight words (16 bytes at v = 4)
    ex.export_library(str(tmp_path / "k.so"))
    blob = (tmp_path / "k.so").read_bytes()
    assert b"__global__" not in blob and b'extern "C"' not in blob


@pytest.mark.build
@needs_nvcc
@pytest.mark.parametrize("eps", [1e-5, None])
def test_fused_norm_quantize_is_one_kernel_with_block_barriers(eps):
    """RMSNorm+quantize (and quantize) as one CUDA kernel: each reduction (Σx², max|h|, Σq) is warp shuffles and two
    block barriers (graph_kernels_gpu.block_reduce; the whole-model parity run on the GPU checks its numbers:
    docs/bench/cuda)."""
    import tvm

    from compiler.graph_kernels_gpu import norm_quantize

    f = norm_quantize(2, 1536, eps)
    assert len(f.params) == (5 if eps else 4)
    ex = S.compile_mod(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), "cuda")
    src = ex.mod.imports[0].inspect_source()
    assert src.count("__global__") == 2  # declaration + definition: one kernel
    n = 3 if eps else 2  # (Σx²,) max|h|, Σq over 256 threads: 5 shuffles within each warp, 3 over the 8 warps
    assert src.count("__syncthreads()") == 2 * n and len(re.findall(r"= .*__shfl_down_sync\(", src)) == 8 * n
    with pytest.raises(ValueError, match="multiple of 256"):
        norm_quantize(1, 100)


@pytest.mark.build
@needs_nvcc
def test_fused_swiglu_quantize_is_one_kernel():
    """silu(gate)·up and the down projection's input quantize as one CUDA kernel (parameters g, u, q, scale,
    q_sum), with the two trees of the quantize (max|h|, Σq); its numbers are checked by the GPU parity run."""
    import tvm

    from compiler.graph_kernels_gpu import swiglu_quantize

    f = swiglu_quantize(2, 1536)
    assert [str(p.name) for p in f.params] == ["g", "u", "q", "scale", "q_sum"]
    src = S.compile_mod(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), "cuda").mod.imports[0]
    text = src.inspect_source()
    assert text.count("__global__") == 2 and "expf" in text and text.count("__syncthreads()") == 2 * 2


@pytest.mark.build
@needs_nvcc
@pytest.mark.parametrize("first,last", [(0, 0), (1, 0), (0, 1)])
def test_fused_mhc_site_is_one_kernel(first, last):
    import tvm

    from compiler.graph_kernels_gpu import mhc_post
    from compiler.ops import make_op

    f = mhc_post(512, 2, bool(first), bool(last))
    op = make_op("mhc_post", D=512, S=2, first=first, last=last)
    assert len(f.params) == len(op.args())  # the op's parameters (the first site's x as [1, D])
    src = S.compile_mod(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), "cuda").mod.imports[0]
    text = src.inspect_source()
    assert text.count("__global__") == 2 and ("x_out_ptr[" in text) == (not last)


@pytest.mark.unit
def test_invalid_knobs_are_rejected_before_building():
    from schedules import cuda

    op = make_op("gemv_dp4a", M=256, K=512)  # 32 words per row
    assert cuda.valid(op, {"v": 2, "tx": 16, "unroll": 1, "rows": 2, "ty": 4})
    assert not cuda.valid(op, {"v": 4, "tx": 32, "unroll": 1, "rows": 2, "ty": 4})  # 128 words > 32
    with pytest.raises(ValueError, match="do not divide"):
        S.manual(op, "cuda", {"v": 4, "tx": 32})


@pytest.mark.build
@needs_nvcc
def test_remote_tuning_round_trip(tmp_path):
    """export → (the GPU host's timings file) → import: records land in the JSON database and the fastest wins."""
    from compiler import cuda_remote

    op = make_op("gemv_dp4a", M=256, K=512)
    man = json.loads(cuda_remote.export_candidates([op], tmp_path / "cands", trials=3, root=tmp_path).read_text())
    cands = man["candidates"]
    assert len(cands) == 3 and all((tmp_path / "cands" / c["file"]).stat().st_size > 0 for c in cands)
    # what `cuda_remote run` writes on the GPU host (times made up here; one candidate failed its check)
    results = [dict(c, ok=i != 1, run_secs=[(i + 1) * 1e-6] * 3 if i != 1 else None) for i, c in enumerate(cands)]
    (tmp_path / "t.json").write_text(json.dumps({"device": "test", "results": results}))
    assert cuda_remote.import_timings(tmp_path / "t.json", tmp_path) == {op.key: 2}
    sf = S.get_primfunc(op, "cuda", logs_root=tmp_path, mode="tuned")
    assert sf.run_secs == pytest.approx(1e-6)
    # a re-export plans only configurations without a record (the failed one is tried again)
    again = json.loads(cuda_remote.export_candidates([op], tmp_path / "c2", trials=3, root=tmp_path).read_text())
    assert [c["knobs"] for c in again["candidates"]] == [cands[1]["knobs"]]


@pytest.mark.build
def test_committed_cuda_records_replay():
    """Every workload in tuning_logs/cuda replays into a scheduled PrimFunc (the traces match the templates)."""
    db = S.open_database("cuda")
    if db is None:
        pytest.skip("no tuning_logs/cuda")
    from compiler.tune import CUDA_BENCH_SHAPES, config_ops
    from model.config import get_config

    ops = config_ops(get_config("small"), target="cuda") + [make_op(k, **d) for k, d in CUDA_BENCH_SHAPES]
    tuned = [op for op in ops if S.best_record(db, op) is not None]
    assert tuned, "tuning_logs/cuda has none of the small model's or the benchmark's workloads"
    for op in tuned:
        sf = S.get_primfunc(op, "cuda", mode="tuned")
        assert "threadIdx.x" in sf.func.script()


@pytest.mark.build
@needs_nvcc
def test_whole_model_cuda_build(tmp_path):
    """A tiny model compiles for CUDA: tuned/hand dp4a kernels, dlight for the rest, device code in model.so."""
    from runtime_helpers import tiny_gguf

    from compiler.build import build

    r = build(tiny_gguf(2), "cuda", tmp_path)
    assert r.compiled and r.meta["target"] == "cuda" and r.meta["prefill_chunk"] == 16
    kinds = {k.split(":")[0] for k in r.meta["kernels"]}
    assert {"gemv_dp4a", "gemm_dp4a"} <= kinds
    w = next(p for p in r.meta["params"] if p[0].endswith("attn_qkv.weight"))  # q|k|v stacked (lower.stacked)
    assert w[2] == "int32"  # the dp4a layout
    assert b"__global__" not in r.so.read_bytes()
