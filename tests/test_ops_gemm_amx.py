"""The AMX GEMM ``gemm_i8_amx`` == the reference bit for bit (hypothesis over shapes, stacked parts, thread counts),
its shape checks, where a build takes it (``compiler.lower.amx_for``, ``amx_pays``), and a model built with it ==
the same model built without it. The kernel tests skip on CPUs without AMX-INT8 (every AMD part, Intel before
Sapphire Rapids); the rest run everywhere.

    pytest tests/test_ops_gemm_amx.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import targets
from compiler import lower
from compiler.ops import OpShapeError, make_op
from compiler.ops.ternary_gemm_amx import TernaryGemmI8AMX, amx_pays
from model.config import get_config

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")  # tiny shapes: untuned
AMX = targets.has_amx()
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU lacks AMX-INT8 (amx_int8, amx_tile)")


def _run(op, ins, cores):
    import tvm

    from targets.cpu import check_flags

    check_flags(op.cpu_flags, op.key)  # asks Linux for the tile data
    f = op.kernel(cores).with_attr("global_symbol", "main")
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(f, target=targets.get_target("avx512", amx=True))["main"](*args)
    return args[-1].numpy()


@pytest.mark.unit
def test_shape_checks():
    with pytest.raises(OpShapeError, match="tile8"):
        make_op("gemm_i8_amx", N=8, M=64, K=256, tile=4)
    with pytest.raises(OpShapeError, match="at most 16 tokens"):
        make_op("gemm_i8_amx", N=17, M=64, K=256, tile=8)
    with pytest.raises(OpShapeError, match="multiple of 16"):
        make_op("gemm_i8_amx", N=8, M=24, K=256, tile=8)
    with pytest.raises(OpShapeError, match="multiple of 256"):
        make_op("gemm_i8_amx", N=8, M=64, K=300, tile=8)
    op = make_op("gemm_i8_amx", N=8, M=64, K=512, tile=8, parts=(32, 32))
    assert op.cpu_flags == targets.AMX_FLAGS and op.func_name.startswith("ternary_gemm_i8_amx_N8_M64_K512_tile8")


@pytest.mark.unit
def test_where_amx_pays_and_the_build_setting(monkeypatch):
    assert amx_pays(8, 2560) and amx_pays(16, 6912)
    assert not amx_pays(4, 2560) and not amx_pays(8, 1536) and not amx_pays(17, 2560)
    monkeypatch.setattr(targets, "has_amx", lambda: True)
    assert lower.amx_for("avx512", "tile8") and lower.amx_for("avx512", "tile8", "on")
    assert not lower.amx_for("avx512", "tile8", "off")
    assert not any(lower.amx_for(t, w) for t, w in (("avx512", "tl"), ("avx2", "tile8"), ("cuda", "tile8")))
    monkeypatch.setattr(targets, "has_amx", lambda: False)
    assert not lower.amx_for("avx512", "tile8")
    with pytest.raises(ValueError, match="AMX-INT8"):
        lower.amx_for("avx512", "tile8", "on")
    with pytest.raises(ValueError, match="expected one of"):
        lower.amx_for("avx512", "tile8", "yes")


@pytest.mark.unit
def test_a_build_takes_it_only_where_it_pays():
    """Lowering only (no AMX needed): with ``amx``, the GEMMs over K ≥ 2048 of the prefill chunk (8 tokens) and the
    8- and 16-row decode batches are ``gemm_i8_amx``; the 2- and 4-row batches and K = 256 stay ``gemm_i8``."""
    cfg = get_config("tiny", ffn_hidden=2048)  # the down projection: K = 2048
    with_amx = lower.Lowering(cfg, "avx512", amx=True)
    with_amx.module()
    amx_keys = {k for k in with_amx.kernels if k.startswith("gemm_i8_amx")}
    assert amx_keys == {f"gemm_i8_amx:N={n}:M={cfg.d_model}:K=2048:tile=8" for n in (8, 16)}
    assert all(with_amx.kernels[k] == "fixed" for k in amx_keys)
    assert {f"gemm_i8:N={n}:M={cfg.d_model}:K=2048:tile=8" for n in (2, 4)} <= set(with_amx.kernels)
    assert set(targets.AMX_FLAGS) <= set(with_amx.cpu_flags())
    plain = lower.Lowering(cfg, "avx512")
    plain.module()
    assert not any(k.startswith("gemm_i8_amx") for k in plain.kernels)
    assert not set(targets.AMX_FLAGS) & set(plain.cpu_flags())


@pytest.mark.unit
def test_an_amx_build_prefills_16_tokens_where_every_gemm_takes_amx():
    big = get_config("tiny", d_model=2048, ffn_hidden=2048)  # every K (d_model, heads·head_dim, ffn) ≥ 2048
    assert lower.amx_min_k(big) == 2048
    assert lower.Lowering(big, "avx512", amx=True).chunk == lower.AMX_PREFILL_CHUNK == 16
    assert lower.Lowering(big, "avx512").chunk == 8
    lw = lower.Lowering(get_config("bitnet-2b4t", n_layers=1), "avx512", amx=True)
    lw.module()  # its 2- and 4-row batches stay VNNI, with the knobs of the tuned 8-token GEMM (not "hand")
    assert lw.chunk == 16 and {s for k, s in lw.kernels.items() if k.startswith("gemm_i8:N=")} <= {"tuned", "borrowed"}
    assert lower.Lowering(get_config("tiny", ffn_hidden=2048), "avx512", amx=True).chunk == 8  # d_model 256: VNNI
    assert lower.amx_min_k(get_config("tiny", ffn_hidden=2048, n_experts=4)) == 0


@needs_amx
@pytest.mark.unit
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 16), groups=st.integers(1, 9), kc=st.integers(1, 10), split=st.booleans(),
       cores=st.integers(1, 3), seed=st.integers(0, 2**16))  # fmt: skip
def test_bit_exact_with_the_reference(n, groups, kc, split, cores, seed):
    M, K = 16 * groups, 256 * kc
    parts = (16 * (groups // 2), M - 16 * (groups // 2)) if split and groups > 1 else ()
    op = TernaryGemmI8AMX(n, M, K, tile=8, parts=parts)
    ins = op.random_inputs(np.random.default_rng(seed))
    np.testing.assert_array_equal(_run(op, ins, cores), op.reference(*ins)[0])


@needs_amx
@pytest.mark.unit
def test_extreme_activations_and_the_vnni_gemm():
    """±127 and −128 against all-(±1) weights over K = 6912 (the int32 sums' extremes), and the same output as the
    tuned VNNI ``gemm_i8`` on the same inputs."""
    from compiler.schedule import get_kernel

    op = TernaryGemmI8AMX(16, 64, 6912, tile=8)
    W, x, _xs, scale, ws = op.random_inputs(np.random.default_rng(1))
    x[:8], x[8:] = 127, -128
    W[:] = 0b10101010  # every code 2: +1
    W[1::2] = 0  # every other row tile: −1
    xs = x.astype(np.int32).sum(axis=1).astype(np.int32)
    got = _run(op, [W, x, xs, scale, ws], 2)
    np.testing.assert_array_equal(got, op.reference(W, x, xs, scale, ws)[0])
    vnni = get_kernel(make_op("gemm_i8", N=16, M=64, K=6912, tile=8), "avx512", mode="hand")
    np.testing.assert_array_equal(got, vnni(W, x, xs, scale, ws)[0])


@needs_amx
@pytest.mark.build
def test_a_model_built_with_it_equals_one_built_without(tmp_path):
    """A tiny model whose down projection has K = 2048, built with and without AMX: the same prefill logits (the
    chunk's GEMMs on AMX) and the same 8-row decode batch (on AMX too)."""
    from runtime_helpers import write_tiny

    from compiler.build import build
    from runtime.engine import Engine
    from runtime.kv_cache import Sequence

    gguf = write_tiny(tmp_path / "tiny_ffn2048.gguf", ffn_hidden=2048)
    on, off = (build(gguf, "avx512", tmp_path / "cache", amx=m) for m in ("on", "off"))
    assert on.meta["amx"] and not off.meta["amx"] and on.key != off.key
    assert any(k.startswith("gemm_i8_amx") for k in on.meta["kernels"]) and "amx_tile" in on.meta["cpu_flags"]
    prompt = [5, 17, 300, 2, 9, 44, 1, 0, 511, 7, 3, 90, 12, 8, 250, 33, 60]
    outs = []
    for r in (on, off):
        eng = Engine(r.dir, gguf)
        seqs = [Sequence() for _ in range(8)]
        first = [eng.prefill(prompt[: 9 + i], q) for i, q in enumerate(seqs)]
        batch = eng.decode_batch(seqs, list(range(20, 28)))
        outs.append((np.stack(first), np.asarray(batch)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
