"""compiler.lower's per-target kernel table (KERNELS) and the facts it shares with tuning (compiler.constants).

That the lowered model computes the right thing on each target is held by the builds that run it:
``test_build_model.py`` (avx512 tile8 and tl, avx2) and ``test_cuda.py::test_whole_model_cuda_build``.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from runtime_helpers import tiny_gguf

import targets
from compiler import constants, lower, tune
from model import config as model_config
from model.config import get_config
from model.gguf_io import read_gguf

BUILDS = {"tile8": ("avx2", "tile8"), "tl": ("avx512", "tl"), "dp4a": ("cuda", "tile8")}  # a (target, weights) each


@pytest.mark.unit
def test_every_table_entry_has_a_build():
    assert set(BUILDS) == set(lower.KERNELS)
    for key, (target, weights) in BUILDS.items():
        assert lower.kernels_for(target, weights) is lower.KERNELS[key]
    with pytest.raises(ValueError, match="CPU"):
        lower.kernels_for("cuda", "tl")


@pytest.mark.unit
def test_prefill_chunks_are_shared_with_tuning_and_fit_the_model_bounds():
    assert tune.PREFILL_TOKENS == lower.KERNELS["tile8"].prefill_chunk == constants.CPU_PREFILL_CHUNK
    assert tune.CUDA_PREFILL_TOKENS == lower.KERNELS["dp4a"].prefill_chunk == constants.CUDA_PREFILL_CHUNK
    largest = max(k.prefill_chunk for k in lower.KERNELS.values())
    assert largest <= model_config.PREFILL_TOKENS  # the attention scratch's bound
    assert model_config.KV_BLOCK == constants.KV_BLOCK  # the memory estimate's DeltaNet state slots
    assert largest <= model_config.MIN_CONTEXT  # the smallest context holds one chunk


@pytest.mark.unit
def test_ternary_shapes_use_the_gguf_names():
    cfg = get_config("tiny")
    assert set(lower.ternary_shapes(cfg)) == set(lower.TERNARY)
    assert lower.ternary_shapes(cfg)["attn_output"] == cfg.ternary_shapes()["attn_o"]


@pytest.mark.build
@pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
@pytest.mark.parametrize("key", sorted(BUILDS))
def test_lowering_uses_every_field_of_its_table_entry(key, monkeypatch):
    """Lowering a tiny model calls each builder of its entry, picks its operators and chunk, and fixes exactly the
    operators the entry names fixed (no IR is compiled)."""
    target, weights = BUILDS[key]
    entry = lower.KERNELS[key]
    called: set[str] = set()

    def spy(name, f):
        def wrapped(*a, **k):
            called.add(name)
            return f(*a, **k)

        return wrapped

    builders = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if callable(getattr(entry, f.name))}
    fixed = {kind: spy(f"fixed.{kind}", f) for kind, f in entry.fixed.items()}
    spied = dataclasses.replace(entry, fixed=fixed, **{n: spy(n, f) for n, f in builders.items() if n != "tile"})
    if entry.tile:
        spied = dataclasses.replace(spied, tile=spy("tile", entry.tile))
    monkeypatch.setitem(lower.KERNELS, key, spied)
    g = read_gguf(tiny_gguf(2, mtp_heads=1))  # with a draft head: its argmax is a table builder too
    lw = lower.Lowering(g.config, target, weights=weights, cores=1)
    lw.module()
    moe_only = {"router_topk", "experts"}  # a mixture of experts' builders (the tl layout has no MoE kernels)
    if key != "tl":
        moe = read_gguf(tiny_gguf(2, n_experts=4, n_experts_used=2))
        lower.Lowering(moe.config, target, weights=weights, cores=1).function("decode_b1")
    assert called == (set(builders) - (moe_only if key == "tl" else set())) | {f"fixed.{k}" for k in entry.fixed}
    assert lw.chunk == entry.prefill_chunk
    kinds = {k.split(":")[0]: s for k, s in lw.kernels.items()}
    assert entry.gemv in kinds and (entry.gemm is None or entry.gemm in kinds)
    assert {k for k, s in kinds.items() if s == "fixed"} == set(entry.fixed)


@pytest.mark.unit
def test_memory_estimate_counts_the_cache_tensors_the_runtime_allocates():
    """``model.config.memory_estimate`` (which refuses hostile configs before anything is allocated) counts the
    cache the runtime allocates from ``meta.json["cache"]`` (:func:`compiler.lower.cache_meta`, read by
    ``runtime.kv_cache``): GQA keys/values and MLA's latent rows per block, the DeltaNet states one per sequence
    slot (``n_states``), for one context (the estimate's default) and for the Engine's default pool."""
    import numpy as np

    from runtime.engine import KV_CONTEXTS, default_max_seqs
    from runtime.kv_cache import BlockPool, cache_layout, cache_shapes

    for name in ("small", "small-mla", "small-deltanet"):
        cfg = model_config.get_config(name)
        layout = cache_layout(lower.cache_meta(cfg))
        states = [i for i, (n, _, _, _) in enumerate(layout) if n.startswith("state_")]
        assert [d for _, d, _, _ in layout] == ["n_states" if i in states else "n_blocks" for i in range(len(layout))]
        ctx = cfg.max_seq_len
        cpu = default_max_seqs(constants.CPU_BATCH_SIZES)
        for tokens, seqs in ((ctx, model_config.MAX_SEQUENCES), (KV_CONTEXTS * ctx, cpu), (KV_CONTEXTS * ctx, 3)):
            pool = BlockPool(tokens, constants.KV_BLOCK, ctx, seqs if states else 0)
            size = [int(np.prod(s)) * np.dtype(d).itemsize for s, d in cache_shapes(layout, pool)]
            est = model_config.memory_estimate(cfg, kv_tokens=tokens, sequences=seqs)
            assert est["state"] == sum(b for i, b in enumerate(size) if i in states), (name, tokens, seqs)
            assert est["kv_cache"] == sum(b for i, b in enumerate(size) if i not in states), (name, tokens, seqs)
        assert model_config.memory_estimate(cfg) == model_config.memory_estimate(cfg, ctx, model_config.MAX_SEQUENCES)
        assert (model_config.memory_estimate(cfg)["state"] > 0) == bool(cfg.full_attention_interval)


@pytest.mark.unit
def test_state_pool_facts_are_shared():
    """The cache tensors' leading dimension names (compiler and runtime keep a copy each: the runtime imports no
    compiler) and the estimate's most sequences, the largest default of any target (its largest decode batch and the
    Engine's own sequence)."""
    from runtime import kv_cache
    from runtime.engine import default_max_seqs

    assert (lower.BLOCK_DIM, lower.STATE_DIM) == (kv_cache.BLOCK_DIM, kv_cache.STATE_DIM)
    top = max(default_max_seqs(k.batch_sizes) for k in lower.KERNELS.values())
    assert model_config.MAX_SEQUENCES == top == default_max_seqs(constants.CUDA_BATCH_SIZES)


@pytest.mark.build
@pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
@pytest.mark.parametrize("heads,head_dim", [(8, 32), (8, 256)])  # H·hd 256: quantized combine; 2048: not
def test_cuda_decode_fuses_the_site_with_the_next_norm(heads, head_dim):
    """The CUDA one-token step (``decode_b1``): every mHC site but the last is the site+norm kernel and the next
    block takes its codes (one RMSNorm+quantize kernel left, the first block's); the attention quantizes its own
    output where :func:`compiler.graph_kernels_gpu.quantized_combine_pays` says so, else a quantize kernel follows
    it. A decode batch fuses its sites the same way; ``prefill`` keeps the separate kernels. The CPU build fuses
    nothing. (Lowered only.)"""
    from compiler.graph_kernels_gpu import quantized_combine_pays

    cfg = get_config("tiny", n_heads=heads, n_kv_heads=heads // 2, d_model=heads * head_dim)
    L = cfg.n_layers

    def calls(target, name):
        lw = lower.Lowering(cfg, target, cores=1)
        lw.function(name)
        text = lw.bb.get()[name].script()
        return {
            k: len(re.findall(rf"call_tir\w*\({k}\w*", text))
            for k in ("mhc_post_norm", "ternary_rmsnorm_quant", "attention_quant", "attention_rope", "quantize_")
        }

    one = calls("cuda", "decode_b1")
    assert one["mhc_post_norm"] == 2 * L - 1 and one["ternary_rmsnorm_quant"] == 1
    fused = quantized_combine_pays(cfg.n_heads, cfg.head_dim)
    assert fused == (heads * head_dim <= 1024)
    assert (one["attention_quant"], one["attention_rope"], one["quantize_"]) == ((L, 0, 0) if fused else (0, L, L))
    rows = calls("cuda", "decode_b4")  # a batch's rows take the same fused site, a CUDA block a row
    assert rows["mhc_post_norm"] == 2 * L - 1 and rows["ternary_rmsnorm_quant"] == 1
    many = calls("cuda", "prefill")
    assert many["mhc_post_norm"] == 0 and many["ternary_rmsnorm_quant"] == 2 * L
    cpu = calls("avx2", "decode_b1")
    assert cpu["mhc_post_norm"] == 0 and cpu["ternary_rmsnorm_quant"] == 2 * L and cpu["attention_quant"] == 0


def check_stacking(target: str, weights: str) -> None:
    """``pack_params`` gives a stacked matrix a scale per part, in order; which layers of the variants stack what
    (latent attention's q|kv_a on GPUs only; DeltaNet layers and experts never)."""
    import numpy as np

    from compiler.lower import pack_params, stacked

    g = read_gguf(tiny_gguf(), check_values=False)
    p = pack_params(g, target, weights)
    want = [g.ternary(f"blk.1.{t}.weight").scale for t in ("attn_q", "attn_k", "attn_v")]
    np.testing.assert_array_equal(p["blk.1.attn_qkv.scale"], np.array(want, np.float32))
    gpu = target == "cuda"
    for variant in (get_config("small-deltanet"), get_config("small-mla"), get_config("small-moe")):
        for i in range(variant.n_layers):
            groups = stacked(variant, i, gpu=gpu)
            assert ("attn_qkv" in groups) == (not variant.mla and not variant.is_deltanet(i))
            assert ("ffn_gate_up" in groups) == (not variant.n_experts)
            assert ("attn_q_kv_a" in groups) == (variant.mla and gpu)


@pytest.mark.build
@pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
def test_cuda_stacks_qkv_and_gate_up():
    """On CUDA a GQA layer's q|k|v and a dense SwiGLU FFN's gate|up are one stacked matrix each (one GEMV per step, one
    GEMM per prefill chunk, a scale per part) and :func:`compiler.lower.pack_params` packs them so; the attention and
    the cache write read the stacked rows (the one-token step's attention does the cache write itself), SwiGLU +
    quantize its halves. DeltaNet layers and experts keep their separate matrices; latent attention stacks q|kv_a.
    (Lowered only; the CPU's stacking: the next test.)"""

    from compiler.lower import param_specs

    cfg = get_config("tiny")
    L, D, KV, F = cfg.n_layers, cfg.d_model, cfg.kv_dim, cfg.ffn_hidden
    for name, gemv in (("decode_b1", "ternary_gemv_dp4a"), ("decode_b4", "ternary_gemm_dp4a"),
                       ("prefill", "ternary_gemm_dp4a")):  # fmt: skip
        lw = lower.Lowering(cfg, "cuda", cores=1)
        lw.function(name)
        text = lw.bb.get()[name].script()
        called = re.findall(r"call_tir\w*\((\w+)", text)
        assert sum(f"_M{D + 2 * KV}_K{D}_p{D}x{KV}x{KV}" in c for c in called) == L, name
        assert sum(f"_M{2 * F}_K{D}_p{F}x{F}" in c for c in called) == L, name
        assert sum(c.startswith(gemv) for c in called) == 4 * L, name  # q|k|v, o, gate|up, down
        one = name == "decode_b1"  # one row: the attention writes the new key and value itself (write_kv)
        assert sum(c.startswith("kv_update_w") for c in called) == (0 if one else L), name
        assert sum(c.startswith("attention") and "_kv_" in c for c in called) == (L if one else 0), name
        assert sum(c.startswith("swiglu_quantize_halves") for c in called) == L
    names = {s.name: s for s in param_specs(cfg, gpu=True)}
    assert names["blk.0.attn_qkv.weight"].shape == (D + 2 * KV, D // 16) and names["blk.0.attn_qkv.scale"].shape == (3,)
    assert names["blk.0.ffn_gate_up.scale"].shape == (2,) and "blk.0.attn_q.weight" not in names
    check_stacking("cuda", "tile8")


@pytest.mark.build
@pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
@pytest.mark.parametrize("weights", ["tile8", "tl"])
def test_cpu_stacks_qkv_and_gate_up(weights):
    """On the CPU too a GQA layer's q|k|v and a dense gated FFN's gate|up are one stacked matrix each, a scale per
    part: one GEMV per step (a GEMM per batch and prefill chunk, ``tl`` too), fewer kernel calls and VM
    instructions. The query's RoPE and the cache write read their columns, the gate (SwiGLU, or ReLU² with BitNet's
    sub-norm) its halves. Latent attention, DeltaNet layers and experts keep their matrices. (Lowered only; the
    compiled model's exactness: tests/test_exact_reference.py and the oracle tests.)"""

    from compiler.lower import param_specs

    if weights == "tl" and "avx512vbmi" not in targets.cpu_flags():
        pytest.skip("the tl kernel needs AVX-512 VBMI")
    for cfg in (get_config("tiny"), get_config("tiny", arch="bitnet", ffn_act="relu2", n_streams=1)):
        L, D, KV, F = cfg.n_layers, cfg.d_model, cfg.kv_dim, cfg.ffn_hidden
        for name in ("decode_b1", "decode_b4", "prefill"):
            lw = lower.Lowering(cfg, "avx512", cores=1, weights=weights)
            lw.function(name)
            called = re.findall(r"call_tir\w*\((\w+)", lw.bb.get()[name].script())
            kind = ("gemv_" if name == "decode_b1" else "gemm_") + ("i8_tl" if weights == "tl" else "i8")
            stacked = [c for c in called if c.startswith(f"ternary_{kind}_")]
            assert sum(f"_M{D + 2 * KV}_K{D}_" in c and c.endswith(f"_p{D}x{KV}x{KV}") for c in stacked) == L, name
            assert sum(f"_M{2 * F}_K{D}_" in c and c.endswith(f"_p{F}x{F}") for c in stacked) == L, name
            assert sum(c.startswith("kv_update_w") for c in called) == L and not any("_kv_" in c for c in called)
            assert sum(c.startswith(f"rope_q_w{D + 2 * KV}") for c in called) == L, name
            act = "relu2_mul_halves" if cfg.sub_norms else "silu_mul_halves"
            assert sum(c.startswith(act) for c in called) == L, name
        specs = {s.name: s for s in param_specs(cfg, weights=weights)}
        assert specs["blk.0.attn_qkv.scale"].shape == (3,) and specs["blk.0.ffn_gate_up.scale"].shape == (2,)
        assert "blk.0.attn_q.weight" not in specs and "blk.0.ffn_gate.weight" not in specs
    check_stacking("avx512", weights)


@pytest.mark.unit
def test_a_tied_embedding_is_read_from_the_head_unless_the_head_is_int8():
    from compiler.lower import param_specs

    tied, untied = get_config("tiny"), get_config("tiny", tie_embeddings=False)
    for gpu, step in ((False, 16), (True, 0)):
        names = {(cfg is tied, head): {s.name for s in param_specs(cfg, "float16", head, gpu, head_step=step)}
                 for cfg in (tied, untied) for head in ("float16", "int8")}  # fmt: skip
        assert "token_embd.weight" not in names[True, "float16"]
        assert all("token_embd.weight" in n for k, n in names.items() if k != (True, "float16"))


@pytest.mark.build
@pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
@pytest.mark.parametrize("target", ["avx2", "cuda"])
def test_prefill_kv_stops_after_the_last_attention(target):
    """``prefill_kv`` (a prompt's chunks before its last) computes what fills the cache and nothing else: every
    layer's attention with its cache write, every FFN but the last, and no LM head. (Lowered only.)"""
    cfg = get_config("tiny")
    L = cfg.n_layers
    counts = {}
    for name in ("prefill", "prefill_kv"):
        lw = lower.Lowering(cfg, target, cores=1)
        lw.function(name)
        called = re.findall(r"call_tir\w*\((\w+)", lw.bb.get()[name].script())
        counts[name] = {k: sum(c.startswith(k) for c in called) for k in ("lm_head", "kv_update", "ternary_g")}
    assert counts["prefill"]["lm_head"] == 1 and counts["prefill_kv"]["lm_head"] == 0
    assert counts["prefill_kv"]["kv_update"] == counts["prefill"]["kv_update"] == L
    per_ffn = 2  # gate|up stacked, then down
    assert counts["prefill_kv"]["ternary_g"] == counts["prefill"]["ternary_g"] - per_ffn > 0
