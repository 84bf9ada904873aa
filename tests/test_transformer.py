"""The transformer: KV-cache decoding equals the full forward, it learns next tokens (not identity), presets, export.

pytest tests/test_transformer.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import PRESETS, get_config
from model.generate import SamplingParams, generate
from model.transformer import Transformer

pytestmark = pytest.mark.unit


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_config("tiny", **overrides)).eval()


@pytest.mark.parametrize("overrides", [{"n_streams": 1}, {"n_streams": 2}, {"n_streams": 4, "mtp_heads": 1},
                                       {"n_streams": 2, "tie_embeddings": False}])  # fmt: skip
def test_kv_cache_decoding_equals_full_forward(overrides):
    """In float64, so that summation-order noise (~1e-16) cannot flip an int8 activation rounding: the cache logic
    itself must then reproduce the full forward to ~1e-12."""
    model = small_model(**overrides).double()
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2)
        steps = [model(idx[:, :7], cache)] + [model(idx[:, t : t + 1], cache) for t in range(7, 24)]
    inc = torch.cat(steps, dim=1)
    assert cache.pos == 24
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-10)


def test_kv_cache_float32_agrees():
    """float32, as the runtime runs: attention over 1 vs T keys sums in a different order (~1e-7), which can flip
    the rounding of a rare int8 activation; one flip moves logits by ≲1e-2 (measured 8.7e-3 on logits of ~1.4)."""
    model = small_model(n_streams=4)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2)
        inc = torch.cat([model(idx[:, :7], cache)] + [model(idx[:, t : t + 1], cache) for t in range(7, 24)], 1)
    torch.testing.assert_close(inc, full, rtol=0, atol=2e-2)
    assert (inc - full).abs().median() < 1e-6  # almost every logit agrees to float32 noise
    assert torch.equal(inc.argmax(-1), full.argmax(-1))


def test_kv_cache_overflow_and_context_limit_raise():
    model = small_model(max_seq_len=8)
    cache = model.new_cache(max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 3, dtype=torch.long), cache)


def test_causal_no_peeking():
    """Changing a future token never changes the logits of earlier positions."""
    model = small_model()
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    other = idx.clone()
    other[0, 10:] = (other[0, 10:] + 1) % 512
    with torch.no_grad():
        a, b = model(idx), model(other)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.equal(a[:, 10:], b[:, 10:])


def test_learns_next_token_not_identity():
    """The predecessor's identity bypass: a model that copies its input reaches a fine-looking loss on text. Here the
    next token is always current + 3 (mod V), so copying scores 0 % and predicting the shifted target scores 100 %."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = get_config("tiny", n_layers=1, vocab_size=64, max_seq_len=32)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch():
        start = torch.randint(0, cfg.vocab_size, (8, 1), generator=gen)
        return (start + 3 * torch.arange(17)) % cfg.vocab_size

    for _ in range(60):  # converges in ~50 steps (loss < 0.01)
        seq = batch()
        loss, _ = model.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq = batch()
    with torch.no_grad():
        pred = model.eval()(seq[:, :-1]).argmax(-1)
    assert (pred == seq[:, 1:]).float().mean() > 0.95  # next token
    assert (pred == seq[:, :-1]).float().mean() < 0.05  # not the current one
    out = generate(model, [5], SamplingParams(max_new_tokens=8)).tokens
    assert out == [(5 + 3 * i) % 64 for i in range(1, 9)]  # differs position by position


def test_mtp_loss_uses_further_shifted_targets():
    model = small_model(mtp_heads=2)
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    total, ce = model.loss(idx[:, :-1], idx[:, 1:])
    assert total.item() > ce.item()  # the MTP terms add a positive cross-entropy
    total.backward()
    assert model.mtp[1].proj.weight.grad.abs().sum() > 0 and model.mtp[0].embed_proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_mtp_chain_sees_only_the_tokens_it_may():
    """Step k at position t sees h_t and the tokens t+1 .. t+k+1 (what the runtime feeds it), never a later one."""
    model = small_model(mtp_heads=2).eval()
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    h, nxt = model.hidden(idx), idx[:, 1:]
    h = h[:, :-1]  # the positions whose next token is known
    chain = model.mtp_chain(h, nxt)
    assert [tuple(g.shape) for g in chain] == [(1, 11, 256), (1, 10, 256)]
    t = 4
    for k, g in enumerate(chain):
        later = nxt.clone()
        later[0, t + k + 1 :] = (later[0, t + k + 1 :] + 7) % 512  # tokens after t + k + 1
        assert torch.equal(model.mtp_chain(h, later)[k][0, t], g[0, t])
        seen = nxt.clone()
        seen[0, t + k] = (seen[0, t + k] + 7) % 512  # the token at t + k + 1
        assert not torch.equal(model.mtp_chain(h, seen)[k][0, t], g[0, t])


def test_gguf_tensors_reload_exactly():
    model = small_model(n_streams=4, mtp_heads=1, tie_embeddings=False)
    with torch.no_grad():
        for site in model.mhc_sites():
            site.res_logits.add_(torch.randn_like(site.res_logits))
    tensors = model.gguf_tensors()
    assert "output.weight" in tensors and "mtp.0.embed_proj.weight" in tensors and "blk.1.mhc_ffn.res_logits" in tensors
    again = Transformer.from_gguf_tensors(model.config, tensors).eval()
    idx = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))
    coeffs = again.mhc_coefficients()
    assert len(coeffs) == 4 and coeffs[0].h_res.shape == (4, 4)
    for a, b in zip(coeffs, model.mhc_coefficients(), strict=True):
        assert np.array_equal(a.h_res, b.h_res) and np.array_equal(a.h_pre, b.h_pre)
    del tensors["blk.0.attn_q.weight"]
    with pytest.raises(ValueError, match="missing"):
        Transformer.from_gguf_tensors(model.config, tensors)


def test_presets_build_and_small_is_in_budget():
    n_small = Transformer(PRESETS["small"]).num_params()
    assert 20e6 <= n_small <= 30e6  # the budget for the shipped model
    for cfg in PRESETS.values():
        assert all(k % 256 == 0 for _, k in cfg.ternary_shapes().values())


def test_dynamic_mhc_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="dynamic"):
        Transformer(get_config("tiny", mhc_dynamic=True))
