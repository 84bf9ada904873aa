"""Token filtering (train/token_filter.py and its wiring in train/train.py): the bigram table against a hand count, the
keep probabilities (sum K, floor, cap, monotone), systematic sampling (K distinct valid positions, inclusion
frequencies equal to p — a biased sampler fails the same check), the Horvitz–Thompson estimate's mean equal to the full
mean CE (a biased one fails), the sparse loss against the full one, determinism in (seed, step, micro, rank), the off
path untouched, bad settings refused in one line, and a paused token-filtered run resuming bit for bit.

    pytest tests/test_token_filter.py -q
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import norm
from test_train_loop import final_tensors, shards, tiny_cfg  # noqa: F401  (shards: a fixture)

from model.config import get_config
from model.transformer import IGNORE_INDEX, Transformer
from train import checkpoint
from train import token_filter as tf
from train.train import LossModule, TrainConfig, parse_args, train

N = 96  # flat target positions of the statistical tests
DRAWS = 2500  # seeded draws of u; each position's count is Binomial(DRAWS, p_i)
ALPHA = 1e-3  # family-wise significance level (Bonferroni over the positions)


def skewed_case(seed: int = 0, ignored_every: int = 11, keep: float = 0.3, floor: float = 0.25):
    """Scores spread over two decades, some targets ignored: ``(scores, valid, p, k, n)``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, generator=g, dtype=torch.float64) ** 3 * 12
    valid = torch.ones(N, dtype=torch.bool)
    valid[::ignored_every] = False
    n = int(valid.sum())
    k = tf.keep_count(n, keep)
    return scores, valid, tf.inclusion_probs(scores, valid, k, n, floor), k, n


def inclusion_counts(sampler, p: torch.Tensor, k: int, draws: int = DRAWS) -> torch.Tensor:
    rng = np.random.default_rng(123)
    counts = torch.zeros(p.numel(), dtype=torch.float64)
    for _ in range(draws):
        counts[sampler(float(rng.random()))] += 1
    return counts


def frequencies_match(counts: torch.Tensor, p: torch.Tensor, draws: int = DRAWS) -> bool:
    """Every position's count is consistent with Binomial(draws, p_i) at family-wise level ALPHA (normal
    approximation, Bonferroni); positions with p_i = 1 or 0 must be always or never chosen."""
    sure, never = p > 1 - 1e-9, p == 0
    if not (bool((counts[sure] == draws).all()) and bool((counts[never] == 0).all())):
        return False
    mid = ~(sure | never)
    z = (counts[mid] / draws - p[mid]) / (p[mid] * (1 - p[mid]) / draws).sqrt()
    return float(z.abs().max()) < norm.ppf(1 - ALPHA / (2 * int(mid.sum())))


@pytest.mark.unit
def test_bigram_surprisal_equals_a_hand_count():
    tokens = np.array([0, 1, 0, 1, 2, 1, 0], dtype=np.uint16)  # pairs 01 10 01 12 21 10; vocab 3
    a = 0.5
    scorer = tf.BigramScorer.from_tokens(tokens, 3, alpha=a)
    # context counts: 0 starts 2 pairs, 1 starts 3, 2 starts 1; pairs: 01 ×2, 10 ×2, 12 ×1, 21 ×1
    hand = {(0, 1): (2 + a) / (2 + 3 * a), (1, 0): (2 + a) / (3 + 3 * a), (1, 2): (1 + a) / (3 + 3 * a),
            (2, 1): (1 + a) / (1 + 3 * a)}  # fmt: skip
    # unseen pairs: the next token's unigram (as a next token: 0 ×2, 1 ×3, 2 ×1 of 6)
    hand |= {(0, 0): (2 + a) / (6 + 3 * a), (2, 2): (1 + a) / (6 + 3 * a), (0, 2): (1 + a) / (6 + 3 * a)}
    prev, nxt = torch.tensor([p for p, _ in hand]), torch.tensor([q for _, q in hand])
    got = scorer(prev, nxt)
    want = torch.tensor([-math.log(v) for v in hand.values()], dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-6), (got, want)
    assert scorer.keys.tolist() == [0 * 3 + 1, 1 * 3 + 0, 1 * 3 + 2, 2 * 3 + 1]  # sorted prev·V + next
    two = tf.BigramScorer.from_tokens(tokens, 3, alpha=a, max_tokens=2)  # the first 2 tokens: one pair, 0 → 1
    assert two.keys.tolist() == [1]


@pytest.mark.unit
@pytest.mark.parametrize(("keep", "floor"), [(0.3, 0.25), (0.5, 0.0), (0.1, 1.0), (0.9, 0.5), (0.02, 0.25)])
def test_inclusion_probs_sum_to_k_respect_floor_and_cap_and_rise_with_score(keep, floor):
    scores, valid, p, k, n = skewed_case(keep=keep, floor=floor)
    assert p.dtype == torch.float64 and float(p.sum()) == pytest.approx(k, rel=1e-12)
    assert bool((p[~valid] == 0).all())
    pv, sv = p[valid], scores[valid]
    assert float(pv.min()) >= floor * k / n * (1 - 1e-9) and float(pv.max()) <= 1 + 1e-9
    order = torch.argsort(sv)
    assert bool((pv[order].diff() >= -1e-12).all())  # monotone in the score
    if floor == 1.0:  # the floor is the mean: every valid token alike
        assert torch.allclose(pv, torch.full_like(pv, k / n))


@pytest.mark.unit
def test_uniform_scores_give_equal_probabilities_and_keep_one_keeps_everything():
    valid = torch.ones(40, dtype=torch.bool)
    p = tf.inclusion_probs(torch.ones(40), valid, 10, 40, 0.25)
    assert bool((p == 0.25).all())
    assert bool((tf.inclusion_probs(torch.rand(40), valid, 40, 40, 0.25) == 1).all())
    x = torch.randint(0, 50, (2, 20))
    sel = tf.TokenFilter(1.0, "uniform", 0.25, seed=0, rank=0).select(x, x.roll(1, 1), 3, 0)
    assert torch.equal(sel.idx, torch.arange(40)) and bool((sel.weight == 1 / 40).all())


@pytest.mark.unit
@pytest.mark.parametrize("case", range(6))
def test_selection_is_k_distinct_valid_positions(case):
    g = torch.Generator().manual_seed(case)
    b, t = 3, 17 + case
    y = torch.randint(0, 30, (b, t), generator=g)
    y[torch.rand(b, t, generator=g) < 0.3] = IGNORE_INDEX
    y[0, :4] = 5  # at least a few valid targets
    x = torch.randint(0, 30, (b, t), generator=g)
    scorer = tf.BigramScorer.from_tokens(np.random.default_rng(case).integers(0, 30, 500), 30)
    n = int((y != IGNORE_INDEX).sum())
    for keep in (0.05, 0.3, 0.5, 0.97, 1.0):
        f = tf.TokenFilter(keep, ("bigram", "uniform")[case % 2], (0.0, 0.25, 1.0)[case % 3], 7, 0, scorer)
        for step in range(5):
            sel = f.select(x, y, step, 0)
            k = tf.keep_count(n, keep)
            assert sel.idx.shape == (k,) and sel.idx.unique().numel() == k
            assert bool((y.flatten()[sel.idx] != IGNORE_INDEX).all())
            assert bool((sel.weight > 0).all()) and sel.weight.dtype == torch.float32


@pytest.mark.unit
def test_inclusion_frequencies_equal_p_and_a_biased_sampler_fails():
    _, valid, p, k, n = skewed_case()
    assert 0 < int((p > 1 - 1e-9).sum()) < k  # some positions are certain, most are not
    ours = inclusion_counts(lambda u: tf.systematic_sample(p, k, n, u, valid), p, k)
    assert frequencies_match(ours, p)
    # successive sampling without replacement in proportion to p: K distinct valid positions too, but its inclusion
    # probabilities are not p (large p under-, small p over-represented)
    g = torch.Generator().manual_seed(0)
    biased = inclusion_counts(lambda u: torch.multinomial(p, k, replacement=False, generator=g), p, k)
    assert not frequencies_match(biased, p)
    # and a sampler right up to a small shift of u is caught: positions at the crossing points drift by ~0.05
    shifted = inclusion_counts(lambda u: tf.systematic_sample(p, k, n, (u + 0.05) % 1 * 0.9 + 0.05, valid), p, k)
    assert not frequencies_match(shifted, p)


@pytest.mark.unit
def test_the_weighted_estimate_is_unbiased_for_the_mean_ce_and_the_plain_mean_of_kept_ce_is_not():
    scores, valid, p, k, n = skewed_case()
    g = torch.Generator().manual_seed(1)
    ce = scores + torch.rand(N, generator=g, dtype=torch.float64) * 2  # per-token CE, correlated with the score
    full = float(ce[valid].mean())
    rng = np.random.default_rng(5)
    ht, plain = [], []
    for _ in range(DRAWS):
        idx = tf.systematic_sample(p, k, n, float(rng.random()), valid)
        ht.append(float((ce[idx] / (p[idx] * n)).sum()))
        plain.append(float(ce[idx].mean()))
    z = norm.ppf(1 - ALPHA / 2)
    for est, unbiased in ((np.array(ht), True), (np.array(plain), False)):
        se = est.std(ddof=1) / math.sqrt(DRAWS)
        assert se > 0 and (abs(est.mean() - full) < z * se) == unbiased, (est.mean(), full, se)


@pytest.mark.unit
def test_the_same_seed_step_micro_and_rank_give_the_same_selection():
    x = torch.randint(0, 64, (4, 32))
    y = x.roll(-1, 1)
    scorer = tf.BigramScorer.from_tokens(np.random.default_rng(0).integers(0, 64, 4000), 64)
    a, b = (tf.TokenFilter(0.4, "bigram", 0.25, seed=3, rank=1, scorer=scorer) for _ in range(2))
    assert all(torch.equal(s, t) for s, t in zip(a.select(x, y, 9, 1), b.select(x, y, 9, 1), strict=True))
    rank0, seed4 = tf.TokenFilter(0.4, "uniform", 0.25, 3, 0), tf.TokenFilter(0.4, "uniform", 0.25, 4, 1)
    others = [a.uniform_draw(9, 0), a.uniform_draw(10, 1), rank0.uniform_draw(9, 1), seed4.uniform_draw(9, 1)]
    assert a.uniform_draw(9, 1) not in others


@pytest.mark.unit
def test_sparse_loss_is_the_weighted_ce_of_the_kept_rows_and_equals_the_full_loss_at_keep_one():
    torch.manual_seed(0)
    for config in (get_config("tiny"), get_config("tiny", n_experts=4)):
        model = Transformer(config)
        data = torch.randint(0, config.vocab_size, (2, 33))
        x, y = data[:, :-1], data[:, 1:]
        full_total, full_ce = model.loss(x, y)
        total, ce = LossModule(model, 0.0)(x, y)  # no selection: the unchanged objective, bit for bit
        assert torch.equal(total, full_total) and torch.equal(ce, full_ce)
        everything = torch.arange(64)
        total, ce = tf.sparse_loss(model, x, y, everything, torch.full((64,), 1 / 64))
        assert torch.allclose(total, full_total, rtol=1e-6) and torch.allclose(ce, full_ce, rtol=1e-6)
        per_token = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
        idx, w = torch.tensor([3, 10, 11, 40]), torch.tensor([0.5, 0.1, 0.2, 0.3])
        _, ce = tf.sparse_loss(model, x, y, idx, w)
        assert torch.allclose(ce, (per_token[idx] * w).sum(), rtol=1e-6)
    mtp = Transformer(get_config("tiny", mtp_heads=1))
    with pytest.raises(ValueError, match="mtp_heads"):
        tf.sparse_loss(mtp, x, y, idx, w)


@pytest.mark.unit
def test_keep_one_is_off():
    assert tf.from_config(TrainConfig(token_keep=1.0, token_score="bigram"), np.zeros(10), 8, 0, "cpu") is None
    with pytest.raises(ValueError, match="bigram score needs"):
        tf.TokenFilter(0.5, "bigram", 0.25, 0, 0)
    with pytest.raises(ValueError, match="keep 0"):
        tf.TokenFilter(0, "uniform", 0.25, 0, 0)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--token-keep", "0"], "--token-keep must be in (0, 1], got 0.0"),
        (["--token-keep", "1.5"], "--token-keep must be in (0, 1]"),
        (["--token-keep", "nan"], "--token-keep must be in (0, 1]"),
        (["--token-score", "loss"], "--token-score must be one of bigram, uniform, got 'loss'"),
        (["--token-floor", "-0.1"], "--token-floor must be in [0, 1]"),
        (["--token-floor", "2"], "--token-floor must be in [0, 1]"),
        (["--token-keep", "0.5", "--model", '{"mtp_heads": 2}'], "token filtering does not support mtp_heads"),
    ],
)
def test_bad_token_filter_settings_are_refused_in_one_line(shards, tmp_path, capsys, flags, message):  # noqa: F811
    base = ["--preset", "tiny", "--data", str(shards), "--out", str(tmp_path / "run"), "--seq-len", "32"]
    with pytest.raises(SystemExit) as exc:
        parse_args(base + flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert parse_args([*base, "--token-keep", "0.5", "--token-score", "uniform"]).token_keep == 0.5


@pytest.mark.e2e
def test_a_paused_token_filtered_run_resumes_exactly(shards, tmp_path):  # noqa: F811
    cfg = tiny_cfg(shards, tmp_path / "whole", steps=4, token_keep=0.5, eval_every=2)
    train(cfg, progress=False)
    parts = replace(cfg, out=str(tmp_path / "parts"), run_steps=2)
    assert train(parts, progress=False)["status"] == "paused"
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "parts" / "checkpoints"))["step"] == 2
    train(replace(parts, run_steps=0), progress=False)
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "parts")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:  # bit-exact: the resumed run drew the same windows and kept the same tokens
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kept_frac"] for r in rows] == [0.5] * 4 and all(math.isfinite(r["val_loss"]) for r in rows[1::2])
    with pytest.raises(ValueError, match="different settings"):  # the selection is part of the trajectory
        train(replace(cfg, token_keep=0.25, steps=6), progress=False)


@pytest.mark.e2e
def test_the_compiled_objective_sees_static_shapes_across_selections():
    import torch._dynamo

    torch._dynamo.reset()
    model = Transformer(get_config("tiny"))
    objective = torch.compile(LossModule(model, 0.0), backend="eager")  # dynamo's graph capture, no codegen
    scorer = tf.BigramScorer.from_tokens(np.random.default_rng(0).integers(0, 512, 20_000), 512)
    f = tf.TokenFilter(0.5, "bigram", 0.25, seed=0, rank=0, scorer=scorer)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new selection must not retrace
        for step in range(3):
            data = torch.randint(0, 512, (2, 33))
            x, y = data[:, :-1], data[:, 1:]
            loss, _ = objective(x, y, *f.select(x, y, step, 0, all_valid=True))
            loss.backward()
