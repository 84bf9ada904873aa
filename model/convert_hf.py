"""Import a Hugging Face ``BitNetForCausalLM`` checkpoint (BitNet b1.58, e.g. ``microsoft/bitnet-b1.58-2B-4T``) as a
GGUF of llama.cpp's ``bitnet`` architecture.

The source directory holds ``config.json``, the weights as ``model.safetensors`` or as shards listed by
``model.safetensors.index.json`` (safetensors only: nothing is unpickled), ``tokenizer.json``, and optionally
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``, ``chat_template``) and
``chat_template.jinja`` (newer checkpoints keep the template there; it wins over the one in tokenizer_config.json).

config.json is read as transformers' ``BitNetConfig`` reads it (the defaults of absent fields are its defaults,
:data:`DEFAULTS`). What the ``bitnet`` graph does not compute is refused with a :class:`ConvertError` naming the
config.json field and its value: another architecture, ``hidden_act`` other than ``relu2`` (2B-4T) or ``silu``,
``attention_bias``, ``rope_scaling`` other than none / linear 1.0, a ``head_dim`` other than ``hidden_size /
num_attention_heads``, a ``quantization_config`` whose BitLinear layers differ from the published ones, and sizes that
:func:`model.config.config_problems` refuses (``hidden_size`` and ``intermediate_size`` multiples of 256, ...).
``max_position_embeddings`` becomes the context (``max_seq_len``); ``--context`` shortens it, since the KV cache is
allocated up front (2B-4T says 4096).

The ternary projections come in either published form, detected per tensor by its dtype:

* float master weights (bf16/f16/f32; transformers' online ``AutoBitLinear``): quantized exactly as its
  ``WeightQuant`` does, in float32: ``scale = 1 / max(mean|W|, 1e-5)``, ``codes = clamp(round(W · scale), -1, 1)``,
  tensor scale ``s = 1 / scale``;
* packed (``weight`` uint8 ``[out/4, in]`` + ``weight_scale``): unpacked as transformers' ``unpack_weights`` does
  (row block ``i`` of the output, rows ``i·out/4 .. (i+1)·out/4``, is ``((byte >> 2i) & 3) − 1``). ``BitLinear``
  (``quantization_config.linear_class = "bitlinear"``, the default and 2B-4T's) divides its output by
  ``weight_scale``, so ``s = 1 / weight_scale``; ``AutoBitLinear`` offline multiplies, so ``s = weight_scale``.

The GGUF's TQ2_0/TQ1_0 blocks store the scale as float16, so ``s`` is rounded to float16 here (explicitly, before
:class:`~model.ternary.quant.TernaryWeights` is made): a relative error of at most 2^-11 (4.9e-4) on every weight of the
tensor, the same for all of them (below float16's normal range, 6.1e-5, an absolute error of at most 2^-25). For
comparison, transformers' online path rounds ``codes / scale`` to the checkpoint dtype (bf16: up to 2^-9).
Norms become float32; the embedding is written F16 (``--embed f32`` keeps float32). The LM head is tied
(llama.cpp's ``bitnet`` graph has no ``output.weight``): an ``lm_head.weight`` in a tied checkpoint must equal the
embedding. Q/K rows are not permuted: llama.cpp's ``bitnet`` rotates halves (NEOX RoPE), as HF does.

The tokenizer (Llama 3 byte-level BPE, ``tokenizer.ggml.pre = "llama-bpe"``; special added tokens become control
tokens) goes through :func:`model.tokenizer.spec_from_hf`, padded with unused tokens up to ``vocab_size``.

    python -m model.convert_hf path/to/bitnet-b1.58-2B-4T --out bitnet-2b.gguf [--type tq2_0|tq1_0] \\
        [--embed f16|f32] [--context 4096]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from model.config import FFN_ACTS, MIN_CONTEXT, ModelConfig, config_problems
from model.ternary.quant import SCALE_EPS, TernaryWeights
from model.tokenizer import TokenizerError, TokenizerSpec, spec_from_hf

ARCHITECTURE = "BitNetForCausalLM"
MODEL_TYPE = "bitnet"
# transformers' BitNetConfig defaults (4.57), used for fields config.json leaves out; tests compare the two.
DEFAULTS: dict[str, Any] = {
    "hidden_act": "relu2",
    "num_key_value_heads": 5,  # an explicit null means num_attention_heads
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "attention_bias": False,
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# ModelConfig field → the config.json field it comes from (for messages)
HF_FIELD = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size",
            "max_seq_len": "max_position_embeddings (or --context)", "rope_theta": "rope_theta",
            "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings", "ffn_act": "hidden_act",
            "arch": "architectures"}  # fmt: skip
PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}  # fmt: skip
LAYER_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}  # fmt: skip
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a derived buffer some checkpoints carry
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors' dtype names
TERNARY_TYPES = ("tq2_0", "tq1_0")
EMBED_TYPES = ("f16", "f32")


class ConvertError(ValueError):
    """A checkpoint this converter cannot import; the message names the file, field or tensor and what is wrong."""


@dataclass(frozen=True)
class HFConfig:
    """The fields of config.json the converter uses, absent ones at transformers' defaults, checked."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str = "relu2"  # the gate's activation (model.config.FFN_ACTS)
    linear_class: str = "bitlinear"  # quantization_config.linear_class: how a packed weight_scale is applied

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of each ternary projection of one layer, by its HF module name."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        return {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
                "mlp.down_proj": (d, f)}  # fmt: skip

    def norm_shapes(self) -> dict[str, int]:
        d = self.hidden_size
        return {"input_layernorm": d, "post_attention_layernorm": d, "self_attn.attn_sub_norm": d,
                "mlp.ffn_sub_norm": self.intermediate_size}  # fmt: skip


@dataclass(frozen=True)
class ConvertOptions:
    """The command line (see ``--help``)."""

    src: Path
    out: Path
    type: str = "tq2_0"
    embed: str = "f16"
    context: int | None = None


# --- config.json --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{what}: cannot read {path}: {exc}") from None


def _int(raw: dict, key: str) -> int:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"config.json: {key} = {v!r} must be a positive integer")
    return v


def _float(raw: dict, key: str) -> float:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConvertError(f"config.json: {key} = {v!r} must be a finite number")
    return float(v)


def parse_config(raw: dict) -> HFConfig:
    """config.json's dict → :class:`HFConfig`, refusing (:class:`ConvertError`, naming the field) what the llama.cpp
    ``bitnet`` graph does not compute."""
    if not isinstance(raw, dict):
        raise ConvertError("config.json: not a JSON object")
    archs = raw.get("architectures")
    if not ((isinstance(archs, list) and ARCHITECTURE in archs) or raw.get("model_type") == MODEL_TYPE):
        raise ConvertError(f"config.json: architectures = {archs!r} (model_type = {raw.get('model_type')!r}); only "
                           f"{ARCHITECTURE} (model_type {MODEL_TYPE!r}) is supported")  # fmt: skip
    raw = {**DEFAULTS, **raw}
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConvertError(f"config.json: missing {', '.join(missing)}")
    if raw["hidden_act"] not in FFN_ACTS:
        raise ConvertError(f"config.json: hidden_act = {raw['hidden_act']!r}; the bitnet graph gates with "
                           f"{' or '.join(FFN_ACTS)}")  # fmt: skip
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ConvertError(f"config.json: {key} = {raw[key]!r}; biases are not supported")
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        factor = scaling.get("factor", 1.0) if isinstance(scaling, dict) else None
        if not (kind == "default" or (kind == "linear" and factor == 1.0)):
            raise ConvertError(f"config.json: rope_scaling = {json.dumps(scaling)}; RoPE scaling is not supported")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError(f"config.json: partial_rotary_factor = {raw['partial_rotary_factor']!r}; only 1.0 "
                           "(RoPE over the whole head) is supported")  # fmt: skip
    if raw["num_key_value_heads"] is None:
        raw["num_key_value_heads"] = raw["num_attention_heads"]
    ints = {k: _int(raw, k) for k in (*REQUIRED, "num_key_value_heads", "max_position_embeddings")}
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != ints["hidden_size"] // ints["num_attention_heads"]:
        raise ConvertError(f"config.json: head_dim = {head_dim!r}; only hidden_size / num_attention_heads = "
                           f"{ints['hidden_size'] // ints['num_attention_heads']} is supported")  # fmt: skip
    tie = raw["tie_word_embeddings"]
    if not isinstance(tie, bool):
        raise ConvertError(f"config.json: tie_word_embeddings = {tie!r} must be true or false")
    cfg = HFConfig(**ints, rope_theta=_float(raw, "rope_theta"), rms_norm_eps=_float(raw, "rms_norm_eps"),
                   tie_word_embeddings=tie, hidden_act=raw["hidden_act"],
                   linear_class=_quantization(raw.get("quantization_config")))  # fmt: skip
    return cfg


def _quantization(q: Any) -> str:
    """``quantization_config`` → the ``linear_class`` of its BitLinear layers, refusing what changes the maths."""
    if q is None:
        return "bitlinear"
    if not isinstance(q, dict):
        raise ConvertError(f"config.json: quantization_config = {q!r} is not an object")
    if q.get("quant_method") != "bitnet":
        raise ConvertError(f"config.json: quantization_config.quant_method = {q.get('quant_method')!r}; only "
                           "'bitnet' (ternary BitLinear) is supported")  # fmt: skip
    linear_class = q.get("linear_class", "bitlinear")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise ConvertError(f"config.json: quantization_config.linear_class = {linear_class!r}; expected 'bitlinear' "
                           "or 'autobitlinear'")  # fmt: skip
    if q.get("quantization_mode", "offline") not in ("offline", "online"):
        raise ConvertError(f"config.json: quantization_config.quantization_mode = {q['quantization_mode']!r}; "
                           "expected 'offline' or 'online'")  # fmt: skip
    if q.get("use_rms_norm"):
        raise ConvertError("config.json: quantization_config.use_rms_norm = true (an RMSNorm inside every "
                           "BitLinear) is not supported")  # fmt: skip
    kept = q.get("modules_to_not_convert") or []
    if not isinstance(kept, list) or any(not isinstance(m, str) for m in kept):
        raise ConvertError(f"config.json: quantization_config.modules_to_not_convert = {kept!r} is not a list of names")
    # transformers keeps a module in float when an entry is a substring of its dotted name
    spared = [m for m in kept if any(m in f"model.layers.0.{p}" for p in PROJECTIONS)]
    if spared:
        raise ConvertError(f"config.json: quantization_config.modules_to_not_convert = {kept!r} keeps projections "
                           f"in float ({spared[0]!r}); every projection must be ternary")  # fmt: skip
    return linear_class


def model_fields(cfg: HFConfig, name: str, context: int | None = None) -> dict[str, Any]:
    """The :class:`~model.config.ModelConfig` fields (``arch="bitnet"``) of ``cfg``, checked by
    :func:`~model.config.config_problems`; problems are reported with the config.json field names."""
    if context is not None:
        if isinstance(context, bool) or not isinstance(context, int) or context < MIN_CONTEXT:
            raise ConvertError(f"--context {context!r} must be an integer of at least {MIN_CONTEXT}")
        if context > cfg.max_position_embeddings:
            raise ConvertError(f"--context {context} exceeds config.json's max_position_embeddings = "
                               f"{cfg.max_position_embeddings}, the longest the model was trained for")  # fmt: skip
    out = {"arch": "bitnet", "name": name, "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size,
           "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
           "n_kv_heads": cfg.num_key_value_heads, "ffn_hidden": cfg.intermediate_size, "n_streams": 1,
           "max_seq_len": cfg.max_position_embeddings if context is None else context, "rope_theta": cfg.rope_theta,
           "norm_eps": cfg.rms_norm_eps, "tie_embeddings": cfg.tie_word_embeddings, "mtp_heads": 0,
           "ffn_act": cfg.hidden_act}  # fmt: skip
    problems = config_problems(SimpleNamespace(**out))
    if problems:
        raise ConvertError("config.json: " + "; ".join(f"{HF_FIELD.get(f, f)}: {text}" for f, text in problems))
    if out["max_seq_len"] < MIN_CONTEXT:
        raise ConvertError(f"config.json: max_position_embeddings = {out['max_seq_len']} is below the minimum "
                           f"context {MIN_CONTEXT}")  # fmt: skip
    return out


def build_config(fields_: dict[str, Any]) -> ModelConfig:
    """A :class:`~model.config.ModelConfig` from :func:`model_fields`' dict. A key that is a derived property rather
    than a field of ModelConfig (``ffn_act`` follows ``arch`` there) must agree with what it derives."""
    names = {f.name for f in fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in fields_.items() if k in names})
    wrong = [k for k, v in fields_.items() if k not in names and getattr(config, k, None) != v]
    if wrong:
        raise ConvertError(f"ModelConfig cannot express {', '.join(f'{k}={fields_[k]!r}' for k in wrong)}")
    return config


# --- weights ------------------------------------------------------------------------------------------------------


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """transformers' packed BitNet weight (uint8 ``[out/4, in]``) → int8 codes ``[out, in]``: row block ``i`` holds bits
    ``2i..2i+1`` of every byte, minus 1. Raises :class:`ConvertError` for the 2-bit value 3 (a weight of +2)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ConvertError(f"packed ternary weight: expected uint8 [out/4, in], got {packed.dtype} {packed.shape}")
    trits = np.concatenate([(packed >> np.uint8(2 * i)) & np.uint8(3) for i in range(4)], axis=0)
    if (trits == 3).any():
        raise ConvertError("packed ternary weight holds the 2-bit value 3 (not -1, 0 or +1)")
    return (trits.astype(np.int8) - 1).astype(np.int8)


def quantize_master(weight) -> tuple[np.ndarray, np.float32]:
    """A float master weight (torch, any float dtype) → (int8 codes, float32 scale ``s``) exactly as transformers'
    ``WeightQuant``: in float32, ``scale = 1 / max(mean|W|, 1e-5)``, ``codes = clamp(round(W · scale), -1, 1)``,
    ``s = 1 / scale``."""
    import torch

    w = weight.detach().to(torch.float32)
    scale = 1.0 / w.abs().mean().clamp_(min=SCALE_EPS)
    codes = (w * scale).round().clamp(-1, 1).to(torch.int8)
    return codes.numpy(), np.float32((1.0 / scale).item())


def _float16_scale(s: np.float32, name: str) -> np.float32:
    """``s`` rounded to float16 (the TQ block scale's dtype): relative error ≤ 2^-11 in float16's normal range."""
    with np.errstate(over="ignore"):
        h = np.float16(s)
    if not (np.isfinite(h) and h > 0):
        raise ConvertError(f"{name}: tensor scale {float(s):.6g} does not fit a positive float16 (the TQ block scale)")
    return np.float32(h)


def ternary_from_packed(packed, weight_scale, linear_class: str, name: str) -> TernaryWeights:
    """Packed uint8 weight + ``weight_scale`` (torch or numpy) → :class:`TernaryWeights` with the float16 scale."""
    codes = unpack_ternary(_numpy(packed))
    ws = np.asarray(_numpy(weight_scale, np.float32), dtype=np.float32).reshape(-1)
    if ws.size != 1 or not (np.isfinite(ws[0]) and ws[0] > 0):
        raise ConvertError(f"{name}_scale: expected one positive finite value, got {ws[:4].tolist()}")
    s = np.float32(1) / ws[0] if linear_class == "bitlinear" else ws[0]
    return TernaryWeights(codes=codes, scale=_float16_scale(np.float32(s), name))


def ternary_from_master(weight, name: str) -> TernaryWeights:
    import torch

    if not torch.isfinite(weight).all():
        raise ConvertError(f"{name}: the master weight holds NaN or inf")
    codes, s = quantize_master(weight)
    return TernaryWeights(codes=codes, scale=_float16_scale(s, name))


def _numpy(t, dtype=None) -> np.ndarray:
    """A torch tensor (bf16 included) or array → numpy, as float32 when ``dtype`` is given."""
    if hasattr(t, "detach"):
        import torch

        t = t.detach().to(torch.float32) if dtype is not None else t.detach()
        return t.numpy()
    return np.asarray(t, dtype=dtype)


class Checkpoint:
    """The safetensors files of a checkpoint directory: tensor name → file, shapes and dtypes without reading data."""

    def __init__(self, src: Path) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, "model.safetensors.index.json").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError("model.safetensors.index.json: no weight_map")
            files = sorted(set(weight_map.values()))
        elif (src / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
            hint = f" ({', '.join(pickles[:3])} are pickles, which are never loaded)" if pickles else ""
            raise ConvertError(f"{src}: no model.safetensors or model.safetensors.index.json{hint}")
        self.file_of: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for fname in files:
            if not isinstance(fname, str) or Path(fname).name != fname or not (src / fname).is_file():
                raise ConvertError(f"model.safetensors.index.json names {fname!r}, not a file of {src}")
            try:
                with safe_open(src / fname, framework="pt") as f:
                    for key in f.keys():
                        if key in self.file_of:
                            raise ConvertError(f"tensor {key} is in both {self.file_of[key].name} and {fname}")
                        sl = f.get_slice(key)
                        self.file_of[key] = src / fname
                        self.meta[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            except ConvertError:
                raise
            except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
                raise ConvertError(f"{fname}: not a readable safetensors file: {exc}") from None
        if weight_map is not None:
            wrong = [k for k, v in weight_map.items() if self.file_of.get(k) != src / v]
            if wrong:
                raise ConvertError(f"model.safetensors.index.json: {wrong[0]} is not in {weight_map[wrong[0]]} "
                                   f"({len(wrong)} such)")  # fmt: skip

    def get(self, name: str):
        """The tensor (torch, in its stored dtype)."""
        with self._safe_open(self.file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def dtype(self, name: str) -> str:
        """safetensors' dtype name: ``"BF16"``, ``"U8"``, ..."""
        return self.meta[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][0]


def _list(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def load_tensors(src: Path, cfg: HFConfig) -> dict[str, np.ndarray | TernaryWeights]:
    """The checkpoint's tensors under their GGUF names: ternary projections as :class:`TernaryWeights` (float16
    scale), norms and the embedding as float32. Names, shapes and dtypes are checked before any data is read."""
    ck = Checkpoint(src)
    d, v = cfg.hidden_size, cfg.vocab_size
    floats: dict[str, tuple[str, tuple[int, ...]]] = {  # HF name → (GGUF name, shape)
        "model.embed_tokens.weight": ("token_embd.weight", (v, d)),
        "model.norm.weight": ("output_norm.weight", (d,)),
    }
    if not cfg.tie_word_embeddings:
        floats["lm_head.weight"] = ("output.weight", (v, d))
    ternary: dict[str, tuple[str, tuple[int, int]]] = {}  # HF module → (GGUF name, [out, in])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_NORMS.items():
            floats[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{gg}.weight", (cfg.norm_shapes()[hf],))
        for hf, gg in PROJECTIONS.items():
            ternary[f"model.layers.{i}.{hf}"] = (f"blk.{i}.{gg}.weight", cfg.projection_shapes()[hf])
    expected = set(floats) | {m + ".weight" for m in ternary}
    scales = {m + ".weight_scale" for m in ternary}
    present = set(ck.file_of)
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in present
    missing = expected - present
    if missing:
        raise ConvertError(f"checkpoint lacks {len(missing)} tensor(s): {_list(missing)}")
    unknown = {n for n in present - expected - scales - {"lm_head.weight"} if not n.endswith(IGNORED_SUFFIXES)}
    if unknown:
        raise ConvertError(f"checkpoint holds {len(unknown)} tensor(s) a {ARCHITECTURE} of this config does not have: "
                           f"{_list(unknown)}")  # fmt: skip
    for name, (_, shape) in floats.items():
        if ck.dtype(name) not in FLOAT_DTYPES or ck.shape(name) != shape:
            raise ConvertError(f"{name}: {ck.dtype(name)} {list(ck.shape(name))}, expected a float tensor of shape "
                               f"{list(shape)} (from config.json)")  # fmt: skip
    packed = set()
    for module, (_, (rows, cols)) in ternary.items():
        name, dtype, shape = module + ".weight", ck.dtype(module + ".weight"), ck.shape(module + ".weight")
        if dtype == "U8":
            if rows % 4 or shape != (rows // 4, cols):
                raise ConvertError(f"{name}: packed uint8 {list(shape)}, expected [{rows}/4, {cols}] (config.json)")
            if module + ".weight_scale" not in present:
                raise ConvertError(f"{name}: packed ternary weight without its {module}.weight_scale")
            scale_name = module + ".weight_scale"
            if ck.dtype(scale_name) not in FLOAT_DTYPES or math.prod(ck.shape(scale_name)) != 1:
                raise ConvertError(f"{scale_name}: {ck.dtype(scale_name)} {list(ck.shape(scale_name))}, expected "
                                   "one float")  # fmt: skip
            packed.add(module)
        elif dtype in FLOAT_DTYPES:
            if shape != (rows, cols):
                raise ConvertError(f"{name}: {list(shape)}, expected [{rows}, {cols}] (from config.json)")
            if module + ".weight_scale" in present:
                raise ConvertError(f"{name}: a float weight with a weight_scale (neither the packed nor the master "
                                   "form) is not supported")  # fmt: skip
        else:
            raise ConvertError(f"{name}: dtype {dtype}; expected packed uint8 or a float master weight")
    out: dict[str, np.ndarray | TernaryWeights] = {}
    for name, (gg, _) in floats.items():
        out[gg] = _numpy(ck.get(name), np.float32)
        if not np.isfinite(out[gg]).all():
            raise ConvertError(f"{name}: holds NaN or inf")
    if tied_head:
        head, embed = ck.get("lm_head.weight"), ck.get("model.embed_tokens.weight")
        if head.shape != embed.shape or not bool((head.float() == embed.float()).all()):
            raise ConvertError("lm_head.weight differs from model.embed_tokens.weight, but config.json has "
                               "tie_word_embeddings = true")  # fmt: skip
    for module, (gg, _) in ternary.items():
        name = module + ".weight"
        if module in packed:
            out[gg] = ternary_from_packed(ck.get(name), ck.get(module + ".weight_scale"), cfg.linear_class, name)
        else:
            out[gg] = ternary_from_master(ck.get(name), name)
    return out


# --- tokenizer ----------------------------------------------------------------------------------------------------


def _token_content(value: Any, key: str) -> str | None:
    """tokenizer_config.json's ``bos_token`` & co: a string, an AddedToken dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConvertError(f"tokenizer_config.json: {key} = {value!r} is neither a string nor a token object")


def _chat_template(src: Path, tcfg: dict) -> str | None:
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tcfg.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ConvertError("tokenizer_config.json: chat_template is neither a string nor a list holding a 'default' one")


def load_tokenizer(src: Path, vocab_size: int, raw_config: dict | None = None) -> TokenizerSpec:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) → a :class:`TokenizerSpec` of ``vocab_size``
    tokens. ``bos``/``eos``/``pad`` come from tokenizer_config.json, else config.json's ``bos_token_id`` /
    ``eos_token_id`` (the first of a list)."""
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise ConvertError(f"tokenizer.json: cannot load it: {exc}") from None
    tcfg_path = src / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path, "tokenizer_config.json") if tcfg_path.is_file() else {}
    if not isinstance(tcfg, dict):
        raise ConvertError("tokenizer_config.json: not a JSON object")
    roles = {r: _token_content(tcfg.get(f"{r}_token"), f"{r}_token") for r in ("bos", "eos", "pad")}
    for role in ("bos", "eos"):
        ident = (raw_config or {}).get(f"{role}_token_id")
        ident = ident[0] if isinstance(ident, list) and ident else ident
        if roles[role] is None and isinstance(ident, int) and not isinstance(ident, bool):
            roles[role] = tok.id_to_token(ident)
            if roles[role] is None:
                raise ConvertError(f"config.json: {role}_token_id = {ident} is not a token of tokenizer.json")
    try:
        spec = spec_from_hf(tok, chat_template=_chat_template(src, tcfg), **roles)
    except TokenizerError as exc:
        raise ConvertError(f"tokenizer.json: {exc}") from None
    if len(spec.tokens) > vocab_size:
        raise ConvertError(f"tokenizer.json has {len(spec.tokens)} tokens, more than config.json's vocab_size = "
                           f"{vocab_size}")  # fmt: skip
    return spec.padded(vocab_size)


# --- the whole conversion -----------------------------------------------------------------------------------------


def convert(
    src_dir: str | Path, context: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray | TernaryWeights], TokenizerSpec]:
    """Read the checkpoint in ``src_dir``: (ModelConfig fields, tensors under their GGUF names, tokenizer).
    ``context`` replaces ``max_position_embeddings`` as the context length. Raises :class:`ConvertError`."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a directory")
    raw = _read_json(src / "config.json", "config.json")
    cfg = parse_config(raw)
    out_fields = model_fields(cfg, src.resolve().name or "bitnet", context)
    spec = load_tokenizer(src, cfg.vocab_size, raw)
    return out_fields, load_tensors(src, cfg), spec


def parse_args(argv: list[str] | None = None) -> ConvertOptions:
    ap = argparse.ArgumentParser(prog="python -m model.convert_hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("src", type=Path, help="the checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    ap.add_argument("--type", choices=TERNARY_TYPES, default="tq2_0", help="ggml type of the ternary tensors")
    ap.add_argument("--embed", choices=EMBED_TYPES, default="f16", help="type of the token embedding")
    ap.add_argument("--context", type=int, help="context length (default: max_position_embeddings)")
    return ConvertOptions(**vars(ap.parse_args(argv)))


def run(opts: ConvertOptions) -> str:
    """Convert and write ``opts.out`` atomically (a temporary file in the same directory, then a rename); returns the
    summary line."""
    from model.gguf_io import GGMLType, write_gguf

    out_fields, tensors, spec = convert(opts.src, opts.context)
    config = build_config(out_fields)
    out = opts.out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write_gguf(tmp, config, tensors, spec, ternary_type=GGMLType[opts.type.upper()],
                   embed_type=GGMLType[opts.embed.upper()])  # fmt: skip
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return (f"{out}: bitnet {config.name!r}, {config.n_layers} layers, d_model {config.d_model}, heads "
            f"{config.n_heads}/{config.n_kv_heads}, ffn {config.ffn_hidden}, vocab {config.vocab_size}, context "
            f"{config.max_seq_len}, {opts.type.upper()} + {opts.embed.upper()} embedding, "
            f"{out.stat().st_size / 2**20:.1f} MiB")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    try:
        print(run(opts))
    except (ValueError, OSError) as exc:  # ConvertError, GGUFError, TokenizerError, TernaryFormatError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
