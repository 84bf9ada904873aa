"""The gated DeltaNet hybrid (model/deltanet.py) and its place in the model, the cache, the GGUF file and training.

The chunked parallel form equals the recurrent one (outputs, final state and gradients), the module equals a literal
numpy loop of the maths (written here from the module's quantized weights), the cache decodes exactly as the full
forward with a state whose size does not depend on the length, and hybrids survive the GGUF round trip, learn, and
leave GQA models as they were.

    pytest tests/test_deltanet_model.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_helpers import assert_gguf_round_trip

from model.attention import Attention
from model.config import get_config
from model.deltanet import GatedDeltaNet, chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule
from model.generate import generate
from model.gguf_io import GGMLType, GGUFError, parse_gguf, read_gguf, tensor_specs
from model.random_model import write_random_gguf
from model.sampling import SamplingParams
from model.transformer import Transformer
from train.rl import sample_group
from train.train import TrainConfig, make_optimizers

pytestmark = pytest.mark.unit

H, HK, HD, D = 4, 2, 64, 256  # the tiny preset: query heads, KV heads, head size, width
G = H // HK
SSM = ("ssm_alpha.weight", "ssm_beta.weight", "ssm_a", "ssm_dt.bias")


def dn_config(interval: int = 2, **overrides):
    """Interval 2: layer 0 DeltaNet, layer 1 softmax attention; 3: both layers DeltaNet."""
    return get_config("tiny", full_attention_interval=interval, **overrides)


def dn_model(seed: int = 0, interval: int = 2, **overrides) -> Transformer:
    """A tiny hybrid whose gates depend on the input (projections ~ N(0, 1/d), not the small init) and whose norm
    gains are not all ones, so that a gate or a gain used in the wrong place shows."""
    torch.manual_seed(seed)
    model = Transformer(dn_config(interval, **overrides)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.norm.weight.uniform_(0.5, 1.5)
            if isinstance(b.attn, GatedDeltaNet):
                b.attn.w_alpha.normal_(0, D**-0.5)
                b.attn.w_beta.normal_(0, D**-0.5)
    return model


def random_inputs(b: int, t: int, h: int, hk: int, dk: int, dv: int, seed: int, dtype=torch.float64):
    """``q, k (L2-normed), v, alpha, beta, state`` as the rule functions take them; a few decays are exactly 0 (a
    state wiped) and a few exactly 1."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    alpha = torch.rand(b, t, hk, generator=gen, dtype=dtype) * 0.6 + 0.4
    alpha[0, t // 3, 0], alpha[-1, 2 * t // 3, 1], alpha[0, t // 2, 1] = 0.0, 0.0, 1.0
    beta = torch.rand(b, t, hk, generator=gen, dtype=dtype)
    return rand(b, t, h, dk), l2norm(rand(b, t, hk, dk)), rand(b, t, hk, dv), alpha, beta, rand(b, hk, dk, dv)


# --- the two forms of the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "chunk"), [(150, 64), (37, 16), (64, 64), (5, 64), (1, 64)])
def test_chunked_form_equals_the_recurrent_one(t, chunk):
    """float64, T not a multiple of the chunk (and one chunk, and less), GQA (2 query heads per state), a nonzero
    initial state, decays of exactly 0 and 1: outputs and final state agree to rounding."""
    q, k, v, alpha, beta, s0 = random_inputs(2, t, 4, 2, 16, 8, seed=t)
    want_o, want_s = recurrent_gated_delta_rule(q, k, v, alpha, beta, s0)
    got_o, got_s = chunk_gated_delta_rule(q, k, v, alpha, beta, s0, chunk=chunk)
    assert got_o.shape == (2, t, 4, 8) and got_s.shape == (2, 2, 16, 8)
    torch.testing.assert_close(got_o, want_o, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-12)
    zero_o, zero_s = chunk_gated_delta_rule(q, k, v, alpha, beta, None, chunk=chunk)  # None: from zeros
    from_zeros = recurrent_gated_delta_rule(q, k, v, alpha, beta, torch.zeros_like(s0))
    torch.testing.assert_close((zero_o, zero_s), from_zeros, rtol=0, atol=1e-12)
    assert want_o.abs().max() > 0.5 and (zero_o - got_o).abs().max() > 1e-2  # the initial state matters


def test_chunked_form_carries_the_state_across_calls():
    """Three calls of 70, 1 and 40 tokens, each from the last one's final state, equal one call over 111."""
    q, k, v, alpha, beta, s0 = random_inputs(2, 111, 4, 2, 16, 8, seed=7)
    whole_o, whole_s = chunk_gated_delta_rule(q, k, v, alpha, beta, s0)
    outs, s = [], s0
    for a, b in ((0, 70), (70, 71), (71, 111)):
        o, s = chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], alpha[:, a:b], beta[:, a:b], s)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), whole_o, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, whole_s, rtol=0, atol=1e-12)


def test_chunked_gradients_equal_the_recurrent_ones():
    """Training backpropagates through the chunked form (the triangular solve included): its gradients with respect
    to every input, the initial state too, are the recurrent loop's (for decays above 0: the chunked form sums
    ``log α``, whose gradient at an ``α`` of exactly 0 is lost; the module's ``α`` is 0 only by underflow, where the
    gradient reaching the gate logits is 0 either way)."""
    q, k, v, alpha, beta, s0 = random_inputs(2, 45, 4, 2, 8, 8, seed=3)
    inputs = [x.requires_grad_() for x in (q, k, v, alpha.clamp_min(0.3), beta, s0)]
    weight = torch.randn(2, 45, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for rule in (recurrent_gated_delta_rule, lambda *a: chunk_gated_delta_rule(*a, chunk=16)):
        o, s = rule(*inputs)
        grads.append(torch.autograd.grad((o * weight).sum() + s.square().sum(), inputs))
    for name, want, got in zip(("q", "k", "v", "alpha", "beta", "state"), *grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)
        assert want.abs().max() > 1e-3, name


# --- the maths, literally ----------------------------------------------------------------------------------------


def ref_rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def ref_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row to int8 values by its own absmax: ``(x_q, a)``."""
    a = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * a), -127, 127), a


def ref_linear(layer, x: np.ndarray) -> np.ndarray:
    tw = layer.ternary_weights()
    xq, a = ref_quantize(x)
    return (xq @ tw.codes.astype(np.float64).T) * (float(tw.scale) / a)


@torch.no_grad()
def reference_deltanet(layer: GatedDeltaNet, u: torch.Tensor, eps: float) -> np.ndarray:
    """``y [B, T, d]`` of the module docstring's maths, KV head by KV head and token by token."""
    w = lambda p: p.double().numpy()  # noqa: E731
    out = []
    for ub in u.double().numpy():
        t = len(ub)
        x = ref_rms(ub, w(layer.norm.weight), eps)
        q = ref_linear(layer.q, x).reshape(t, H, HD)
        k = ref_linear(layer.k, x).reshape(t, HK, HD)
        v = ref_linear(layer.v, x).reshape(t, HK, HD)
        xq, a = ref_quantize(x)
        x_deq = xq / a  # the int8 input the ternary matmuls read, dequantized
        alpha = np.exp(-np.exp(w(layer.A_log)) * np.log1p(np.exp(x_deq @ w(layer.w_alpha).T + w(layer.dt_bias))))
        beta = 1 / (1 + np.exp(-(x_deq @ w(layer.w_beta).T)))
        heads = np.zeros((t, H * HD))
        for kv in range(HK):
            S = np.zeros((HD, HD))  # S[i, j]: key dim i, value dim j
            for i in range(t):
                kn = k[i, kv] / math.sqrt(k[i, kv] @ k[i, kv] + 1e-6)
                S = alpha[i, kv] * S  # decay first, then the delta rule on the decayed state
                S = S + np.outer(kn, beta[i, kv] * (v[i, kv] - S.T @ kn))
                for h in range(kv * G, kv * G + G):  # the query heads of this KV head
                    qn = q[i, h] / math.sqrt(q[i, h] @ q[i, h] + 1e-6) / math.sqrt(HD)
                    heads[i, h * HD : (h + 1) * HD] = S.T @ qn
        out.append(ref_linear(layer.o, heads))
    return np.stack(out)


@pytest.mark.parametrize("qk_scale", [1.0, 1e-3], ids=["unit", "tiny-qk"])
def test_module_equals_the_numpy_loop_with_and_without_a_cache(qk_scale):
    """In float64: the layer run whole (chunked: 75 tokens, two chunks), through the cache in parts of 66 (chunked,
    from zeros), 1, 1 (recurrent) and 7 (chunked from the state) tokens, and token by token (recurrent), computes
    the maths of the module docstring to summation-order noise. With q and k weights scaled by 1e-3, ``Σk²`` is
    near the norms' 1e-6, which must then sit inside the square root."""
    model = dn_model(seed=3).double()
    layer = model.blocks[0].attn
    with torch.no_grad():
        layer.q.weight.mul_(qk_scale)
        layer.k.weight.mul_(qk_scale)
    t = 75
    u = torch.randn(2, t, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = reference_deltanet(layer, u, model.config.norm_eps)
    rope = (model.rope_cos[:t], model.rope_sin[:t])  # ignored
    with torch.no_grad():
        whole = layer(u, rope).numpy()
        cache = model.new_cache(batch=2, max_len=t)
        parts = [layer(u[:, a:b], rope, cache, a) for a, b in ((0, 66), (66, 67), (67, 68), (68, 75))]
        steps_cache = model.new_cache(batch=2, max_len=t)
        steps = [layer(u[:, j : j + 1], rope, steps_cache, j) for j in range(t)]
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(torch.cat(parts, 1).numpy(), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), want, rtol=0, atol=1e-9)
    assert np.abs(want).max() > 0.02  # not vacuous
    alpha, _ = layer.gates(layer.norm(u))
    assert alpha.min() < 0.5 < alpha.max() < 1  # the decay does something, and differs between tokens and heads


def test_position_zero_starts_from_a_zero_state():
    """A cache reused from position 0 ignores what its state held."""
    model = dn_model(seed=1).double()
    idx = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache()
        model(idx, cache)
        cache.pos = 0
        torch.testing.assert_close(model(idx, cache), model(idx), rtol=0, atol=1e-12)


# --- the cache ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [2, 3])
def test_cached_decoding_equals_the_full_forward(interval):
    """float64: token by token, and a prefix prefilled (70 tokens: a chunk boundary inside, then a chunk of 5 from
    the state) then decoded, equal the full forward of 90 tokens."""
    model = dn_model(seed=2, interval=interval, n_streams=4).double()
    idx = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2)
        steps = torch.cat([model(idx[:, j : j + 1], cache) for j in range(90)], dim=1)
        prefilled = model.new_cache(batch=2)
        chunks = [model(idx[:, :70], prefilled), model(idx[:, 70:75], prefilled)]
        chunks = torch.cat(chunks + [model(idx[:, j : j + 1], prefilled) for j in range(75, 90)], 1)
    assert cache.pos == prefilled.pos == 90
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunks, full, rtol=0, atol=1e-10)


def test_cached_decoding_float32_agrees():
    model = dn_model(seed=4)
    idx = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        inc = torch.cat([model(idx[:, :67], cache)] + [model(idx[:, j : j + 1], cache) for j in range(67, 80)], 1)
    assert (inc - full).abs().max() < 5e-2 and (inc - full).abs().median() < 1e-4
    assert torch.equal(inc.argmax(-1), full.argmax(-1))


def test_state_size_does_not_depend_on_the_length():
    """A DeltaNet layer's cache is one ``[Hk, hd, hd]`` state per row at any ``max_len`` (``config.state_bytes`` in
    float32); the hybrid's attention layer keeps its keys and values; a model of DeltaNet layers only decodes past
    its cache's ``max_len``."""
    cfg = dn_config()
    model = dn_model()
    for max_len in (8, 256):
        cache = model.new_cache(batch=3, max_len=max_len)
        assert set(cache.tensors()) == {"k", "v", "state"}
        assert cache.state[0].shape == (3, HK, HD, HD) and cache.state[0].dtype == torch.float32
        assert cache.state[1] is None and cache.k[0] is None and cache.v[0] is None
        assert cache.k[1].shape == cache.v[1].shape == (3, HK, max_len, HD)
        states = cache.tensors()["state"]
        assert sum(s.numel() for s in states) == 3 * HD * HD * HK and 4 * states[0][0].numel() == cfg.state_bytes
    idx = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx, cache)
    assert cache.state[0].abs().sum() > 0
    assert cache.k[1][:, :, :6].abs().sum() > 0 and not cache.k[1][:, :, 6:].any()  # attention writes its keys
    assert cfg.kv_bytes_per_token == 8 * HK * HD  # one attention layer of two

    only = dn_model(interval=3)  # both layers DeltaNet
    assert all(isinstance(b.attn, GatedDeltaNet) for b in only.blocks)
    small = only.new_cache(max_len=4)
    assert set(small.tensors()) == {"state"} and len(small.tensors()["state"]) == 2
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        steps = torch.cat([only(idx[:, j : j + 1], small) for j in range(12)], 1)  # 12 tokens through a 4-slot cache
        torch.testing.assert_close(steps, only(idx), rtol=0, atol=1e-4)
        hybrid = model.new_cache(max_len=4)
        with pytest.raises(ValueError, match="KV cache overflow: 5 positions > max_len 4"):
            for j in range(5):
                model(idx[:, j : j + 1], hybrid)


@pytest.mark.parametrize("interval", [2, 3])
def test_cache_copies_to_a_batch_and_drops_rows(interval):
    """``fill_from`` / ``keep_rows`` (train.rl's group sampling) copy and select the states as the keys and values."""
    torch.manual_seed(0)
    model = Transformer(dn_config(interval)).double().eval()
    prompt = torch.tensor([[5, 9, 30, 2]])
    with torch.no_grad():
        one = model.new_cache(1, 12)
        model(prompt, one)
        group = model.new_cache(3, 12)
        group.fill_from(one)
        assert group.pos == 4 and torch.equal(group.state[0][2], one.state[0][0])
        group.keep_rows(torch.tensor([2, 0]))
        got = model(torch.tensor([[7], [11]]), group)
        want = torch.cat([model(torch.tensor([[*prompt[0].tolist(), t]]))[:, -1:] for t in (7, 11)])
    assert all(t.shape[0] == 2 for ts in group.tensors().values() for t in ts)
    assert (group.k[0] is None) and (group.state[1] is None) == (interval == 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_rl_group_sampling_and_generation_run_on_a_hybrid():
    """train.rl's group sampling (one prefill, its cache copied to the group's rows, finished rows dropped) gives the
    greedy completion of model.generate in every row."""
    model = dn_model(seed=4)
    prompt = [5, 9, 30, 2, 77]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = generate(model, prompt, greedy).tokens
    assert sample_group(model, prompt, 3, greedy, torch.Generator().manual_seed(0)) == [want] * 3
    with torch.no_grad():  # the greedy tokens are the full forward's argmax over each prefix
        logits = model(torch.tensor([prompt + want[:-1]]))[0, len(prompt) - 1 :]
    assert logits.argmax(-1).tolist() == want


# --- the file ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "ttype", "overrides"),
    [(2, GGMLType.TQ2_0, {}), (3, GGMLType.TQ1_0, {"n_streams": 4, "tie_embeddings": False})],
)
def test_gguf_round_trip_gives_identical_logits(tmp_path, interval, ttype, overrides):
    model = dn_model(interval=interval, **overrides)
    cfg = model.config
    tensors = model.gguf_tensors()
    assert set(tensors) == set(tensor_specs(cfg))
    block0 = {n[len("blk.0.") :] for n in tensors if n.startswith("blk.0.") and not n.startswith("blk.0.mhc")}
    assert block0 >= {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", *SSM}
    assert all(("blk.1." + s in tensors) == (interval == 3) for s in SSM)
    attn = model.blocks[0].attn
    assert np.array_equal(tensors["blk.0.ssm_a"], attn.A_log.detach().numpy()) and tensors["blk.0.ssm_a"].shape == (HK,)
    assert np.array_equal(tensors["blk.0.ssm_alpha.weight"], attn.w_alpha.detach().numpy())
    assert tensors["blk.0.attn_k.weight"].codes.shape == (HK * HD, D)
    assert cfg.full_attention_interval == interval
    back = assert_gguf_round_trip(model, tmp_path / "deltanet.gguf", ttype, tokens=70)
    del back["blk.0.ssm_dt.bias"]
    with pytest.raises(ValueError, match=r"missing \['blk\.0\.ssm_dt\.bias'\]"):
        Transformer.from_gguf_tensors(cfg, back)


def test_random_small_deltanet_gguf_loads_and_runs(tmp_path):
    cfg = get_config("small-deltanet")
    g = read_gguf(write_random_gguf("small-deltanet", tmp_path / "small-deltanet.gguf"))
    assert g.config == cfg
    model = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()
    assert [type(b.attn) for b in model.blocks] == [GatedDeltaNet, Attention] * 4
    assert np.array_equal(model.blocks[4].attn.dt_bias.detach().numpy(), g.tensors["blk.4.ssm_dt.bias"].data)
    idx = torch.arange(1, 17)[None]
    with torch.no_grad():
        logits = model(idx)
        cache = model.new_cache()
        inc = torch.cat([model(idx[:, :9], cache)] + [model(idx[:, j : j + 1], cache) for j in range(9, 16)], 1)
    assert logits.shape == (1, 16, cfg.vocab_size) and torch.isfinite(logits).all() and logits.std() > 0
    assert torch.equal(inc.argmax(-1), logits.argmax(-1))


def drop_tensor(src, dst, name: str):
    """Copy a GGUF through gguf.GGUFWriter without the tensor ``name``."""
    import gguf

    f = parse_gguf(src)
    w = gguf.GGUFWriter(str(dst), f.metadata["general.architecture"])
    for key, value in f.metadata.items():
        if key != "general.architecture":
            sub = gguf.GGUFValueType(int(f.array_types[key])) if key in f.array_types else None
            vt = gguf.GGUFValueType(int(f.value_types[key]))
            w.add_key_value(key, list(value) if sub is not None else value, vt, sub_type=sub)
    for tname, t in f.tensors.items():
        if tname != name:
            w.add_tensor(tname, np.array(t.data), raw_dtype=gguf.GGMLQuantizationType(int(t.ggml_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_without_a_decay_tensor_is_refused_by_name(tmp_path):
    src = write_random_gguf(dn_config(), tmp_path / "dn.gguf")
    assert read_gguf(src).config.full_attention_interval == 2
    with pytest.raises(GGUFError, match=r"missing \['blk\.0\.ssm_a'\]") as info:
        read_gguf(drop_tensor(src, tmp_path / "no_ssm_a.gguf", "blk.0.ssm_a"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"full_attention_interval": -1}, "full_attention_interval=-1 must be ≥ 0"),
     ({"full_attention_interval": 2, "mtp_heads": 1}, "mtp_heads=1: a DeltaNet hybrid has no draft heads"),
     ({"full_attention_interval": 2, "kv_lora_rank": 256, "n_kv_heads": 4}, "softmax layers are GQA")],
)  # fmt: skip
def test_hostile_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **overrides)


def test_deltanet_module_refuses_an_attention_layer():
    with pytest.raises(ValueError, match="layer 1 is softmax attention"):
        GatedDeltaNet(dn_config(), 1)


def test_onnx_export_refuses_a_hybrid(tmp_path):
    pytest.importorskip("onnx")
    from model.onnx_export import export_onnx

    with pytest.raises(ValueError, match="full_attention_interval=2"):
        export_onnx(dn_model(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# --- training, and GQA untouched ---------------------------------------------------------------------------------


def test_training_steps_lower_the_loss_and_reach_the_gates():
    model = dn_model(seed=1, interval=3).train()
    idx = torch.randint(0, 512, (4, 81), generator=torch.Generator().manual_seed(2))  # 80 tokens: two chunks
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        total, ce = model.loss(x, y)
        opt.zero_grad()
        total.backward()
        if step == 0:
            for b in model.blocks:
                a = b.attn
                for p in (a.q.weight, a.k.weight, a.v.weight, a.o.weight, a.w_alpha, a.w_beta, a.A_log, a.dt_bias):
                    assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
        losses.append(float(ce))
    assert losses[-1] < losses[0] - 0.5


def test_optimizer_groups_put_the_gates_with_adamw():
    model = dn_model()
    opts = make_optimizers(model, TrainConfig())
    muon = {id(p) for g in opts["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opts["adamw"].param_groups for p in g["params"]}
    a = model.blocks[0].attn
    assert all(id(bl.weight) in muon for bl in (a.q, a.k, a.v, a.o))
    assert all(id(p) in adamw for p in (a.w_alpha, a.w_beta, a.A_log, a.dt_bias, a.norm.weight))
    assert len(muon) + len(adamw) == len(list(model.parameters()))


@pytest.mark.parametrize("overrides", [{}, {"n_streams": 4, "mtp_heads": 1, "tie_embeddings": False}])
def test_gqa_configs_are_unchanged(overrides):
    cfg = get_config("tiny", **overrides)
    model = Transformer(cfg)
    assert cfg.full_attention_interval == 0 and cfg.deltanet_layers == () and cfg.state_bytes == 0
    assert not any(isinstance(m, GatedDeltaNet) for m in model.modules())
    assert all(type(b.attn) is Attention for b in model.blocks)
    attn = {n[len("blocks.0.attn.") :] for n, _ in model.named_parameters() if n.startswith("blocks.0.attn.")}
    assert attn == {"norm.weight", "q.weight", "k.weight", "v.weight", "o.weight"}
    names = list(model.gguf_tensors())
    assert set(names) == set(tensor_specs(cfg)) and not any("ssm" in n for n in names)
    cache = model.new_cache(batch=2, max_len=8)
    assert set(cache.tensors()) == {"k", "v"} and not hasattr(cache, "state")
    assert all(t is not None for t in cache.k) and cache.k[0].shape == (2, cfg.n_kv_heads, 8, cfg.head_dim)
