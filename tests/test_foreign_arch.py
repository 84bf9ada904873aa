"""The foreign architectures as llama.cpp names them: ``bitnet`` (BitNet b1.58) and ternary ``llama``.

* the GGUF files carry llama.cpp's keys and tensor names (read back by gguf-py), a ``llama`` file stores
  ``attn_q``/``attn_k`` rows permuted for adjacent-pair RoPE and the reader undoes it, and the permutation is the
  right one (rotate-half RoPE on the original rows = adjacent-pair RoPE on the permuted rows);
* files the compiled graph cannot run are refused with the key or tensor named;
* compiled for avx2/avx512 they match the exact reference bit for bit and PyTorch within 1e-3 (same greedy tokens),
  and they compile for CUDA to one graph per call.

    pytest tests/test_foreign_arch.py -q
"""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
from kernel_helpers import X86
from runtime_helpers import assert_pytorch_parity, built, reference, tiny_gguf
from test_exact_reference import _exact, exact_parity
from test_gguf_io import rewrite

from compiler import cuda_cross
from model.config import get_config
from model.gguf_io import GGMLType, GGUFError, parse_gguf, read_gguf, rope_norm_rows, write_gguf
from model.random_model import write_random_gguf
from runtime.engine import Engine

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
FOREIGN = ("bitnet", "llama")
BUILT = [("bitnet", "relu2"), ("llama", "silu")]  # arch, ffn_act
STEPS = 64


def _cfg(arch: str, act: str = "silu"):
    return replace(get_config("tiny"), arch=arch, ffn_act=act, n_streams=1, name=f"tiny-{arch}")


@pytest.mark.unit
@pytest.mark.parametrize("arch", FOREIGN)
def test_files_carry_llama_cpp_names(arch, tmp_path):
    cfg = _cfg(arch)
    path = write_random_gguf(cfg, tmp_path / "m.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == arch
    for key, want in (("block_count", 2), ("embedding_length", 256), ("feed_forward_length", 512),
                      ("attention.head_count", 4), ("attention.head_count_kv", 2), ("rope.dimension_count", 64),
                      ("context_length", 256)):  # fmt: skip
        assert r.fields[f"{arch}.{key}"].contents() == want, key
    names = {t.name for t in r.tensors}
    # gguf-py's own tensor list for the architecture names every tensor we write
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_id]}
    assert {n.rsplit(".", 1)[0].replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.") for n in names} <= known
    assert ("blk.1.ffn_sub_norm.weight" in names) == (arch == "bitnet")
    assert not any("mhc" in n for n in names) and "output.weight" not in names  # tied, plain residual
    g = read_gguf(path)
    assert g.config == cfg


@pytest.mark.unit
def test_the_bitnet_gate_activation_is_stored_and_defaults_to_llama_cpps(tmp_path):
    path = write_random_gguf(_cfg("bitnet", "relu2"), tmp_path / "m.gguf")
    assert read_gguf(path).config.ffn_act == "relu2"
    plain = rewrite(path, tmp_path / "plain.gguf", drop_keys={"bitnet.feed_forward_activation"})
    assert read_gguf(plain).config.ffn_act == "silu"  # what llama.cpp's bitnet graph computes
    s = gguf.GGUFValueType.STRING
    bad = rewrite(path, tmp_path / "bad.gguf", set_keys={"bitnet.feed_forward_activation": ("gelu", s)})
    with pytest.raises(GGUFError, match=r"bitnet\.feed_forward_activation: ffn_act='gelu'"):
        read_gguf(bad)
    with pytest.raises(ValueError, match="only arch 'bitnet'"):
        _cfg("llama", "relu2")


@pytest.mark.unit
def test_llama_q_k_rows_are_permuted_on_disk_and_restored_on_read(tmp_path):
    from model.random_model import random_tensors

    cfg = _cfg("llama")
    path = write_random_gguf(cfg, tmp_path / "m.gguf", seed=3)
    want = random_tensors(cfg, seed=3)
    g = read_gguf(path)
    for name, heads in (("blk.1.attn_q.weight", cfg.n_heads), ("blk.1.attn_k.weight", cfg.n_kv_heads)):
        raw = g.tensors[name].ternary().codes
        assert np.array_equal(raw, rope_norm_rows(want[name].codes, heads))
        assert not np.array_equal(raw, want[name].codes)
        assert np.array_equal(g.ternary(name).codes, want[name].codes)
    assert np.array_equal(g.ternary("blk.0.attn_v.weight").codes, want["blk.0.attn_v.weight"].codes)


def _q8_embedding_file(path):
    """A tiny llama TQ2_0 file whose embedding (the tied head) is Q8_0, as llama-quantize may write it."""
    from model.random_model import random_tensors
    from model.tokenizer import TokenizerSpec

    cfg = _cfg("llama")
    spec = read_gguf(write_random_gguf(cfg, path.with_suffix(".f16.gguf"))).tokenizer
    assert isinstance(spec, TokenizerSpec)
    tensors = random_tensors(cfg, seed=5)
    write_gguf(path, cfg, tensors, spec, embed_type=GGMLType.Q8_0)
    return path, tensors["token_embd.weight"]


@pytest.mark.unit
def test_block_quantized_embeddings_are_read_and_dequantized(tmp_path):
    path, want = _q8_embedding_file(tmp_path / "q8.gguf")
    r = gguf.GGUFReader(path)
    assert next(t for t in r.tensors if t.name == "token_embd.weight").tensor_type == gguf.GGMLQuantizationType.Q8_0
    g = read_gguf(path)
    got = g.tensors["token_embd.weight"].to_float()
    assert got.shape == want.shape
    scale = np.abs(want).reshape(-1, 32).max(axis=1) / 127  # Q8_0: a float16 scale per 32 values
    # half a step, plus the float16 rounding of the scale (≤ 2^-11) times the largest code, 127
    assert (np.abs(got - want).reshape(-1, 32) <= scale[:, None] * (0.5 + 127 * 2**-11) + 1e-7).all()
    bad = np.array(g.tensors["token_embd.weight"].data)
    bad[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)  # the first block's scale
    with pytest.raises(GGUFError, match=r"token_embd\.weight: non-finite"):
        read_gguf(rewrite(path, tmp_path / "bad.gguf", patch_tensors={"token_embd.weight": bad}))


@pytest.mark.unit
def test_the_permutation_turns_rotate_half_rope_into_adjacent_pair_rope():
    rng = np.random.default_rng(0)
    heads, hd = 3, 8
    q = rng.standard_normal(heads * hd)
    ang = rng.uniform(0, 6, hd // 2)
    cos, sin = np.cos(ang), np.sin(ang)

    def neox(x):  # ours and HF's: i with i + hd/2
        x = x.reshape(heads, hd)
        a, b = x[:, : hd // 2], x[:, hd // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1).reshape(-1)

    def adjacent(x):  # llama.cpp's LLAMA_ROPE_TYPE_NORM: 2i with 2i + 1
        x = x.reshape(heads, hd // 2, 2)
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(-1)

    P = lambda v: rope_norm_rows(v[:, None], heads)[:, 0]  # noqa: E731
    np.testing.assert_allclose(P(neox(q)), adjacent(P(q)), atol=1e-12)
    np.testing.assert_array_equal(rope_norm_rows(rope_norm_rows(q[:, None], heads), heads, inverse=True)[:, 0], q)


@pytest.mark.unit
def test_unsupported_foreign_files_are_refused_by_name(tmp_path):
    path = write_random_gguf(_cfg("llama"), tmp_path / "m.gguf")
    u32, f32s, s = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
    cases = {
        "llama.expert_count = 8": {"set_keys": {"llama.expert_count": (8, u32)}},
        "llama.rope.scaling.type = 'yarn'": {"set_keys": {"llama.rope.scaling.type": ("yarn", s)}},
        "llama.rope.dimension_count = 32": {"set_keys": {"llama.rope.dimension_count": (32, u32)}},
        "missing metadata key 'llama.embedding_length'": {"drop_keys": {"llama.embedding_length"}},
        "hyperparameter llama.attention.head_count_kv: n_kv_heads=3": {
            "set_keys": {"llama.attention.head_count_kv": (3, u32)}},
        "hyperparameter llama.rope.freq_base: rope_theta=0.0": {"set_keys": {"llama.rope.freq_base": (0.0, f32s)}},
        "missing ['blk.1.ffn_up.weight']": {"drop_tensors": {"blk.1.ffn_up.weight"}},
    }  # fmt: skip
    for i, (msg, kw) in enumerate(cases.items()):
        with pytest.raises(GGUFError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            read_gguf(rewrite(path, tmp_path / f"bad{i}.gguf", **kw))
    # defaults where llama.cpp has them: head_count_kv = head_count, freq_base 10000, vocab_size = the tokenizer's
    ok = rewrite(path, tmp_path / "ok.gguf", drop_keys={"llama.attention.head_count_kv", "llama.rope.freq_base",
                                                         "llama.vocab_size"})  # fmt: skip
    with pytest.raises(GGUFError, match=r"attn_k\.weight: shape"):  # 4 kv heads now: the k rows no longer fit
        read_gguf(ok)
    bit = write_random_gguf(_cfg("bitnet"), tmp_path / "b.gguf")
    f = parse_gguf(bit)
    head = np.array(f.tensors["token_embd.weight"].data)
    untied = rewrite(bit, tmp_path / "untied.gguf", add_tensors={"output.weight": head})
    with pytest.raises(GGUFError, match="arch 'bitnet' always ties"):
        read_gguf(untied)


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
@pytest.mark.parametrize(("arch", "act"), BUILT)
def test_compiled_foreign_models_match_the_exact_reference_and_pytorch(arch, act, target):
    gguf_path = tiny_gguf(1, arch=arch, ffn_act=act)
    eng = Engine(built(gguf_path, target).dir, gguf_path)
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, 512, 13)]
    toks, mine, errs = exact_parity(eng, _exact(gguf_path, target), prompt, STEPS)
    assert mine == toks and max(errs) <= 1e-3, errs  # measured: 0.0
    assert_pytorch_parity(eng, reference(gguf_path), prompt, STEPS)


@pytest.mark.build
def test_a_q8_0_embedding_compiles_to_float16_and_matches_the_exact_reference(tmp_path):
    path, _ = _q8_embedding_file(tmp_path / "q8.gguf")
    r = built(path, "auto")
    params = {name: (shape, dtype) for name, shape, dtype in r.meta["params"]}
    assert "token_embd.weight" not in params  # tied: the rows are read from the head's one float16 copy
    assert params["lm_head.weight"][1] == "float16"
    eng = Engine(r.dir, path)
    prompt = [int(t) for t in np.random.default_rng(9).integers(0, 512, 13)]
    toks, mine, errs = exact_parity(eng, _exact(path, eng.target), prompt, 16)
    assert mine == toks and max(errs) <= 1e-3, errs


@pytest.mark.build
@pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc + headers) on this machine")
def test_bitnet_builds_for_cuda_as_one_graph_per_call(tmp_path):
    from compiler.build import build

    r = build(tiny_gguf(1, arch="bitnet", ffn_act="relu2"), "cuda", tmp_path / "cache")
    assert r.compiled
    for name, c in r.meta["census"].items():
        assert (c["graphs"], c["kernels_outside"], c["allocations"]) == (1, 0, 0), (name, c)
    assert any(k.startswith("rmsnorm_quant:D=512") for k in r.meta["kernels"])  # the FFN sub-norm
