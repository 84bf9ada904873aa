"""Reinforcement learning from execution feedback: GRPO or MaxRL on mined code tasks, starting from a shipped GGUF.

* **Tasks** (:mod:`train.exec_tasks`): a function's signature and docstring (with its doctest examples) as the prompt,
  plain code ending at the docstring's closing quotes; the examples are the check. Only a **train-split** task file
  is accepted: one whose header says another split (the held-out ``val`` tasks, for ``train.eval --suite exec``) is
  refused with one error line. Prompts that leave no room for ``max_new_tokens`` in the context are dropped (counted
  in the summary).
* **Sampling** (:func:`sample_groups`): each step takes ``prompts_per_step`` tasks (an epoch-wise permutation seeded by
  ``(seed, epoch)``; rank ``r`` of ``W`` takes every ``W``-th) and samples ``group_size`` completions of each with one
  batched KV-cache loop: the prompts are left-padded and prefilled together, each row's cache repeated to ``G``
  rows, and all rows decode together until each hits the end-of-text token, a stop string
  (``train.completion.STOP_STRINGS``) or ``max_new_tokens`` (finished rows leave the batch). Temperature → top-k →
  top-p as in ``model.generate``; the draws come from a generator seeded by ``(seed, step, rank)``, so a resumed run
  samples exactly what the uninterrupted one would have.
  Decoding is launch-bound: on an H200 the ``small`` model takes ~31 ms a token step for any group of 8 to 32 rows,
  so sampling is ~95 % of a step (8 prompts × 8 × ≤128 tokens: 35 s sampling, 0.8 s sandbox, 0.8 s update) and a
  large group is nearly free; so all of a step's prompts decode as one batch (MLA and DeltaNet models: a prompt at a
  time). Or the compiled engine samples (``python -m bench.rl_engine``: the policy's weights put into a
  ``compiler.build`` entry in place before each step), through the ``sampler`` argument of :func:`train_rl`.
* **Rewards**: the completion is cut as the evaluation cuts it (text before a stop token or string, then
  ``train.completion.cut_body``), its check run in the sandbox in parallel (``exec_tasks.check_candidates``: the
  program of ``exec_tasks.program`` in ``train.sandbox``, once per distinct body that parses) and scored by
  ``exec_tasks.reward`` (1 = every example passes; partial credit for parsing and running). A sample *passes* when
  its reward is 1.
* **GRPO**: advantage ``A = (r − mean_group) / (std_group + eps)`` (population std; groups whose rewards are all equal
  carry no signal and are left out). Per generated token the PPO clipped objective ``−min(ρ A, clip(ρ, 1 ± ε) A)``
  with ``ρ = π/π_old`` against the sampling policy's log-probs (those of the first inner epoch, taken before any
  update, so ``ρ = 1`` there and the clip acts from the second of ``inner_epochs`` on), plus ``kl_coef`` times the k3
  estimate ``exp(q) − q − 1``, ``q = log π_ref − log π``, of the KL to the frozen starting model. The loss is the mean
  over every generated token of the step (all ranks; prompt tokens and padding masked).
* **MaxRL** (maximum likelihood on successes): cross-entropy on the completion tokens of passing samples only, each
  weighted by ``1 / (passing samples in its group)`` (``--maxrl-weight group``: every prompt with a success counts
  the same, the estimator of ∇ log P(pass | prompt)) or by 1 (``--maxrl-weight mean``: a plain mean over passing
  samples, i.e. rejection-sampling fine-tuning); the same weighted-token mean and the same optional KL term. Failing
  samples contribute nothing; a step where nothing passed makes no update (it is still logged).
* **Training**: ternary QAT throughout (every BitLinear quantizes in its forward, straight-through gradients), Muon
  + AdamW from ``train.train.make_optimizers`` with warmup then linear decay, ``inner_epochs`` optimizer steps per RL
  step, gradient clipping, bf16 autocast on CUDA. Under ``torchrun`` each rank samples and scores its share of the
  prompts, the loss is normalised by the global token count and the gradients are summed over ranks (all-reduce), so
  any number of GPUs computes the same update; rank 0 logs, checkpoints and exports.
* **Exact resume** as in ``train.train``: checkpoints (``train.checkpoint``) every ``ckpt_every`` steps, at the end
  and on SIGTERM/SIGINT; the same command with the same ``--out`` resumes from the newest one and continues bit for
  bit (the sampling and the task order are functions of the step); ``--run-steps N`` pauses after N steps.
* **Outputs** in ``--out``: ``metrics.jsonl`` (per step: mean reward, pass rate, groups with signal, KL, loss,
  tokens sampled, seconds spent sampling / scoring / updating), ``rl_curves.png``, ``model.gguf`` (the GGUF's
  ``training.*`` keys plus ``training.rl_algo`` and ``training.rl_steps``, written and read back by
  ``train.sft.export_gguf``) and ``rl_summary.json``.

    python -m train.rl --algo grpo --gguf models/small.gguf --tasks data/tasks/train.jsonl --out runs/rl --steps 200
    torchrun --nproc_per_node 2 -m train.rl --algo maxrl --gguf models/small.gguf --tasks data/tasks/train.jsonl \\
        --out runs/rl-maxrl
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from model.attention import KVCache
from model.bitlinear import frozen_weights
from model.generate import GREEDY_BELOW, _finite_or_inf, _softmax, filter_logits
from model.sampling import SamplingParams
from model.tokenizer import hf_from_spec
from model.transformer import Transformer
from train import checkpoint, exec_tasks
from train.cli import parse_config
from train.completion import STOP_STRINGS, cut_body
from train.sft import export_gguf, load_gguf_model
from train.tokenizer import EOT
from train.train import TrainConfig, _StopFlag, dist_setup, lr_factor, make_optimizers, trim_metrics

log = logging.getLogger("train.rl")

ALGOS = ("grpo", "maxrl")
MAXRL_WEIGHTS = ("group", "mean")
PASS = 1.0 - 1e-9  # a reward at least this is a pass (reward 1: every check passed)
# settings that may differ between a checkpoint and the run resuming it (all others must match)
RESUMABLE_CHANGES = ("steps", "run_steps", "time_limit_s", "out", "ckpt_every", "workers", "device")


Decode = Callable[[list[int]], str]


class RLError(ValueError):
    """A run that cannot start as asked: bad settings, a held-out task file, a checkpoint of other settings."""


@dataclass(frozen=True)
class RLConfig:
    algo: str = "grpo"  # grpo | maxrl
    gguf: str = "models/small.gguf"  # the starting model (also the frozen KL reference)
    tasks: str = ""  # train-split task file (python -m train.exec_tasks)
    out: str = "runs/rl"
    steps: int = 200  # the lr schedule spans these
    run_steps: int = 0  # >0: stop (with a checkpoint) after this many steps in this invocation; resume later
    time_limit_s: float = 0.0  # >0: end after the step that passes this many seconds, exported as it stands
    prompts_per_step: int = 16  # P, over all ranks (sampling time grows with P / ranks)
    group_size: int = 16  # G completions per prompt (decoded together: on a GPU, 32 rows cost what 8 do)
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95
    inner_epochs: int = 1  # optimizer steps on each step's samples (the PPO clip acts from the second on)
    clip_eps: float = 0.2
    kl_coef: float = 0.02  # k3 KL to the starting model, both algorithms (0: off; the KL is still logged)
    adv_eps: float = 1e-6
    maxrl_weight: str = "group"  # group: 1/(passing in the group) per passing sample | mean: plain mean
    micro_batch: int = 32  # sequences per forward/backward in the update (bounds activation memory)
    lr_matrix: float = 0.002  # Muon (ternary matrices' master weights)
    lr_embed: float = 2.5e-4  # AdamW (embeddings, norms, mHC logits)
    warmup_steps: int = 10
    decay_frac: float = 0.3
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 0  # sandbox processes per rank (0: the sandbox's default)
    ckpt_every: int = 25
    device: str = ""  # single-process device (empty: cuda if available); torchrun ranks use their own GPU

    def problems(self, tasks_needed: bool = True) -> list[str]:
        """What is wrong with these settings, checked before anything is loaded; [] if nothing."""
        out = []
        if self.algo not in ALGOS:
            out.append(f"--algo must be one of {'|'.join(ALGOS)}, got {self.algo!r}")
        if self.maxrl_weight not in MAXRL_WEIGHTS:
            out.append(f"--maxrl-weight must be one of {'|'.join(MAXRL_WEIGHTS)}, got {self.maxrl_weight!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "inner_epochs", "micro_batch",
                     "ckpt_every"):  # fmt: skip
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        for name in ("run_steps", "warmup_steps", "workers", "top_k", "seed"):
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        for name in ("temperature", "kl_coef", "clip_eps", "lr_matrix", "lr_embed", "time_limit_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                out.append(f"--{name.replace('_', '-')} must be finite and ≥ 0, got {getattr(self, name)}")
        for name in ("grad_clip", "adv_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                out.append(f"--{name.replace('_', '-')} must be finite and > 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.decay_frac <= 1:
            out.append(f"--decay-frac must be in [0, 1], got {self.decay_frac}")
        if not Path(self.gguf).is_file():
            out.append(f"--gguf {self.gguf}: no such file")
        if tasks_needed and not self.tasks:
            out.append("--tasks is required (a train-split task file from python -m train.exec_tasks)")
        elif tasks_needed and not Path(self.tasks).is_file():
            out.append(f"--tasks {self.tasks}: no such file")
        return out

    def schedule(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, warmup_steps=self.warmup_steps, decay_frac=self.decay_frac,
                           lr_matrix=self.lr_matrix, lr_embed=self.lr_embed)  # fmt: skip

    def sampling(self, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop_token_ids=stop_token_ids,
                              stop_strings=STOP_STRINGS)  # fmt: skip


# --- tasks ------------------------------------------------------------------------------------------------------------
def load_train_tasks(path: Path) -> list:
    """The tasks of a train-split task file; a held-out one (header ``split`` other than ``train``) raises
    :class:`RLError` before any task is read."""
    split = exec_tasks.read_header(path).get("split")
    if split != "train":
        raise RLError(f"--tasks {path}: its header says split={split!r}; RL trains on train-split tasks only (the "
                      "held-out tasks are for evaluation: python -m train.eval --suite exec)")  # fmt: skip
    tasks = exec_tasks.load_tasks(path)
    if not tasks:
        raise RLError(f"--tasks {path}: no tasks")
    return tasks


def step_tasks(n: int, count: int, seed: int, step: int) -> list[int]:
    """The task indices of ``step``: positions ``[step·count, (step+1)·count)`` of the concatenated epoch-wise
    permutations (epoch ``e`` shuffled by ``(seed, e)``), so every task comes up once per epoch."""
    out = []
    for pos in range(step * count, (step + 1) * count):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[i]))
    return out


def seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


# --- sampling ---------------------------------------------------------------------------------------------------------
def pick_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits [n, vocab]`` as ``model.generate.sample`` picks it (greedy below
    ``GREEDY_BELOW``, else temperature → top-k → top-p in float64), drawn on ``generator``'s device (a CPU generator
    draws on the CPU; on a GPU, a CUDA generator keeps the whole step there: no small CPU ops between kernels)."""
    x = _finite_or_inf(logits)
    if not params.temperature >= GREEDY_BELOW:
        return x.argmax(-1)
    top = x.amax(-1, keepdim=True)
    x = torch.where(torch.isfinite(top), (x - top) / params.temperature, x)
    x = torch.where(torch.isnan(x), float("-inf"), x)
    probs = _softmax(filter_logits(x, params.top_k, params.top_p))
    return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0]


def stopped(tokens: list[int], params: SamplingParams, decode: Decode | None) -> bool:
    """Whether a completion ended on a stop token or a stop string (not on the token or context limit)."""
    if tokens and tokens[-1] in params.stop_token_ids:
        return True
    return bool(params.stop_strings and decode is not None and any(s in decode(tokens) for s in params.stop_strings))


def stop_window(params: SamplingParams) -> int:
    """How many last tokens of a completion hold every stop string that its newest token can complete: a token
    decodes to at least one character or one byte of one (UTF-8: at most 4 bytes a character), so
    ``4 · len(s) + 4`` tokens do. Decoding that tail each step instead of the whole completion keeps a step's host
    work flat in the completion's length."""
    return 4 * max(map(len, params.stop_strings), default=0) + 4


def _check_prompt(prompt_ids: Sequence[int], limit: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_seq_len {limit}")


def _attention_backends(device: torch.device):
    """On CUDA no cuDNN attention: with the cached path's explicit mask it re-plans every step (~8 ms of CPU time per
    layer on an H200)."""
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def sample_group(model: Transformer, prompt_ids: Sequence[int], n: int, params: SamplingParams,
                 generator: torch.Generator, decode: Decode | None = None) -> list[list[int]]:  # fmt: skip
    """``n`` completions of one prompt (token ids, each ending with its stop token if it had one).

    The prompt is prefilled once and its KV cache copied to ``n`` rows, which decode together; a row finishes at a
    stop token, a stop string (needs ``decode``) or ``params.max_new_tokens`` (or the context), and finished rows
    leave the batch. Under greedy decoding every row equals ``model.generate.generate``'s tokens; sampled, the rows
    are a function of ``generator``'s state. On CUDA: bf16 autocast and KV cache."""
    if params.stop_strings and decode is None:
        raise ValueError("stop strings need a decode function")
    _check_prompt(prompt_ids, model.config.max_seq_len)
    device = model.tok_emb.weight.device
    with _attention_backends(device):
        return _sample_groups(model, [list(prompt_ids)], n, params, generator, decode, device)[0]


@torch.no_grad()
def sample_groups(model: Transformer, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                  generator: torch.Generator, decode: Decode | None = None) -> list[list[list[int]]]:  # fmt: skip
    """``n`` completions of each prompt, as :func:`sample_group` gives them, with every prompt's rows in one decode
    batch: the prompts are left-padded to the longest and prefilled together (``KVCache.pad``: each row attends to
    its own tokens only; RoPE sees distances, not positions), then each row is repeated ``n`` times. A step of R
    prompts costs one batched forward per token instead of R. Each row computes what it would alone, up to float
    rounding.

    Falls back to one :func:`sample_group` per prompt for MLA and DeltaNet models (no padded batches), and where the
    longest prompt plus ``max_new_tokens`` passes the context (a padded row would stop early). The draws differ from
    per-prompt sampling's (one generator over all rows), so a run is reproducible with the same sampler only."""
    if params.stop_strings and decode is None:
        raise ValueError("stop strings need a decode function")
    cfg = model.config
    for p in prompts:
        _check_prompt(p, cfg.max_seq_len)
    longest = max((len(p) for p in prompts), default=0)
    if len(prompts) < 2 or cfg.mla or cfg.deltanet_layers or longest + params.max_new_tokens > cfg.max_seq_len:
        return [sample_group(model, p, n, params, generator, decode) for p in prompts]
    device = model.tok_emb.weight.device
    with _attention_backends(device):
        return _sample_groups(model, [list(p) for p in prompts], n, params, generator, decode, device)


def _sample_groups(model, prompts, n, params, generator, decode, device) -> list[list[list[int]]]:
    was_training = model.training
    model.eval()
    limit = model.config.max_seq_len
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731
    longest = max(len(p) for p in prompts)
    cache_len = min(limit, longest + params.max_new_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else model.tok_emb.weight.dtype  # autocast's k/v are bf16
    if len(prompts) == 1:  # one prompt: prefill one row, then copy its cache to the group
        one = KVCache(model.config, 1, cache_len, device, dtype)
        with autocast():
            logits = model(torch.tensor(prompts, device=device), one)[:, -1].float().expand(n, -1)
        cache = KVCache(model.config, n, cache_len, device, dtype)
        cache.fill_from(one)
        del one
    else:  # left-padded to the longest (padding: each prompt's first token; never attended to)
        cache = KVCache(model.config, len(prompts), cache_len, device, dtype)
        cache.pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        x = torch.tensor([[p[0]] * (longest - len(p)) + p for p in prompts], device=device)
        with autocast():
            logits = model(x, cache)[:, -1].float().repeat_interleave(n, dim=0)
        cache.repeat_rows(n)
    out: list[list[int]] = [[] for _ in range(n * len(prompts))]
    rows = list(range(len(out)))  # the completion each cache row belongs to
    stop_ids = set(params.stop_token_ids)
    window = stop_window(params)  # the text before the newest token held no stop string: its tail is enough
    while rows and params.max_new_tokens:
        tokens = pick_tokens(logits, params, generator).tolist()
        keep = []
        for slot, (r, t) in enumerate(zip(rows, tokens, strict=True)):
            out[r].append(t)
            done = t in stop_ids or len(out[r]) >= params.max_new_tokens or cache.pos >= limit
            if not done and params.stop_strings:
                done = any(s in decode(out[r][-window:]) for s in params.stop_strings)
            if not done:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.keep_rows(index)
        step_in = torch.tensor([[tokens[s]] for s in keep], device=device)
        rows = [rows[s] for s in keep]
        with autocast():
            logits = model(step_in, cache)[:, -1].float()
    model.train(was_training)
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


# (model, prompts, n, params, seed) -> n completions of each prompt, as sample_groups gives them; seed: the step's
Sampler = Callable[[Transformer, list[list[int]], int, SamplingParams, int], list[list[list[int]]]]


def torch_sampler(decode: Decode) -> Sampler:
    """The PyTorch sampler: :func:`sample_groups` on the policy itself, its weights quantized once for the step
    (``model.bitlinear.frozen_weights``), the draws from a generator seeded by ``seed`` on the model's device."""

    def sample(model: Transformer, prompts: list[list[int]], n: int, params: SamplingParams, seed: int):
        generator = torch.Generator(model.tok_emb.weight.device).manual_seed(seed)
        with frozen_weights(model):
            return sample_groups(model, prompts, n, params, generator, decode)

    sample.name = "torch"
    return sample


# --- rewards ----------------------------------------------------------------------------------------------------------
def completion_body(tokens: list[int], params: SamplingParams, decode: Decode) -> str:
    """The function body a completion gives, cut as ``train.eval`` cuts it: the text (before a stop token or string),
    then ``cut_body`` (a partial last line dropped when the token limit stopped it)."""
    hit_limit = not stopped(tokens, params, decode)
    ids = tokens[:-1] if tokens and tokens[-1] in params.stop_token_ids else tokens
    text = decode(ids)
    cuts = [text.find(s) for s in params.stop_strings if s in text]
    return cut_body(text[: min(cuts)] if cuts else text, hit_limit)


Scorer = Callable[[list, list[str]], list[float]]  # (tasks, bodies) -> rewards in [0, 1]


def execution_scorer(workers: int = 0) -> Scorer:
    """Rewards by running each task's check on each body in the sandbox, in parallel (``exec_tasks.check_candidates``
    with its ``LIMITS``: unparsed bodies and repeats run no program), scored by ``exec_tasks.reward``."""

    def score(tasks: list, bodies: list[str]) -> list[float]:
        verdicts = exec_tasks.check_candidates(tasks, bodies, exec_tasks.LIMITS, workers)
        return [float(exec_tasks.reward(t, b, v)) for t, b, v in zip(tasks, bodies, verdicts, strict=True)]

    return score


# --- objectives -------------------------------------------------------------------------------------------------------
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [P, G], signal [P])`` from rewards ``[P, G]``: ``(r − mean) / (std + eps)`` per group (population
    std); a group whose rewards are all equal has no signal and gets advantage 0."""
    rewards = rewards.double()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    signal = (rewards.amax(-1) - rewards.amin(-1)) > 0
    adv = torch.where(signal[:, None], (rewards - mean) / (std + eps), torch.zeros_like(rewards))
    return adv.float(), signal


def maxrl_weights(rewards: torch.Tensor, mode: str = "group") -> torch.Tensor:
    """Per-sample weights ``[P, G]``: 0 for a failing sample; for a passing one ``1 / (passing in its group)``
    (``group``) or 1 (``mean``)."""
    passed = (rewards >= PASS).float()
    if mode == "mean":
        return passed
    return passed / passed.sum(-1, keepdim=True).clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) on samples from π: ``exp(q) − q − 1`` with ``q = log π_ref − log π``
    (≥ 0; zero, with zero gradient, where the two agree)."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


def token_objective(algo: str, logp: torch.Tensor, old_logp: torch.Tensor, coef: torch.Tensor,
                    ref_logp: torch.Tensor | None, clip_eps: float, kl_coef: float) -> torch.Tensor:  # fmt: skip
    """Per-token loss ``[B, T]`` (unmasked). GRPO: ``−min(ρ A, clip(ρ, 1 ± ε) A)`` with ``ρ = exp(logp − old_logp)``
    and ``A = coef`` per row; MaxRL: ``−logp`` (rows weighted by the caller). Plus ``kl_coef · k3``."""
    if algo == "grpo":
        ratio = torch.exp(logp - old_logp)
        adv = coef[:, None]
        obj = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    else:
        obj = -logp
    if ref_logp is not None and kl_coef:
        obj = obj + kl_coef * kl_k3(logp, ref_logp)
    return obj


@dataclass
class Rollout:
    """One completion in the update: its prompt and tokens, its advantage (GRPO) and its token weight (MaxRL)."""

    prompt: list[int]
    completion: list[int]
    coef: float = 0.0  # GRPO: the advantage
    weight: float = 1.0  # weight of each of its tokens in the loss (GRPO: 1; MaxRL: the sample's weight)


def rollouts_for_update(algo: str, prompts: list[list[int]], completions: list[list[list[int]]],
                        rewards: torch.Tensor, cfg: RLConfig) -> tuple[list[Rollout], int]:  # fmt: skip
    """The completions that take part in the update and the number of groups with signal (GRPO: rewards not all
    equal; MaxRL: at least one pass)."""
    rows = []
    if algo == "grpo":
        adv, signal = grpo_advantages(rewards, cfg.adv_eps)
        for g in signal.nonzero().flatten().tolist():
            rows += [Rollout(prompts[g], c, float(adv[g, i])) for i, c in enumerate(completions[g])]
        return rows, int(signal.sum())
    weights = maxrl_weights(rewards, cfg.maxrl_weight)
    for g, group in enumerate(completions):
        rows += [Rollout(prompts[g], c, 0.0, float(weights[g, i])) for i, c in enumerate(group) if weights[g, i] > 0]
    return rows, int((weights.sum(-1) > 0).sum())


def micro_batches(rows: list[Rollout], size: int, device) -> list[dict[str, torch.Tensor]]:
    """Right-padded ``x``, ``y`` (``prompt + completion`` shifted by one), the mask of completion targets, and per-row
    ``coef`` and ``weight``, in chunks of ``size`` rows."""
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        seqs = [r.prompt + r.completion for r in chunk]
        t = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(chunk), t, dtype=torch.long)
        y = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros(len(chunk), t)
        for j, (r, s) in enumerate(zip(chunk, seqs, strict=True)):
            x[j, : len(s) - 1] = torch.tensor(s[:-1])
            y[j, : len(s) - 1] = torch.tensor(s[1:])
            mask[j, len(r.prompt) - 1 : len(s) - 1] = 1
        out.append({"x": x.to(device), "y": y.to(device), "mask": mask.to(device),
                    "coef": torch.tensor([r.coef for r in chunk], device=device),
                    "weight": torch.tensor([r.weight for r in chunk], device=device)})  # fmt: skip
    return out


def token_logprobs(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log π(y_t | x_≤t)`` per position ``[B, T]`` (float32; bf16 autocast on CUDA)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(x)
    logits = logits.float()
    return -F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def _all_sum(values: list[float], device, world: int, op=None) -> list[float]:
    """``values`` summed (or reduced by ``op``) over the ranks."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _reduce_grads(model: nn.Module, world: int) -> None:
    """Every parameter gets a gradient (zeros where none flowed, so all ranks agree), summed over ranks."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def update_policy(model: Transformer, ref: Transformer | None, opts: dict, rows: list[Rollout], cfg: RLConfig,
                  world: int = 1) -> dict:  # fmt: skip
    """``cfg.inner_epochs`` optimizer steps on ``rows`` (this rank's share); every rank must call it, even with no
    rows. The loss is ``Σ weight · objective / Σ weight`` over the generated tokens of all ranks (gradients summed
    over ranks). Returns the loss, mean KL (k3, first epoch), gradient norm and token count, or
    ``{"updated": False}`` when no rank has a row."""
    device = model.tok_emb.weight.device
    batches = micro_batches(rows, cfg.micro_batch, device)
    tokens, weighted = _all_sum([sum(float(b["mask"].sum()) for b in batches),
                                 sum(float((b["mask"] * b["weight"][:, None]).sum()) for b in batches)],
                                device, world)  # fmt: skip
    if weighted <= 0:
        return {"updated": False, "loss": None, "kl": None, "grad_norm": None, "update_tokens": 0}
    ref_logp = []
    if ref is not None:
        with torch.no_grad():
            ref_logp = [token_logprobs(ref, b["x"], b["y"]) for b in batches]
    old_logp: list[torch.Tensor] = []
    model.train()
    first = {}
    for epoch in range(cfg.inner_epochs):
        loss_sum = kl_sum = 0.0
        for i, b in enumerate(batches):
            logp = token_logprobs(model, b["x"], b["y"])
            if epoch == 0:  # the sampling policy's log-probs: the weights have not moved yet
                old_logp.append(logp.detach())
            r = ref_logp[i] if ref_logp else None
            obj = token_objective(cfg.algo, logp, old_logp[i], b["coef"], r, cfg.clip_eps, cfg.kl_coef)
            loss = (obj * b["mask"] * b["weight"][:, None]).sum() / weighted
            loss.backward()
            loss_sum += float(loss.detach())
            if r is not None and epoch == 0:
                kl_sum += float((kl_k3(logp.detach(), r) * b["mask"]).sum())
        _reduce_grads(model, world)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if epoch == 0:
            loss_sum, kl_sum = _all_sum([loss_sum, kl_sum], device, world)
            first = {"loss": loss_sum, "kl": kl_sum / tokens if ref_logp else None, "grad_norm": float(grad_norm)}
    return {"updated": True, **first, "update_tokens": int(tokens)}


# --- the loop ---------------------------------------------------------------------------------------------------------
def plot_curves(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["mean_reward"] for r in rows], label="mean reward", lw=1)
    ax1.plot(steps, [r["pass_rate"] for r in rows], label="pass rate", lw=1)
    ax1.set_ylim(-0.02, 1.02)
    kl = [(r["step"], r["kl"]) for r in rows if r.get("kl") is not None]
    if kl:
        ax2.plot(*zip(*kl, strict=True), label="KL to start (k3)", lw=1, color="C3")
    for ax, ylabel in ((ax1, "reward / pass rate"), (ax2, "nats / token")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _encode_prompts(tasks: list, tok, room: int) -> tuple[list, list[list[int]], int]:
    """``(tasks, prompt ids, dropped)``: the tasks whose prompt leaves ``room`` tokens of context."""
    kept, ids, dropped = [], [], 0
    for task in tasks:
        p = tok.encode(task.prompt).ids
        if 0 < len(p) <= room:
            kept.append(task)
            ids.append(p)
        else:
            dropped += 1
    return kept, ids, dropped


def train_rl(cfg: RLConfig, tasks: list | None = None, scorer: Scorer | None = None, progress: bool = True,
             sampler: Sampler | None = None) -> dict:  # fmt: skip
    """Run (or resume) RL from ``cfg.gguf``; ``tasks`` (objects with ``.prompt``) and ``scorer`` replace the task file
    and the sandbox (tests); ``sampler`` replaces :func:`torch_sampler` (``bench.rl_engine``: the compiled engine; a
    ``name`` attribute names it in the checkpoints, and a run resumes only with the sampler it started with). Writes
    ``<out>/model.gguf`` when the last step is done; returns the summary."""
    if problems := cfg.problems(tasks_needed=tasks is None):
        raise RLError("; ".join(problems))
    t_start = time.perf_counter()
    if tasks is None:
        tasks = load_train_tasks(Path(cfg.tasks))
    rank, world, device = dist_setup()
    if world == 1 and cfg.device:
        device = torch.device(cfg.device)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    try:
        return _run(cfg, tasks, scorer or execution_scorer(cfg.workers), progress, rank, world, device, out,
                    ckpt_dir, t_start, sampler)  # fmt: skip
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(cfg: RLConfig, tasks: list, scorer: Scorer, progress: bool, rank: int, world: int, device, out: Path,
         ckpt_dir: Path, t_start: float, sampler: Sampler | None) -> dict:  # fmt: skip
    is_main = rank == 0
    if cfg.prompts_per_step < world:
        raise RLError(f"--prompts-per-step {cfg.prompts_per_step} is fewer than the {world} ranks")
    if is_main and ckpt_dir.is_dir():
        checkpoint.remove_stale(ckpt_dir)
    torch.manual_seed(cfg.seed)
    model, gg = load_gguf_model(cfg.gguf)
    ref = Transformer.from_gguf_tensors(gg.config, gg.model_tensors()).requires_grad_(False).eval().to(device)
    model.to(device)
    tok = hf_from_spec(gg.tokenizer)
    stop_ids = tuple(sorted({i for i in (gg.tokenizer.eos_id, tok.token_to_id(EOT)) if i is not None}))
    params = cfg.sampling(stop_ids)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    sampler = sampler or torch_sampler(decode)
    sampler_name = getattr(sampler, "name", "custom")
    tasks, prompts, dropped = _encode_prompts(tasks, tok, model.config.max_seq_len - cfg.max_new_tokens)
    if not tasks:
        raise RLError(f"no task's prompt fits max_seq_len {model.config.max_seq_len} with --max-new-tokens "
                      f"{cfg.max_new_tokens}")  # fmt: skip
    sched = cfg.schedule()
    opts = make_optimizers(model, sched)
    start = 0
    path, state = checkpoint.resumable(ckpt_dir)
    if path is not None:
        saved = state["extra"]["rl_config"]
        mismatched = checkpoint.changed_settings(saved, asdict(cfg), RESUMABLE_CHANGES)
        if mismatched:
            raise RLError(f"{path} was trained with different settings: {mismatched}; use another --out")
        if state["extra"].get("sampler", "torch") != sampler_name:
            raise RLError(f"{path} was sampled by {state['extra'].get('sampler', 'torch')!r}, this run by "
                          f"{sampler_name!r}: resume with the same sampler, or use another --out")  # fmt: skip
        if state["extra"].get("world") != world:
            log.warning("%s was written by %s rank(s), this run has %d: the samples will differ from an "
                        "uninterrupted run", path, state["extra"].get("world"), world)  # fmt: skip
        checkpoint.load(path, model, opts)
        start = state["step"]
        log.info("resuming from %s (step %d)", path, start)
    metrics_path = out / "metrics.jsonl"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(metrics_path, start)
        (out / "config.json").write_text(json.dumps({"rl": asdict(cfg), "tasks": len(tasks), "tasks_dropped": dropped,
                                                     "world": world, "sampler": sampler_name}, indent=2))  # fmt: skip
    extra = lambda: {"rl_config": asdict(cfg), "world": world, "sampler": sampler_name}  # noqa: E731
    stop = _StopFlag()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"rl {cfg.algo}", unit="step", disable=not (progress and is_main))
    done, status, last = start, "completed", {}
    try:
        for step in range(start, cfg.steps):
            for opt in opts.values():
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(step, sched)
            mine = step_tasks(len(tasks), cfg.prompts_per_step, cfg.seed, step)[rank::world]
            t0 = time.perf_counter()
            groups = sampler(model, [prompts[i] for i in mine], cfg.group_size, params, seed_for(cfg.seed, step, rank))
            t1 = time.perf_counter()
            bodies = [completion_body(c, params, decode) for group in groups for c in group]
            flat_tasks = [tasks[i] for i in mine for _ in range(cfg.group_size)]
            rewards = torch.tensor(scorer(flat_tasks, bodies) if bodies else [], dtype=torch.float64)
            rewards = rewards.view(len(mine), cfg.group_size)
            t2 = time.perf_counter()
            rows, signal = rollouts_for_update(cfg.algo, [prompts[i] for i in mine], groups, rewards, cfg)
            upd = update_policy(model, ref, opts, rows, cfg, world)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            done = step + 1
            n_sampled = sum(len(c) for group in groups for c in group)
            sums = _all_sum([float(rewards.sum()), float((rewards >= PASS).sum()), rewards.numel(), signal,
                             len(mine), n_sampled, float(stop.requested)], device, world)  # fmt: skip
            total_r, passes, samples, signal, n_groups, n_sampled, stops = sums
            secs = _all_sum([t1 - t0, t2 - t1, t3 - t2], device, world, dist.ReduceOp.MAX)  # the slowest rank's
            last = {"step": done, "mean_reward": total_r / samples, "pass_rate": passes / samples,
                    "groups": int(n_groups), "groups_with_signal": int(signal), "updated": upd["updated"],
                    "loss": upd["loss"], "kl": upd["kl"], "grad_norm": upd["grad_norm"],
                    "tokens_sampled": int(n_sampled), "update_tokens": upd["update_tokens"],
                    "lr_matrix": opts["muon"].param_groups[0]["lr"], "sample_s": round(secs[0], 3),
                    "reward_s": round(secs[1], 3), "update_s": round(secs[2], 3)}  # fmt: skip
            if upd["loss"] is not None and not math.isfinite(upd["loss"]):
                raise FloatingPointError(f"loss became {upd['loss']} at step {done}")
            if is_main:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
                bar.set_postfix(reward=f"{last['mean_reward']:.3f}", passed=f"{last['pass_rate']:.2f}")
            bar.update(1)
            if done < cfg.steps and (stops or (cfg.run_steps and done - start >= cfg.run_steps)):
                status = "interrupted" if stops else "paused"
                break
            out_of_time = cfg.time_limit_s and time.perf_counter() - t_start >= cfg.time_limit_s
            if done < cfg.steps and _all_sum([float(bool(out_of_time))], device, world)[0]:
                status = "time limit"  # exported as it is: the schedule spans --steps, it did not decay to its end
                break
            if is_main and done % cfg.ckpt_every == 0 and done < cfg.steps:
                checkpoint.save(ckpt_dir, done, model, opts, extra())
        summary = {"status": status, "step": done, "last": last, "tasks": len(tasks), "tasks_dropped": dropped,
                   "world": world, "sampler": sampler_name}  # fmt: skip
        if is_main and done > start:
            checkpoint.save(ckpt_dir, done, model, opts, extra())
        if is_main and metrics_path.exists():
            plot_curves(metrics_path, out / "rl_curves.png")
        if is_main and status in ("completed", "time limit"):
            meta = {"training.rl_algo": cfg.algo, "training.rl_steps": done}
            summary["export"] = export_gguf(model.eval(), gg, out / "model.gguf", meta)
            summary["config"] = asdict(cfg)
            summary["seconds"] = round(time.perf_counter() - t_start, 1)
            (out / "rl_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        stop.restore()
        bar.close()


def parse_args(argv: list[str] | None = None) -> RLConfig:
    return parse_config(RLConfig, "python -m train.rl", __doc__, argv)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = train_rl(cfg)
    except (ValueError, OSError, checkpoint.CheckpointError) as exc:
        raise SystemExit(f"python -m train.rl: error: {exc}") from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
