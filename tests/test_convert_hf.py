"""model.convert_hf imports a Hugging Face BitNetForCausalLM checkpoint in both published forms (bf16 master weights,
packed uint8 + weight_scale) exactly as transformers reads it, and refuses what the bitnet graph does not compute.

Every checkpoint is built here (config.json, safetensors, a Llama 3 style tokenizer trained in memory): nothing is
downloaded. transformers' own BitNet functions are the reference, run eagerly (they are ``@torch.compile``).

pytest tests/test_convert_hf.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_gguf_tokenizer import LLAMA3_SAMPLES, LLAMA3_SPECIALS, llama3_hf_tokenizer

from model.convert_hf import (
    DEFAULTS,
    ConvertError,
    build_config,
    convert,
    main,
    model_fields,
    parse_config,
    quantize_master,
    ternary_from_master,
    ternary_from_packed,
    unpack_ternary,
)
from model.gguf_io import ACT_KEY, tensor_specs
from model.tokenizer import TOKEN_CONTROL, TOKEN_UNUSED, hf_from_spec

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]

D, F, L, H, KV, VOCAB = 256, 512, 2, 4, 2, 768
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}"
)
KV_DIM = KV * D // H
SHAPES = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (KV_DIM, D), "self_attn.v_proj": (KV_DIM, D),
          "self_attn.o_proj": (D, D), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D),
          "mlp.down_proj": (D, F)}  # fmt: skip
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}  # fmt: skip
PACKED_QUANT = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}


@pytest.fixture(scope="module")
def hf():
    """transformers.integrations.bitnet with TorchDynamo off while this module's tests run (what TORCHDYNAMO_DISABLE=1
    does, undone afterwards): its ``@torch.compile`` functions run eagerly."""
    from transformers.integrations import bitnet

    with torch._dynamo.config.patch(disable=True):
        yield bitnet


def hf_config(**overrides) -> dict:
    tok = llama3_hf_tokenizer()
    cfg = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": VOCAB, "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
           "max_position_embeddings": 256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "relu2",
           "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
           "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
           "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}  # fmt: skip
    return cfg | overrides


def hf_tensors(hf, form: str = "master", dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny BitNetForCausalLM state dict: float master projections, or packed with ``hf.pack_weights``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.02, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=g)).to(dtype)

    t = {"model.embed_tokens.weight": randn(VOCAB, D), "model.norm.weight": randn(D, std=0.1, mean=1.0)}
    for i in range(L):
        p = f"model.layers.{i}."
        for norm, n in (("input_layernorm", D), ("post_attention_layernorm", D), ("self_attn.attn_sub_norm", D),
                        ("mlp.ffn_sub_norm", F)):  # fmt: skip
            t[f"{p}{norm}.weight"] = randn(n, std=0.1, mean=1.0)
        for j, (module, shape) in enumerate(SHAPES.items()):
            if form == "master":
                t[f"{p}{module}.weight"] = randn(*shape)
            else:
                codes = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
                t[f"{p}{module}.weight"] = hf.pack_weights(codes.clone())  # adds 1 in place: give it a copy
                t[f"{p}{module}.weight_scale"] = torch.tensor([20.0 + 3.7 * j + i], dtype=dtype)
    return t


def write_checkpoint(path: Path, tensors: dict, config: dict | None = None, shards: int = 1,
                     tokenizer_config: dict | None = None) -> Path:  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or hf_config()))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
    else:
        names, weight_map = sorted(tensors), {}
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k::shards]
            save_file({n: tensors[n] for n in part}, str(path / fname))
            weight_map |= dict.fromkeys(part, fname)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    llama3_hf_tokenizer().save(str(path / "tokenizer.json"))
    if tokenizer_config is None:
        tokenizer_config = {"bos_token": "<|begin_of_text|>", "chat_template": CHAT_TEMPLATE,
                            "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def ternary_items(tensors: dict):
    """(HF module name, its converted TernaryWeights) for every projection."""
    for i in range(L):
        for module, gg in GGUF_NAMES.items():
            yield f"model.layers.{i}.{module}", tensors[f"blk.{i}.{gg}.weight"]


# --- the two weight forms against transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_master_weights_quantize_like_transformers_weightquant(tmp_path, hf, dtype):
    src = hf_tensors(hf, "master", dtype)
    _, tensors, _ = convert(write_checkpoint(tmp_path / "m", src))
    for module, tw in ternary_items(tensors):
        w = src[module + ".weight"]
        reference = hf.WeightQuant.apply(w)  # codes / scale, in w's dtype: its sign is the code
        assert tw.codes.dtype == np.int8
        np.testing.assert_array_equal(tw.codes, torch.sign(reference.float()).to(torch.int8).numpy(), err_msg=module)
        scale = 1.0 / w.float().abs().mean().clamp(min=1e-5)
        assert tw.scale == np.float32(np.float16(np.float32((1.0 / scale).item()))), module


def test_packed_weights_unpack_like_transformers(tmp_path, hf):
    src = hf_tensors(hf, "packed")
    _, tensors, _ = convert(write_checkpoint(tmp_path / "p", src, hf_config(quantization_config=PACKED_QUANT)))
    for module, tw in ternary_items(tensors):
        reference = hf.unpack_weights(src[module + ".weight"], dtype=torch.float32)
        np.testing.assert_array_equal(tw.codes, reference.to(torch.int8).numpy(), err_msg=module)
        ws = np.float32(src[module + ".weight_scale"].float().item())
        assert tw.scale == np.float32(np.float16(np.float32(1) / ws)), module  # BitLinear divides by weight_scale


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


@pytest.mark.parametrize("layer", ["BitLinear", "AutoBitLinear offline", "AutoBitLinear online"])
def test_converted_weights_compute_what_transformers_layers_compute(hf, layer):
    """The scale's meaning (divide, multiply, 1/absmean) checked against the layers' forward, not our reading."""
    g = torch.Generator().manual_seed(1)
    out, k = 64, 256
    x = torch.randn(3, k, generator=g)
    codes = torch.randint(-1, 2, (out, k), generator=g, dtype=torch.int8)
    packed, ws = hf.pack_weights(codes.clone()), torch.tensor([23.7])
    if layer == "BitLinear":
        m = hf.BitLinear(k, out, bias=False, dtype=torch.float32)
        m.load_state_dict({"weight": packed, "weight_scale": ws})
        tw = ternary_from_packed(packed, ws, "bitlinear", "w")
    elif layer == "AutoBitLinear offline":
        m = hf.AutoBitLinear(k, out, bias=False, online_quant=False)
        m.load_state_dict({"weight": packed, "weight_scale": ws})  # its load hook unpacks
        tw = ternary_from_packed(packed, ws, "autobitlinear", "w")
    else:
        m = hf.AutoBitLinear(k, out, bias=False, online_quant=True)
        master = 0.02 * torch.randn(out, k, generator=g)
        m.load_state_dict({"weight": master})
        tw = ternary_from_master(master, "w")
    with torch.no_grad():
        y = m(x).numpy()
    ours = _fake_quant(x).numpy() @ tw.dequantize().T
    np.testing.assert_allclose(ours, y, rtol=2e-3, atol=2e-3 * np.abs(y).max())  # the float16 scale: ≤ 2^-11


def test_unpack_and_quantize_helpers_on_known_values():
    packed = np.array([[0b10_01_00_10]], dtype=np.uint8)  # row blocks 0..3 hold trits 2, 0, 1, 2
    np.testing.assert_array_equal(unpack_ternary(packed), [[1], [-1], [0], [1]])
    with pytest.raises(ConvertError, match="2-bit value 3"):
        unpack_ternary(np.array([[0b11]], dtype=np.uint8))
    codes, s = quantize_master(torch.tensor([[0.5, -0.25, 0.0, 1.25]]))  # mean |w| = 0.5
    np.testing.assert_array_equal(codes, [[1, 0, 0, 1]])  # scale 2: round(-0.5) = 0, round(2.5) = 2 (half to even)
    assert s == np.float32(0.5)
    with pytest.raises(ConvertError, match="float16"):
        ternary_from_packed(np.zeros((1, 256), np.uint8), np.array([1e-9], np.float32), "bitlinear", "w")


# --- config, names, norms ------------------------------------------------------------------------------------------


def test_fields_names_and_float_tensors(tmp_path, hf):
    src = hf_tensors(hf, "master")
    fields, tensors, tokenizer = convert(write_checkpoint(tmp_path / "bitnet-tiny", src))
    assert fields == {"arch": "bitnet", "name": "bitnet-tiny", "vocab_size": VOCAB, "d_model": D, "n_layers": L,
                      "n_heads": H, "n_kv_heads": KV, "ffn_hidden": F, "n_streams": 1, "max_seq_len": 256,
                      "rope_theta": 500000.0, "norm_eps": 1e-5, "tie_embeddings": True, "mtp_heads": 0,
                      "ffn_act": "relu2"}  # fmt: skip
    names = {"token_embd.weight", "output_norm.weight"}
    for i in range(L):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm")}
        names |= {f"blk.{i}.{n}.weight" for n in GGUF_NAMES.values()}
    assert set(tensors) == names
    config = build_config(fields)
    assert (config.arch, config.ffn_act, config.sub_norms) == ("bitnet", "relu2", True)
    specs = tensor_specs(config)
    assert set(specs) == names
    for name, spec in specs.items():
        value = tensors[name]
        assert (value.codes.shape if spec.kind == "ternary" else value.shape) == spec.shape, name
    pairs = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "model.layers.1.input_layernorm.weight": "blk.1.attn_norm.weight",
             "model.layers.1.post_attention_layernorm.weight": "blk.1.ffn_norm.weight",
             "model.layers.0.self_attn.attn_sub_norm.weight": "blk.0.attn_sub_norm.weight",
             "model.layers.0.mlp.ffn_sub_norm.weight": "blk.0.ffn_sub_norm.weight"}  # fmt: skip
    for hf_name, gguf_name in pairs.items():
        assert tensors[gguf_name].dtype == np.float32
        np.testing.assert_array_equal(tensors[gguf_name], src[hf_name].float().numpy(), err_msg=hf_name)
    k = tensors["blk.0.attn_k.weight"]
    assert k.codes.shape == (KV_DIM, D)  # no row permutation: the bitnet RoPE rotates halves, as HF does
    assert tokenizer.pre == "llama-bpe" and len(tokenizer.tokens) == VOCAB


def test_context_overrides_max_position_embeddings(tmp_path, hf):
    src = write_checkpoint(tmp_path / "c", hf_tensors(hf, "packed"), hf_config(quantization_config=PACKED_QUANT))
    assert convert(src, context=64)[0]["max_seq_len"] == 64
    for context, match in ((512, "exceeds config.json's max_position_embeddings = 256"), (8, "at least 16")):
        with pytest.raises(ConvertError, match=match):
            convert(src, context=context)


def test_sharded_checkpoint_reads_like_one_file(tmp_path, hf):
    src = hf_tensors(hf, "packed")
    config = hf_config(quantization_config=PACKED_QUANT)
    one = convert(write_checkpoint(tmp_path / "one", src, config))
    three = convert(write_checkpoint(tmp_path / "three", src, config, shards=3))
    assert not (tmp_path / "three" / "model.safetensors").exists()
    assert one[0] | {"name": "three"} == three[0] and one[2] == three[2]
    for name, value in one[1].items():
        other = three[1][name]
        if hasattr(value, "codes"):
            np.testing.assert_array_equal(value.codes, other.codes)
            assert value.scale == other.scale
        else:
            np.testing.assert_array_equal(value, other)


def test_autobitlinear_packed_scale_multiplies(tmp_path, hf):
    src = hf_tensors(hf, "packed")
    quant = PACKED_QUANT | {"linear_class": "autobitlinear"}
    _, tensors, _ = convert(write_checkpoint(tmp_path / "a", src, hf_config(quantization_config=quant)))
    for module, tw in ternary_items(tensors):
        assert tw.scale == np.float32(np.float16(src[module + ".weight_scale"].float().item())), module


def test_the_2b4t_config_gives_the_preset_shape():
    """config.json of microsoft/bitnet-b1.58-2B-4T (transcribed here, not downloaded) → the bitnet-2b4t preset."""
    from model.config import PRESETS

    published = {"architectures": ["BitNetForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                 "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "relu2", "hidden_size": 2560,
                 "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 4096,
                 "model_type": "bitnet", "rms_norm_eps": 1e-05, "num_attention_heads": 20, "num_hidden_layers": 30,
                 "num_key_value_heads": 5, "rope_theta": 500000.0, "tie_word_embeddings": True,
                 "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
                 "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                         "quantization_mode": "offline"}}  # fmt: skip
    assert build_config(model_fields(parse_config(published), "bitnet-2b4t")) == PRESETS["bitnet-2b4t"]
    assert build_config(model_fields(parse_config(published), "x", context=1024)).max_seq_len == 1024


def test_absent_fields_take_transformers_bitnetconfig_defaults(hf):
    from transformers import BitNetConfig

    reference = BitNetConfig()
    for key, value in DEFAULTS.items():
        assert getattr(reference, key) == value, key
    assert BitNetConfig(num_attention_heads=H, num_key_value_heads=None).num_key_value_heads == H
    optional = set(DEFAULTS) | {"rope_scaling", "head_dim", "quantization_config"}
    bare = {k: v for k, v in hf_config().items() if k not in optional}
    cfg = parse_config(bare)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.num_key_value_heads, cfg.max_position_embeddings) == (
        500000.0, 1e-5, 5, 2048)  # fmt: skip
    assert (cfg.tie_word_embeddings, cfg.linear_class) == (False, "bitlinear")
    assert parse_config(bare | {"num_key_value_heads": None}).num_key_value_heads == H


# --- refusals name the field --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"attention_bias": True}, "attention_bias = True"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 'rope_scaling = {"rope_type": "yarn"'),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"head_dim": 32}, "head_dim = 32"),
        ({"hidden_size": 300}, "hidden_size: .*multiple of 256"),
        ({"intermediate_size": 500}, "intermediate_size: .*multiple of 256"),
        ({"num_key_value_heads": 3}, "num_key_value_heads: "),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures = \\['LlamaForCausalLM'\\]"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"max_position_embeddings": 8}, "max_position_embeddings = 8"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps = '1e-5'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers = 0"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method = 'gptq'"),
        ({"quantization_config": PACKED_QUANT | {"use_rms_norm": True}}, "quantization_config.use_rms_norm"),
        ({"quantization_config": PACKED_QUANT | {"modules_to_not_convert": ["down_proj"]}},
         "modules_to_not_convert"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, overrides, match):
    src = tmp_path / "x"
    write_checkpoint(src, {"unused": torch.zeros(1)}, hf_config(**overrides))
    with pytest.raises(ConvertError, match=f"config.json: .*{match}"):
        convert(src)


def _edit(hf, change) -> dict:
    t = hf_tensors(hf, "packed")
    change(t)
    return t


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.pop("model.layers.1.mlp.ffn_sub_norm.weight"), "lacks 1 tensor.*model.layers.1.mlp.ffn_sub_norm"),
        (lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale"), "without its .*o_proj.weight_scale"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(D)}),
         "does not have: model.layers.0.self_attn.q_proj.bias"),
        (lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.ones(D)}),
         "does not have: model.layers.2.input_layernorm.weight"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(D // 4, D, dtype=torch.uint8)}),
         r"k_proj.weight: packed uint8 \[64, 256\], expected \[128/4, 256\]"),
        (lambda t: t["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(5, 0xFF), "2-bit value 3"),
        (lambda t: t.update({"model.norm.weight": torch.ones(D + 1)}), r"model.norm.weight: .*\[257\], expected"),
        (lambda t: t.update({"model.embed_tokens.weight": torch.ones(VOCAB, D, dtype=torch.int32)}), "I32"),
        (lambda t: t.update({"lm_head.weight": torch.ones(VOCAB, D, dtype=torch.bfloat16)}),
         "lm_head.weight differs from model.embed_tokens.weight"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.ones(F, D)}), "float weight with a weight_sc"),
        (lambda t: t["model.layers.0.mlp.up_proj.weight_scale"].fill_(float("inf")), "weight_scale: expected one"),
        (lambda t: t["model.norm.weight"].fill_(float("nan")), "model.norm.weight: holds NaN"),
    ],
)  # fmt: skip
def test_bad_tensors_are_refused_naming_them(tmp_path, hf, change, match):
    src = write_checkpoint(tmp_path / "t", _edit(hf, change), hf_config(quantization_config=PACKED_QUANT))
    with pytest.raises(ConvertError, match=match):
        convert(src)


def test_tied_lm_head_equal_to_the_embedding_is_accepted(tmp_path, hf):
    t = hf_tensors(hf, "packed")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    tensors = convert(write_checkpoint(tmp_path / "h", t, hf_config(quantization_config=PACKED_QUANT)))[1]
    assert "output.weight" not in tensors


def test_missing_files_are_refused(tmp_path, hf):
    src = write_checkpoint(tmp_path / "f", hf_tensors(hf, "packed"), hf_config(quantization_config=PACKED_QUANT))
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(ConvertError, match=r"no model\.safetensors .*pytorch_model\.bin are pickles, which are never"):
        convert(src)
    (src / "config.json").unlink()
    with pytest.raises(ConvertError, match=r"config\.json: .* does not exist"):
        convert(src)
    with pytest.raises(ConvertError, match="is not a directory"):
        convert(tmp_path / "nowhere")


def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path, hf):
    src = write_checkpoint(tmp_path / "s", hf_tensors(hf, "packed"), hf_config(quantization_config=PACKED_QUANT), 2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=r"names '\.\./elsewhere\.safetensors', not a file of"):
        convert(src)


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_specials_roles_template_and_padding(tmp_path, hf):
    src = write_checkpoint(tmp_path / "t", hf_tensors(hf, "packed"), hf_config(quantization_config=PACKED_QUANT))
    spec = convert(src)[2]
    tok = llama3_hf_tokenizer()
    assert [spec.tokens[i] for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL] == LLAMA3_SPECIALS
    assert spec.bos_id == tok.token_to_id("<|begin_of_text|>") and spec.eos_id == tok.token_to_id("<|eot_id|>")
    assert spec.chat_template == CHAT_TEMPLATE and spec.pre == "llama-bpe"
    assert len(spec.tokens) == VOCAB and set(spec.token_type[tok.get_vocab_size() :]) == {TOKEN_UNUSED}
    rebuilt = hf_from_spec(spec)
    for text in LLAMA3_SAMPLES:
        assert rebuilt.encode(text).ids == tok.encode(text, add_special_tokens=False).ids

    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # newer checkpoints: it wins
    (src / "tokenizer_config.json").write_text("{}")  # no roles: config.json's ids (eos: the first of the list)
    spec = convert(src)[2]
    assert spec.chat_template == "{{ messages[0]['content'] }}"
    assert (spec.bos_id, spec.eos_id) == (tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>"))


@pytest.mark.parametrize(
    "config, tokenizer_config, match",
    [
        ({"vocab_size": 512}, None, r"tokenizer.json has \d+ tokens, more than config.json's vocab_size = 512"),
        ({}, {"eos_token": "<|nope|>"}, "eos token '<\\|nope\\|>' is not in the vocabulary"),
        ({}, {"bos_token": 7}, "bos_token = 7"),
        ({}, {"chat_template": [{"name": "tool_use", "template": "x"}]}, "chat_template"),
    ],
)
def test_tokenizer_problems_are_refused(tmp_path, hf, config, tokenizer_config, match):
    t = hf_tensors(hf, "packed")
    if "vocab_size" in config:
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][: config["vocab_size"]].clone()
    cfg = hf_config(quantization_config=PACKED_QUANT, **config)
    with pytest.raises(ConvertError, match=match):
        convert(write_checkpoint(tmp_path / "k", t, cfg, tokenizer_config=tokenizer_config))


def test_a_non_llama3_pre_tokenizer_is_refused(tmp_path, hf):
    src = write_checkpoint(tmp_path / "m", hf_tensors(hf, "packed"), hf_config(quantization_config=PACKED_QUANT))
    data = json.loads((src / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConvertError, match=r"tokenizer\.json: expected a ByteLevel.*got Metaspace"):
        convert(src)


# --- the command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["--type", "tq1_0", "--embed", "f32", "--context", "128"]])
def test_cli_writes_a_bitnet_gguf_that_gguf_tools_read(tmp_path, hf, capsys, args):
    from gguf import GGUFReader

    from model.gguf_io import read_gguf

    src = write_checkpoint(tmp_path / "bitnet-tiny", hf_tensors(hf, "master"))
    out = tmp_path / "out.gguf"
    main([str(src), "--out", str(out), *args])
    assert capsys.readouterr().out.startswith(f"{out}: bitnet 'bitnet-tiny', 2 layers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bitnet-tiny", "out.gguf"]  # no temporary file left

    r = GGUFReader(str(out))

    def value(key):
        f = r.fields[key]
        return f.contents()

    tok = llama3_hf_tokenizer()
    assert value("general.architecture") == "bitnet" and value("general.name") == "bitnet-tiny"
    assert value(ACT_KEY) == "relu2"  # absent, a reader would gate with silu
    assert (value("bitnet.block_count"), value("bitnet.embedding_length"), value("bitnet.feed_forward_length")) == (
        L, D, F)  # fmt: skip
    assert (value("bitnet.attention.head_count"), value("bitnet.attention.head_count_kv")) == (H, KV)
    assert value("bitnet.context_length") == (128 if args else 256)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "llama-bpe"
    assert value("tokenizer.ggml.bos_token_id") == tok.token_to_id("<|begin_of_text|>")
    assert value("tokenizer.ggml.eos_token_id") == tok.token_to_id("<|eot_id|>")
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    types = value("tokenizer.ggml.token_type")
    assert len(types) == VOCAB and all(types[tok.token_to_id(s)] == TOKEN_CONTROL for s in LLAMA3_SPECIALS)
    by_name = {t.name: t for t in r.tensors}
    assert "blk.1.ffn_sub_norm.weight" in by_name and "output.weight" not in by_name
    assert by_name["blk.0.attn_q.weight"].tensor_type.name == ("TQ1_0" if args else "TQ2_0")
    assert by_name["token_embd.weight"].tensor_type.name == ("F32" if args else "F16")

    g = read_gguf(out)  # our reader: the same config and ternaries as convert() gave
    fields, tensors, _ = convert(src, 128 if args else None)
    assert g.config == build_config(fields)
    for name, tw in g.model_tensors().items():
        if hasattr(tw, "codes"):
            np.testing.assert_array_equal(tw.codes, tensors[name].codes, err_msg=name)
            assert tw.scale == tensors[name].scale, name


def test_cli_errors_are_one_line_and_exit_2(tmp_path, hf, capsys):
    src = write_checkpoint(tmp_path / "e", hf_tensors(hf, "packed"), hf_config(hidden_act="gelu"))
    with pytest.raises(SystemExit) as exit_:
        main([str(src), "--out", str(tmp_path / "out.gguf")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: config.json: hidden_act = 'gelu'")
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--context" in capsys.readouterr().out
