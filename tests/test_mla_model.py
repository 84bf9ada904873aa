"""Multi-head latent attention (model/mla.py) and its place in the model, the KV cache, the GGUF file and training.

The forward is held to a literal per-head reference of the maths (written here from the module's quantized weights),
the latent cache decodes exactly as the full forward, stores ``c + r`` floats a token and layer, and MLA models
survive the GGUF round trip, learn, and leave GQA models as they were.

    pytest tests/test_mla_model.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_helpers import assert_gguf_round_trip

from model.attention import Attention, KVCache, apply_rope
from model.config import get_config
from model.generate import generate
from model.gguf_io import ARCH, GGMLType, GGUFError, read_gguf, tensor_specs
from model.mla import LatentAttention
from model.random_model import write_random_gguf
from model.sampling import SamplingParams
from model.transformer import Transformer
from train.rl import sample_group
from train.train import TrainConfig, make_optimizers

C, R, H, HD = 256, 32, 4, 64  # latent, rotary dimensions, heads and head size of the tiny MLA config


def mla_config(**overrides):
    return get_config("tiny", **{"kv_lora_rank": C, "n_kv_heads": H, "qk_rope_dim": R, **overrides})


def mla_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny MLA model whose norm gains are not all ones (so that a gain used in the wrong place shows)."""
    torch.manual_seed(seed)
    model = Transformer(mla_config(**overrides)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.norm.weight.uniform_(0.5, 1.5)
            b.attn.kv_norm.weight.uniform_(0.5, 1.5)
    return model


# --- the maths, literally ---------------------------------------------------------------------------------------------


def rope_angles(r: int, n: int, theta: float = 10000.0) -> np.ndarray:
    """``[n, r/2]``: position ``p`` rotates the pair ``(i, i + r/2)`` by ``p · θ^(-2i/r)``."""
    return np.outer(np.arange(n, dtype=np.float64), theta ** (-np.arange(0, r, 2, dtype=np.float64) / r))


def ref_rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def ref_linear(layer, x: np.ndarray) -> np.ndarray:
    """Ternary codes and scale from the exported weights; each row of ``x`` quantized to int8 by its own absmax."""
    tw = layer.ternary_weights()
    a = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    xq = np.clip(np.round(x * a), -127, 127)
    return (xq @ tw.codes.astype(np.float64).T) * (float(tw.scale) / a)


def ref_rope(v: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate-half: ``v[i]`` pairs with ``v[i + r/2]``."""
    half = len(v) // 2
    out = np.empty_like(v)
    for i in range(half):
        cs, sn = math.cos(angles[i]), math.sin(angles[i])
        out[i] = v[i] * cs - v[i + half] * sn
        out[i + half] = v[i + half] * cs + v[i] * sn
    return out


@torch.no_grad()
def reference_mla(attn: LatentAttention, u: torch.Tensor, angles: np.ndarray, eps: float) -> np.ndarray:
    """``y [B, T, d]`` of the module's maths (positions ``0 .. T-1``), head by head and query by query."""
    weight = lambda norm: norm.weight.double().numpy()  # noqa: E731
    out = []
    for ub in u.double().numpy():
        t = len(ub)
        x = ref_rms(ub, weight(attn.norm), eps)
        q = ref_linear(attn.q, x).reshape(t, H, HD + R)
        kva = ref_linear(attn.kv_a, x)
        latent = ref_rms(kva[:, :C], weight(attn.kv_norm), eps)
        k_pe = [ref_rope(kva[j, C:], angles[j]) for j in range(t)]  # one rotary key for every head
        kv = ref_linear(attn.kv_b, latent).reshape(t, H, 2 * HD)
        heads = np.zeros((t, H * HD))
        for h in range(H):
            for i in range(t):
                query = np.concatenate([q[i, h, :HD], ref_rope(q[i, h, HD:], angles[i])])
                scores = [query @ np.concatenate([kv[j, h, :HD], k_pe[j]]) / math.sqrt(HD + R) for j in range(i + 1)]
                p = np.exp(np.array(scores) - max(scores))
                p /= p.sum()
                heads[i, h * HD : (h + 1) * HD] = sum(p[j] * kv[j, h, HD:] for j in range(i + 1))
        out.append(ref_linear(attn.o, heads))
    return np.stack(out)


@pytest.mark.unit
def test_forward_equals_the_per_head_reference_with_and_without_a_cache():
    """In float64 with the same RoPE angles: the module, run whole or through the cache in chunks of 4, 3 (a masked
    chunk after a cached prefix), 1 and 1 tokens, computes the maths of the module docstring to summation-order
    noise."""
    model = mla_model(seed=3).double()
    attn = model.blocks[1].attn
    t = 9
    u = torch.randn(2, t, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles = rope_angles(R, t)
    cos, sin = torch.from_numpy(np.cos(angles)), torch.from_numpy(np.sin(angles))
    want = reference_mla(attn, u, angles, model.config.norm_eps)
    with torch.no_grad():
        whole = attn(u, (cos, sin)).numpy()
        cache = KVCache(model.config, batch=2, dtype=torch.float64)
        parts = [attn(u[:, a:b], (cos[a:b], sin[a:b]), cache, a) for a, b in ((0, 4), (4, 7), (7, 8), (8, 9))]
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(torch.cat(parts, 1).numpy(), want, rtol=0, atol=1e-9)
    assert np.abs(want).max() > 0.1  # not vacuous


@pytest.mark.unit
def test_kv_cache_decoding_equals_the_full_forward():
    """Token by token, and a prefix prefilled (7 tokens, then a chunk of 5) then decoded: float64 (as
    tests/test_transformer.py), so that no int8 rounding can flip and the cache must reproduce the full forward."""
    model = mla_model(n_streams=4, mtp_heads=1).double()
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2)
        steps = torch.cat([model(idx[:, j : j + 1], cache) for j in range(20)], dim=1)
        prefilled = model.new_cache(batch=2)
        chunks = [model(idx[:, :7], prefilled), model(idx[:, 7:12], prefilled)]
        chunks = torch.cat(chunks + [model(idx[:, j : j + 1], prefilled) for j in range(12, 20)], 1)
    assert cache.pos == prefilled.pos == 20
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunks, full, rtol=0, atol=1e-10)


@pytest.mark.unit
def test_kv_cache_float32_agrees():
    model = mla_model(seed=2)
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        inc = torch.cat([model(idx[:, :5], cache)] + [model(idx[:, j : j + 1], cache) for j in range(5, 16)], 1)
    assert (inc - full).abs().median() < 1e-4 and torch.equal(inc.argmax(-1), full.argmax(-1))


@pytest.mark.unit
def test_cache_holds_the_float_latent_and_rotated_key_only():
    model = mla_model()
    cfg = model.config
    cache = model.new_cache(batch=2, max_len=16)
    assert set(cache.tensors()) == {"latent", "k_pe"} and not hasattr(cache, "k")
    assert cache.latent[0].shape == (2, 16, C) and cache.k_pe[1].shape == (2, 16, R)
    per_token_layer = sum(t.numel() for ts in cache.tensors().values() for t in ts) // (2 * 16 * cfg.n_layers)
    assert per_token_layer == C + R != 2 * H * HD
    attn = model.blocks[0].attn
    u = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0))
    rope = (model.rope_cos[:5], model.rope_sin[:5])
    with torch.no_grad():
        attn(u, rope, cache, 0)
        kva = attn.kv_a(attn.norm(u))
        latent = attn.kv_norm(kva[..., :C])
        assert torch.equal(cache.latent[0][:, :5], latent)  # the normed latent itself, before any quantization
        assert torch.equal(cache.k_pe[0][:, :5], apply_rope(kva[..., C:], *rope))  # rotated, one for all heads
    assert not cache.latent[0][:, 5:].any() and not cache.latent[1].any()  # layer 1 not run, positions ≥ 5 free
    with pytest.raises(ValueError, match="KV cache overflow: 17 positions > max_len 16"):
        cache.update_latent(0, 15, torch.zeros(2, 2, C), torch.zeros(2, 2, R))
    assert cfg.kv_bytes_per_token == cfg.n_layers * (C + 4 * (1 + R))  # what the compiled cache holds instead


@pytest.mark.unit
@pytest.mark.parametrize("config", [mla_config(), get_config("tiny")], ids=["mla", "gqa"])
def test_cache_copies_to_a_batch_and_drops_rows(config):
    """``fill_from`` / ``keep_rows`` (train.rl's group sampling) for both cache layouts."""
    torch.manual_seed(0)
    model = Transformer(config).double().eval()  # float64: no int8 rounding flips between the two paths
    prompt = torch.tensor([[5, 9, 30, 2]])
    with torch.no_grad():
        one = model.new_cache(1, 12)
        model(prompt, one)
        group = model.new_cache(3, 12)
        group.fill_from(one)
        assert group.pos == 4
        group.keep_rows(torch.tensor([2, 0]))
        got = model(torch.tensor([[7], [11]]), group)
        want = torch.cat([model(torch.tensor([[*prompt[0].tolist(), t]]))[:, -1:] for t in (7, 11)])
    assert all(t.shape[0] == 2 for ts in group.tensors().values() for t in ts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.unit
def test_rl_group_sampling_runs_on_mla():
    model = mla_model(seed=4)
    prompt = [5, 9, 30, 2, 77]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert (
        sample_group(model, prompt, 2, greedy, torch.Generator().manual_seed(0))
        == [generate(model, prompt, greedy).tokens] * 2
    )
    free = sample_group(model, prompt, 4, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=3),
                        torch.Generator().manual_seed(1))  # fmt: skip
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=3, stop_token_ids=(free[0][1], free[1][3]))
    rows = sample_group(model, prompt, 4, params, torch.Generator().manual_seed(1))
    for row in rows:  # each token in the top 3 of the full forward over its own prefix: the compacted cache is right
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row[:-1]]))[0, len(prompt) - 1 :]
        assert all(t in logits[j].topk(3).indices.tolist() for j, t in enumerate(row))


# --- the file, the configs -------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("ttype", "overrides"),
    [(GGMLType.TQ2_0, {}), (GGMLType.TQ1_0, {"n_streams": 4, "mtp_heads": 1, "tie_embeddings": False})],
)
def test_gguf_round_trip_gives_identical_logits(tmp_path, ttype, overrides):
    model = mla_model(**overrides)
    cfg = model.config
    tensors = model.gguf_tensors()
    assert set(tensors) == set(tensor_specs(cfg))
    block = {n[len("blk.0.") :] for n in tensors if n.startswith("blk.0.attn")}
    assert block == {"attn_norm.weight", "attn_q.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight",
                     "attn_kv_b.weight", "attn_output.weight"}  # fmt: skip
    assert tensors["blk.0.attn_q.weight"].codes.shape == (H * (HD + R), 256)
    assert tensors["blk.0.attn_kv_a_mqa.weight"].codes.shape == (C + R, 256)
    assert tensors["blk.0.attn_kv_b.weight"].codes.shape == (2 * H * HD, C)
    assert np.array_equal(tensors["blk.1.attn_kv_a_norm.weight"], model.blocks[1].attn.kv_norm.weight.detach().numpy())
    back = assert_gguf_round_trip(model, tmp_path / "mla.gguf", ttype)
    del back["blk.1.attn_kv_b.weight"]
    with pytest.raises(ValueError, match=r"missing \['blk\.1\.attn_kv_b\.weight'\]"):
        Transformer.from_gguf_tensors(cfg, back)


@pytest.mark.unit
def test_random_small_mla_gguf_loads_into_the_transformer(tmp_path):
    cfg = get_config("small-mla")
    g = read_gguf(write_random_gguf("small-mla", tmp_path / "small-mla.gguf"))
    assert g.config == cfg
    model = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()
    assert isinstance(model.blocks[7].attn, LatentAttention)
    assert model.rope_cos.shape == (cfg.max_seq_len, cfg.qk_rope_dim // 2)  # RoPE tables of dimension r
    assert np.array_equal(model.blocks[3].attn.kv_b.ternary_weights().codes, g.ternary("blk.3.attn_kv_b.weight").codes)
    with torch.no_grad():
        logits = model(torch.arange(1, 17)[None])
    assert logits.shape == (1, 16, cfg.vocab_size) and torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"kv_lora_rank": 100}, "kv_lora_rank=100"), ({"kv_lora_rank": 384}, "kv_lora_rank=384"),
     ({"qk_rope_dim": 31}, "qk_rope_dim=31"), ({"qk_rope_dim": 66}, "qk_rope_dim=66"),
     ({"n_kv_heads": 2}, "n_kv_heads=2")],
)  # fmt: skip
def test_hostile_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        mla_config(**overrides)


def set_uint32(raw: bytes, key: str, value: int) -> bytes:
    """``raw`` with the uint32 metadata value of ``key`` replaced (the key's string, then its type, then the value)."""
    name = key.encode()
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert int.from_bytes(raw[at : at + 4], "little") == 4  # GGUF value type 4: uint32
    return raw[: at + 4] + value.to_bytes(4, "little") + raw[at + 8 :]


@pytest.mark.unit
def test_gguf_with_a_bad_latent_rank_is_refused_by_key(tmp_path):
    raw = write_random_gguf(mla_config(), tmp_path / "mla.gguf").read_bytes()
    assert read_gguf(raw).config.kv_lora_rank == C
    key = f"{ARCH}.attention.kv_lora_rank"
    with pytest.raises(GGUFError, match=rf"hyperparameter {key}: kv_lora_rank=100") as info:
        read_gguf(set_uint32(raw, key, 100))
    assert "\n" not in str(info.value)


# --- training, and GQA untouched --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_training_steps_lower_the_loss_and_reach_the_latent_path():
    model = mla_model(seed=1).train()
    idx = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        total, ce = model.loss(x, y)
        opt.zero_grad()
        total.backward()
        if step == 0:
            for b in model.blocks:
                for p in (b.attn.q.weight, b.attn.kv_a.weight, b.attn.kv_norm.weight, b.attn.kv_b.weight):
                    assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
        losses.append(float(ce))
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.unit
def test_optimizer_groups_put_the_latent_norm_with_the_norms():
    model = mla_model()
    opts = make_optimizers(model, TrainConfig())
    muon = {id(p) for g in opts["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opts["adamw"].param_groups for p in g["params"]}
    for b in model.blocks:
        a = b.attn
        assert all(id(bl.weight) in muon for bl in (a.q, a.kv_a, a.kv_b, a.o))
        assert id(a.kv_norm.weight) in adamw and id(a.norm.weight) in adamw


@pytest.mark.unit
def test_onnx_export_runs_an_mla_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from model.onnx_export import export_onnx

    model = mla_model(seed=5, max_seq_len=64)
    export_onnx(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    got = sess.run(None, {"input_ids": idx.numpy()})[0]
    with torch.no_grad():
        want = model(idx).numpy()
    err = np.abs(got - want)  # dequantized weights: summation order, and rarely an int8 rounding flip (as GQA)
    assert err.max() < 5e-2 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.unit
@pytest.mark.parametrize("overrides", [{}, {"n_streams": 4, "mtp_heads": 1, "tie_embeddings": False}])
def test_gqa_configs_are_unchanged(overrides):
    cfg = get_config("tiny", **overrides)
    model = Transformer(cfg)
    assert not cfg.mla and not any(isinstance(m, LatentAttention) for m in model.modules())
    assert all(type(b.attn) is Attention for b in model.blocks)
    attn = {n[len("blocks.0.attn.") :] for n, _ in model.named_parameters() if n.startswith("blocks.0.attn.")}
    assert attn == {"norm.weight", "q.weight", "k.weight", "v.weight", "o.weight"}
    assert model.rope_cos.shape == (cfg.max_seq_len, cfg.head_dim // 2)
    names = list(model.gguf_tensors())
    assert set(names) == set(tensor_specs(cfg))
    block = [n[len("blk.0.") :] for n in names if n.startswith("blk.0.attn")]
    assert block == ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"]
    cache = model.new_cache(batch=2, max_len=8)
    assert set(cache.tensors()) == {"k", "v"} and not hasattr(cache, "latent")
    assert cache.k[0].shape == (2, cfg.n_kv_heads, 8, cfg.head_dim)
