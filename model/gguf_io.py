"""The GGUF contract of the ``bitnet-mhc`` architecture (and of llama.cpp's ``bitnet`` and ternary ``llama``): a writer
(via the ``gguf`` package) and a validating reader.

One .gguf file is self-contained: hyperparameters, tokenizer and every weight. The reader is our own strict parser
(numpy + stdlib, no torch, never executes or unpickles anything): it checks magic, version, every length and count
against the bytes that remain (no absurd allocations), keys and their value types, tensor names, shapes, ggml types,
data bounds and finite values, and raises :class:`GGUFError` naming what is wrong. ``gguf.GGUFReader`` and
``gguf-dump`` open our files too.

Contract (GGUF v3, little-endian, alignment 32)
-----------------------------------------------
``general.architecture = "bitnet-mhc"``, ``general.name`` (preset name), ``general.file_type`` (37 = TQ2_0,
36 = TQ1_0), ``general.quantization_version = 2``. Hyperparameters (key → :class:`~model.config.ModelConfig` field):

=========================================================  =========  ==================
``bitnet-mhc.vocab_size``                                  uint32     vocab_size
``bitnet-mhc.context_length``                              uint32     max_seq_len
``bitnet-mhc.embedding_length``                            uint32     d_model
``bitnet-mhc.block_count``                                 uint32     n_layers
``bitnet-mhc.feed_forward_length``                         uint32     ffn_hidden
``bitnet-mhc.attention.head_count`` / ``head_count_kv``    uint32     n_heads / n_kv_heads
``bitnet-mhc.attention.layer_norm_rms_epsilon``            float32    norm_eps
``bitnet-mhc.rope.freq_base``                              float32    rope_theta (GPT-NeoX rotate-half pairing)
``bitnet-mhc.mhc.stream_count``                            uint32     n_streams (1, 2, 4)
``bitnet-mhc.mhc.dynamic``                                 bool       mhc_dynamic (must be false for now)
``bitnet-mhc.tie_embeddings``                              bool       tie_embeddings
``bitnet-mhc.mtp.head_count``                              uint32     mtp_heads
``bitnet-mhc.expert_count`` / ``expert_used_count``        uint32     n_experts / n_experts_used (MoE only)
``bitnet-mhc.attention.kv_lora_rank``                      uint32     kv_lora_rank (MLA only)
``bitnet-mhc.rope.dimension_count``                        uint32     qk_rope_dim (MLA only)
``bitnet-mhc.full_attention_interval``                     uint32     full_attention_interval (DeltaNet only)
=========================================================  =========  ==================

Tokenizer: ``tokenizer.ggml.model = "gpt2"``, ``.pre``, ``.tokens`` (string[vocab_size]), ``.merges`` (string[]),
``.token_type`` (int32[vocab_size]), optional ``.bos_token_id`` / ``.eos_token_id`` / ``.padding_token_id`` /
``.unknown_token_id`` (uint32) and ``tokenizer.chat_template`` (see :mod:`model.tokenizer`).

Tensors (shapes in numpy order ``[rows, cols]``; GGUF lists dims reversed). Ternary = TQ2_0 (or TQ1_0, one type per
file), one per-tensor absmean scale stored in every non-zero block; ``y = W x`` with ``W [out, in]``:

==================================================  =====================  ==========================
``token_embd.weight``                               [vocab, d]             F16 (or F32)
``output.weight`` (only if not tied)                [vocab, d]             F16 (or F32)
``output_norm.weight``                              [d]                    F32
``blk.{i}.attn_norm.weight`` / ``ffn_norm.weight``  [d]                    F32
``blk.{i}.attn_q.weight`` / ``attn_output.weight``  [d, d]                 ternary
``blk.{i}.attn_k.weight`` / ``attn_v.weight``       [n_kv_heads·hd, d]     ternary
``blk.{i}.ffn_gate.weight`` / ``ffn_up.weight``     [ffn, d]               ternary
``blk.{i}.ffn_down.weight``                         [d, ffn]               ternary
``blk.{i}.mhc_{attn,ffn}.pre_logits``               [n]                    F32   (n > 1 only)
``blk.{i}.mhc_{attn,ffn}.post_logits``              [n]                    F32   (n > 1 only)
``blk.{i}.mhc_{attn,ffn}.res_logits``               [1] (n=2) / [24] (n=4) F32   (n > 1 only)
``blk.{i}.ffn_gate_inp.weight`` (MoE: the router)   [n_experts, d]         F32
``blk.{i}.ffn_{gate,up}_exps.weight`` (MoE)         [n_experts, ffn, d]    ternary, a scale per expert
``blk.{i}.ffn_down_exps.weight`` (MoE)              [n_experts, d, ffn]    ternary, a scale per expert
``blk.{i}.attn_q.weight`` (MLA)                     [H·(hd+r), d]          ternary, per head [hd | r]
``blk.{i}.attn_kv_a_mqa.weight`` (MLA)              [c + r, d]             ternary: [latent | rope key]
``blk.{i}.attn_kv_a_norm.weight`` (MLA)             [c]                    F32
``blk.{i}.attn_kv_b.weight`` (MLA)                  [2·H·hd, c]            ternary, per head [k | v]
``blk.{i}.ssm_alpha.weight`` / ``ssm_beta.weight``  [n_kv_heads, d]        F32   (DeltaNet layers)
``blk.{i}.ssm_a`` / ``blk.{i}.ssm_dt.bias``         [n_kv_heads]           F32   (DeltaNet layers)
``mtp.{k}.proj.weight`` / ``embed_proj.weight``     [d, d]                 ternary
``mtp.{k}.embed_norm.weight``                       [d]                    F32
==================================================  =====================  ==========================

A mixture-of-experts file (``expert_count`` > 0; :mod:`model.moe`) has the three ``_exps`` stacks and the router in
place of ``ffn_gate``/``ffn_up``/``ffn_down``, named as llama.cpp names them; the keys are absent from a dense file.
A multi-head latent attention file (``attention.kv_lora_rank`` = c > 0, ``rope.dimension_count`` = r; :mod:`model.mla`)
has ``attn_kv_a_mqa``, ``attn_kv_a_norm`` and ``attn_kv_b`` in place of ``attn_k``/``attn_v`` (llama.cpp's
``deepseek2`` names, without a query compression), and ``attention.head_count_kv`` = ``head_count``.
A gated DeltaNet hybrid (``full_attention_interval`` = n > 0; :mod:`model.deltanet`) has, in each layer ``i`` with
``(i + 1) % n != 0``, the four ``ssm_*`` tensors beside GQA-shaped ``attn_q``/``attn_k``/``attn_v``/``attn_output``.

The mHC logits become coefficients with :func:`model.mhc_static.coefficients` (:meth:`GGUFModel.mhc_coefficients`).

Foreign architectures (``general.architecture = "bitnet"`` or ``"llama"``; ``docs/foreign_models.md``): llama.cpp's
keys (:data:`FOREIGN_HPARAMS`, with its defaults for absent ones; ``rope.dimension_count``, ``attention.key_length``
and ``value_length`` must equal the head size; experts, RoPE scaling and ``rope_freqs.weight`` are refused), the same
tensor names without ``mhc_*``/``mtp.*``, plus ``blk.{i}.attn_sub_norm.weight [d]`` and ``blk.{i}.ffn_sub_norm.weight
[ffn]`` for ``bitnet`` (always tied), whose gate activation is ``bitnet.feed_forward_activation`` (``silu`` when
absent, as llama.cpp computes it; BitNet b1.58 2B-4T is ``relu2``). A ``llama`` file's ``attn_q``/``attn_k`` rows are
stored permuted for llama.cpp's adjacent-pair RoPE (:func:`rope_norm_rows`); :meth:`GGUFModel.ternary` undoes it.

Before anything is parsed, :func:`check_model_file` checks the path (a readable regular file of at most
``MAX_FILE_BYTES`` starting with the GGUF magic and version: never a directory, a device or a FIFO), and
``compiler.cache`` calls it before hashing. :func:`read_gguf` then validates the values, not only the structure: every
hyperparameter named by its key (non-zero counts, finite in-range floats, ``context_length`` between
``model.config.MIN_CONTEXT`` and ``MAX_CONTEXT`` and within the memory its KV cache and RoPE tables imply,
``mhc.dynamic`` false), and the tokenizer (merges name known tokens, special token ids in range).

    python -m model.gguf_io model.gguf          # validate a file and print its config and tensors
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from model.config import ARCHS, ModelConfig, compile_problems, config_problems
from model.mhc_static import MHCCoefficients, coefficients, res_logits_size
from model.ternary import ggml
from model.ternary.checks import QK, TernaryFormatError
from model.ternary.quant import TernaryWeights
from model.tokenizer import TokenizerError, TokenizerSpec

ARCH = "bitnet-mhc"
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_KEY_BYTES = 65535
MAX_ELEMENTS = 1 << 40  # per tensor; far above any model we build, far below overflow
MAX_FILE_BYTES = 64 << 30  # a model file larger than this is refused before it is hashed or mapped
MIN_FILE_BYTES = 24  # magic, version, tensor count, metadata count
MAX_MESSAGE = 500  # characters of a GGUFError (a key read from a corrupt file can be 64 KiB of anything)


class GGUFError(ValueError):
    """A GGUF file that is malformed or does not follow the bitnet-mhc contract; the message says what and where, on
    one line (control characters from the file escaped, at most ``MAX_MESSAGE`` characters: the middle elided)."""

    def __init__(self, message: str) -> None:
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE // 2] + " … " + text[-MAX_MESSAGE // 2 :]
        super().__init__(text)


class ValueType(IntEnum):
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


_SCALAR = {ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
           ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
           ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8"}  # fmt: skip


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    TQ1_0 = int(ggml.TernaryType.TQ1_0)
    TQ2_0 = int(ggml.TernaryType.TQ2_0)
    BF16 = 30


_FLOAT_DTYPES = {GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2")}
# ggml's block-quantized types, allowed for the embedding and the output head only (what llama-quantize writes beside
# TQ1_0/TQ2_0 matrices): dequantized by gguf-py (gguf.quants), then stored as float16 by the build (or int8 rows with
# --head int8). (block size, bytes per block) from gguf.GGML_QUANT_SIZES.
QUANT_EMBED_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K,
                     GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.BF16)  # fmt: skip
EMBED_TYPES = (GGMLType.F32, GGMLType.F16, *QUANT_EMBED_TYPES)
FILE_TYPE = {GGMLType.TQ2_0: 37, GGMLType.TQ1_0: 36}  # llama.cpp's LlamaFileType MOSTLY_TQ2_0 / MOSTLY_TQ1_0

# (key under "<arch>.", ModelConfig field, value type)
HPARAMS: tuple[tuple[str, str, ValueType], ...] = (
    ("vocab_size", "vocab_size", ValueType.UINT32),
    ("context_length", "max_seq_len", ValueType.UINT32),
    ("embedding_length", "d_model", ValueType.UINT32),
    ("block_count", "n_layers", ValueType.UINT32),
    ("feed_forward_length", "ffn_hidden", ValueType.UINT32),
    ("attention.head_count", "n_heads", ValueType.UINT32),
    ("attention.head_count_kv", "n_kv_heads", ValueType.UINT32),
    ("attention.layer_norm_rms_epsilon", "norm_eps", ValueType.FLOAT32),
    ("rope.freq_base", "rope_theta", ValueType.FLOAT32),
    ("mhc.stream_count", "n_streams", ValueType.UINT32),
    ("mhc.dynamic", "mhc_dynamic", ValueType.BOOL),
    ("tie_embeddings", "tie_embeddings", ValueType.BOOL),
    ("mtp.head_count", "mtp_heads", ValueType.UINT32),
)
EXPERT_HPARAMS = (("expert_count", "n_experts"), ("expert_used_count", "n_experts_used"))  # optional (MoE only)
# optional (multi-head latent attention only), as llama.cpp's deepseek2 names them
MLA_HPARAMS = (("attention.kv_lora_rank", "kv_lora_rank"), ("rope.dimension_count", "qk_rope_dim"))
DELTANET_HPARAMS = (("full_attention_interval", "full_attention_interval"),)  # optional (DeltaNet hybrids only)
# llama.cpp's keys for the foreign architectures ("bitnet", "llama"): (key, field, type, default when absent; None:
# required). vocab_size defaults to the tokenizer's size, head_count_kv to head_count; the embeddings are tied when
# the file has no output.weight.
FOREIGN_HPARAMS: tuple[tuple[str, str, ValueType, Any], ...] = (
    ("vocab_size", "vocab_size", ValueType.UINT32, "tokens"),
    ("context_length", "max_seq_len", ValueType.UINT32, None),
    ("embedding_length", "d_model", ValueType.UINT32, None),
    ("block_count", "n_layers", ValueType.UINT32, None),
    ("feed_forward_length", "ffn_hidden", ValueType.UINT32, None),
    ("attention.head_count", "n_heads", ValueType.UINT32, None),
    ("attention.head_count_kv", "n_kv_heads", ValueType.UINT32, "n_heads"),
    ("attention.layer_norm_rms_epsilon", "norm_eps", ValueType.FLOAT32, None),
    ("rope.freq_base", "rope_theta", ValueType.FLOAT32, 10000.0),
)
FOREIGN_ARCHS = tuple(a for a in ARCHS if a != ARCH)
# llama.cpp's bitnet graph gates with silu (the 1bitLLM models); BitNet b1.58 2B-4T uses relu². Our writer says which
# (llama.cpp ignores the key and computes silu); a file without it is read as llama.cpp reads it.
ACT_KEY = "bitnet.feed_forward_activation"
ROPE_NORM_ARCHS = ("llama",)  # llama.cpp rotates adjacent pairs there and permutes attn_q/attn_k rows to match
TOKEN_IDS = {"bos_id": "tokenizer.ggml.bos_token_id", "eos_id": "tokenizer.ggml.eos_token_id",
             "pad_id": "tokenizer.ggml.padding_token_id", "unk_id": "tokenizer.ggml.unknown_token_id"}  # fmt: skip


# --- the tensor contract ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # numpy order
    kind: str  # "ternary", "embed" (F16/F32), "float" (F32)


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a file for ``cfg`` must hold, and nothing else."""
    d, f, kv, v = cfg.d_model, cfg.ffn_hidden, cfg.kv_dim, cfg.vocab_size
    specs = {"token_embd.weight": TensorSpec((v, d), "embed"), "output_norm.weight": TensorSpec((d,), "float")}
    if not cfg.tie_embeddings:
        specs["output.weight"] = TensorSpec((v, d), "embed")
    shapes = {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}  # fmt: skip
    if cfg.mla:  # latent attention (model.mla): q, the latent + shared rope key, its up-projection to k|v per head
        named = cfg.ternary_shapes()
        shapes = {k: v for k, v in shapes.items() if k not in ("attn_q", "attn_k", "attn_v")}
        shapes |= {k: named[k] for k in ("attn_q", "attn_kv_a_mqa", "attn_kv_b")}
    if cfg.n_experts:  # MoE: stacks of experts, and the router
        e = cfg.n_experts
        shapes = {k: v for k, v in shapes.items() if not k.startswith("ffn_")}
        shapes |= {"ffn_gate_exps": (e, f, d), "ffn_up_exps": (e, f, d), "ffn_down_exps": (e, d, f)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        specs[p + "attn_norm.weight"] = specs[p + "ffn_norm.weight"] = TensorSpec((d,), "float")
        specs |= {f"{p}{name}.weight": TensorSpec(shape, "ternary") for name, shape in shapes.items()}
        if cfg.n_experts:
            specs[p + "ffn_gate_inp.weight"] = TensorSpec((cfg.n_experts, d), "float")
        if cfg.mla:
            specs[p + "attn_kv_a_norm.weight"] = TensorSpec((cfg.kv_lora_rank,), "float")
        if cfg.is_deltanet(i):  # model.deltanet: the decay and write-strength projections, A_log and the dt bias
            hk = cfg.n_kv_heads
            specs[p + "ssm_alpha.weight"] = specs[p + "ssm_beta.weight"] = TensorSpec((hk, d), "float")
            specs[p + "ssm_a"] = specs[p + "ssm_dt.bias"] = TensorSpec((hk,), "float")
        if cfg.sub_norms:
            specs[p + "attn_sub_norm.weight"] = TensorSpec((d,), "float")
            specs[p + "ffn_sub_norm.weight"] = TensorSpec((f,), "float")
        if cfg.n_streams > 1:
            for site in ("mhc_attn", "mhc_ffn"):
                specs[f"{p}{site}.pre_logits"] = specs[f"{p}{site}.post_logits"] = TensorSpec((cfg.n_streams,), "float")
                specs[f"{p}{site}.res_logits"] = TensorSpec((res_logits_size(cfg.n_streams),), "float")
    for k in range(cfg.mtp_heads):  # model.transformer.MTPHead
        specs[f"mtp.{k}.proj.weight"] = specs[f"mtp.{k}.embed_proj.weight"] = TensorSpec((d, d), "ternary")
        specs[f"mtp.{k}.embed_norm.weight"] = TensorSpec((d,), "float")
    return specs


# --- writer -------------------------------------------------------------------------------------------------------


def write_gguf(
    path: str | Path,
    config: ModelConfig,
    tensors: dict[str, np.ndarray | TernaryWeights],
    tokenizer: TokenizerSpec,
    ternary_type: GGMLType = GGMLType.TQ2_0,
    embed_type: GGMLType = GGMLType.F16,
    metadata: dict[str, str | int | float | bool] | None = None,
) -> None:
    """Write a bitnet-mhc GGUF. ``tensors`` maps every name of :func:`tensor_specs` to ``TernaryWeights`` (ternary)
    or a float array; ``metadata`` adds free-form keys (str/bool/int → int64/float → float64), e.g. ``training.*``."""
    import gguf

    ternary_type, embed_type = GGMLType(ternary_type), GGMLType(embed_type)
    if ternary_type not in FILE_TYPE or embed_type not in (*_FLOAT_DTYPES, GGMLType.Q8_0):
        raise GGUFError(f"ternary_type must be TQ2_0/TQ1_0 and embed_type F16/F32/Q8_0, got {ternary_type!r}/"
                        f"{embed_type!r}")  # fmt: skip
    specs = tensor_specs(config)
    _check_names(set(tensors), specs)
    try:
        tokenizer.validate()
    except TokenizerError as exc:
        raise GGUFError(str(exc)) from exc
    if len(tokenizer.tokens) != config.vocab_size:
        raise GGUFError(f"tokenizer has {len(tokenizer.tokens)} tokens but vocab_size = {config.vocab_size} "
                        "(use TokenizerSpec.padded)")  # fmt: skip
    arch = config.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(config.name)
    w.add_file_type(FILE_TYPE[ternary_type])
    w.add_quantization_version(2)
    adders = {ValueType.UINT32: w.add_uint32, ValueType.FLOAT32: w.add_float32, ValueType.BOOL: w.add_bool}
    for key, attr, vtype, *_ in HPARAMS if arch == ARCH else FOREIGN_HPARAMS:
        adders[vtype](f"{arch}.{key}", getattr(config, attr))
    if config.n_experts:  # only in MoE files: a dense file stays byte-identical to one written before MoE existed
        for key, attr in EXPERT_HPARAMS:
            w.add_uint32(f"{arch}.{key}", getattr(config, attr))
    if config.mla:  # likewise only in latent-attention files
        for key, attr in MLA_HPARAMS:
            w.add_uint32(f"{arch}.{key}", getattr(config, attr))
    if config.full_attention_interval:  # and in DeltaNet hybrids
        for key, attr in DELTANET_HPARAMS:
            w.add_uint32(f"{arch}.{key}", getattr(config, attr))
    if arch != ARCH:
        w.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
    if arch == "bitnet":
        w.add_string(ACT_KEY, config.ffn_act)
    w.add_tokenizer_model(tokenizer.model)
    w.add_tokenizer_pre(tokenizer.pre)
    w.add_token_list(list(tokenizer.tokens))
    w.add_token_merges(list(tokenizer.merges))
    w.add_token_types(list(tokenizer.token_type))
    for attr, key in TOKEN_IDS.items():
        if getattr(tokenizer, attr) is not None:
            w.add_uint32(key, getattr(tokenizer, attr))
    if tokenizer.chat_template is not None:
        w.add_chat_template(tokenizer.chat_template)
    for key, value in (metadata or {}).items():
        if key.startswith(("general.", "tokenizer.", f"{arch}.")):
            raise GGUFError(f"metadata key {key!r} is reserved by the contract")
        adders = {bool: w.add_bool, int: w.add_int64, float: w.add_float64, str: w.add_string}
        if type(value) not in adders:
            raise GGUFError(f"metadata {key!r}: unsupported value type {type(value).__name__}")
        adders[type(value)](key, value)
    for name, spec in specs.items():
        value = tensors[name]
        if arch in ROPE_NORM_ARCHS and name.endswith(_ROPE_ROWS):  # as llama.cpp's converter stores them
            heads = config.n_heads if name.endswith(_ROPE_ROWS[0]) else config.n_kv_heads
            value = TernaryWeights(codes=rope_norm_rows(value.codes, heads), scale=value.scale)
        arr, qtype = _encode(name, value, spec, ternary_type, embed_type)
        w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_ROPE_ROWS = ("attn_q.weight", "attn_k.weight")


def rope_norm_rows(rows: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """Reorder each head's rows from rotate-half pairing (row ``i`` with ``i + hd/2``: ours, HF's) to adjacent pairs
    (``2i`` with ``2i + 1``: llama.cpp's ``llama`` RoPE), as llama.cpp's converter permutes ``attn_q``/``attn_k``;
    ``inverse`` undoes it. A row permutation: exact for ternary codes."""
    n, rest = rows.shape[0], rows.shape[1:]
    hd = n // heads
    if heads <= 0 or n % heads or hd % 2:
        raise GGUFError(f"cannot split {n} rows into {heads} heads of an even size")
    a, b = (hd // 2, 2) if inverse else (2, hd // 2)
    return np.ascontiguousarray(rows.reshape(heads, a, b, *rest).swapaxes(1, 2).reshape(n, *rest))


def _encode(name, value, spec: TensorSpec, ternary_type: GGMLType, embed_type: GGMLType):
    if spec.kind == "ternary":
        if not isinstance(value, TernaryWeights):
            raise GGUFError(f"{name}: expected TernaryWeights, got {type(value).__name__}")
        if value.codes.shape != spec.shape:
            raise GGUFError(f"{name}: shape {value.codes.shape}, expected {spec.shape}")
        try:
            return ggml.pack(value, ggml.TernaryType(int(ternary_type))), ternary_type
        except TernaryFormatError as exc:
            raise GGUFError(f"{name}: {exc}") from exc
    qtype = embed_type if spec.kind == "embed" else GGMLType.F32
    arr = np.asarray(value)
    if arr.shape != spec.shape:
        raise GGUFError(f"{name}: shape {arr.shape}, expected {spec.shape}")
    if qtype == GGMLType.Q8_0:
        from gguf import GGMLQuantizationType, quants

        arr = np.asarray(arr, np.float32)
        if not np.isfinite(arr).all():
            raise GGUFError(f"{name}: non-finite values")
        return quants.quantize(arr, GGMLQuantizationType.Q8_0), qtype
    with np.errstate(over="ignore"):  # an overflow to inf is reported just below
        arr = np.ascontiguousarray(arr, dtype=_FLOAT_DTYPES[qtype])
    if not np.isfinite(arr).all():
        raise GGUFError(f"{name}: non-finite values in {qtype.name} (overflow?)")
    return arr, qtype


def _check_names(names: set[str], specs: dict[str, TensorSpec]) -> None:
    missing, extra = sorted(set(specs) - names), sorted(names - set(specs))
    if missing or extra:
        raise GGUFError(f"tensor set does not match the config: missing {missing[:5]}{'...' * (len(missing) > 5)}, "
                        f"unexpected {extra[:5]}{'...' * (len(extra) > 5)}")  # fmt: skip


# --- low-level parser ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: numpy-order ``shape``; ``data`` is a read-only view (float array, or raw bytes ``[rows, row_bytes]``
    for TQ2_0/TQ1_0, ready for :func:`model.ternary.layouts.repack_gguf`)."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray

    def ternary(self) -> TernaryWeights:
        if self.ggml_type not in FILE_TYPE:
            raise GGUFError(f"{self.name}: {self.ggml_type.name} is not a ternary type")
        try:
            codes, scales = ggml.unpack(self.data, self.shape[-1], ggml.TernaryType(int(self.ggml_type)))
            tw = ggml.to_ternary(codes, scales)
        except TernaryFormatError as exc:
            raise GGUFError(f"{self.name}: {exc}") from exc
        if not np.isfinite(tw.scale).all():
            raise GGUFError(f"{self.name}: non-finite scale {tw.scale}")
        return tw

    def as_stored(self) -> np.ndarray:
        """An embedding or head as a build keeps it: F16 and F32 as they are (exact), a block-quantized type (Q8_0,
        ...) dequantized and rounded to float16 (≤ 2^-11 relative)."""
        if self.ggml_type in QUANT_EMBED_TYPES:
            return self.to_float().astype(np.float16)
        return np.ascontiguousarray(self.data)

    def to_float(self) -> np.ndarray:
        if self.ggml_type in _FLOAT_DTYPES:
            return self.data.astype(np.float32)
        if self.ggml_type in QUANT_EMBED_TYPES:
            from gguf import GGMLQuantizationType, quants

            try:
                with np.errstate(all="ignore"):  # a corrupt block scale: reported by the caller's finiteness check
                    out = quants.dequantize(self.data, GGMLQuantizationType(int(self.ggml_type)))
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise GGUFError(f"{self.name}: cannot dequantize {self.ggml_type.name}: {exc}") from exc
            return np.asarray(out, np.float32).reshape(self.shape)
        return self.ternary().dequantize()


@dataclass
class GGUFFile:
    version: int
    alignment: int
    metadata: dict[str, Any]
    value_types: dict[str, ValueType]  # the GGUF type of each key (the item type for arrays is in array_types)
    array_types: dict[str, ValueType]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    """Bounds-checked little-endian reads; every length is checked against the bytes that remain."""

    def __init__(self, buf) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.size - self.pos:
            raise GGUFError(f"truncated or corrupt file: {what} needs {n} bytes at offset {self.pos}, "
                            f"{self.size - self.pos} remain")  # fmt: skip
        out = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q", f"{what} length")
        if limit is not None and n > limit:
            raise GGUFError(f"{what}: declared length {n} exceeds {limit}")
        try:
            return str(self.take(n, what), "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{what}: invalid UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, what: str) -> tuple[Any, ValueType | None]:
        """A value of GGUF type ``vtype``; returns (value, item type if an array)."""
        vtype = self.vtype(vtype, what)
        if vtype == ValueType.STRING:
            return self.string(what), None
        if vtype != ValueType.ARRAY:
            raw = self.take(np.dtype(_SCALAR[vtype]).itemsize, what)
            v = np.frombuffer(raw, _SCALAR[vtype])[0].item()
            if vtype == ValueType.BOOL and v not in (0, 1):
                raise GGUFError(f"{what}: bool byte {v} is neither 0 nor 1")
            return (bool(v) if vtype == ValueType.BOOL else v), None
        item = self.vtype(self.unpack("I", f"{what} item type"), f"{what} item")
        count = self.unpack("Q", f"{what} count")
        if item == ValueType.ARRAY:
            raise GGUFError(f"{what}: nested arrays are not part of the contract")
        min_item = 8 if item == ValueType.STRING else np.dtype(_SCALAR[item]).itemsize
        if count > (self.size - self.pos) // min_item:
            raise GGUFError(f"{what}: declared {count} items, more than the {self.size - self.pos} bytes left can hold")
        if item == ValueType.STRING:
            return [self.string(f"{what}[{i}]") for i in range(count)], item
        arr = np.frombuffer(self.take(count * min_item, what), _SCALAR[item]).copy()
        if item == ValueType.BOOL and (arr > 1).any():
            raise GGUFError(f"{what}: bool array holds bytes other than 0/1")
        return arr.astype(bool) if item == ValueType.BOOL else arr, item

    @staticmethod
    def vtype(v: int, what: str) -> ValueType:
        try:
            return ValueType(v)
        except ValueError:
            raise GGUFError(f"{what}: unknown GGUF value type {v}") from None


def _tensor_nbytes(name: str, gtype: GGMLType, ne: list[int]) -> int:
    if gtype in _FLOAT_DTYPES:
        return int(np.prod(ne, dtype=np.int64)) * _FLOAT_DTYPES[gtype].itemsize
    if gtype in QUANT_EMBED_TYPES:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(gtype))]
        if ne[0] % block:
            raise GGUFError(f"tensor {name}: {gtype.name} row length {ne[0]} is not a multiple of {block}")
        return int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * size
    if ne[0] % QK:
        raise GGUFError(f"tensor {name}: {gtype.name} row length {ne[0]} is not a multiple of {QK}")
    rows = int(np.prod(ne[1:], dtype=np.int64))
    return rows * ggml.row_bytes(ne[0], ggml.TernaryType(int(gtype)))


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def check_model_file(path: str | Path) -> Path:
    """``path`` if it can be a GGUF model: a readable regular file of ``MIN_FILE_BYTES`` to ``MAX_FILE_BYTES`` bytes
    that starts with the GGUF magic and version 3; else a one-line :class:`GGUFError`. Reads 8 bytes and never blocks
    (opened non-blocking, so a FIFO cannot stall it): the check to make before a file is hashed, mapped or parsed."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise GGUFError(f"{p}: no such file") from None
    except OSError as exc:
        raise GGUFError(f"{p}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a plain file")
            raise GGUFError(f"{p}: not a regular file ({kind}), expected a .gguf model")
        if st.st_size > MAX_FILE_BYTES:
            raise GGUFError(f"{p}: {st.st_size / 2**30:.1f} GiB is larger than the {MAX_FILE_BYTES >> 30} GiB a "
                            "model file may be")  # fmt: skip
        if st.st_size < MIN_FILE_BYTES:
            raise GGUFError(f"{p}: {'empty' if not st.st_size else f'{st.st_size} bytes'}, too small for a GGUF header")
        try:
            head = os.pread(fd, 8, 0)
        except OSError as exc:
            raise GGUFError(f"{p}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{p}: not a GGUF file: magic {head[:4]!r}, expected {GGUF_MAGIC!r}")
    version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else None
    if version != GGUF_VERSION:
        raise GGUFError(f"{p}: unsupported GGUF version {version} (expected {GGUF_VERSION})")
    return p


def parse_gguf(source: str | Path | bytes) -> GGUFFile:
    """Structural parse of a GGUF v3 file (path → checked by :func:`check_model_file`, then memory-mapped, or bytes);
    tensor data stays zero-copy."""
    if isinstance(source, bytes | bytearray | memoryview):
        buf = bytes(source)
    else:
        path = check_model_file(source)
        try:
            with open(path, "rb") as fh:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: the file was emptied since the check
            raise GGUFError(f"cannot open {source}: {exc}") from exc
    cur = _Cursor(buf)
    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.unpack("I", "version")
    if version != GGUF_VERSION:
        raise GGUFError(f"unsupported GGUF version {version} (expected {GGUF_VERSION})")
    n_tensors, n_kv = cur.unpack("Q", "tensor count"), cur.unpack("Q", "metadata count")
    left = cur.size - cur.pos
    if n_kv > left // 13 or n_tensors > left // 25:  # smallest possible KV pair / tensor info in bytes
        raise GGUFError(f"declared {n_kv} metadata keys and {n_tensors} tensors cannot fit in {cur.size} bytes")
    meta: dict[str, Any] = {}
    vtypes: dict[str, ValueType] = {}
    atypes: dict[str, ValueType] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if key in meta:
            raise GGUFError(f"duplicate metadata key {key!r}")
        vtype = cur.unpack("I", f"{key} type")
        meta[key], item = cur.value(vtype, key)
        vtypes[key] = ValueType(vtype)
        if item is not None:
            atypes[key] = item
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in meta and (vtypes["general.alignment"] != ValueType.UINT32 or alignment <= 0
                                        or alignment & (alignment - 1) or alignment > 1 << 16):  # fmt: skip
        raise GGUFError(f"general.alignment = {alignment!r} must be a uint32 power of two ≤ 65536")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name", MAX_KEY_BYTES)
        n_dims = cur.unpack("I", f"tensor {name} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.unpack("Q", f"tensor {name} dim") for _ in range(n_dims)]
        raw_type = cur.unpack("I", f"tensor {name} type")
        offset = cur.unpack("Q", f"tensor {name} offset")
        if any(n == 0 for n in ne) or any(n > MAX_ELEMENTS for n in ne) or np.prod(ne, dtype=float) > MAX_ELEMENTS:
            raise GGUFError(f"tensor {name}: implausible dims {ne}")
        try:
            gtype = GGMLType(raw_type)
        except ValueError:
            raise GGUFError(f"tensor {name}: ggml type {raw_type} is not one of {[t.name for t in GGMLType]}") from None
        if offset % alignment:
            raise GGUFError(f"tensor {name}: offset {offset} is not aligned to {alignment}")
        infos.append((name, gtype, ne, offset, _tensor_nbytes(name, gtype, ne)))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    spans = []
    for name, gtype, ne, offset, nbytes in infos:
        if name in tensors:
            raise GGUFError(f"duplicate tensor name {name!r}")
        start = data_start + offset
        if start + nbytes > cur.size:
            raise GGUFError(f"tensor {name}: data [{start}, {start + nbytes}) extends past the end of the file "
                            f"({cur.size} bytes): truncated?")  # fmt: skip
        shape = tuple(reversed(ne))
        if gtype in _FLOAT_DTYPES:
            dtype = _FLOAT_DTYPES[gtype]
            data = np.frombuffer(buf, dtype, nbytes // dtype.itemsize, start).reshape(shape)
        else:  # raw blocks, one row of bytes per row of weights
            data = np.frombuffer(buf, np.uint8, nbytes, start).reshape(*shape[:-1], -1)
        tensors[name] = GGUFTensor(name, gtype, shape, data)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise GGUFError(f"tensors {a} and {b} overlap in the file")
    return GGUFFile(version, alignment, meta, vtypes, atypes, tensors)


# --- contract-level reader ----------------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    """A validated bitnet-mhc file: config, tokenizer and tensors (see the module docstring for names)."""

    config: ModelConfig
    tokenizer: TokenizerSpec
    tensors: dict[str, GGUFTensor]
    ternary_type: GGMLType
    metadata: dict[str, Any] = field(repr=False)

    def ternary(self, name: str) -> TernaryWeights:
        """A ternary tensor's codes and scale, its rows in rotate-half RoPE order (a ``llama`` file's ``attn_q`` and
        ``attn_k`` rows are stored permuted for llama.cpp's adjacent-pair RoPE: undone here)."""
        tw = self.tensors[name].ternary()
        if self.config.arch in ROPE_NORM_ARCHS and name.endswith(_ROPE_ROWS):
            heads = self.config.n_heads if name.endswith(_ROPE_ROWS[0]) else self.config.n_kv_heads
            tw = TernaryWeights(codes=rope_norm_rows(tw.codes, heads, inverse=True), scale=tw.scale)
        return tw

    def model_tensors(self) -> dict[str, np.ndarray | TernaryWeights]:
        """What :meth:`model.transformer.Transformer.from_gguf_tensors` takes: ternaries as ``TernaryWeights``."""
        specs = tensor_specs(self.config)
        return {n: (self.ternary(n) if specs[n].kind == "ternary" else t.to_float()) for n, t in self.tensors.items()}

    def mhc_coefficients(self) -> list[MHCCoefficients]:
        """Static ``(h_pre, h_post, H_res)`` per site in execution order (block 0 attn, block 0 FFN, ...)."""
        out = []
        for i in range(self.config.n_layers):
            for site in ("mhc_attn", "mhc_ffn"):
                if self.config.n_streams == 1:
                    one = np.ones(1, np.float32)
                    out.append(MHCCoefficients(one, one, one.reshape(1, 1)))
                    continue
                logits = [self.tensors[f"blk.{i}.{site}.{k}_logits"].data for k in ("pre", "post", "res")]
                out.append(coefficients(*logits))
        return out


def _get(f: GGUFFile, key: str, vtype: ValueType, item: ValueType | None = None, required: bool = True):
    if key not in f.metadata:
        if required:
            raise GGUFError(f"missing metadata key {key!r}")
        return None
    if f.value_types[key] != vtype or (item is not None and f.array_types.get(key) != item):
        got = f.value_types[key].name + (f"[{f.array_types[key].name}]" if key in f.array_types else "")
        want = vtype.name + (f"[{item.name}]" if item is not None else "")
        raise GGUFError(f"metadata {key!r} has type {got}, expected {want}")
    return f.metadata[key]


def _float32_value(v: float) -> float:
    return float(str(np.float32(v)))  # shortest decimal: 1e-5 comes back as 1e-5, not 9.99999974e-06


def read_gguf(source: str | Path | bytes, check_values: bool = True) -> GGUFModel:
    """Parse and validate a bitnet-mhc GGUF. ``check_values`` also decodes every ternary tensor (codes, one scale)
    and checks every float for NaN/inf (O(size); turn it off only for files already validated)."""
    f = parse_gguf(source)
    arch = _get(f, "general.architecture", ValueType.STRING)
    if arch not in ARCHS:
        raise GGUFError(f"general.architecture = {arch!r}; supported: {', '.join(ARCHS)}")
    fields: dict[str, Any] = {"name": _get(f, "general.name", ValueType.STRING, required=False) or "custom"}
    fields |= _own_fields(f) if arch == ARCH else _foreign_fields(f, arch)
    _check_config(config_problems(SimpleNamespace(**fields)), arch)  # before ModelConfig raises, to name the keys
    config = ModelConfig(**fields)
    n_tensors, per_block = _tensor_count(config)
    if n_tensors > len(f.tensors) + per_block:  # before tensor_specs: a huge block_count must not build a huge dict
        raise GGUFError(f"{arch}.block_count = {config.n_layers} (and mtp.head_count = {config.mtp_heads}) implies "
                        f"{n_tensors} tensors, the file has {len(f.tensors)}")  # fmt: skip
    _check_config(compile_problems(config), arch)
    tok = _read_tokenizer(f, config)
    specs = tensor_specs(config)
    _check_names(set(f.tensors), specs)
    ternary_types = {t.ggml_type for n, t in f.tensors.items() if specs[n].kind == "ternary"}
    if len(ternary_types) > 1 or ternary_types - {GGMLType.TQ2_0, GGMLType.TQ1_0}:
        raise GGUFError(
            f"ternary tensors must all be TQ2_0 or all TQ1_0, found {sorted(t.name for t in ternary_types)}"
        )
    for name, spec in specs.items():
        t = f.tensors[name]
        if t.shape != spec.shape:
            raise GGUFError(f"tensor {name}: shape {t.shape}, expected {spec.shape}")
        allowed = {"float": {GGMLType.F32}, "embed": set(EMBED_TYPES)}.get(spec.kind, ternary_types)
        if t.ggml_type not in allowed:
            raise GGUFError(
                f"tensor {name}: type {t.ggml_type.name}, expected one of {sorted(a.name for a in allowed)}"
            )
        if check_values:
            if spec.kind == "ternary":
                t.ternary()
            elif not np.isfinite(t.to_float() if t.ggml_type in QUANT_EMBED_TYPES else t.data).all():
                raise GGUFError(f"tensor {name}: non-finite values (NaN or inf)")
    ternary_type = ternary_types.pop() if ternary_types else GGMLType.TQ2_0
    file_type = _get(f, "general.file_type", ValueType.UINT32, required=False)
    if file_type is not None and file_type != FILE_TYPE[ternary_type]:
        raise GGUFError(f"general.file_type = {file_type}, but the ternary tensors are {ternary_type.name} "
                        f"(file type {FILE_TYPE[ternary_type]})")  # fmt: skip
    quant_version = _get(f, "general.quantization_version", ValueType.UINT32, required=False)
    if quant_version not in (None, 2):
        raise GGUFError(f"general.quantization_version = {quant_version}, expected 2")
    return GGUFModel(config, tok, f.tensors, ternary_type, f.metadata)


def _own_fields(f: GGUFFile) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, attr, vtype in HPARAMS:
        v = _get(f, f"{ARCH}.{key}", vtype)
        if vtype == ValueType.UINT32 and v == 0 and attr != "mtp_heads":  # 0 would make ModelConfig derive a value
            raise GGUFError(f"hyperparameter {ARCH}.{key} = 0 must be positive")
        fields[attr] = _float32_value(v) if vtype == ValueType.FLOAT32 else v
    for key, attr in (*EXPERT_HPARAMS, *MLA_HPARAMS, *DELTANET_HPARAMS):
        v = _get(f, f"{ARCH}.{key}", ValueType.UINT32, required=False)
        if v is not None:
            fields[attr] = v
    if fields.get("kv_lora_rank") and not fields.get("qk_rope_dim"):  # 0 would make ModelConfig derive a value
        raise GGUFError(f"hyperparameter {ARCH}.rope.dimension_count is required (and positive) with "
                        f"{ARCH}.attention.kv_lora_rank")  # fmt: skip
    return fields


def _foreign_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    """The config of a llama.cpp ``bitnet``/``llama`` file, refusing what the compiled graph does not do (experts,
    RoPE scaling, a partial rotary dimension, head sizes other than d / heads)."""
    act = _get(f, ACT_KEY, ValueType.STRING, required=False) if arch == "bitnet" else None
    fields: dict[str, Any] = {"arch": arch, "n_streams": 1, "mhc_dynamic": False, "mtp_heads": 0,
                              "ffn_act": act or "silu", "tie_embeddings": "output.weight" not in f.tensors}  # fmt: skip
    for key, attr, vtype, default in FOREIGN_HPARAMS:
        v = _get(f, f"{arch}.{key}", vtype, required=default is None)
        if v is None:
            v = (
                len(f.metadata.get("tokenizer.ggml.tokens") or ())
                if default == "tokens"
                else fields.get(default, default)
            )
        if vtype == ValueType.UINT32 and v == 0:  # 0 would make ModelConfig derive a value
            raise GGUFError(f"hyperparameter {arch}.{key} = 0 must be positive")
        fields[attr] = _float32_value(v) if vtype == ValueType.FLOAT32 else v
    for key in ("expert_count", "expert_used_count"):
        if f.metadata.get(f"{arch}.{key}"):
            raise GGUFError(f"{arch}.{key} = {f.metadata[f'{arch}.{key}']}: mixture-of-experts files are not supported")
    head_dim = fields["d_model"] // fields["n_heads"] if fields["n_heads"] else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        v = f.metadata.get(f"{arch}.{key}")
        if v is not None and v != head_dim:
            raise GGUFError(f"{arch}.{key} = {v}: only a head size (and rotary dimension) of embedding_length / "
                            f"head_count = {head_dim} is supported")  # fmt: skip
    scaling = f.metadata.get(f"{arch}.rope.scaling.type")
    factor = f.metadata.get(f"{arch}.rope.scaling.factor", 1.0)
    if scaling not in (None, "none", "linear") or (scaling == "linear" and factor != 1.0):
        raise GGUFError(f"{arch}.rope.scaling.type = {scaling!r} (factor {factor}): RoPE scaling is not supported")
    if "rope_freqs.weight" in f.tensors:
        raise GGUFError("rope_freqs.weight: per-dimension RoPE frequency factors (Llama 3.1 scaling) are not supported")
    return fields


def _key_of(arch: str, attr: str) -> str:
    if attr == "ffn_act":
        return ACT_KEY
    rows = (*HPARAMS, *EXPERT_HPARAMS, *MLA_HPARAMS, *DELTANET_HPARAMS) if arch == ARCH else FOREIGN_HPARAMS
    return next((f"{arch}.{row[0]}" for row in rows if row[1] == attr), attr)


def _check_config(problems: list[tuple[str, str]], arch: str = ARCH) -> None:
    if problems:
        raise GGUFError("; ".join(f"hyperparameter {_key_of(arch, attr)}: {text}" for attr, text in problems))


def _tensor_count(cfg: ModelConfig) -> tuple[int, int]:
    """``len(tensor_specs(cfg))`` by arithmetic (no dict of block_count entries), and the tensors of one block."""
    per_block = 2 + 7 + (1 if cfg.n_experts else 0) + (6 if cfg.n_streams > 1 else 0) + (2 if cfg.sub_norms else 0)
    per_block += 1 if cfg.mla else 0  # attn_kv_a_norm (q, kv_a_mqa, kv_b, output replace q, k, v, output)
    n = cfg.full_attention_interval
    ssm = 4 * (cfg.n_layers - cfg.n_layers // n) if n else 0  # the ssm_* tensors of the DeltaNet layers
    return 2 + (0 if cfg.tie_embeddings else 1) + cfg.n_layers * per_block + ssm + 3 * cfg.mtp_heads, per_block


def _read_tokenizer(f: GGUFFile, config: ModelConfig) -> TokenizerSpec:
    p = "tokenizer.ggml."
    ids = {attr: _get(f, key, ValueType.UINT32, required=False) for attr, key in TOKEN_IDS.items()}
    types = _get(f, p + "token_type", ValueType.ARRAY, ValueType.INT32)
    spec = TokenizerSpec(
        tokens=tuple(_get(f, p + "tokens", ValueType.ARRAY, ValueType.STRING)),
        merges=tuple(_get(f, p + "merges", ValueType.ARRAY, ValueType.STRING)),
        token_type=tuple(int(t) for t in types),
        model=_get(f, p + "model", ValueType.STRING),
        pre=_get(f, p + "pre", ValueType.STRING, required=False) or "default",
        chat_template=_get(f, "tokenizer.chat_template", ValueType.STRING, required=False),
        extra={k: v for k, v in f.metadata.items() if k.startswith("tokenizer.") and k not in _TOKENIZER_KEYS},
        **ids,
    )
    try:
        spec.validate()
    except TokenizerError as exc:
        raise GGUFError(str(exc)) from exc
    if len(spec.tokens) != config.vocab_size:
        raise GGUFError(f"tokenizer.ggml.tokens has {len(spec.tokens)} entries, vocab_size is {config.vocab_size}")
    return spec


_TOKENIZER_KEYS = (
    {"tokenizer.ggml." + k for k in ("tokens", "merges", "token_type", "model", "pre")}
    | set(TOKEN_IDS.values())
    | {"tokenizer.chat_template"}
)


def main(argv: list[str] | None = None) -> None:
    path = (argv or sys.argv[1:])[0]
    m = read_gguf(path)
    print(m.config)
    print(
        f"tokenizer: {len(m.tokenizer.tokens)} tokens, {len(m.tokenizer.merges)} merges; ternary {m.ternary_type.name}"
    )
    for name, t in m.tensors.items():
        print(f"  {name:32s} {t.ggml_type.name:6s} {t.shape}")


if __name__ == "__main__":
    main()
