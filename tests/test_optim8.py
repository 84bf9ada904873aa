"""Memory-saving optimizers (train/optim8.py, train/galore.py) and their wiring in train/train.py: the 8-bit block
quantizer's error bounds, AdamW8bit against torch's AdamW, state through ``train.checkpoint``, GaLore's subspace, the
state's bytes, exact resume of a paused run, and loss parity of the 8-bit run on the tiny preset.

    pytest tests/test_optim8.py -q
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_train_loop import final_tensors, shards, tiny_cfg  # noqa: F401  (shards: a fixture)

from model.config import get_config
from model.transformer import Transformer
from train import checkpoint
from train.galore import GaLoreMuon, top_subspace
from train.muon import BatchedMuon
from train.optim8 import AdamW8bit, Muon8bit, Quantizer, code_table, state_bytes
from train.train import TrainConfig, make_optimizers, parse_args, train

QUANTIZERS = [Quantizer(kind, signed, sqrt) for kind in ("linear", "dynamic") for signed, sqrt in
              ((True, False), (False, False), (False, True))]  # fmt: skip


def random_blocks(seed: int, batch: int, n: int, decades: float, signed: bool) -> torch.Tensor:
    """Values whose magnitudes spread over ``decades`` decades (optimizer state is anything but uniform)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    x = x * 10 ** (decades * torch.rand(batch, n, generator=gen, dtype=torch.float64))
    return (x if signed else x.abs()).float()


@pytest.mark.unit
@pytest.mark.parametrize(("kind", "signed"), [(k, s) for k in ("linear", "dynamic") for s in (True, False)])
def test_code_tables_are_sorted_and_fit_a_byte(kind, signed):
    t = code_table(kind, signed)
    assert len(t) <= 256 and bool((t.diff() > 0).all())
    assert t[-1] == 1.0 and 0.0 in t and (t[0] < -0.99 if signed else t[0] == 0.0)


@pytest.mark.unit
@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: f"{q.kind}-{'signed' if q.signed else 'unsigned'}-{q.sqrt}")
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 3), n=st.integers(1, 700), decades=st.floats(0, 8))
def test_round_trip_error_is_at_most_half_a_level_of_its_block(q, seed, batch, n, decades):
    x = random_blocks(seed, batch, n, decades, q.signed)
    codes, scale = q.quantize(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and scale.shape == (batch, -(-n // q.block))
    y = q.dequantize(codes, scale)
    stored, back = (x.sqrt(), y.sqrt()) if q.sqrt else (x, y)  # the bound holds for what is stored
    pad = -n % q.block
    blocks = torch.nn.functional.pad(stored, (0, pad)).view(batch, -1, q.block)
    assert torch.equal(scale, blocks.abs().amax(-1))  # one float32 scale per block: its absmax
    half_level = (q.table.diff().max() / 2).item()
    bound = (scale.repeat_interleave(q.block, -1)[:, :n] * half_level) * (1 + 1e-5) + 1e-30
    assert bool(((stored - back).abs() <= bound).all())


@pytest.mark.unit
@pytest.mark.parametrize("q", QUANTIZERS)
def test_zeros_stay_zeros(q):
    x = torch.zeros(2, 300)
    assert torch.equal(q.dequantize(*q.quantize(x)), x)


@pytest.mark.unit
def test_dynamic_table_keeps_values_far_below_the_block_max():
    x = torch.full((1, 256), 3e-4)
    x[0, 0] = 1.0  # one large entry sets the block's scale
    for q in (Quantizer("dynamic", signed=True), Quantizer("dynamic", signed=False)):
        rel = (q.dequantize(*q.quantize(x)) - x).abs()[0, 1:] / 3e-4
        assert float(rel.max()) < 0.2  # a few significant bits survive
    assert float(Quantizer("linear", signed=True).dequantize(*Quantizer("linear").quantize(x))[0, 1:].abs().max()) == 0


@pytest.mark.unit
def test_adamw8bit_with_float_state_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(300))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    a, b = AdamW8bit(ours, min_8bit_size=10**9, **kw), torch.optim.AdamW(ref, **kw)
    for _ in range(5):
        for x, y in zip(ours, ref, strict=True):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        a.step()
        b.step()
    for x, y in zip(ours, ref, strict=True):
        assert torch.equal(x, y)


@pytest.mark.unit
@pytest.mark.parametrize("which", ["adamw", "muon"])
def test_8bit_optimizers_track_their_float_versions(which):
    torch.manual_seed(0)
    shapes = [(64, 128), (64, 128), (128, 64)]
    start = [torch.randn(s) for s in shapes]
    ours, ref = ([torch.nn.Parameter(p.clone()) for p in start] for _ in range(2))
    if which == "adamw":
        a, b = AdamW8bit(ours, lr=1e-3), torch.optim.AdamW(ref, lr=1e-3)
    else:
        a, b = Muon8bit(ours, lr=0.02), BatchedMuon(ref, lr=0.02)
    for _ in range(20):
        for x, y in zip(ours, ref, strict=True):
            x.grad = torch.randn_like(x) + 0.5 * x.detach()  # noise plus a pull towards 0
            y.grad = x.grad.clone() + 0.5 * (y.detach() - x.detach())
        a.step()
        b.step()
    for x, y, s in zip(ours, ref, start, strict=True):
        moved = (y.detach() - s).norm()
        assert float((x.detach() - y.detach()).norm() / moved) < 0.05, which
    st = a.state[ours[0]]
    assert {k: v.dtype for k, v in st.items() if k.endswith("_q")} and all(
        v.dtype == torch.uint8 for k, v in st.items() if k.endswith("_q"))  # fmt: skip


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(128, 64, bias=False), torch.nn.Linear(128, 64, bias=False)
        self.c, self.emb = torch.nn.Linear(64, 128, bias=False), torch.nn.Embedding(512, 16)
        self.norm = torch.nn.Parameter(torch.ones(16))


def small_optimizers(model: Small, kind: str) -> dict[str, torch.optim.Optimizer]:
    matrices = [model.a.weight, model.b.weight, model.c.weight]
    muon = Muon8bit(matrices) if kind == "muon8" else GaLoreMuon(matrices, rank=16, update_every=2)
    return {"muon": muon, "adamw": AdamW8bit([model.emb.weight, model.norm], lr=1e-2)}


def fake_grads(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["muon8", "galore"])
def test_state_round_trips_through_a_checkpoint_and_continues_exactly(kind, tmp_path):
    torch.manual_seed(0)
    model = Small()
    opts = small_optimizers(model, kind)
    for step in range(3):
        fake_grads(model, step)
        for opt in opts.values():
            opt.step()
    path = checkpoint.save(tmp_path, 3, model, opts, extra={})
    torch.manual_seed(1)
    model2 = Small()
    opts2 = small_optimizers(model2, kind)
    checkpoint.load(path, model2, opts2)
    for name, opt in opts.items():
        for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
            st, st2 = opt.state.get(p, {}), opts2[name].state.get(p2, {})
            assert st.keys() == st2.keys()
            for k in st:
                assert st[k].dtype == st2[k].dtype and torch.equal(st[k], st2[k]), (name, k)
    for step in range(3, 6):  # refreshes GaLore's subspace at step 4 from the restored projector
        for m, o in ((model, opts), (model2, opts2)):
            fake_grads(m, step)
            for opt in o.values():
                opt.step()
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


def tiny_state_bytes(optimizer: str, adamw_bits: int) -> dict[str, int]:
    """State bytes of the tiny preset's optimizers after one step (state is made on the first step)."""
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    opts = make_optimizers(model, TrainConfig(preset="tiny", optimizer=optimizer, adamw_bits=adamw_bits))
    fake_grads(model, 0)
    for opt in opts.values():
        opt.step()
    hidden = sum(p.numel() for p in opts["muon"].param_groups[0]["params"])
    return {name: state_bytes(opt) for name, opt in opts.items()} | {"hidden": hidden}


@pytest.mark.unit
def test_8bit_state_is_at_least_70_percent_smaller():
    full, small = tiny_state_bytes("muon", 32), tiny_state_bytes("muon8", 8)
    assert full["muon"] == 4 * full["hidden"]  # float32 momentum of every hidden matrix
    assert small["muon"] == full["hidden"] + 4 * full["hidden"] // 256  # a byte each + a float32 scale per block
    saved = 1 - (small["muon"] + small["adamw"]) / (full["muon"] + full["adamw"])
    assert saved >= 0.70 and 1 - small["muon"] / full["muon"] > 0.74, (full, small)
    galore = tiny_state_bytes("galore", 32)
    assert galore["muon"] < 0.6 * full["muon"], galore  # rank 64: r·(a + b) instead of a·b


@pytest.mark.unit
def test_top_subspace_finds_the_column_space_of_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 96, 5, generator=gen) @ torch.randn(3, 5, 200, generator=gen)  # rank 5
    p = top_subspace(g, 5, torch.Generator().manual_seed(1))
    assert p.shape == (3, 96, 5)
    assert torch.allclose(p.mT @ p, torch.eye(5).expand(3, 5, 5), atol=1e-5)
    assert float((g - p @ (p.mT @ g)).norm() / g.norm()) < 1e-5


@pytest.mark.unit
def test_galore_keeps_low_rank_state_and_carries_momentum_into_a_new_subspace():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(128, 64))]
    opt = GaLoreMuon(params, rank=8, update_every=3)
    for step in range(3):
        fake_grads(torch.nn.ParameterList(params), step)
        opt.step()
    for p in params:  # short side projected: a × r projector, r × b momentum
        assert opt.state[p]["projector"].shape == (64, 8) and opt.state[p]["momentum_buffer"].shape == (8, 128)
    old = {p: (opt.state[p]["projector"].clone(), opt.state[p]["momentum_buffer"].clone()) for p in params}
    fake_grads(torch.nn.ParameterList(params), 3)
    grads = [p.grad.clone() for p in params]
    opt.step()  # step 3: new subspace
    for p, g in zip(params, grads, strict=True):
        new, (proj, mom) = opt.state[p]["projector"], old[p]
        g = g.mT if p.shape[0] > p.shape[1] else g
        carried = (new.mT @ proj) @ mom
        expect = carried.lerp(new.mT @ g, 1 - 0.95)
        assert torch.allclose(opt.state[p]["momentum_buffer"], expect, atol=1e-6)
        assert not torch.allclose(new, proj, atol=1e-3)


@pytest.mark.unit
def test_full_rank_galore_is_muon_up_to_rounding():
    torch.manual_seed(0)
    start = [torch.randn(s) for s in ((32, 64), (32, 64), (64, 32))]
    ours, ref = ([torch.nn.Parameter(p.clone()) for p in start] for _ in range(2))
    a, b = GaLoreMuon(ours, rank=32, update_every=3), BatchedMuon(ref)
    for step in range(7):  # two refreshes: the momentum survives them (a rotation at full rank)
        fake_grads(torch.nn.ParameterList(ours), step)
        fake_grads(torch.nn.ParameterList(ref), step)
        a.step()
        b.step()
    for x, y, s in zip(ours, ref, start, strict=True):
        x, y = x.detach(), y.detach()
        assert float((x - y).norm() / (y - s).norm()) < 0.02  # bf16 Newton–Schulz


@pytest.mark.unit
def test_optimizer_flags_are_parsed_and_checked(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    flags = ["--optimizer", "galore", "--adamw-bits", "8", "--galore-rank", "32", "--galore-scale", "0.5"]
    cfg = parse_args(
        ["--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--seq-len", "32", *flags]
    )
    assert (cfg.optimizer, cfg.adamw_bits, cfg.galore_rank, cfg.galore_scale) == ("galore", 8, 32, 0.5)
    bad = replace(cfg, optimizer="sgd", adamw_bits=16, galore_rank=0).problems()
    assert any("--optimizer must be one of muon, muon8, galore" in p for p in bad)
    assert any("--adamw-bits must be 8 or 32" in p for p in bad) and any("--galore-rank" in p for p in bad)
    opts = make_optimizers(Transformer(get_config("tiny")), cfg)
    assert isinstance(opts["muon"], GaLoreMuon) and isinstance(opts["adamw"], AdamW8bit)
    assert opts["muon"].param_groups[0]["rank"] == 32


@pytest.mark.e2e
@pytest.mark.parametrize("kind", [{"optimizer": "muon8", "adamw_bits": 8},
                                  {"optimizer": "galore", "galore_rank": 32, "galore_update_every": 2}],
                         ids=["muon8", "galore"])  # fmt: skip
def test_paused_and_resumed_run_equals_uninterrupted_run(shards, tmp_path, kind):  # noqa: F811
    whole = tiny_cfg(shards, tmp_path / "whole", steps=6, eval_every=6, **kind)
    train(whole, progress=False)
    parts = replace(whole, out=str(tmp_path / "parts"), run_steps=3)
    assert train(parts, progress=False)["step"] == 3  # galore: refreshed at steps 0 and 2, next at 4 after resuming
    train(replace(parts, run_steps=0), progress=False)
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "parts")
    assert a.keys() == b.keys() and any(k.endswith(("_q", "projector")) for k in a)
    for k in a:  # bit-exact: weights, 8-bit codes and scales or projectors and low-rank momenta, RNG state
        assert torch.equal(a[k], b[k]), k


@pytest.mark.e2e
@pytest.mark.slow
def test_8bit_run_reaches_the_loss_of_the_float_run(shards, tmp_path):  # noqa: F811
    base = tiny_cfg(shards, tmp_path, steps=30, lr_embed=1e-2, log_every=30, eval_every=30, model_overrides={
        "n_layers": 1})  # fmt: skip
    losses = {}
    for name, kw in {"muon": {}, "muon8": {"optimizer": "muon8", "adamw_bits": 8}}.items():
        train(replace(base, out=str(tmp_path / name), **kw), progress=False)
        losses[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert losses["muon"] < 4.5, losses  # it learned (uniform guessing: ln 512 = 6.24)
    assert abs(losses["muon8"] - losses["muon"]) < 0.1, losses


@pytest.mark.unit
def test_compare_summary_pairs_seeds_and_reports_state_bytes():
    from train.optim_compare import parse_args as compare_args
    from train.optim_compare import summarize, table

    assert compare_args(["--seeds", "3", "4", "--variants", "muon", "galore"]).seeds == [3, 4]
    sb = lambda total: {"muon": total, "adamw": 0, "total": total}  # noqa: E731
    runs = [{"variant": v, "seed": s, "val_loss": loss, "state_bytes": sb(b)}
            for v, b, losses in (("muon", 400, (3.0, 3.2, 3.1)), ("muon8", 100, (3.1, 3.1, 3.3)))
            for s, loss in enumerate(losses)]  # fmt: skip
    out = summarize(runs)
    assert out["muon8"]["val_loss_median"] == 3.1 and out["muon8"]["delta_vs_muon_median"] == pytest.approx(0.1)
    assert out["muon8"]["delta_vs_muon_min"] == pytest.approx(-0.1) and out["muon8"]["state_vs_muon"] == 0.25
    assert "25.0%" in table(out)
