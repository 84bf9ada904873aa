"""Token filtering: compute the LM head and the loss for a sampled subset of the target tokens, unbiasedly weighted.

With ``--token-keep k < 1`` (``train.train``), each micro-batch of ``N`` target tokens keeps a fixed number
``K = round(k·N)`` of them; only those ``K`` rows of the final hidden state go through the LM head (a ``K × vocab``
logits matrix instead of ``N × vocab``) and the cross-entropy. The rest of the model (embeddings, blocks) still runs on
every position: a kept token's prediction needs the whole prefix.

* **Importance** (``--token-score``): ``bigram`` scores a target by its surprisal ``−log p(next | prev)`` under an
  add-α bigram model (α = :data:`BIGRAM_ALPHA`) counted on the first :data:`BIGRAM_MAX_TOKENS` tokens of the train
  split (:class:`BigramScorer`: sorted ``int64`` keys ``prev·V + next`` and float32 surprisals, looked up on the device
  with ``torch.searchsorted``; a pair never seen falls back to the next token's add-α unigram surprisal). Tokens that
  a bigram already predicts (indentation after a newline, a closing bracket) are kept less often, surprising ones more.
  ``uniform`` scores every token alike.
* **Keep probabilities** (:func:`inclusion_probs`): ``p_i = min(1, max(a, c·w_i))`` with ``w_i`` the score,
  ``a = floor·K/N`` (``--token-floor``: every token keeps at least ``floor`` times the mean keep probability, so none
  has probability 0 and the estimator stays unbiased) and ``c`` such that ``Σ p_i = K``, found on the device by a
  fixed number of grid refinements (:data:`GRID` points, :data:`ROUNDS` rounds: no host synchronisation); the ``p_i``
  are then scaled to sum to ``K`` to float64 rounding, and those are the probabilities used below.
* **Selection** (:func:`systematic_sample`): systematic (Madow) sampling with a fixed size ``K``, so the compiled
  objective sees static shapes: one ``u ~ U(0, 1)`` and the positions where the cumulative sum of ``p`` crosses
  ``u + j``, ``j = 0 … K−1`` (``searchsorted``): exactly ``K`` distinct positions, position ``i`` with probability
  ``p_i``. ``u`` comes from a generator seeded with ``(seed, step, micro, rank, SEED_TAG)``, so the selection is a pure
  function of the batch and those four numbers, like ``train.train.Batches``' windows, and a resumed run repeats it.
* **Loss** (:func:`sparse_loss`): kept token ``i``'s cross-entropy is weighted by ``1 / (p_i·N)``, so the weighted sum
  is the Horvitz–Thompson estimate of the mean CE over all ``N`` tokens (unbiased: its expectation over ``u`` is the
  full loss, and so is its gradient's). The ``ce`` that ``train.train`` logs is this estimate; ``val_loss`` always
  covers every token. ``--entropy-coef`` is weighted the same way; MoE's load-balancing loss is unchanged (it comes
  from the blocks, which see every token).
* Targets equal to ``IGNORE_INDEX`` score 0, have probability 0, are never selected and do not count in ``N``.
  ``train.train``'s windows hold none, so there ``N = batch·seq_len`` and nothing is synchronised with the host.
* **Refused**: ``mtp_heads > 0`` (``TrainConfig.problems``): the draft heads' loss needs the logits at every position,
  which is what this saves; train draft heads with ``python -m train.mtp``.
* ``--token-keep 1`` (the default) is off: ``train.train`` calls the objective exactly as before (same code path,
  bit-identical losses).

What it saves: the LM head's matmuls (forward and both backward ones) and the float32 logits, for ``1 − k`` of the
tokens; docs/train/token_filter/README.md has the head's share of the FLOPs per model size and the measured loss
effect (``python -m train.token_filter_compare``).

    python -m train.train --preset small --data data/shards --out runs/tf --token-keep 0.5 --token-score bigram
    python -m train.throughput --preset small --token-keep 0.5     # bigram table of random tokens there
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from model.transformer import IGNORE_INDEX, MOE_AUX_WEIGHT, Transformer

log = logging.getLogger("train.token_filter")

SCORES = ("bigram", "uniform")
BIGRAM_ALPHA = 0.1  # add-α smoothing of the bigram and unigram counts
BIGRAM_MAX_TOKENS = 32 * 2**20  # the bigram table counts the first this many train tokens (a few seconds)
GRID = 32  # candidate values of c per refinement round (inclusion_probs)
ROUNDS = 7  # refinement rounds: the bracket of log c shrinks 32⁷ ≈ 3·10¹⁰ times
MIN_SCORE = 1e-6  # scores are raised to at least this times the largest, so c·w_i can reach 1 for every token
SEED_TAG = 0x70CE  # appended to (seed, step, micro, rank): the selection's random stream is not the batches'


class BigramScorer:
    """Surprisal ``−log p(next | prev)`` of an add-α bigram model, looked up on the device.

    ``keys`` (sorted ``int64``, ``prev·V + next``) and ``surprisal`` (float32) hold the pairs seen in the counted
    tokens; ``unigram`` (float32 ``[V]``) is the add-α surprisal of a token on its own, used for unseen pairs."""

    def __init__(self, keys: torch.Tensor, surprisal: torch.Tensor, unigram: torch.Tensor) -> None:
        self.keys, self.surprisal, self.unigram = keys, surprisal, unigram
        self.vocab = unigram.numel()

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab: int, alpha: float = BIGRAM_ALPHA,
                    max_tokens: int = BIGRAM_MAX_TOKENS) -> BigramScorer:  # fmt: skip
        """Count the pairs of the first ``max_tokens`` of ``tokens`` (a 1-D array of ids < ``vocab``)."""
        t = np.asarray(tokens[:max_tokens]).astype(np.int64)
        if t.size < 2:
            raise ValueError(f"{t.size} token(s): a bigram table needs at least 2")
        if int(t.min()) < 0 or int(t.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        prev, nxt = t[:-1], t[1:]
        keys, counts = np.unique(prev * vocab + nxt, return_counts=True)
        context = np.bincount(prev, minlength=vocab).astype(np.float64)  # pairs that start with each token
        surprisal = np.log(context[keys // vocab] + alpha * vocab) - np.log(counts + alpha)
        unigram = np.log(prev.size + alpha * vocab) - np.log(np.bincount(nxt, minlength=vocab) + alpha)
        return cls(torch.from_numpy(keys), torch.from_numpy(surprisal.astype(np.float32)),
                   torch.from_numpy(unigram.astype(np.float32)))  # fmt: skip

    def to(self, device) -> BigramScorer:
        return BigramScorer(self.keys.to(device), self.surprisal.to(device), self.unigram.to(device))

    def __call__(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Surprisal (nats, float32) of each ``nxt`` after ``prev`` (same shapes, ids in ``[0, V)``)."""
        query = prev.long() * self.vocab + nxt.long()
        at = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == query, self.surprisal[at], self.unigram[nxt.long()])


def keep_count(n: int, keep: float) -> int:
    """``K``: how many of ``n`` target tokens a micro-batch keeps (``round(keep·n)``, at least 1, at most ``n``)."""
    return min(n, max(1, round(keep * n)))


def inclusion_probs(scores: torch.Tensor, valid: torch.Tensor, k: int, n: int, floor: float) -> torch.Tensor:
    """Keep probabilities (float64, the shape of ``scores``): ``min(1, max(floor·k/n, c·w))`` on the ``n`` valid
    positions with ``w`` the scores (negatives count as 0, every one raised to ``MIN_SCORE`` times the largest), 0
    elsewhere, summing to ``k``. ``c`` is bracketed in log space between a value where the sum is ≤ ``k`` and one where
    it is ≥ ``k`` and refined ``ROUNDS`` times on a grid of ``GRID`` intervals: device tensors only, no host sync."""
    vmask = valid.double()
    if k >= n:
        return vmask
    w = torch.where(valid, scores.double().clamp(min=0), 0.0)
    w = torch.where(valid, w.clamp(min=float(MIN_SCORE) * w.max() + 1e-300), 0.0)
    a = floor * k / n
    wmin = torch.where(valid, w, math.inf).min()
    # c·w ≤ k/n everywhere at lo (so the sum is ≤ k), c·w ≥ k/n everywhere at hi (so it is ≥ k)
    lo, hi = math.log(k / n) - w.max().log(), math.log(k / n) - wmin.log()
    grid = torch.linspace(0, 1, GRID + 1, dtype=torch.float64, device=w.device)
    for _ in range(ROUNDS):
        cands = lo + (hi - lo) * grid
        total = ((cands.exp()[:, None] * w).clamp(a, 1) * vmask).sum(1)
        below = ((total <= k).sum() - 1).clamp(0, GRID - 1)  # the last candidate whose sum is ≤ k
        lo, hi = cands[below], cands[below + 1]
    p = ((lo + hi) / 2).exp() * w
    p = p.clamp(a, 1) * vmask
    return p * (k / p.sum())


def systematic_sample(p: torch.Tensor, k: int, n: int, u: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` distinct positions (``int64``, ascending unless ``valid`` reorders) of the flat ``p`` (summing to ``k``),
    position ``i`` with probability ``p[i]``: those whose interval ``[C_{i-1}, C_i)`` of the cumulative sum holds a
    point ``u + j``. ``valid`` (bool, ``n`` of them true) marks the positions that may be chosen; ``None``: all.

    A valid position's interval is at most 1 long, so it holds at most one point; rounding (float64) can only break
    that at an interval within ~1e-12 of 1, and the ``cummax`` below then moves the second point to the next valid
    position, so the result is always ``k`` distinct valid positions."""
    order = None
    if valid is not None and n < p.numel():
        order = torch.argsort((~valid).to(torch.uint8), stable=True)  # the valid positions first, in order
        p = p[order]
    points = u + torch.arange(k, dtype=torch.float64, device=p.device)
    idx = torch.searchsorted(torch.cumsum(p, 0), points, right=True)
    j = torch.arange(k, device=p.device)
    idx = torch.cummax(idx - j, 0).values.clamp_(0, n - k) + j  # strictly increasing, within [0, n)
    return idx if order is None else order[idx]


class Selection(NamedTuple):
    idx: torch.Tensor  # [K] int64: kept positions of the flattened [B, T] targets
    weight: torch.Tensor  # [K] float32: 1 / (p_i · N)


class TokenFilter:
    """The per-micro-batch selection of ``train.train`` (see the module docstring): ``select(x, y, step, micro)``."""

    def __init__(self, keep: float, score: str, floor: float, seed: int, rank: int,
                 scorer: BigramScorer | None = None) -> None:  # fmt: skip
        if not (0 < keep <= 1 and score in SCORES and 0 <= floor <= 1):
            raise ValueError(f"token filter: keep {keep} ∉ (0, 1], score {score!r} ∉ {SCORES} or floor {floor} ∉ "
                             "[0, 1]")  # fmt: skip
        if score == "bigram" and scorer is None:
            raise ValueError("token filter: the bigram score needs a BigramScorer")
        self.keep, self.score, self.floor, self.seed, self.rank, self.scorer = keep, score, floor, seed, rank, scorer
        self.kept_frac = keep

    def uniform_draw(self, step: int, micro: int) -> float:
        return float(np.random.default_rng((self.seed, step, micro, self.rank, SEED_TAG)).random())

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Importance of each target (flat float32; ignored targets 0)."""
        valid = y.flatten() != IGNORE_INDEX
        if self.score == "uniform":
            return valid.float()
        return torch.where(valid, self.scorer(x.flatten(), y.flatten().clamp(min=0)), 0.0)

    def probs(self, x: torch.Tensor, y: torch.Tensor, all_valid: bool = False) -> tuple[torch.Tensor, int, int]:
        """``(p, K, N)``: the keep probabilities of the flat targets, how many to keep and how many count.
        ``all_valid``: the caller knows ``y`` holds no ``IGNORE_INDEX`` (no host sync to count them)."""
        valid = y.flatten() != IGNORE_INDEX
        n = y.numel() if all_valid else int(valid.sum())
        if n == 0:
            raise ValueError("token filter: every target of the micro-batch is IGNORE_INDEX")
        k = keep_count(n, self.keep)
        return inclusion_probs(self.scores(x, y), valid, k, n, self.floor), k, n

    def select(self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int, all_valid: bool = False) -> Selection:
        """The kept positions and their weights for batch ``(step, micro)`` of this rank (a pure function of them)."""
        p, k, n = self.probs(x, y, all_valid)
        valid = None if all_valid else y.flatten() != IGNORE_INDEX
        idx = systematic_sample(p, k, n, self.uniform_draw(step, micro), valid)
        self.kept_frac = k / y.numel()
        return Selection(idx, (1.0 / (p[idx] * n)).float())


def from_config(cfg, tokens: np.ndarray, vocab: int, rank: int, device) -> TokenFilter | None:
    """The filter a ``TrainConfig`` asks for (``None`` when ``token_keep == 1``: off), its bigram table counted on
    ``tokens`` (the train split) and moved to ``device``."""
    if cfg.token_keep >= 1:
        return None
    scorer = None
    if cfg.token_score == "bigram":
        t0 = time.perf_counter()
        scorer = BigramScorer.from_tokens(tokens, vocab).to(device)
        log.info("token filter: bigram table of %d pairs from %d tokens in %.1f s", scorer.keys.numel(),
                 min(tokens.size, BIGRAM_MAX_TOKENS), time.perf_counter() - t0)  # fmt: skip
    return TokenFilter(cfg.token_keep, cfg.token_score, cfg.token_floor, cfg.seed, rank, scorer)


def sparse_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                entropy_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(total, ce)`` as ``Transformer.loss`` but with the LM head and CE on the kept rows ``idx`` of the flattened
    ``[B, T]`` positions only, each weighted by ``weight`` (the Horvitz–Thompson estimate of the mean over all)."""
    if model.config.mtp_heads:
        raise ValueError("token filtering does not support mtp_heads (their loss needs every position's logits)")
    h = model.hidden(x)
    logits = model.head(h.flatten(0, 1).index_select(0, idx)).float()
    ce = (F.cross_entropy(logits, y.flatten().index_select(0, idx), reduction="none") * weight).sum()
    total = ce
    if entropy_coef:
        logp = logits.log_softmax(-1)
        total = total - entropy_coef * (-(logp.exp() * logp).sum(-1) * weight).sum()
    if model.config.n_experts:
        total = total + MOE_AUX_WEIGHT * model.moe_aux_loss()
    return total, ce.detach()
