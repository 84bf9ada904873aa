"""The ternary mixture-of-experts FFN (model/moe.py) and its place in the model, the GGUF file and training.

The routing is checked against a literal per-token reference (the compiled graph computes the same), the experts
run on their own tokens only, ties go to the lower index, the load-balancing loss follows its formula, and MoE
models survive the GGUF round trip and learn.

    pytest tests/test_moe_model.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import assert_gguf_round_trip

from model.config import get_config
from model.gguf_io import GGMLType, read_gguf, tensor_specs
from model.moe import MoEFFN, balance_loss, top_experts
from model.random_model import random_tensors, write_random_gguf
from model.ternary.quant import TernaryWeights
from model.transformer import MOE_AUX_WEIGHT, Transformer
from train.train import LossModule, TrainConfig, flops_per_token, make_optimizers, moe_stats

pytestmark = pytest.mark.unit

D = 256  # the tiny preset's d_model


def moe_config(n_experts: int = 4, k: int = 2, **overrides):
    return get_config("tiny", n_experts=n_experts, n_experts_used=k, ffn_hidden=256, **overrides)


def make_moe(n_experts: int = 4, k: int = 2, seed: int = 0, router_std: float = 0.1) -> MoEFFN:
    """An MoE FFN whose router logits spread (std ≈ 1.6) and whose norm is not all ones."""
    torch.manual_seed(seed)
    m = MoEFFN(moe_config(n_experts, k))
    with torch.no_grad():
        m.router.weight.normal_(std=router_std)
        m.norm.weight.uniform_(0.5, 1.5)
    return m


def reference_route(m: MoEFFN, xt: torch.Tensor) -> tuple[list[int], list[float], list[float]]:
    """One token's chosen experts, their weights and the full router softmax, from the formula, literally."""
    logits = [float(v) for v in m.router.weight @ xt]
    chosen = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[: m.k]
    top = max(logits)
    total = sum(math.exp(v - top) for v in logits)
    denom = sum(math.exp(logits[e] - top) for e in chosen)
    return chosen, [math.exp(logits[e] - top) / denom for e in chosen], [math.exp(v - top) / total for v in logits]


@torch.no_grad()
def reference_forward(m: MoEFFN, u: torch.Tensor) -> tuple[torch.Tensor, list[list[int]], float]:
    """``(y, chosen experts per token, aux loss)`` token by token: ``y_t = Σ_j w_j · expert_{e_j}(x_t)``."""
    x = m.norm(u).reshape(-1, u.shape[-1])
    n_experts = len(m.experts)
    ys, chosen_all, mean_p, counts = [], [], [0.0] * n_experts, [0] * n_experts
    for xt in x:
        chosen, weights, probs = reference_route(m, xt)
        y = torch.zeros_like(xt)
        for e, w in zip(chosen, weights, strict=True):
            y = y + w * m.experts[e](xt[None])[0]
            counts[e] += 1
        ys.append(y)
        chosen_all.append(chosen)
        mean_p = [a + p / len(x) for a, p in zip(mean_p, probs, strict=True)]
    aux = n_experts * sum(c / (len(x) * m.k) * p for c, p in zip(counts, mean_p, strict=True))
    return torch.stack(ys).reshape(u.shape), chosen_all, aux


# --- (a) the formula, (b) only the chosen experts run, (c) ties, (d) the load-balancing loss --------------------------


@settings(max_examples=20)
@given(data=st.data(), n_experts=st.integers(2, 6), batch=st.integers(1, 2), tokens=st.integers(1, 7),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_output_and_aux_equal_the_per_token_formula(data, n_experts, batch, tokens, seed):
    k = data.draw(st.integers(1, n_experts), label="k")
    m = make_moe(n_experts, k, seed)
    u = torch.randn(batch, tokens, D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = m(u)
    want, chosen, aux = reference_forward(m, u)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert float(m.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert m.last_load.tolist() == [sum(e in c for c in chosen) for e in range(n_experts)]


def test_each_expert_runs_once_on_exactly_its_tokens():
    m = make_moe(n_experts=6, k=2, seed=3)
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(6)}
    hooks = [expert.register_forward_hook(lambda mod, args, out, e=e: seen[e].append(args[0].detach()))
             for e, expert in enumerate(m.experts)]  # fmt: skip
    u = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    m(u)
    for h in hooks:
        h.remove()
    x = m.norm(u).detach().reshape(-1, D)
    _, chosen, _ = reference_forward(m, u)
    for e in range(6):
        tokens = [t for t, c in enumerate(chosen) if e in c]
        assert len(seen[e]) == 1  # one call per expert and forward, however many tokens it has (maybe none)
        assert torch.equal(seen[e][0], x[tokens]), e
    assert sum(len(s[0]) for s in seen.values()) == 15 * 2  # k rows per token in all: no expert runs on every token


@settings(max_examples=50)
@given(st.data())
def test_top_experts_break_ties_by_the_lower_index(data):
    n_experts = data.draw(st.integers(2, 8))
    k = data.draw(st.integers(1, n_experts))
    row = st.lists(st.integers(-2, 2), min_size=n_experts, max_size=n_experts)  # few distinct values: many ties
    rows = data.draw(st.lists(row, min_size=1, max_size=6))
    got = top_experts(torch.tensor(rows, dtype=torch.float32), k).tolist()
    assert got == [sorted(range(n_experts), key=lambda e: (-r[e], e))[:k] for r in rows]


def test_a_uniform_router_picks_the_first_experts_with_equal_weights_and_aux_one():
    m = make_moe(n_experts=5, k=3, seed=2)
    with torch.no_grad():
        m.router.weight.zero_()  # every logit 0: a five-way tie for every token
        u = torch.randn(2, 4, D)
        y = m(u)
        x = m.norm(u)
        want = sum(m.experts[e](x) / 3 for e in range(3))
    assert m.last_load.tolist() == [8, 8, 8, 0, 0]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    # P_e = 1/E for every e, so E · Σ_e f_e · P_e = Σ_e f_e = 1 whatever the assignment (and for any k)
    assert float(m.aux_loss) == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=30)
@given(n_experts=st.integers(2, 8), per_expert=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_balance_loss_is_one_for_balanced_assignments_and_E_when_collapsed(n_experts, per_expert, seed):
    g = torch.Generator().manual_seed(seed)
    n = n_experts * per_expert
    probs = torch.randn(n, n_experts, generator=g).softmax(-1)
    top = torch.arange(n).remainder(n_experts)[:, None]  # each expert gets the same share (k = 1)
    aux, load = balance_loss(probs, top)
    assert float(aux) == pytest.approx(1.0, rel=1e-5) and load.tolist() == [per_expert] * n_experts
    collapsed = torch.zeros(n, n_experts)
    collapsed[:, 0] = 1  # every token sure of expert 0 and sent there: the worst case, E
    aux, load = balance_loss(collapsed, torch.zeros(n, 1, dtype=torch.int64))
    assert float(aux) == pytest.approx(n_experts) and load.tolist() == [n] + [0] * (n_experts - 1)


def test_aux_loss_gradient_pushes_the_router_towards_balance():
    m = make_moe(n_experts=4, k=1, seed=5)
    with torch.no_grad():
        m.router.weight[0] += 0.01  # inputs with a positive mean favour expert 0 (logit ≈ +1.8)
    u = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(0)) + 1.0
    m(u)
    before = float(m.aux_loss.detach())
    assert before > 1.2  # imbalanced: loads 12, 4, 14, 2
    m.aux_loss.backward()
    with torch.no_grad():
        m.router.weight -= 0.01 * m.router.weight.grad / m.router.weight.grad.norm()
        m(u)
    assert float(m.aux_loss) < before


# --- the model: (e) GGUF round trip, (f) training, (g) dense names unchanged ------------------------------------------


def moe_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(moe_config(**overrides)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.router.weight.normal_(std=0.1)
    return model


@pytest.mark.parametrize(
    ("ttype", "overrides"),
    [(GGMLType.TQ2_0, {"n_streams": 2}), (GGMLType.TQ1_0, {"n_streams": 4, "mtp_heads": 1, "k": 3})],
)
def test_gguf_round_trip_gives_identical_logits(tmp_path, ttype, overrides):
    model = moe_model(**overrides)
    cfg = model.config
    tensors = model.gguf_tensors()
    assert set(tensors) == set(tensor_specs(cfg))
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    assert gate.stacked and gate.codes.shape == (cfg.n_experts, cfg.ffn_hidden, cfg.d_model)
    assert tensors["blk.1.ffn_gate_inp.weight"].shape == (cfg.n_experts, cfg.d_model)
    assert_gguf_round_trip(model, tmp_path / "moe.gguf", ttype)


def test_loading_a_stack_with_the_wrong_expert_count_fails_clearly():
    tensors = moe_model().gguf_tensors()
    tw = tensors["blk.0.ffn_up_exps.weight"]
    tensors["blk.0.ffn_up_exps.weight"] = TernaryWeights.stack([tw.expert(e) for e in range(3)])
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up_exps\.weight: expected a stack of 4 experts.*got 3"):
        Transformer.from_gguf_tensors(moe_config(), tensors)
    tensors["blk.0.ffn_up_exps.weight"] = tw.expert(0)
    with pytest.raises(ValueError, match="got no stack of experts"):
        Transformer.from_gguf_tensors(moe_config(), tensors)


def test_random_moe_gguf_reads_back_runs_and_spreads_tokens(tmp_path):
    g = read_gguf(write_random_gguf(get_config("tiny", n_experts=4, n_experts_used=2), tmp_path / "r.gguf"))
    assert (g.config.n_experts, g.config.n_experts_used) == (4, 2)
    assert g.tensors["blk.0.ffn_down_exps.weight"].ternary().codes.shape == (4, 256, 512)
    model = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()
    with torch.no_grad():
        logits = model(torch.arange(1, 33)[None])
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert all((b.ffn.last_load > 0).sum() >= 3 for b in model.blocks)  # a random router spreads the tokens


def test_random_small_moe_preset_writes_and_reads(tmp_path):
    cfg = get_config("small-moe")
    tensors = random_tensors(cfg)
    assert tensors["blk.7.ffn_gate_exps.weight"].scale.shape == (cfg.n_experts,)
    g = read_gguf(write_random_gguf(cfg, tmp_path / "small-moe.gguf"))
    assert g.config == cfg
    assert np.array_equal(g.ternary("blk.7.ffn_up_exps.weight").codes, tensors["blk.7.ffn_up_exps.weight"].codes)


def test_kv_cache_decoding_equals_the_full_forward():
    model = moe_model()
    idx = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2)
        steps = torch.cat([model(idx[:, t : t + 1], cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_training_steps_lower_the_loss_and_reach_router_and_experts():
    model = moe_model(seed=1).train()
    idx = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        total, ce = model.loss(x, y)
        aux = float(model.moe_aux_loss().detach())
        assert float(total.detach()) == pytest.approx(float(ce) + MOE_AUX_WEIGHT * aux, rel=1e-6)
        opt.zero_grad()
        total.backward()
        if step == 0:
            for b in model.blocks:
                assert b.ffn.router.weight.grad.abs().sum() > 0
                for e, expert in enumerate(b.ffn.experts):
                    for bl in (expert.gate, expert.up, expert.down):
                        assert (bl.weight.grad.abs().sum() > 0) == (b.ffn.last_load[e] > 0)
        opt.step()
        losses.append(float(ce))
    assert losses[-1] < losses[0] - 0.5


def test_training_loop_pieces_handle_moe():
    model = moe_model(k=1)
    opts = make_optimizers(model, TrainConfig())
    muon = {id(p) for g in opts["muon"].param_groups for p in g["params"]}
    routers = [b.ffn.router.weight for b in model.blocks]
    assert not any(id(p) in muon for p in routers)  # the float routers go to AdamW, the experts to Muon
    assert all(id(b.ffn.experts[0].gate.weight) in muon for b in model.blocks)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        loss, ce = LossModule(model, entropy_coef=0.1)(x, x)
        logp = model(x).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    assert float(loss) == pytest.approx(float(ce - 0.1 * entropy + MOE_AUX_WEIGHT * model.moe_aux_loss()), rel=1e-5)
    stats = moe_stats(model)
    assert set(stats) == {"moe_aux", "moe_load_max"} and 1 <= stats["moe_load_max"] <= 4
    dense_ffn = moe_model(k=4)  # all experts active: the FLOPs of every expert
    assert flops_per_token(model, 32) < flops_per_token(dense_ffn, 32)
    assert moe_stats(Transformer(get_config("tiny"))) == {}


@pytest.mark.parametrize("overrides", [{}, {"n_streams": 4, "mtp_heads": 1, "tie_embeddings": False}])
def test_dense_models_keep_their_tensor_names(overrides):
    cfg = get_config("tiny", **overrides)
    names = set(Transformer(cfg).gguf_tensors())
    assert names == set(tensor_specs(cfg))
    block = {n[len("blk.0.") :] for n in names if n.startswith("blk.0.")}
    ffn = {"ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
    attn = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"}
    mhc = {f"mhc_{s}.{k}_logits" for s in ("attn", "ffn") for k in ("pre", "post", "res")}
    assert block == ffn | attn | (mhc if cfg.n_streams > 1 else set())
    moe_block = {n[len("blk.0.") :] for n in tensor_specs(moe_config(**overrides)) if n.startswith("blk.0.")}
    assert moe_block == block - ffn | {"ffn_norm.weight", "ffn_gate_inp.weight", "ffn_gate_exps.weight",
                                       "ffn_up_exps.weight", "ffn_down_exps.weight"}  # fmt: skip
