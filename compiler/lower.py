"""GGUF model → one Relax IRModule with ``prefill`` and ``decode_b{B}`` over a paged, in-place KV cache.

Signatures (``L`` layers, ``Hkv`` KV heads, context ``C``, head dim ``hd``, KV block ``K`` = :data:`KV_BLOCK` tokens,
table width ``W = ⌈C / K⌉``; params in :func:`param_specs` order)::

    decode_b{B}(toks int32[B], pos int32[B], table int32[B, W], logits float32[B, V], kc_0, vc_0, ..., *params)
    prefill(toks int32[P], pos int32[P], table int32[P, W], last int32[1], logits float32[1, V], kc_0, ..., *params)
    prefill_kv(toks int32[P], pos int32[P], table int32[P, W], attn float32[P, D], kc_0, ..., *params)
    chain_b1(toks int32[1], pos int32[1], table int32[1, W], bias float32[V], sampling float32[2], logits float32[1, V],
             ring int32[R + 1], kc_0, ..., *params)

``prefill_kv`` fills the cache only (a prompt's chunks before its last): no LM head, no last FFN. The results are
written into tensors the caller passes after the inputs (:func:`output_specs`; the function
returns them): no allocation per call, so on CUDA the whole step is one captured graph. With ``m = mtp_heads > 0``
(self-speculative decoding, :mod:`runtime.spec_decode`) both also write the normed hidden states, ``hidden
float32[B, D]`` after ``logits`` (prefill: row ``last``, ``[1, D]``), and ``draft{k}_b{B}(hidden float32[B, D],
token int32[B], drafts int32[k, B], *draft_params)`` writes ``k ≤ m`` greedy draft tokens from the recurrent heads,
fed the token picked after ``hidden`` (:meth:`Lowering.draft`). Rows of one sequence at consecutive positions in one
``decode_b{B}`` call (the last token and its drafts) are the speculative verify step: each row's key and value are
written before any row attends, so row ``t`` sees the rows before it. ``chain_b1`` is ``decode_b1`` that also picks
the next token, the argmax of ``logits + bias`` (``sampling = (1/T, seed)`` with ``1/T > 0``: of ``logits/T + bias``
plus Gumbel noise, a draw at temperature ``T``), and writes it, in place, as the next call's token at the next
position and into the ring (``R`` = :data:`compiler.constants.CHAIN_RING` picks and their count): calls queued back
to back decode with nothing from the host between them (``runtime.engine.Engine.chain``). With MTP heads,
``spec_chain_b{T}`` (one per ``K = T - 1`` from 1 to ``m``; the inputs and results of ``chain_b1`` over ``T`` rows,
plus ``hidden``) is the speculative chain: its rows are the last token and ``K`` drafts, it keeps each row's pick up
to the first wrong draft (1 .. T tokens into the ring), and drafts the next call's rows from the last kept row
(:meth:`Lowering._spec_advance`).

Each ``kc_l``/``vc_l`` is ``float32[n_blocks, Hkv, K, hd]``, ``n_blocks`` symbolic: the runtime sizes the cache
(:mod:`runtime.kv_cache`). Latent attention caches its int8 latent and ``(s/a, k_pe)`` rows instead, and a DeltaNet
layer has one ``state_l [n_states, Hk, hd, hd]`` with its own symbolic ``n_states``, one slot per live sequence
(:func:`cache_specs`, :func:`cache_meta`; ``meta.json["cache"]`` tells the runtime each tensor's leading dimension).
Row ``t`` holds one token at position ``pos[t]`` of the sequence whose block table is ``table[t]`` (position ``p``
lives in block ``table[t, p // K]``, slot ``p % K``; its DeltaNet state in slot ``table[t, 0]``); the graph writes the
row's key and value there **in place** (``call_tir_inplace``) and attends over that sequence's positions
``0 .. pos[t]``. A ``decode_b{B}`` row is one sequence's next token (the batch: each sequence at its own position,
each ternary matrix read once for all ``B``); a ``prefill`` chunk is ``P`` consecutive tokens of one sequence (every
row the same table) and returns the logits of row ``last``. A row with ``pos < 0`` is padding: it writes nothing and
attends to nothing, so a short chunk or a batch below ``B`` never touches another sequence's blocks. A row's logits
do not depend on the other rows or on ``B`` (the exactness of batching, ``tests/test_batch.py``).

Kernels: every ternary matmul, the RMSNorm+quantize before q/k/v and gate/up, and the mHC site post+mix go through
:func:`compiler.schedule.get_primfunc` (the tuned record of ``tuning_logs/<target>/``, or the hand schedule with a loud
UNTUNED warning). ``decode_b1`` uses ``gemv_i8`` and ``mhc_post``; prefill uses ``gemm_i8`` with ``N = P`` (the tuned
tile is 8) and a token-batched TE twin of ``mhc_post``, as does ``decode_b{B}`` with ``N = B`` (a GEMM without its own
record borrows the prefill chunk's knobs; the batch's RMSNorm always takes the one-token kernel's). Embedding, RoPE,
the cache write, attention, SwiGLU, the o/down
input quantize, the final norm and the LM head are the small kernels of :mod:`compiler.graph_kernels`.

CPU weight layout: every ternary matrix is stored once, in ``tile8`` (:mod:`model.ternary.layouts_x86`: the 64-byte
chunks of 8 rows side by side, so each thread of a decode GEMV streams one linear range), read by both the decode
GEMV and the prefill GEMM (``tile=8``). The LM head is ``[V, D]`` as the GGUF stores it (rows streamed once).
``weights="tl"`` (AVX-512 VBMI) stores them in the 1.67-bit ``tl{R}`` layout instead
(:mod:`model.ternary.layouts_tl`): decode calls ``gemv_i8_tl``, prefill and batches ``gemm_i8_tl``. Both
layouts give the same integer dot products, hence bit-identical logits.

Structure: :class:`Lowering` has one builder per block (``embedding``, ``attention``, ``ffn``, ``mhc_site``,
``head``), each reading top to bottom; everything that differs between builds (which operator serves the ternary
GEMV and GEMM, which kernels are fixed rather than tuned, the graph kernels' GPU variants, the prefill chunk) is one
row of :data:`KERNELS` (CPU ``tile8``, CPU ``tl``, CUDA ``dp4a``). Chunk sizes shared with tuning live in
:mod:`compiler.constants`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compiler import graph_kernels as gk
from compiler import graph_kernels_deltanet as gkd
from compiler import graph_kernels_gpu as gkg
from compiler import graph_kernels_mla as gkm
from compiler.constants import (
    CHAIN_RING,
    CPU_BATCH_SIZES,
    CPU_PREFILL_CHUNK,
    CUDA_BATCH_SIZES,
    CUDA_PREFILL_CHUNK,
    KV_BLOCK,
)
from compiler.ops import make_op
from compiler.ops.ternary_gemm_amx import amx_pays

log = logging.getLogger("compiler.build")

PREFILL_CHUNK = CPU_PREFILL_CHUNK  # a CPU build's prefill chunk (compiler.arith's default)
TERNARY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MLA_TERNARY = ("attn_q", "attn_kv_a_mqa", "attn_output")  # a latent-attention block's tuned GEMVs (attn_kv_b: gkm)
MTP_TERNARY = ("proj", "embed_proj")  # each MTP head's ternary matrices (model.transformer.MTPHead)
CPU_TILE = 8  # row tile of the CPU weight layout (tile8), when it divides M
WEIGHT_LAYOUTS = ("tile8", "tl")  # CPU ternary weights: 2-bit tile8 (default) or 1.67-bit tl{R} (AVX-512 VBMI)
DRAFT_VOCAB_CPU = 2048  # CPU drafts: the LM head over the first ids only (draft_vocab; docs/speculative.md)


def cpu_tile(M: int) -> int:
    return CPU_TILE if M % CPU_TILE == 0 else 0


def tl_tile(M: int) -> int:
    """Row tiles (16 rows each) per group of the ``tl`` layout for output size M: the largest of 8, 4, 2, 1 fitting."""
    for r in (8, 4, 2, 1):
        if M % (16 * r) == 0:
            return r
    raise ValueError(f"weights='tl' needs every ternary matrix's output size to be a multiple of 16; M = {M}")


HEADS = ("auto", "int8")  # the LM head as the GGUF stores it (F16 or F32), or int8 rows + a float32 scale per row


def check_weights(weights: str, gpu: bool, cfg=None) -> None:
    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_LAYOUTS}")
    if weights == "tl" and gpu:
        raise ValueError("weights='tl' is a CPU (AVX-512 VBMI) layout; the CUDA build uses dp4a")
    if cfg is not None and cfg.n_experts and weights != "tile8":
        raise ValueError(f"a mixture-of-experts model (n_experts={cfg.n_experts}) compiles with the tile8 (or CUDA) "
                         "weights only, for now (no expert-indexed tl kernel yet)")  # fmt: skip


AMX_MODES = ("auto", "on", "off")


def amx_for(target: str, weights: str, mode: str = "auto") -> bool:
    """Whether a build's prefill and decode-batch GEMMs take the AMX kernel where it pays
    (:mod:`compiler.ops.ternary_gemm_amx`, :func:`~compiler.ops.ternary_gemm_amx.amx_pays`): ``auto``, when the
    build is ``tile8`` on ``avx512`` and this CPU has AMX-INT8; ``on`` demands it; ``off`` never. The one place the
    setting is resolved (``compiler.build`` and the runtime's JIT key their cache entries by the result)."""
    import targets

    if mode not in AMX_MODES:
        raise ValueError(f"amx={mode!r}: expected one of {', '.join(AMX_MODES)}")
    fits = target == "avx512" and weights == "tile8" and targets.has_amx()
    if mode == "on" and not fits:
        raise ValueError("amx='on' needs the avx512 target, tile8 weights and a CPU with AMX-INT8 (amx_int8, amx_tile)")
    return mode != "off" and fits


AMX_PREFILL_CHUNK = 16  # an AMX build's prefill chunk where every GEMM of it takes AMX (amx_min_k): a tile's tokens


def amx_min_k(cfg) -> int:
    """The smallest K of a dense GQA model's ternary matrices (q|k|v, gate|up: d_model; o: heads·head_dim; down:
    ffn_hidden), 0 for the other architectures (latent attention, DeltaNet, experts: their prefill stays in chunks
    of 8, the chunk the VNNI GEMM records are tuned for)."""
    if cfg.mla or cfg.deltanet_layers or cfg.n_experts:
        return 0
    return min(cfg.d_model, cfg.ffn_hidden, cfg.n_heads * cfg.head_dim)


def stacked(cfg, i: int, gpu: bool) -> dict[str, tuple[str, ...]]:
    """Layer ``i``'s matrices stored and read as one stacked matrix (a scale per part, :mod:`compiler.ops.stacked`):
    a GQA layer's ``attn_qkv`` (q|k|v) and a dense gated FFN's ``ffn_gate_up`` (gate|up), so one GEMV (or prefill
    GEMM) reads what three or two did. A GPU decode step is bound by its kernel count (docs/bench/cuda/README.md); a
    CPU one by the Relax VM's instructions per kernel call as much as by its kernels, and a small matrix (GQA's k and
    v) streams slowly on its own (docs/runtime/README.md, "Stacked q|k|v and gate|up"). The cache write and the
    query's RoPE (CPU) or the attention (GPU) read their columns of the stacked output; the gate reads its halves.

    GPUs also stack a latent-attention layer's ``attn_q_kv_a`` (q|kv_a); their gate|up is read by the fused SwiGLU +
    quantize, so only a SwiGLU FFN without a sub-norm stacks there. The CPU stacks every dense gated FFN (SwiGLU or
    ReLU², a sub-norm or none) and no latent attention."""
    out = {}
    if cfg.mla:
        if gpu:
            out["attn_q_kv_a"] = ("attn_q", "attn_kv_a_mqa")
    elif not cfg.is_deltanet(i):
        out["attn_qkv"] = ("attn_q", "attn_k", "attn_v")
    if not cfg.n_experts and (not gpu or (cfg.ffn_act == "silu" and not cfg.sub_norms)):
        out["ffn_gate_up"] = ("ffn_gate", "ffn_up")
    return out


def block_ternary(cfg, i: int = 0, gpu: bool = False) -> list[tuple[str, tuple[str, ...], int]]:
    """Layer ``i``'s ternary parameters: ``(name after blk.{i}., the block's matrices it holds, experts)``. A dense
    block has one parameter per matrix (experts 0), or per :func:`stacked` group (a scale per part, ``[P]``). A mixture
    of experts has ``ffn_gate_up_exps``, each expert's gate and up stacked along the rows (one GEMV reads both), and
    ``ffn_down_exps``, both ``[E, ...]`` with a scale per matrix ``[E, P]`` (the GGUF keeps llama.cpp's three stacks;
    :func:`pack_params` joins gate and up)."""
    groups = stacked(cfg, i, gpu)
    member = {t: name for name, parts in groups.items() for t in parts}
    out, seen = [], set()
    attn = [t for t in (MLA_TERNARY if cfg.mla else TERNARY) if not t.startswith("ffn_")]
    for t in attn + ([] if cfg.n_experts else [t for t in TERNARY if t.startswith("ffn_")]):
        name = member.get(t, t)
        if name not in seen:
            seen.add(name)
            out.append((name, groups.get(name, (t,)), 0))
    if cfg.n_experts:
        E = cfg.n_experts
        out += [("ffn_gate_up_exps", ("ffn_gate", "ffn_up"), E), ("ffn_down_exps", ("ffn_down",), E)]
    return out


@dataclass
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def head_step(cfg, target: str, head_dtype: str) -> int:
    """The LM head's layout for ``target``: 0 for rows ``[V, D]`` (GPUs), else the column step of the CPU kernels'
    blocked layout (:func:`compiler.graph_kernels.tile_head`): ``HEAD_I8_CHUNK`` for the int8 head on AVX-512 VNNI
    (:func:`compiler.graph_kernels.lm_head_i8`), ``HEAD_LANES`` for every other CPU head."""
    if target == "cuda":
        return 0
    if head_dtype == "int8" and target == "avx512" and cfg.d_model % gk.HEAD_I8_CHUNK == 0:
        return gk.HEAD_I8_CHUNK
    return gk.HEAD_LANES


def shares_embedding(cfg, head_dtype: str) -> bool:
    """Whether the token embedding is read from the LM head's array (one copy of the table, not two): a tied model
    whose head keeps the embedding's own values (``head="auto"``; an int8 head is not the embedding). The rows are
    then gathered from the head's layout (:func:`compiler.graph_kernels.embed_blocked` on CPUs), bit for bit the
    same; at the 2B-4T size that is 656 MB of memory less."""
    return bool(cfg.tie_embeddings) and head_dtype != "int8"


def param_specs(cfg, embed_dtype: str = "float32", head_dtype: str = "float32", gpu: bool = False,
                weights: str = "tile8", head_step: int = 0) -> list[ParamSpec]:  # fmt: skip
    """The compiled functions' parameters after the KV cache, in order (names as stored in ``params.npz``).

    ``token_embd.weight [V, D]`` and the LM head ``lm_head.weight`` keep the GGUF's float16 when it has it (exact;
    the kernels compute in float32); a tied model has no ``token_embd.weight`` unless its head is int8
    (:func:`shares_embedding`). The head is ``[V, D]`` when ``head_step`` is 0 (GPUs), else blocked
    (:func:`head_step`, :func:`compiler.graph_kernels.tile_head`). On GPUs the ternaries are ``int32[M, K/16]``
    (``dp4a`` layout), on CPUs ``uint8[M/8, K/256, 8, 64]`` (``tile8``)."""
    D, V, hd, C, S = cfg.d_model, cfg.vocab_size, cfg.rope_dim, cfg.max_seq_len, cfg.n_streams
    head = (gk.head_blocks(V), D // head_step, gk.HEAD_BLOCK, head_step) if head_step else (V, D)
    out = [] if shares_embedding(cfg, head_dtype) else [ParamSpec("token_embd.weight", (V, D), embed_dtype)]
    out.append(ParamSpec("lm_head.weight", head, head_dtype))
    if head_dtype == "int8":  # HEADS: int8 rows, one float32 scale each
        out.append(ParamSpec("lm_head.scale", (V,), "float32"))
    out += [ParamSpec("output_norm.weight", (D,), "float32"), ParamSpec("rope.cos", (C, hd // 2), "float32"),
            ParamSpec("rope.sin", (C, hd // 2), "float32")]  # fmt: skip
    shapes = ternary_shapes(cfg)
    for i in range(cfg.n_layers):
        out.append(ParamSpec(f"blk.{i}.attn_norm.weight", (D,), "float32"))
        out.append(ParamSpec(f"blk.{i}.ffn_norm.weight", (D,), "float32"))
        if cfg.sub_norms:
            out.append(ParamSpec(f"blk.{i}.attn_sub_norm.weight", (D,), "float32"))
            out.append(ParamSpec(f"blk.{i}.ffn_sub_norm.weight", (cfg.ffn_hidden,), "float32"))
        for name, parts, E in block_ternary(cfg, i, gpu):
            M, K = sum(shapes[t][0] for t in parts), shapes[parts[0]][1]
            lead = (E,) if E else ()
            out.append(ParamSpec(f"blk.{i}.{name}.weight", (*lead, M, K // 16), "int32") if gpu else
                       ParamSpec(f"blk.{i}.{name}.weight", (*lead, *_cpu_w_shape(M, K, weights)), "uint8"))  # fmt: skip
            out.append(ParamSpec(f"blk.{i}.{name}.scale", (E, len(parts)) if E else (len(parts),), "float32"))
        if cfg.n_experts:  # the router, float32 [E, D]
            out.append(ParamSpec(f"blk.{i}.ffn_gate_inp.weight", (cfg.n_experts, D), "float32"))
        if cfg.mla:  # attn_kv_b's codes per head, key part [H, hd, c] and value part [H, c, hd], its scale; the norm
            H, c = cfg.n_heads, cfg.kv_lora_rank
            out += [ParamSpec(f"blk.{i}.attn_k_b.weight", (H, cfg.head_dim, c), "int8"),
                    ParamSpec(f"blk.{i}.attn_v_b.weight", (H, c, cfg.head_dim), "int8"),
                    ParamSpec(f"blk.{i}.attn_kv_b.scale", (1,), "float32"),
                    ParamSpec(f"blk.{i}.attn_kv_a_norm.weight", (c,), "float32")]  # fmt: skip
        if cfg.is_deltanet(i):  # the gate projections [ssm_alpha; ssm_beta], A_log, the dt bias
            hk = cfg.n_kv_heads
            out += [ParamSpec(f"blk.{i}.ssm_gates.weight", (2 * hk, D), "float32"),
                    ParamSpec(f"blk.{i}.ssm_a", (hk,), "float32"),
                    ParamSpec(f"blk.{i}.ssm_dt.bias", (hk,), "float32")]  # fmt: skip
        for site in ("mhc_attn", "mhc_ffn"):
            out += [ParamSpec(f"blk.{i}.{site}.h_pre", (S,), "float32"),
                    ParamSpec(f"blk.{i}.{site}.h_post", (S,), "float32"),
                    ParamSpec(f"blk.{i}.{site}.h_res", (S, S), "float32")]  # fmt: skip
    for k in range(cfg.mtp_heads):  # the multi-token-prediction heads (draft{k}_b{B})
        for t in MTP_TERNARY:
            out.append(ParamSpec(f"mtp.{k}.{t}.weight", (D, D // 16), "int32") if gpu else
                       ParamSpec(f"mtp.{k}.{t}.weight", _cpu_w_shape(D, D, weights), "uint8"))  # fmt: skip
            out.append(ParamSpec(f"mtp.{k}.{t}.scale", (1,), "float32"))
        out.append(ParamSpec(f"mtp.{k}.embed_norm.weight", (D,), "float32"))
    return out


BLOCK_DIM, STATE_DIM = "n_blocks", "n_states"  # the cache tensors' symbolic leading dimensions (runtime.kv_cache)


def cache_specs(cfg) -> list[ParamSpec]:
    """Each layer's cache tensors, in layer order, their shapes after the symbolic leading dimension
    (:func:`cache_dim`): ``kc_{i}`` and ``vc_{i}`` after ``n_blocks``, GQA float32 keys and values ``[Hkv, block,
    hd]`` or MLA's int8 latent ``[block, c]`` and float32 ``(s/a, k_pe)`` rows ``[block, 1 + r]``
    (:mod:`compiler.graph_kernels_mla`); a DeltaNet layer's ``state_{i}`` ``[Hkv, hd, hd]`` after ``n_states``, one
    per sequence, in the slot its first block's id indexes (:mod:`compiler.graph_kernels_deltanet`; the runtime keeps
    the block ids ``[0, n_states)`` for first blocks, :mod:`runtime.kv_cache`). ``meta.json`` lists them
    (``cache``, :func:`cache_meta`) for the runtime, which allocates them."""
    if cfg.mla:
        (ks, kt), (vs, vt) = gkm.cache_shapes(cfg.kv_lora_rank, cfg.qk_rope_dim, KV_BLOCK)
    else:
        ks = vs = (cfg.n_kv_heads, KV_BLOCK, cfg.head_dim)
        kt = vt = "float32"
    ss, stype = gkd.state_shape(cfg.n_kv_heads, cfg.head_dim)
    return [s for i in range(cfg.n_layers) for s in (
        (ParamSpec(f"state_{i}", ss, stype),) if cfg.is_deltanet(i) else
        (ParamSpec(f"kc_{i}", ks, kt), ParamSpec(f"vc_{i}", vs, vt)))]  # fmt: skip


def cache_dim(spec: ParamSpec) -> str:
    """A cache tensor's symbolic leading dimension: :data:`STATE_DIM` for a DeltaNet state, else :data:`BLOCK_DIM`."""
    return STATE_DIM if spec.name.startswith("state_") else BLOCK_DIM


def cache_meta(cfg) -> list[list]:
    """``meta.json["cache"]``: ``[name, shape after the leading dimension, dtype, leading dimension]`` per cache
    tensor (:func:`cache_specs`; read by :func:`runtime.kv_cache.cache_layout`)."""
    return [[s.name, list(s.shape), s.dtype, cache_dim(s)] for s in cache_specs(cfg)]


def output_specs(cfg, name: str, T: int) -> list[ParamSpec]:
    """The results of ``decode_b{B}``, ``verify_b{B}`` and ``prefill`` (``T`` rows), in order: the caller passes
    them as tensors after the inputs and the function writes into them (destination passing: no allocation per
    call, and on CUDA the whole step is one captured graph; :func:`compiler.build._static_inputs`). ``logits``
    ``[rows, V]`` (prefill: ``rows = 1``, the row ``last``); with MTP heads the normed hidden states ``hidden [rows,
    D]``; ``verify_b{B}`` also every row's greedy drafts ``drafts int32[m, B]``; ``draft{k}_b{B}`` only its drafts
    ``int32[k, B]``; ``chain_b1`` also the ring of its picks ``ring int32[CHAIN_RING + 1]`` (:meth:`Lowering.function`).
    ``compiler.build`` writes them to ``meta.json`` (``outputs``) for the runtime."""
    if name.startswith("draft"):
        return [ParamSpec("drafts", (int(name[5 : name.index("_")]), T), "int32")]
    if name == "prefill_kv":
        return [ParamSpec("attn", (T, cfg.d_model), "float32")]
    rows = T if name.startswith(("decode_b", "verify_b", "chain_b", "spec_chain_b")) else 1
    out = [ParamSpec("logits", (rows, cfg.vocab_size), "float32")]
    if cfg.mtp_heads:
        out.append(ParamSpec("hidden", (rows, cfg.d_model), "float32"))
    if name.startswith("verify_b"):
        out.append(ParamSpec("drafts", (cfg.mtp_heads, T), "int32"))
    if name.startswith(("chain_b", "spec_chain_b")):
        out.append(ParamSpec("ring", (CHAIN_RING + 1,), "int32"))
    return out


def spec_chain_rows(cfg) -> range:
    """The rows ``T`` of the speculative chain functions ``spec_chain_b{T}`` a build has: one per number of drafts
    ``K = T - 1`` from 1 to the model's MTP heads (none without heads)."""
    return range(2, cfg.mtp_heads + 2)


def draft_vocab(V: int, gpu: bool) -> int:
    """The ids the MTP heads draft from: all on GPUs; on CPUs the first :data:`DRAFT_VOCAB_CPU` (byte-level BPE ids
    run from the bytes through the merges in training order, roughly by frequency), which cuts the draft's LM head,
    the bulk of its cost there. A draft from a subset is still exact: it is only a proposal (docs/speculative.md)."""
    return V if gpu else min(V, DRAFT_VOCAB_CPU)


def draft_specs(specs: list[ParamSpec]) -> list[ParamSpec]:
    """The parameters of the ``draft{k}_b{B}`` functions, in ``specs`` order: the embedding, the LM head and the MTP
    heads'."""
    return [s for s in specs if s.name.startswith(("token_embd.", "lm_head.", "mtp."))]


GGUF_NAMES = {"attn_o": "attn_output"}  # the one place a config projection name differs from the GGUF's


def ternary_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(M, K) of each ternary matrix of a block, by its GGUF name (:data:`TERNARY`), from ``cfg.ternary_shapes``."""
    return {GGUF_NAMES.get(n, n): mk for n, mk in cfg.ternary_shapes().items()}


def var_name(name: str) -> str:
    """The Relax variable of the parameter or tensor ``name`` (its dots are not allowed there)."""
    return name.replace(".", "_")


def _var(name: str, shape, dtype: str):
    from tvm import relax

    return relax.Var(var_name(name), relax.TensorType(shape, dtype))


def _rows(name: str, chunk: int) -> int:
    """The rows ``T`` of function ``name``: its batch ``B``, or the prefill chunk."""
    return int(name.split("_b")[1]) if "_b" in name else chunk


def _results(outs):
    """A function's results as a tuple made by a VM builtin, which no CUDA graph captures: Relax's graph rewrite then
    passes them out of the captured region (TVM 0.27 drops a result that is bound inside the region)."""
    from tvm import relax

    return relax.call_pure_packed("vm.builtin.make_tuple", *outs, ty_args=relax.TupleType([o.ty for o in outs]))


def _site_param(site: int, name: str) -> str:
    """The parameter ``name`` of mHC site ``site`` (``2i``: layer i's ``mhc_attn``, ``2i + 1``: its ``mhc_ffn``)."""
    return f"blk.{site // 2}.{'mhc_attn' if site % 2 == 0 else 'mhc_ffn'}.{name}"


def _cpu_w_shape(M: int, K: int, weights: str = "tile8") -> tuple[int, ...]:
    if weights == "tl":
        from model.ternary.layouts_tl import shape

        return shape(M, K, tl_tile(M))
    return (M // CPU_TILE, K // 256, CPU_TILE, 64) if cpu_tile(M) else (M, K // 4)


def _pack_cpu(codes: np.ndarray, weights: str = "tile8") -> np.ndarray:
    """int8 codes ``[M, K]`` → ``tile8`` (``rowmajor4`` when 8 does not divide M), or ``tl{R}``."""
    from model.ternary.layouts import get_layout

    m = codes.shape[0]
    name = f"tl{tl_tile(m)}" if weights == "tl" else f"tile{CPU_TILE}" if cpu_tile(m) else "rowmajor4"
    return get_layout(name).pack(codes)


def quantize_head(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LM head as int8 rows with one float32 scale each (``head="int8"``): ``scale[v] = max|W[v]| / 127``,
    ``q = round_half_even(W[v] / scale[v])`` (a zero row: scale 0, codes 0). Logits are ``scale[v] · Σ_d h[d]·q[v, d]``;
    each weight moves by at most ``scale[v] / 2``."""
    w = np.asarray(w, np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scale


def pack_params(g, target: str, weights: str = "tile8", head: str = "auto") -> dict[str, np.ndarray]:
    """The GGUF's tensors → the kernels' inputs for ``target``: ternaries repacked to ``tile8`` or ``tl{R}`` (GPU:
    ``dp4a``) + a float32 scale, floats as float32, mHC coefficients computed once, RoPE tables. ``head``: the LM
    head as the GGUF stores it (``auto``: F16 stays float16) or ``int8`` rows with a scale each
    (:func:`quantize_head`), in the target's layout (:func:`head_step`)."""
    from model.ternary.layouts import get_layout

    gpu = target == "cuda"
    check_weights(weights, gpu, g.config)
    if head not in HEADS:
        raise ValueError(f"head={head!r}: expected one of {HEADS}")
    pack = get_layout("dp4a").pack if gpu else (lambda codes: _pack_cpu(codes, weights))
    cfg = g.config
    p: dict[str, np.ndarray] = {}
    emb = g.tensors["token_embd.weight"].as_stored()
    head_w = emb if cfg.tie_embeddings else g.tensors["output.weight"].as_stored()
    if head == "int8":
        head_w, p["lm_head.scale"] = quantize_head(head_w)
    if not shares_embedding(cfg, str(head_w.dtype)):
        p["token_embd.weight"] = emb
    step = head_step(cfg, target, str(head_w.dtype))
    p["lm_head.weight"] = gk.tile_head(head_w, step) if step else np.ascontiguousarray(head_w)
    p["output_norm.weight"] = g.tensors["output_norm.weight"].to_float().astype(np.float32)
    p["rope.cos"], p["rope.sin"] = gk.rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta)
    coeffs = g.mhc_coefficients()
    for i in range(cfg.n_layers):
        for n in ("attn_norm", "ffn_norm") + (("attn_sub_norm", "ffn_sub_norm") if cfg.sub_norms else ()):
            p[f"blk.{i}.{n}.weight"] = g.tensors[f"blk.{i}.{n}.weight"].to_float().astype(np.float32)
        for name, parts, E in block_ternary(cfg, i, gpu):
            if not E:
                tws = [g.ternary(f"blk.{i}.{t}.weight") for t in parts]
                p[f"blk.{i}.{name}.weight"] = pack(np.concatenate([tw.codes for tw in tws]))
                p[f"blk.{i}.{name}.scale"] = np.array([tw.scale for tw in tws], np.float32)
                continue
            stacks = [g.ternary(f"blk.{i}.{t}_exps.weight") for t in parts]  # each [E, M, K], a scale per expert
            p[f"blk.{i}.{name}.weight"] = np.stack(
                [pack(np.concatenate([s.codes[e] for s in stacks])) for e in range(E)]
            )  # fmt: skip
            p[f"blk.{i}.{name}.scale"] = np.stack([s.scale for s in stacks], axis=1).astype(np.float32)
        if cfg.n_experts:
            p[f"blk.{i}.ffn_gate_inp.weight"] = g.tensors[f"blk.{i}.ffn_gate_inp.weight"].to_float().astype(np.float32)
        if cfg.is_deltanet(i):
            gates = [g.tensors[f"blk.{i}.ssm_{n}.weight"].to_float().astype(np.float32) for n in ("alpha", "beta")]
            p[f"blk.{i}.ssm_gates.weight"] = np.ascontiguousarray(np.concatenate(gates))
            p[f"blk.{i}.ssm_a"] = g.tensors[f"blk.{i}.ssm_a"].to_float().astype(np.float32)
            p[f"blk.{i}.ssm_dt.bias"] = g.tensors[f"blk.{i}.ssm_dt.bias"].to_float().astype(np.float32)
        if cfg.mla:  # attn_kv_b [H·2·hd, c]: per head its hd key rows, then its hd value rows
            tw = g.ternary(f"blk.{i}.attn_kv_b.weight")
            codes = tw.codes.astype(np.int8).reshape(cfg.n_heads, 2, cfg.head_dim, cfg.kv_lora_rank)
            p[f"blk.{i}.attn_k_b.weight"] = np.ascontiguousarray(codes[:, 0])
            p[f"blk.{i}.attn_v_b.weight"] = np.ascontiguousarray(codes[:, 1].transpose(0, 2, 1))
            p[f"blk.{i}.attn_kv_b.scale"] = np.array([tw.scale], np.float32)
            norm = g.tensors[f"blk.{i}.attn_kv_a_norm.weight"]
            p[f"blk.{i}.attn_kv_a_norm.weight"] = norm.to_float().astype(np.float32)
        for j, site in enumerate(("mhc_attn", "mhc_ffn")):
            c = coeffs[2 * i + j]
            p[f"blk.{i}.{site}.h_pre"] = np.asarray(c.h_pre, np.float32)
            p[f"blk.{i}.{site}.h_post"] = np.asarray(c.h_post, np.float32)
            p[f"blk.{i}.{site}.h_res"] = np.asarray(c.h_res, np.float32)
    for k in range(cfg.mtp_heads):
        for t in MTP_TERNARY:
            tw = g.tensors[f"mtp.{k}.{t}.weight"].ternary()
            p[f"mtp.{k}.{t}.weight"] = pack(tw.codes)
            p[f"mtp.{k}.{t}.scale"] = np.array([tw.scale], np.float32)
        p[f"mtp.{k}.embed_norm.weight"] = g.tensors[f"mtp.{k}.embed_norm.weight"].to_float().astype(np.float32)
    for s in param_specs(cfg, str(emb.dtype), str(head_w.dtype), gpu, weights, step):
        a = p[s.name]
        if a.shape != s.shape or a.dtype != np.dtype(s.dtype):
            raise ValueError(f"packed {s.name}: {a.shape} {a.dtype}, expected {s.shape} {s.dtype}")
    return p


# --- the per-target kernel table ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetKernels:
    """Which kernel serves each step of a block on one kind of build: the only place lowering depends on the target.

    The ternary matmuls are tuned operators (:mod:`compiler.ops`): ``gemv`` for decode (one token), ``gemm`` for a
    prefill chunk of ``prefill_chunk`` tokens and a decode batch. ``fixed``
    names the operators served by a fixed kernel instead of a tuning record (op → PrimFunc); every other operator
    (RMSNorm+quantize, the mHC site) comes from ``tuning_logs/<target>/`` or its hand schedule. The rest are the
    small graph kernels' builders."""

    name: str
    prefill_chunk: int
    gemv: str  # op kind of the decode ternary GEMV
    gemm: str  # op kind of the prefill (and decode batch) ternary GEMM
    tile: Callable[[int], int] | None  # the weight layout's row tile for output size M (the ops' ``tile``), if any
    x_words: bool  # the matmuls read the int8 activations as int32 words ([T, K/4], a view)
    x_sum: bool  # the matmuls take the activations' per-token sums (the zero-point correction)
    fixed: dict[str, Callable]  # op kind → builder of its fixed kernel from the op
    quantize: Callable  # per-token int8 quantize (T, K) of the o/down inputs
    attention: Callable  # (T, H, Hkv, hd, C)
    attention_scratch: Callable  # (T, H, hd, C) -> the shapes of attention's two scratch outputs
    rope_in_attention: bool  # attention rotates the query (q [T, D], then the RoPE tables after table): no rope_q
    attention_quant: Callable | None  # (H, hd) -> whether attention(..., quant=True), which also quantizes its output
    # for the o projection in its combine (one kernel fewer), is used for that shape
    mhc_norm: Callable | None  # (D, S, first, eps): a decode mHC site + the next block's RMSNorm+quantize, one kernel
    swiglu_quant: Callable | None  # (T, F): silu(gate)·up and its quantize as one kernel; None: silu_mul, quantize
    lm_head: Callable  # (V, D, dtype)
    argmax: Callable  # (B, V): each row's first maximum (int32) and its value (the MTP heads' greedy drafts)
    kv_update: Callable  # (T, Hkv, hd, C, block)
    batch_sizes: tuple[int, ...]  # the decode functions' batch sizes (sequences per step): decode_b{B}
    schedule_small: bool  # schedule the elementwise graph kernels here (else compiler.build's dlight pass does)
    fused_draft: bool  # verify_b{B}: decode_b{B} that also drafts for every row (a GPU step is launch-bound)
    mhc_x_row: bool  # the decode mHC kernel takes the first site's embedding as x [1, D] (else [D])
    router_topk: Callable  # (T, E, k): a mixture of experts' top-k and weights from the router's float64 logits
    experts: Callable | None  # (S, M, K, E, P, X): every MoE slot in one kernel, the ids read on the device; None: the
    # tuned GEMV (gemv with E) once per slot, the expert a scalar the host reads (Lowering.moe)
    cuda_forms: bool  # DeltaNet's kernels (graph_kernels_deltanet) in their CUDA form (MLA: latent_attention_fused)


def _cuda_norm_quant(op):  # RMSNorm+quantize as one kernel (shared-memory reductions) instead of seven
    return gkg.norm_quantize(op.N, op.D, eps=op.eps)


def _cuda_mhc_post(op):  # the mHC site as one kernel instead of three
    return gkg.mhc_post(op.D, op.S, bool(op.first), bool(op.last))


KERNELS = {  # keyed by the ternary weights' layout: CPU tile8 (avx2, avx512), CPU tl (avx512 VBMI), CUDA dp4a
    "tile8": TargetKernels(
        name="tile8", prefill_chunk=CPU_PREFILL_CHUNK, gemv="gemv_i8", gemm="gemm_i8", tile=cpu_tile,
        x_words=False, x_sum=True, fixed={}, quantize=gk.quantize, attention=gk.attention,
        attention_scratch=gk.attention_scratch, lm_head=gk.lm_head, argmax=gk.argmax, kv_update=gk.kv_update,
        schedule_small=True, mhc_x_row=False, batch_sizes=CPU_BATCH_SIZES, fused_draft=False,
        rope_in_attention=False, swiglu_quant=None, router_topk=gk.router_topk, experts=None, cuda_forms=False,
        attention_quant=None, mhc_norm=None,
    ),
    "tl": TargetKernels(
        name="tl", prefill_chunk=CPU_PREFILL_CHUNK, gemv="gemv_i8_tl", gemm="gemm_i8_tl", tile=tl_tile,
        x_words=False, x_sum=False, fixed={}, quantize=gk.quantize, attention=gk.attention,
        attention_scratch=gk.attention_scratch, lm_head=gk.lm_head, argmax=gk.argmax, kv_update=gk.kv_update,
        schedule_small=True, mhc_x_row=False, batch_sizes=CPU_BATCH_SIZES, fused_draft=False,
        rope_in_attention=False, swiglu_quant=None, router_topk=gk.router_topk, experts=None, cuda_forms=False,
        attention_quant=None, mhc_norm=None,
    ),
    "dp4a": TargetKernels(
        name="dp4a", prefill_chunk=CUDA_PREFILL_CHUNK, gemv="gemv_dp4a", gemm="gemm_dp4a", tile=None,
        x_words=True, x_sum=True, fixed={"rmsnorm_quant": _cuda_norm_quant, "mhc_post": _cuda_mhc_post},
        quantize=gkg.norm_quantize, attention=gkg.attention, attention_scratch=gkg.attention_scratch,
        lm_head=gkg.lm_head, argmax=gkg.argmax, kv_update=functools.partial(gk.kv_update, gpu=True),
        schedule_small=False, mhc_x_row=True, fused_draft=True, batch_sizes=CUDA_BATCH_SIZES,
        rope_in_attention=True, swiglu_quant=gkg.swiglu_quantize, attention_quant=gkg.quantized_combine_pays,
        mhc_norm=gkg.mhc_post_norm,
        router_topk=functools.partial(gk.router_topk, gpu=True), experts=gkg.experts_dp4a, cuda_forms=True,
    ),
}  # fmt: skip


def kernels_for(target: str, weights: str = "tile8") -> TargetKernels:
    """The :data:`KERNELS` entry of a build: ``dp4a`` on CUDA, else the CPU weight layout."""
    check_weights(weights, target == "cuda")
    return KERNELS["dp4a" if target == "cuda" else weights]


def _next_norm(site: int) -> str:
    """The weight of the RMSNorm that the block after mHC site ``site`` applies to its input first: the FFN's after
    an attention site (``2i``), the next layer's attention's after an FFN site."""
    i = site // 2
    return f"blk.{i}.ffn_norm.weight" if site % 2 == 0 else f"blk.{i + 1}.attn_norm.weight"


@dataclass
class _Frame:
    """What the block builders of one function (``decode_b{B}`` or ``prefill``) share: its row count, inputs
    (every row's position and block table), the paged KV cache and the params. ``batch``: rows are sequences (a
    decode step), else tokens of one sequence (a prefill chunk)."""

    T: int
    pos: object
    table: object
    cache: dict  # cache_specs name → var
    pv: dict
    batch: bool
    normed: dict = field(default_factory=dict)  # norm weight → (its input u, (q8, scale, sums)) a fused site made


@dataclass
class Lowering:
    """Builds the IRModule; ``kernels`` records where each tuned-operator kernel came from (op key → source)."""

    cfg: object
    target: str
    chunk: int | None = None  # tokens per prefill call (None: the table's prefill_chunk)
    logs_root: object = None
    embed_dtype: str = "float32"
    head_dtype: str = "float32"
    weights: str = "tile8"
    cores: int | None = None  # the thread count CPU kernels are built for (None: targets.build_cores)
    amx: bool = False  # the GEMMs where AMX pays take gemm_i8_amx (amx_for)
    kernels: dict[str, str] = field(default_factory=dict)
    op_flags: set[str] = field(default_factory=set)  # CPU flags the tuned-operator kernels need beyond the target's

    def __post_init__(self):
        from tvm import relax

        self.gpu = self.target == "cuda"
        self.k = kernels_for(self.target, self.weights)
        # an int8 head on AVX-512 VNNI: integer dots against the quantized hidden rows (graph_kernels.lm_head_i8)
        self.head_step = head_step(self.cfg, self.target, self.head_dtype)  # the head's layout (param_specs)
        self.head_i8 = self.head_step == gk.HEAD_I8_CHUNK
        check_weights(self.weights, self.gpu, self.cfg)
        if self.chunk is None:
            amx_chunk = self.amx and amx_pays(AMX_PREFILL_CHUNK, amx_min_k(self.cfg))
            self.chunk = AMX_PREFILL_CHUNK if amx_chunk else self.k.prefill_chunk
        self.bb = relax.BlockBuilder()
        self._gv: dict[str, object] = {}
        self._tgt = None

    # --- the functions: one builder per block ------------------------------------------------------------------
    def module(self):
        for B in self.k.batch_sizes:
            self.function(f"decode_b{B}")
            if self.cfg.mtp_heads and self.k.fused_draft:
                self.function(f"verify_b{B}")
            for heads in range(1, self.cfg.mtp_heads + 1):
                self.draft(B, heads)
        self.function("chain_b1")
        for T in spec_chain_rows(self.cfg):
            self.function(f"spec_chain_b{T}")
        self.function("prefill")
        self.function("prefill_kv")
        return self.bb.get()

    def function(self, name: str):
        """``decode_b{B}`` (one token for each of ``B`` sequences → logits ``[B, V]``) or ``prefill`` (a chunk of one
        sequence → the logits ``[V]`` of row ``last``): the embedding, then per layer its attention and its FFN, each
        followed by its mHC site, then the head. ``prefill_kv`` is a chunk that only fills the cache (a prompt's
        chunks before its last): it stops after the last layer's attention, whose output ``attn [T, D]`` is its
        result (no last FFN, no LM head: at the 2B-4T shape the head alone reads 656 MB). Every row has its own
        position ``pos[t]`` (< 0: a padding row, which writes nothing) and block table ``table[t]`` into the paged KV
        cache ``kc_i, vc_i [n_blocks, Hkv, block, hd]`` and the DeltaNet states ``state_i [n_states, Hk, hd, hd]``,
        whose ``n_blocks`` and ``n_states`` the runtime chooses (symbolic dimensions)."""
        from tvm import tirx

        cfg, bb = self.cfg, self.bb
        batch = name.startswith(("decode_b", "verify_b", "chain_b", "spec_chain_b"))
        T = _rows(name, self.chunk)
        W = gk.table_width(cfg.max_seq_len, KV_BLOCK)
        toks, pos, table = _var("tokens", (T,), "int32"), _var("pos", (T,), "int32"), _var("table", (T, W), "int32")
        kv_only = name == "prefill_kv"
        last = None if batch or kv_only else _var("last", (1,), "int32")
        chain = name.startswith(("chain_b", "spec_chain_b"))
        bias = _var("bias", (cfg.vocab_size,), "float32") if chain else None
        samp = _var("sampling", (2,), "float32") if chain else None
        inputs = [toks, pos, table] + [v for v in (last, bias, samp) if v is not None]
        dst = {o.name: _var(o.name, o.shape, o.dtype) for o in output_specs(cfg, name, T)}
        dims = {d: tirx.Var(d, "int64") for d in (BLOCK_DIM, STATE_DIM)}
        cache = {s.name: _var(s.name, (dims[cache_dim(s)], *s.shape), s.dtype) for s in cache_specs(cfg)}
        specs = self.specs()
        pv = {s.name: _var(s.name, s.shape, s.dtype) for s in specs}
        f = _Frame(T, pos, table, cache, pv, batch)
        with bb.function(name, inputs + list(dst.values()) + list(cache.values()) + [pv[s.name] for s in specs]):
            with bb.dataflow():
                x, u = self.embedding(f, toks)
                X = None  # the residual streams [T, S, D] between sites
                for site in range(2 * cfg.n_layers):
                    y = (self.attention if site % 2 == 0 else self.ffn)(f, site // 2, u)
                    if kv_only and site == 2 * cfg.n_layers - 2:  # the cache is written; the rest feeds the logits
                        break
                    X, u = self.mhc_site(f, site, x, X, y, _next_norm(site))
                if kv_only:  # the last attention's output: it keeps every cache write live
                    out = bb.emit_output(_results([self._copy_into(y, dst["attn"])]))
                else:
                    out = bb.emit_output(_results(self._outputs(name, f, u, last, dst, toks, pos, bias, samp)))
            bb.emit_func_output(out)

    def _outputs(self, name: str, f: _Frame, u, last, dst: dict, toks, pos, bias, samp) -> list:
        """The head and what follows it in function ``name``: its results (see :func:`output_specs`)."""
        cfg, f32, T = self.cfg, "float32", f.T
        chain = name.startswith(("chain_b", "spec_chain_b"))
        logits, hn = self.head(f, u, last, dst)
        outs = [logits, hn] if cfg.mtp_heads else [logits]
        if name.startswith("verify_b"):  # decode_b{B} that also drafts for every row after its argmax
            top = self._call(self._te("argmax", self.k.argmax, T, cfg.vocab_size), [logits],
                             [((T,), "int32"), ((T,), f32)])[0]  # fmt: skip
            outs.append(self._copy_into(self._draft_steps(f, hn, top, cfg.mtp_heads), dst["drafts"]))
        if name.startswith("spec_chain_b"):  # verify, accept and draft the next call's rows
            outs += self._spec_advance(f, logits, hn, bias, samp, toks, pos, dst["ring"])
        elif chain:  # the pick feeds the next call: no host round trip
            outs += self._chain_advance(logits, bias, samp, toks, pos, dst["ring"])
        return outs

    def embedding(self, f: _Frame, toks):
        """Token rows ``x [T, D]`` (float32) and the first block's input ``u = Σ_s h_pre[s] · x``."""
        D, S = self.cfg.d_model, self.cfg.n_streams
        x = self._embed(f, toks, f.T)  # [T, D]
        pre = self._te("pre_expand", gk.pre_expand, f.T, D, S)
        u = self._call(pre, [x, f.pv["blk.0.mhc_attn.h_pre"]], [((f.T, D), "float32")])
        return x, u

    def _embed(self, f: _Frame, toks, T: int):
        """The float32 rows ``[T, D]`` of ``toks`` (ids clipped to the vocabulary): from ``token_embd.weight``, or
        from the LM head's array when the model shares it (:func:`shares_embedding`; its blocked CPU layout through
        :func:`compiler.graph_kernels.embed_blocked`)."""
        from tvm import relax

        D, V = self.cfg.d_model, self.cfg.vocab_size
        shared = shares_embedding(self.cfg, self.head_dtype)
        if not shared:
            x = self.bb.emit(relax.op.take(f.pv["token_embd.weight"], toks, axis=0, mode="clip"))
        elif not self.head_step:  # rows [V, D], as the embedding
            x = self.bb.emit(relax.op.take(f.pv["lm_head.weight"], toks, axis=0, mode="clip"))
        else:
            step, dtype = self.head_step, self.head_dtype
            gv = self._te(f"embed_blocked_{dtype}", lambda n: gk.embed_blocked(n, V, D, step, dtype), T)
            x = self._call(gv, [f.pv["lm_head.weight"], toks], [((T, D), self.head_dtype)])
        dtype = self.head_dtype if shared else self.embed_dtype
        return x if dtype == "float32" else self.bb.emit(relax.op.astype(x, "float32"))

    def attention(self, f: _Frame, i: int, u):
        """Layer ``i``'s attention block on ``u [T, D]``: RMSNorm+quantize, q/k/v, RoPE, the in-place cache write,
        causal attention over the cache, quantize, the output projection → ``y [T, D]``. Latent attention:
        :meth:`latent_attention`."""
        from tvm import relax

        if self.cfg.mla:
            return self.latent_attention(f, i, u)
        if self.cfg.is_deltanet(i):
            return self.deltanet(f, i, u)
        cfg, T, f32 = self.cfg, f.T, "float32"
        D, H, Hkv, hd, C, KV = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len, cfg.kv_dim
        q8, sc, qs = self._norm_quant(f, f"blk.{i}.attn_norm.weight", u)
        if "attn_qkv" in stacked(cfg, i, self.gpu):  # one GEMV; the cache write and the attention read their columns
            qv = kv = vv = self._ternary(f, f"blk.{i}.attn_qkv", q8, sc, qs, D + 2 * KV, D, parts=(D, KV, KV))
            cols = {"width": D + 2 * KV, "k_at": D, "v_at": D + KV}
        else:
            qv = self._ternary(f, f"blk.{i}.attn_q", q8, sc, qs, D, D)
            kv = self._ternary(f, f"blk.{i}.attn_k", q8, sc, qs, KV, D)
            vv = self._ternary(f, f"blk.{i}.attn_v", q8, sc, qs, KV, D)
            cols = {}
        cos, sin = f.pv["rope.cos"], f.pv["rope.sin"]
        tag = f"_w{D + 2 * KV}" if cols else ""  # the stacked variants read rows of that width
        kc, vc = f.cache[f"kc_{i}"], f.cache[f"vc_{i}"]
        # one stacked row where the attention rotates the query itself (GPU): it writes the cache too (write_kv)
        own_write = bool(cols) and T == 1 and self.k.rope_in_attention
        if not own_write:
            upd_gv = self._te("kv_update" + tag, functools.partial(self.k.kv_update, **cols), T, Hkv, hd, C, KV_BLOCK)
            kv_args = [kv, vv, f.pos, f.table, cos, sin, kc, vc]
            upd = self.bb.emit(relax.call_tir_inplace(upd_gv, kv_args, [6, 7], [kc.ty, vc.ty]))
            kc, vc = self.bb.emit(relax.TupleGetItem(upd, 0)), self.bb.emit(relax.TupleGetItem(upd, 1))
        scratch = [(shape, f32) for shape in self.k.attention_scratch(T, H, hd, C)]
        qw = {"q_width": cols["width"]} if cols else {}  # the attention reads q from the stacked q|k|v rows
        if own_write:
            qw, tag = qw | {"write_kv": True}, tag + "_kv"

        def attend(att, args, outs):  # the attention's outputs; with own_write kc and vc are updated in place too
            if not own_write:
                return self._call(att, args, outs)
            tys = [kc.ty, vc.ty, *(relax.TensorType(s, d) for s, d in outs)]
            r = self.bb.emit(relax.call_tir_inplace(att, args, [1, 2] + [-1] * len(outs), tys))
            return [self.bb.emit(relax.TupleGetItem(r, 2 + j)) for j in range(len(outs))]

        if self.k.rope_in_attention:
            att = self._te("attention_rope" + tag, functools.partial(self.k.attention, **qw), T, H, Hkv, hd, C,
                           KV_BLOCK)  # fmt: skip
            args = [qv, kc, vc, f.pos, f.table, cos, sin]
        else:  # RoPE of the query (its columns of a stacked q|k|v), then the attention
            rope = self._te("rope_q" + tag, functools.partial(gk.rope_q, width=cols.get("width")), T, H, hd, C)
            qr = self._call(rope, [qv, f.pos, cos, sin], [((T, H, hd), f32)])
            att = self._te("attention", self.k.attention, T, H, Hkv, hd, C, KV_BLOCK)
            args = [qr, kc, vc, f.pos, f.table]
        if self.k.attention_quant and self.k.attention_quant(H, hd) and not cfg.sub_norms:  # o's quantize inside
            att = self._te("attention_quant" + tag, functools.partial(self.k.attention, quant=True, **qw), T, H, Hkv,
                           hd, C, KV_BLOCK)  # fmt: skip
            o8, osc, osum = attend(att, args, [((T, D), "int8"), ((T,), f32), ((T,), "int32"), *scratch])[:3]
            return self._ternary(f, f"blk.{i}.attn_output", o8, osc, osum, D, D)
        o = attend(att, args, [((T, D), f32), *scratch])[0]
        if cfg.sub_norms:  # arch bitnet: RMSNorm before the output projection
            o8, osc, osum = self._norm_quant(f, f"blk.{i}.attn_sub_norm.weight", o)
        else:
            o8, osc, osum = self._quantize(T, D, o)
        return self._ternary(f, f"blk.{i}.attn_output", o8, osc, osum, D, D)

    def latent_attention(self, f: _Frame, i: int, u):
        """Layer ``i``'s multi-head latent attention on ``u [T, D]``, absorbed (:mod:`compiler.graph_kernels_mla`):
        RMSNorm+quantize, q and kv_a (tuned GEMVs), the latent's RMSNorm+quantize (``attn_kv_b``'s input), its
        in-place cache write with ``s/a`` and the rotated shared key, the query absorbed into latent space, attention
        over the latent cache, the value up-projection, quantize, the output projection → ``y [T, D]``. A GPU runs
        :meth:`latent_attention_fused` instead."""
        from tvm import relax

        cfg, T, f32 = self.cfg, f.T, "float32"
        D, H, hd, C = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.max_seq_len
        c, r = cfg.kv_lora_rank, cfg.qk_rope_dim
        q8, sc, qs = self._norm_quant(f, f"blk.{i}.attn_norm.weight", u)
        if "attn_q_kv_a" in stacked(cfg, i, self.gpu):  # a GPU
            return self.latent_attention_fused(f, i, q8, sc, qs)
        qv = self._ternary(f, f"blk.{i}.attn_q", q8, sc, qs, H * (hd + r), D)
        kva = self._ternary(f, f"blk.{i}.attn_kv_a_mqa", q8, sc, qs, c + r, D)
        lat = self.bb.emit(relax.op.strided_slice(kva, axes=[1], begin=[0], end=[c]))
        c8, ca, _ = self._norm_quant(f, f"blk.{i}.attn_kv_a_norm.weight", lat, D=c)
        cos, sin, p = f.pv["rope.cos"], f.pv["rope.sin"], f"blk.{i}."
        lc, pc = f.cache[f"kc_{i}"], f.cache[f"vc_{i}"]
        upd_gv = self._te("mla_kv_update", gkm.kv_update, T, c, r, C, KV_BLOCK)
        args = [c8, ca, kva, f.pv[p + "attn_kv_b.scale"], f.pos, f.table, cos, sin, lc, pc]
        upd = self.bb.emit(relax.call_tir_inplace(upd_gv, args, [8, 9], [lc.ty, pc.ty]))
        lc, pc = self.bb.emit(relax.TupleGetItem(upd, 0)), self.bb.emit(relax.TupleGetItem(upd, 1))
        absorb = self._te("mla_absorb", gkm.absorb, T, H, hd, r, c, C)
        qa, qpe = self._call(
            absorb, [qv, f.pv[p + "attn_k_b.weight"], f.pos, cos, sin], [((T, H, c), f32), ((T, H, r), f32)]
        )
        lanes = gkm.CPU_LANES[self.target]  # a register per head
        att = self._te("mla_attention", functools.partial(gkm.attention, lanes=lanes), T, H, hd, r, c, C, KV_BLOCK)
        scratch = [(shape, f32) for shape in gkm.attention_scratch(T, H, c, C)]
        ctx = self._call(att, [qa, qpe, lc, pc, f.pos, f.table], [((T, H, c), f32), *scratch])[0]
        vup = self._te("mla_v_up", gkm.v_up, T, H, hd, c)
        o = self._call(vup, [ctx, f.pv[p + "attn_v_b.weight"]], [((T, D), f32)])
        o8, osc, osum = self._quantize(T, D, o)
        return self._ternary(f, f"blk.{i}.attn_output", o8, osc, osum, D, D)

    def latent_attention_fused(self, f: _Frame, i: int, q8, sc, qs):
        """:meth:`latent_attention` on a GPU in five kernels instead of ten: the stacked ``q | kv_a`` GEMV,
        ``graph_kernels_mla.prep`` (the latent's norm + quantize, the cache write and ``absorb``), the attention whose
        combine does ``v_up``, the quantize and the output projection."""
        from tvm import relax

        cfg, T, f32 = self.cfg, f.T, "float32"
        D, H, hd, C = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.max_seq_len
        c, r, p = cfg.kv_lora_rank, cfg.qk_rope_dim, f"blk.{i}."
        width = H * (hd + r) + c + r
        qk = self._ternary(f, p + "attn_q_kv_a", q8, sc, qs, width, D, parts=(H * (hd + r), c + r))
        prep = self._te("mla_prep", functools.partial(gkm.prep, eps=cfg.norm_eps), T, H, hd, r, c, C, KV_BLOCK, width)
        lc, pc = f.cache[f"kc_{i}"], f.cache[f"vc_{i}"]
        args = [qk, f.pv[p + "attn_k_b.weight"], f.pv[p + "attn_kv_a_norm.weight"], f.pv[p + "attn_kv_b.scale"],
                f.pos, f.table, f.pv["rope.cos"], f.pv["rope.sin"], lc, pc]  # fmt: skip
        tys = [lc.ty, pc.ty, relax.TensorType((T, H, c), f32), relax.TensorType((T, H, r), f32)]
        out = self.bb.emit(relax.call_tir_inplace(prep, args, [8, 9, -1, -1], tys))
        lc, pc, qa, qpe = (self.bb.emit(relax.TupleGetItem(out, j)) for j in range(4))
        att = self._te("mla_attention_gpu", functools.partial(gkm.attention, gpu=True), T, H, hd, r, c, C, KV_BLOCK)
        scratch = [(shape, f32) for shape in gkm.attention_scratch(T, H, c, C, True)]
        args = [qa, qpe, lc, pc, f.pos, f.table, f.pv[p + "attn_v_b.weight"]]
        o = self._call(att, args, [((T, H * hd), f32), *scratch])[0]
        o8, osc, osum = self._quantize(T, H * hd, o)
        return self._ternary(f, p + "attn_output", o8, osc, osum, D, H * hd)

    def deltanet(self, f: _Frame, i: int, u):
        """Layer ``i``'s gated DeltaNet on ``u [T, D]`` (:mod:`compiler.graph_kernels_deltanet`): RMSNorm+quantize,
        q/k/v (tuned GEMVs, GQA's shapes), the gates from the same int8 activations, the recurrent state update in
        place (rows in order), quantize, the output projection → ``y [T, D]``."""
        from tvm import relax

        cfg, T, f32 = self.cfg, f.T, "float32"
        D, H, Hk, hd, KV, p = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.kv_dim, f"blk.{i}."
        q8, sc, qs = self._norm_quant(f, p + "attn_norm.weight", u)
        qv = self._ternary(f, p + "attn_q", q8, sc, qs, D, D)
        kv = self._ternary(f, p + "attn_k", q8, sc, qs, KV, D)
        vv = self._ternary(f, p + "attn_v", q8, sc, qs, KV, D)
        gates = self._te("ssm_gates", gkd.gates, T, 2 * Hk, D, sched=True)
        gl = self._call(gates, [q8, sc, f.pv[p + "ssm_gates.weight"]], [((T, 2 * Hk), f32)])
        gpu = self.k.cuda_forms
        rec = self._te("deltanet", functools.partial(gkd.recurrent, gpu=gpu), T, H, Hk, hd, cfg.max_seq_len, KV_BLOCK)
        state = f.cache[f"state_{i}"]
        args = [qv, kv, vv, gl, f.pv[p + "ssm_a"], f.pv[p + "ssm_dt.bias"], f.pos, f.table, state]
        out = self.bb.emit(relax.call_tir_inplace(rec, args, [8, -1], [state.ty, relax.TensorType((T, D), f32)]))
        o = self.bb.emit(relax.TupleGetItem(out, 1))
        o8, osc, osum = self._quantize(T, D, o)
        return self._ternary(f, p + "attn_output", o8, osc, osum, D, D)

    def ffn(self, f: _Frame, i: int, u):
        """Layer ``i``'s gated FFN on ``u [T, D]``: RMSNorm+quantize, gate/up, ``act(gate) · up`` (silu or relu²),
        [RMSNorm (arch bitnet) +] quantize, down → ``y [T, D]``. A mixture of experts: :meth:`moe`."""
        if self.cfg.n_experts:
            return self.moe(f, i, u)
        cfg, T = self.cfg, f.T
        D, F = cfg.d_model, cfg.ffn_hidden
        q8, sc, qs = self._norm_quant(f, f"blk.{i}.ffn_norm.weight", u)
        outs8 = [((T, F), "int8"), ((T,), "float32"), ((T,), "int32")]
        halves = "ffn_gate_up" in stacked(cfg, i, self.gpu)  # one GEMV; the gate reads its halves of [T, 2F]
        if halves:
            gu = self._ternary(f, f"blk.{i}.ffn_gate_up", q8, sc, qs, 2 * F, D, parts=(F, F))
            ins = [gu]
        else:
            ins = [self._ternary(f, f"blk.{i}.ffn_{t}", q8, sc, qs, F, D) for t in ("gate", "up")]
        if self.k.swiglu_quant and cfg.ffn_act == "silu" and not cfg.sub_norms:  # SwiGLU + quantize, one kernel
            name = "swiglu_quantize" + ("_halves" if halves else "")
            glu = self._te(name, functools.partial(self.k.swiglu_quant, halves=halves), T, F)
            h8, hsc, hsum = self._call(glu, ins, outs8)
        else:
            act = f"{cfg.ffn_act}_mul" + ("_halves" if halves else "")
            gate = functools.partial(gk.GATED[cfg.ffn_act], halves=halves)
            hh = self._call(self._te(act, gate, T, F, sched=True), ins, [((T, F), "float32")])
            if cfg.sub_norms:
                h8, hsc, hsum = self._norm_quant(f, f"blk.{i}.ffn_sub_norm.weight", hh, F)
            else:
                h8, hsc, hsum = self._quantize(T, F, hh)
        return self._ternary(f, f"blk.{i}.ffn_down", h8, hsc, hsum, D, F)

    def moe(self, f: _Frame, i: int, u):
        """Layer ``i``'s mixture of experts (:class:`model.moe.MoEFFN`) on ``u [T, D]``: the RMSNorm and the router
        (:func:`graph_kernels.router_logits` in float64, :func:`graph_kernels.router_topk`: each row's top ``k``
        experts and their weights), RMSNorm+quantize once; per slot (row ``t``'s ``j``-th expert) that expert's gate
        and up in one pass (stacked rows), SwiGLU and quantize, its down; then the slots' outputs weighted and summed
        in slot order (:func:`graph_kernels.moe_combine`) → ``y [T, D]``. A slot reads only its expert's matrices:

        * CPU (the table's ``experts`` is None): the tuned ``gemv_i8`` with ``E`` experts, once per slot, the expert a
          scalar argument (the router's ids read on the host through a shape: ``tensor_to_shape``, free on a CPU);
        * CUDA (``experts``: :func:`graph_kernels_gpu.experts_dp4a`): every slot in one kernel, the ids read on the
          device (the step stays one CUDA graph), and SwiGLU + quantize as one kernel.

        Every row is computed on its own, so a row's result does not depend on the batch; a prefill chunk reads each
        row's experts once per row."""
        cfg, T, f32 = self.cfg, f.T, "float32"
        D, F, E, k = cfg.d_model, cfg.ffn_hidden, cfg.n_experts, cfg.n_experts_used
        S, p = T * k, f"blk.{i}."
        hn = self._call(self._rmsnorm(T, D), [u, f.pv[p + "ffn_norm.weight"]], [((T, D), f32)])
        lg = self._call(self._te("router_logits", gk.router_logits, T, D, E), [hn, f.pv[p + "ffn_gate_inp.weight"]],
                        [((T, E), "float64")])  # fmt: skip
        ids, w = self._call(self._te("router_topk", self.k.router_topk, T, E, k), [lg],
                            [((T, k), "int32"), ((T, k), f32)])  # fmt: skip
        q8, sc, qs = self._norm_quant(f, p + "ffn_norm.weight", u)
        if self.k.experts:  # every slot in one kernel, the ids on the device
            slots = self._reshape(ids, (S,))
            gu = self._experts_all(f, p + "ffn_gate_up_exps", q8, sc, qs, slots, 2 * F, D, 2)
            h8, hsc, hsum = self._call(self._te("swiglu_quantize_halves", lambda n, m: self.k.swiglu_quant(
                n, m, halves=True), S, F), [gu], [((S, F), "int8"), ((S,), f32), ((S,), "int32")])  # fmt: skip
            Y = self._experts_all(f, p + "ffn_down_exps", h8, hsc, hsum, slots, D, F, 1)
        else:  # the tuned GEMV once per slot, the expert a scalar read on the host
            Y = self._experts_per_slot(f, p, q8, sc, qs, ids)
        return self._call(self._te("moe_combine", gk.moe_combine, T, k, D), [self._reshape(Y, (T, k, D)), w],
                          [((T, D), f32)])  # fmt: skip

    def _experts_per_slot(self, f: _Frame, p: str, q8, sc, qs, ids):
        """A block's experts by the tuned GEMV, once per slot (see :meth:`moe`) → ``[T·k, D]``."""
        from tvm import relax, tirx

        cfg, T, bb, f32 = self.cfg, f.T, self.bb, "float32"
        D, F, k = cfg.d_model, cfg.ffn_hidden, cfg.n_experts_used
        S = T * k
        picks = [tirx.Var(f"expert_{p.replace('.', '_')}{n}", "int64") for n in range(S)]
        bb.match_cast(bb.emit(relax.op.tensor_to_shape(self._reshape(bb.emit(relax.op.astype(ids, "int64")), (S,)))),
                      relax.ShapeType(picks))  # fmt: skip
        gate_up = [self._expert(f, p + "ffn_gate_up_exps", q8, sc, qs, s // k, 2 * F, D, picks[s], 2)
                   for s in range(S)]  # fmt: skip
        gu = gate_up[0] if S == 1 else bb.emit(relax.op.concat(gate_up, axis=0))  # [S, 2F]
        glu = self._te("silu_mul_halves", functools.partial(gk.silu_mul, halves=True), S, F, sched=True)
        hh = self._call(glu, [gu], [((S, F), f32)])
        h8, hsc, hsum = self._quantize(S, F, hh)
        ys = [self._expert(f, p + "ffn_down_exps", h8, hsc, hsum, s, D, F, picks[s], 1) for s in range(S)]
        return ys[0] if S == 1 else bb.emit(relax.op.concat(ys, axis=0))

    def _experts_all(self, f: _Frame, name: str, x8, sc, qs, slots, M: int, K: int, parts: int):
        """``[S, M]``: every slot's expert of the stack ``name`` times its activation row, in one kernel (the table's
        ``experts``, e.g. :func:`graph_kernels_gpu.experts_dp4a`; ``x8 [X, K]`` int8, ``X`` = tokens or slots)."""
        from tvm import relax

        X, S, E = int(x8.ty.shape[0]), int(slots.ty.shape[0]), self.cfg.n_experts
        x4 = self.bb.emit(relax.op.memory.view(x8, (X, K // 4), "int32"))
        gv = self._te("experts", self.k.experts, S, M, K, E, parts, X)
        return self._call(gv, [f.pv[f"{name}.weight"], x4, qs, sc, f.pv[f"{name}.scale"], slots], [((S, M), "float32")])

    def _expert(self, f: _Frame, name: str, x8, sc, qs, row: int, M: int, K: int, e, parts: int):
        """``[1, M]``: expert ``e`` (a shape variable) of the stack ``name`` (``parts`` matrices stacked along its rows)
        times row ``row`` of the int8 activations ``x8 [X, K]`` (the kernel reads the row: no slice is made)."""
        from tvm import relax

        X = int(x8.ty.shape[0])
        gv, _ = self._op(self.k.gemv, M=M, K=K, tile=self.k.tile(M), E=self.cfg.n_experts, P=parts, X=X)
        args = [f.pv[f"{name}.weight"], x8, qs, sc, f.pv[f"{name}.scale"], relax.prim_value(e), relax.prim_value(row)]
        y = self.bb.emit(relax.call_tir(gv, args, relax.TensorType((M,), "float32")))
        return self._reshape(y, (1, M))

    def mhc_site(self, f: _Frame, site: int, x, X, y, next_norm: str | None = None):
        """mHC site ``site`` (``2i``: after layer i's attention, ``2i + 1``: after its FFN): mixes the block output
        ``y`` into the residual streams ``X`` (the first site expands the embedding ``x`` instead, the last collapses
        them) and aggregates the next block's input. Returns the new streams (``X`` after the last) and that input.
        ``next_norm``: the weight of the RMSNorm the next block applies first; where the table has ``mhc_norm`` (decode
        rows: one token, a batch, a verify step) the site computes that norm's int8 codes too and leaves them in
        ``f.normed`` for :meth:`_norm_quant`."""
        D, S, T, f32 = self.cfg.d_model, self.cfg.n_streams, f.T, "float32"
        first, lst = site == 0, site == 2 * self.cfg.n_layers - 1
        coef = [f.pv[_site_param(site, "h_res")], f.pv[_site_param(site, "h_post")]]
        if not lst:
            coef.append(f.pv[_site_param(site + 1, "h_pre")])
        if f.batch and not lst and next_norm and self.k.mhc_norm:  # decode rows: the site and the next norm, one kernel
            eps = self.cfg.norm_eps
            gv = self._te("mhc_post_norm", lambda t, *a: self.k.mhc_norm(*a, eps=eps, T=t), T, D, S, int(first))
            xin = self._reshape(x if first else X, (T, 1 if first else S, D))  # one row: X is [S, D]
            outs = [((T, S, D), f32), ((T, D), f32), ((T, D), "int8"), ((T,), f32), ((T,), "int32")]
            Xn, u, *codes = self._call(gv, [xin, self._reshape(y, (T, D)), *coef, f.pv[next_norm]], outs)
            f.normed[next_norm] = (u, tuple(codes))
            return (self._reshape(Xn, (S, D)) if T == 1 else Xn), u
        if T == 1:  # decode: the tuned site op
            gv, _ = self._op("mhc_post", D=D, S=S, first=int(first), last=int(lst))
            xin = self._reshape(x, (1, D) if self.k.mhc_x_row else (D,)) if first else X
            outs = ([] if lst else [((S, D), f32)]) + [((D,), f32), ((1,), f32)]
            r = self._call(gv, [xin, self._reshape(y, (D,)), *coef], outs)
            return (X if lst else r[0]), self._reshape(r[-2], (1, D))
        gv = self._te(
            "mhc_post_tokens", lambda *a: gk.mhc_post_tokens(*a[:3], bool(a[3]), bool(a[4])),
            T, D, S, int(first), int(lst),
        )  # fmt: skip
        outs = ([] if lst else [((T, S, D), f32)]) + [((T, D), f32)]
        r = self._call(gv, [x if first else X, y, *coef], outs)
        return (X, r) if lst else (r[0], r[1])

    def head(self, f: _Frame, u, last, dst: dict):
        """Final RMSNorm, then the LM head → ``(logits, hidden)``, written into the caller's ``dst["logits"]`` and
        ``dst["hidden"]`` (with MTP heads): ``[T, V]`` and the normed hidden states ``[T, D]`` (a decode batch) or,
        of the row ``last`` only, ``[1, V]`` and ``[1, D]`` (prefill)."""
        from tvm import relax

        D, V, f32 = self.cfg.d_model, self.cfg.vocab_size, "float32"
        rows = f.T
        if last is not None:  # the norm is per row: only the last row's is needed
            u, rows = self.bb.emit(relax.op.take(u, last, axis=0, mode="clip")), 1
        norm = [u, f.pv["output_norm.weight"]]
        if "hidden" in dst:
            hn = self._into(self._rmsnorm(rows, D), norm, dst["hidden"])
        else:
            hn = self._call(self._rmsnorm(rows, D), norm, [((rows, D), f32)])
        if self.head_i8:
            head = self._te("lm_head_i8", lambda B: gk.lm_head_i8(B, V, D), rows)
            h8, a, hsum = self._quantize(rows, D, hn)
            return self._into(head, [h8, a, hsum, f.pv["lm_head.weight"], f.pv["lm_head.scale"]], dst["logits"]), hn
        gv = self._te("lm_head", lambda B: self.k.lm_head(B, V, D, self.head_dtype), rows)
        if self.head_dtype != "int8":
            return self._into(gv, [hn, f.pv["lm_head.weight"]], dst["logits"]), hn
        raw = self._call(gv, [hn, f.pv["lm_head.weight"]], [((rows, V), f32)])
        scaled = self._te("scale_columns", gk.scale_columns, rows, V, sched=True)
        return self._into(scaled, [raw, f.pv["lm_head.scale"]], dst["logits"]), hn

    def draft(self, B: int, heads: int):
        """``draft{heads}_b{B}(hidden float32[B, D], token int32[B], drafts int32[heads, B], *draft_params)`` (the
        parameters of :func:`draft_specs` only: a Relax VM call checks every argument): ``heads`` greedy draft tokens
        for each of ``B`` sequences from the model's recurrent multi-token-prediction heads
        (:class:`model.transformer.MTPHead`). ``hidden`` is the normed hidden state that ``decode_b{B}``/``prefill``
        returned beside the logits and ``token`` the token picked from those logits; step ``k`` computes ``g = g +
        silu(P_k g + Q_k norm_k(emb(token)))`` (each input int8-quantized for its ternary matrix), the logits
        ``lm_head(g)`` over the ids ``0 .. Vd - 1`` (:func:`draft_vocab`) and their argmax, the next step's token,
        written into ``drafts[k]``."""
        g, tok = _var("hidden", (B, self.cfg.d_model), "float32"), _var("token", (B,), "int32")
        (spec,) = output_specs(self.cfg, f"draft{heads}_b{B}", B)
        dst = _var(spec.name, spec.shape, spec.dtype)
        specs = draft_specs(self.specs())
        pv = {s.name: _var(s.name, s.shape, s.dtype) for s in specs}
        with self.bb.function(f"draft{heads}_b{B}", [g, tok, dst] + [pv[s.name] for s in specs]):
            with self.bb.dataflow():
                toks = self._copy_into(self._draft_steps(_Frame(B, None, None, {}, pv, True), g, tok, heads), dst)
                out = self.bb.emit_output(_results([toks]))
            self.bb.emit_func_output(out)

    def _draft_steps(self, f: _Frame, g, tok, heads: int):
        """``heads`` recurrent draft steps from hidden states ``g [B, D]`` and tokens ``tok [B]`` → ``int32 [heads,
        B]`` (see :meth:`draft`)."""
        from tvm import relax

        cfg, bb, f32, B = self.cfg, self.bb, "float32", f.T
        D, V = cfg.d_model, cfg.vocab_size
        Vd = draft_vocab(V, self.gpu)
        if self.head_i8:
            head = self._te("lm_head_i8_draft", lambda n, r: gk.lm_head_i8(n, V, D, r), B, Vd)
        elif Vd < V:  # the CPU head over the draft vocabulary
            head = self._te("lm_head_draft", lambda n, r: gk.lm_head(n, V, D, self.head_dtype, r), B, Vd)
        else:
            head = self._te("lm_head", lambda n: self.k.lm_head(n, V, D, self.head_dtype), B)
        step = self._te("mtp_residual", gk.mtp_residual, B, D, sched=True)
        pick = self._te("argmax", self.k.argmax, B, Vd)
        toks = []
        for k in range(heads):
            e = self._embed(f, tok, B)
            e = self._call(self._rmsnorm(B, D), [e, f.pv[f"mtp.{k}.embed_norm.weight"]], [((B, D), f32)])
            a = self._ternary(f, f"mtp.{k}.proj", *self._quantize(B, D, g), D, D)
            b = self._ternary(f, f"mtp.{k}.embed_proj", *self._quantize(B, D, e), D, D)
            g = self._call(step, [g, a, b], [((B, D), f32)])
            if self.head_i8:  # the head reads the scales of the rows it computes (the first Vd)
                ins = [*self._quantize(B, D, g), f.pv["lm_head.weight"], f.pv["lm_head.scale"]]
                logits = self._call(head, ins, [((B, Vd), f32)])
            else:
                logits = self._call(head, [g, f.pv["lm_head.weight"]], [((B, Vd), f32)])
            if self.head_dtype == "int8" and not self.head_i8:  # the scales of the draft vocabulary's rows
                scale = self.bb.emit(relax.op.strided_slice(f.pv["lm_head.scale"], axes=[0], begin=[0], end=[Vd]))
                sc = self._te("scale_columns", gk.scale_columns, B, Vd, sched=True)
                logits = self._call(sc, [logits, scale], [((B, Vd), f32)])
            tok = self._call(pick, [logits], [((B,), "int32"), ((B,), f32)])[0]
            toks.append(self._reshape(tok, (1, B)))
        return toks[0] if heads == 1 else bb.emit(relax.op.concat(toks, axis=0))

    def _chain_advance(self, logits, bias, samp, toks, pos, ring):
        """``chain_b1``'s last step: the argmax of ``logits [1, V] + bias`` (the first maximum; the caller's ``bias
        [V]`` puts ``-inf`` at ids never picked; with ``samp = (1/T, seed)``, ``1/T > 0``, of ``logits/T + bias`` plus
        Gumbel noise of ``seed`` and the position: :func:`compiler.graph_kernels.argmax`) becomes the token of the next
        call at the next position, written into the caller's ``toks`` and ``pos``, and is appended to the caller's
        ``ring`` (:func:`compiler.graph_kernels.chain_advance`) → the updated ``[ring, toks, pos]``. So calls can be
        queued back to back with nothing from the host between them (``runtime.engine.Engine.chain``)."""
        from tvm import relax

        V = self.cfg.vocab_size
        pick = self._te("argmax_sampled", lambda b, v: self.k.argmax(b, v, sampled=True), 1, V)
        at = self._call(pick, [logits, bias, samp, pos], [((1,), "int32"), ((1,), "float32")])[0]
        gv = self._te("chain_advance", lambda r: gk.chain_advance(r, self.gpu), CHAIN_RING)
        tys = [t.ty for t in (toks, pos, ring)]
        r = self.bb.emit(relax.call_tir_inplace(gv, [at, toks, pos, ring], [1, 2, 3], tys))
        return [self.bb.emit(relax.TupleGetItem(r, i)) for i in (2, 0, 1)]

    def _spec_advance(self, f: _Frame, logits, hn, bias, samp, toks, pos, ring):
        """``spec_chain_b{T}``'s last steps. Its rows are one sequence's last token and ``K = T - 1`` drafts at
        consecutive positions (a speculative verify step); each row's pick is ``chain_b1``'s (the first maximum of
        ``logits + bias``, or with ``samp`` a Gumbel-max draw keyed by the row's position). The drafts are accepted
        while they equal the picks, and the picks up to the first mismatch are the step's tokens
        (:func:`compiler.graph_kernels.spec_advance`: ring, next token, positions). The hidden state of the last
        accepted row and the pick after it feed the MTP heads (:meth:`_draft_steps`), whose ``K`` drafts become the
        next call's rows. So every call yields 1 .. T tokens, exactly those of ``chain_b1`` (greedy: of plain
        decoding), with nothing from the host between calls (``runtime.engine.Engine.chain``)."""
        from tvm import relax

        T, V, K = f.T, self.cfg.vocab_size, f.T - 1
        pick = self._te("argmax_sampled", lambda b, v: self.k.argmax(b, v, sampled=True), T, V)
        at = self._call(pick, [logits, bias, samp, pos], [((T,), "int32"), ((T,), "float32")])[0]
        gv = self._te("spec_advance", lambda t, r: gk.spec_advance(t, r, self.gpu), T, CHAIN_RING)
        tys = [toks.ty, pos.ty, ring.ty, relax.TensorType((1,), "int32")]
        r = self.bb.emit(relax.call_tir_inplace(gv, [at, toks, pos, ring], [1, 2, 3, -1], tys))
        toks, pos, ring, sel = (self.bb.emit(relax.TupleGetItem(r, i)) for i in range(4))
        h = self.bb.emit(relax.op.take(hn, sel, axis=0, mode="clip"))  # [1, D]: the last accepted row's
        nxt = self.bb.emit(relax.op.strided_slice(toks, axes=[0], begin=[0], end=[1]))
        drafts = self._draft_steps(_Frame(1, None, None, {}, f.pv, True), h, nxt, K)
        put = self._te("spec_drafts", lambda t: gk.spec_drafts(t, self.gpu), T)
        toks = self.bb.emit(relax.call_tir_inplace(put, [drafts, toks], [1], toks.ty))
        return [ring, toks, pos]

    # --- steps shared by the blocks --------------------------------------------------------------------------
    def _norm_quant(self, f: _Frame, weight: str, u, D: int | None = None):
        """RMSNorm + per-token int8 quantize of ``u [T, D]`` (a block input, or a sub-norm's) → ``(q8 [T, D], scale
        [T], row sums [T])``. A decode batch's kernel takes the one-token kernel's knobs: a row's ``Σx²`` is then
        summed in the same order whatever the batch (the exactness of batching)."""
        done = f.normed.get(weight)
        if done is not None and done[0] is u:  # the site before computed it (mhc_site's next_norm)
            return done[1]
        D, T, eps = D or self.cfg.d_model, f.T, self.cfg.norm_eps
        like = {"like": make_op("rmsnorm_quant", D=D, N=1, eps=eps), "mode": "like"} if f.batch and T > 1 else {}
        gv, _ = self._op("rmsnorm_quant", D=D, N=T, eps=eps, **like)
        return self._call(gv, [u, f.pv[weight]], [((T, D), "int8"), ((T,), "float32"), ((T,), "int32")])

    def _quantize(self, T: int, K: int, x):
        """Per-token int8 quantize of an o/down projection input → ``(q8 [T, K], scale [T], row sums [T])``."""
        gv = self._te("quantize", self.k.quantize, T, K)
        return self._call(gv, [x], [((T, K), "int8"), ((T,), "float32"), ((T,), "int32")])

    def _ternary(self, f: _Frame, name: str, q8, sc, qs, M: int, K: int, parts: tuple[int, ...] = ()):
        """``y [T, M]``: the ternary matrix ``name`` (``blk.{i}.{t}``, ``mtp.{k}.proj``) times the int8 activations
        ``q8 [T, K]`` (scale ``sc``, row sums ``qs``), by the table's GEMV (one row) or GEMM (prefill, batches);
        ``parts``: the row counts of a :func:`stacked` matrix, a scale each."""
        from tvm import relax

        k, T = self.k, f.T
        W, ws = f.pv[f"{name}.weight"], f.pv[f"{name}.scale"]
        width = K // 4 if k.x_words else K
        if k.x_words:  # e.g. dp4a reads the int8 activations as int32 words: a view, no copy
            q8 = self.bb.emit(relax.op.memory.view(q8, (T, width), "int32"))
        dims = {"M": M, "K": K} | ({"tile": k.tile(M)} if k.tile else {}) | ({"parts": parts} if parts else {})

        def args(x, s, q):
            return [W, x, *([q] if k.x_sum else []), s, ws]

        if T > 1 and self.amx and k.name == "tile8" and amx_pays(T, K):
            gv, _ = self._op("gemm_i8_amx", N=T, **dims)
            return self._call(gv, args(q8, sc, qs), [((T, M), "float32")])
        if T > 1:  # a GEMM without its own record borrows the knobs of the tuned chunk's (an AMX build's chunk differs)
            like = {"like": make_op(k.gemm, N=k.prefill_chunk, **dims)} if T != k.prefill_chunk else {}
            gv, _ = self._op(k.gemm, N=T, **dims, **like)
            return self._call(gv, args(q8, sc, qs), [((T, M), "float32")])
        gv, _ = self._op(k.gemv, **dims)
        return self._reshape(self._call(gv, args(self._reshape(q8, (width,)), sc, qs), [((M,), "float32")]), (1, M))

    # --- kernels -----------------------------------------------------------------------------------------------
    def _op(self, kind: str, like=None, mode: str = "auto", **dims):
        """The kernel of a tuned operator: the table's fixed kernel, else the tuning record (or hand schedule);
        ``like``/``mode``: see :func:`compiler.schedule.get_primfunc`."""
        from compiler.schedule import get_primfunc

        op = make_op(kind, **dims)
        self.op_flags.update(getattr(op, "cpu_flags", ()))
        if op.func_name not in self._gv:
            if kind in self.k.fixed:  # compiler.build gives it a fixed CUDA schedule (schedules.cuda.rows)
                self.kernels[op.key] = "fixed"
                func = self.k.fixed[kind](op)
            elif kind == "gemm_i8_amx":  # scheduled by hand, no tuning record
                self.kernels[op.key] = "fixed"
                func = op.kernel(self.cores).with_attr("op_pattern", 8)
            else:
                sf = get_primfunc(op, self.target, self.logs_root, mode=mode, cores=self.cores, like=like)
                self.kernels[op.key] = sf.source
                log.info("  kernel %-40s %s", op.key, sf.source.upper() if sf.source != "tuned" else "tuned")
                func = sf.for_relax()
            self._gv[op.func_name] = self.bb.add_func(func, op.func_name)
        return self._gv[op.func_name], op

    def _te(self, name: str, builder, *args, sched: bool = False):
        """A small graph kernel ``builder(*args)``, added once per shape (``sched``: an elementwise one that the
        table's target schedules here)."""
        key = f"{name}_" + "_".join(str(int(a)) for a in args)
        if key not in self._gv:
            f = builder(*args)
            if sched and self.k.schedule_small:
                f = gk.schedule(f, self._target())
            self._gv[key] = self.bb.add_func(f, key)
        return self._gv[key]

    def _rmsnorm(self, T, D):
        key = f"rmsnorm_{T}_{D}"
        if key not in self._gv:
            self._gv[key] = self.bb.add_func(gk.rmsnorm(T, D, self.cfg.norm_eps), key)
        return self._gv[key]

    def _target(self):
        if self._tgt is None:
            from targets import get_target

            self._tgt = get_target(self.target)
        return self._tgt

    def _call(self, gv, args, outs):
        from tvm import relax

        tys = [relax.TensorType(s, d) for s, d in outs]
        r = self.bb.emit(relax.call_tir(gv, args, tys if len(tys) > 1 else tys[0]))
        if len(tys) == 1:
            return r
        return [self.bb.emit(relax.TupleGetItem(r, i)) for i in range(len(tys))]

    def _into(self, gv, args, dst):
        """``gv(*args, dst)``, its one output written into ``dst`` in place (a result the caller passed in): the
        kernel needs no output allocation, so a CUDA graph can capture it."""
        from tvm import relax

        return self.bb.emit(relax.call_tir_inplace(gv, [*args, dst], [len(args)], dst.ty))

    def _copy_into(self, src, dst):
        """``src`` copied into the caller's ``dst`` (of the same shape and dtype)."""
        shape, dtype = [int(d) for d in dst.ty.shape], str(dst.ty.dtype)
        copy = self._te(f"copy_{dtype}", lambda *d: gk.copy(d, dtype), *shape, sched=True)
        return self._into(copy, [src], dst)

    def _reshape(self, x, shape):
        from tvm import relax

        return self.bb.emit(relax.op.reshape(x, shape))

    def cpu_flags(self) -> list[str]:
        """The CPU flags the module's kernels execute: the target's and its operators' (``meta.json`` ``cpu_flags``,
        checked by :func:`targets.cpu.check_flags`)."""
        from targets import REQUIRED_FLAGS

        return sorted(set(REQUIRED_FLAGS.get(self.target, ())) | self.op_flags)

    def outputs(self) -> dict[str, list]:
        """Per function built, its results' ``[shape, dtype]`` (:func:`output_specs`), for ``meta.json``."""
        bs, m = self.k.batch_sizes, self.cfg.mtp_heads
        names = [f"decode_b{b}" for b in bs] + ([f"verify_b{b}" for b in bs] if m and self.k.fused_draft else [])
        names += [f"draft{k}_b{b}" for b in bs for k in range(1, m + 1)] + ["chain_b1"]
        names += [f"spec_chain_b{t}" for t in spec_chain_rows(self.cfg)]
        return {n: [[list(s.shape), s.dtype] for s in output_specs(self.cfg, n, _rows(n, self.chunk))]
                for n in [*names, "prefill", "prefill_kv"]}  # fmt: skip

    def specs(self) -> list[ParamSpec]:
        return param_specs(self.cfg, self.embed_dtype, self.head_dtype, self.gpu, self.weights, self.head_step)
