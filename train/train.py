"""Train the BitNet-b1.58 + mHC-lite model on token shards: Muon + AdamW, warmup-stable-decay, exact resume, DDP.

* Optimizers: Muon (``train.muon``, batched over same-shape matrices) for the 2-D hidden matrices (every
  BitLinear), AdamW for embeddings, norms, LM head, mHC logits, MoE routers. Learning rates follow warmup → stable →
  linear decay to zero (WSD). Memory savers: ``--optimizer muon8`` / ``--adamw-bits 8`` keep the momenta in 8 bits
  (``train.optim8``), ``--optimizer galore`` keeps Muon's momentum in a low-rank gradient subspace (``train.galore``);
  docs/train/optim/README.md compares them.
* Precision: bf16 autocast on CUDA (master weights float32), float32 on CPU; optional ``torch.compile``.
* Token filtering (``train.token_filter``): ``--token-keep k < 1`` computes the LM head and the loss for a fixed-size
  sample of ``k`` of each micro-batch's targets, chosen by bigram surprisal (``--token-score``, ``--token-floor``)
  and weighted so the loss stays an unbiased estimate of the full one; the selection is a pure function of
  ``(seed, step, micro-step, rank)`` like the batches. ``--token-keep 1`` (the default) is the unfiltered path.
* Data: windows of ``seq_len + 1`` tokens drawn from the memory-mapped train split by a generator seeded with
  ``(seed, step, micro-step, rank)``, so the data position is the step and a resumed run sees exactly the batches the
  uninterrupted run would have seen.
* Checkpoints (``train.checkpoint``): every ``ckpt_every`` steps, at the end, and on SIGTERM/SIGINT; a run restarted
  with the same ``--out`` resumes from the newest checkpoint that verifies (warning about any newer, corrupt one) and
  continues exactly; temporary folders left by a kill during a checkpoint write are removed on start.
  ``--run-steps N`` stops after N steps with a checkpoint (for time-limited machines); the schedule still spans
  ``--steps``.
* Logs: a progress bar, ``metrics.jsonl`` (loss, next-token CE, val loss, lr, grad norm, tokens/s, MFU, output
  entropy, max |logit|; MoE models add ``moe_aux``, the blocks' mean load-balancing loss, and ``moe_load_max``, the
  busiest expert's assignments over the mean, in the worst block; on resume, the rows logged after the restored
  checkpoint are dropped, so each step appears once) and ``loss.png``.
* Arguments are checked before anything is loaded; a bad flag, path or checkpoint ends in one ``error:`` line.
* Distributed: run the same command under ``torchrun --nproc_per_node N``; DDP with NCCL on GPUs, gloo on CPUs;
  rank 0 alone logs and checkpoints.

    python -m train.train --preset small --data data/shards --out runs/small --steps 3000 --batch-size 64 --compile
    torchrun --nproc_per_node 2 -m train.train --preset tiny --data data/shards --out runs/ddp --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from model.bitlinear import BitLinear
from model.config import get_config
from model.transformer import IGNORE_INDEX, MOE_AUX_WEIGHT, Transformer
from train import checkpoint, token_filter
from train.galore import GaLoreMuon
from train.muon import BatchedMuon
from train.optim8 import AdamW8bit, Muon8bit
from train.shards import ShardError, open_split

log = logging.getLogger("train")


class TrainError(ValueError):
    """A run that cannot start or continue as asked: bad settings, data that does not fit the model, ..."""


OPTIMIZERS = ("muon", "muon8", "galore")  # for the hidden matrices (--optimizer)


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "small"
    data: str = "data/shards"
    out: str = "runs/small"
    steps: int = 2000  # total steps: the lr schedule spans these
    run_steps: int = 0  # >0: stop (with a checkpoint) after this many steps in this invocation; resume later
    batch_size: int = 32  # sequences per micro-batch and rank
    seq_len: int = 512
    grad_accum: int = 1
    lr_matrix: float = 0.02  # Muon, hidden matrices
    lr_embed: float = 3e-3  # AdamW, everything else
    optimizer: str = "muon"  # hidden matrices: muon | muon8 (8-bit momentum, train.optim8) | galore (train.galore)
    adamw_bits: int = 32  # 32 | 8: AdamW's moments in 8 bits (train.optim8.AdamW8bit)
    galore_rank: int = 64  # --optimizer galore: rank of the gradient subspace
    galore_update_every: int = 100  # --optimizer galore: steps between subspace refreshes
    galore_scale: float = 1.0  # --optimizer galore: α, scale of the projected-back update (docs/train/optim)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay_frac: float = 0.3  # final fraction of steps over which the lr decays linearly to 0
    grad_clip: float = 1.0
    entropy_coef: float = 0.0  # >0 adds -coef·H(p) to the loss (discourages collapsed, over-confident outputs)
    ternary: bool = True  # False trains the dense baseline (same shapes, float weights and activations)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    eval_tokens: int = 131072
    ckpt_every: int = 500
    compile: bool = False
    # torch.compile + DDP: False compiles one graph and all-reduces after backward. On 2×H200 (small, 128×512 per GPU)
    # that scaled 1.95× against 1.63× for the bucket-split graphs that overlap communication (docs/train/small)
    ddp_split_graphs: bool = False
    peak_tflops: float = 989.0  # bf16 dense peak of the GPU, for MFU (H100/H200 SXM datasheet)
    # token filtering (train.token_filter): the LM head and loss on a sampled fraction of the targets; 1.0 = off
    token_keep: float = 1.0  # fraction of a micro-batch's target tokens kept
    token_score: str = "bigram"  # importance: bigram (surprisal under the train split's bigram model) | uniform
    token_floor: float = 0.25  # every token's keep probability is at least floor × the mean keep probability
    model_overrides: dict = field(default_factory=dict)  # e.g. {"n_streams": 4}

    def model_config(self):
        return get_config(self.preset, **self.model_overrides)

    def problems(self) -> list[str]:
        """What is wrong with these settings (flags, paths), checked before anything is loaded; [] if nothing."""
        out = []
        flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "ckpt_every",
                     "galore_rank", "galore_update_every"):  # fmt: skip
            if getattr(self, name) < 1:
                out.append(f"{flag(name)} must be ≥ 1, got {getattr(self, name)}")
        for name in ("run_steps", "warmup_steps", "eval_tokens", "seed"):
            if getattr(self, name) < 0:
                out.append(f"{flag(name)} must be ≥ 0, got {getattr(self, name)}")
        for name in ("lr_matrix", "lr_embed", "weight_decay", "entropy_coef"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                out.append(f"{flag(name)} must be finite and ≥ 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.adamw_bits not in (8, 32):
            out.append(f"--adamw-bits must be 8 or 32, got {self.adamw_bits}")
        for name in ("grad_clip", "peak_tflops", "galore_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                out.append(f"{flag(name)} must be finite and > 0, got {getattr(self, name)}")
        if not 0 <= self.decay_frac <= 1:
            out.append(f"--decay-frac must be in [0, 1], got {self.decay_frac}")
        if not (math.isfinite(self.token_keep) and 0 < self.token_keep <= 1):
            out.append(f"--token-keep must be in (0, 1], got {self.token_keep}")
        if self.token_score not in token_filter.SCORES:
            out.append(f"--token-score must be one of {', '.join(token_filter.SCORES)}, got {self.token_score!r}")
        if not 0 <= self.token_floor <= 1:
            out.append(f"--token-floor must be in [0, 1], got {self.token_floor}")
        if not isinstance(self.model_overrides, dict):
            out.append(f"--model must be a JSON object of model config fields, got {self.model_overrides!r}")
        else:
            try:
                mcfg = self.model_config()
            except (KeyError, TypeError, ValueError) as exc:
                out.append(f"--preset {self.preset} / --model: {exc.args[0] if exc.args else exc}")
            else:
                if self.seq_len > mcfg.max_seq_len:
                    out.append(f"--seq-len {self.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
                if self.token_keep < 1 and mcfg.mtp_heads:
                    out.append(f"--token-keep {self.token_keep}: token filtering does not support mtp_heads "
                               f"({mcfg.mtp_heads}; their loss needs every position's logits); train draft heads "
                               "with python -m train.mtp")  # fmt: skip
        data = Path(self.data)
        if not (data / "meta.json").is_file():
            why = "does not exist" if not data.exists() else "holds no meta.json"
            out.append(f"--data {data}: {why}; make token shards with python -m train.shards")
        o = Path(self.out)
        if o.exists() and not o.is_dir():
            out.append(f"--out {o}: exists and is not a directory")
        else:
            parent = next(p for p in (o, *o.absolute().parents) if p.exists())
            if not os.access(parent, os.W_OK):
                out.append(f"--out {o}: {parent} is not writable")
        return out


# settings that may differ between a checkpoint and the run resuming it (all others must match)
RESUMABLE_CHANGES = (
    "steps",
    "run_steps",
    "out",
    "log_every",
    "eval_every",
    "eval_tokens",
    "ckpt_every",
    "compile",
    "ddp_split_graphs",
)
# what a checkpoint written before token filtering existed was trained with (its train_config lacks these)
TOKEN_FILTER_OFF = {f.name: f.default for f in fields(TrainConfig) if f.name.startswith("token_")}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, flat, then linear decay to 0 over the last ``decay_frac`` of the steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    if step < decay_start:
        return 1.0
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))


class Batches:
    """Deterministic random windows: batch ``(step, micro)`` on ``rank`` is a pure function of its arguments.

    On CUDA the windows go through a small ring of pinned host buffers and an asynchronous copy, so fetching a batch
    never waits for the GPU to drain (a pageable copy would synchronise the stream every step).
    """

    RING = 4

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int, rank: int, device) -> None:
        if tokens.size <= seq_len + 1:
            raise ValueError(f"split of {tokens.size} tokens is too short for seq_len {seq_len}")
        self.tokens, self.seq_len, self.batch, self.seed, self.rank, self.device = (
            tokens, seq_len, batch, seed, rank, device)  # fmt: skip
        self.span = np.arange(seq_len + 1)
        self.calls = 0
        if device.type == "cuda":
            self.pinned = [torch.empty(batch, seq_len + 1, dtype=torch.int64).pin_memory() for _ in range(self.RING)]
            self.copied = [None] * self.RING

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, step, micro, self.rank))
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.batch)
        window = torch.from_numpy(self.tokens[starts[:, None] + self.span].astype(np.int64))
        if self.device.type == "cuda":
            slot = self.calls % self.RING
            self.calls += 1
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # the copy that last used this buffer (long finished)
            self.pinned[slot].copy_(window)
            window = self.pinned[slot].to(self.device, non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record()
        return window[:, :-1], window[:, 1:]


class LossModule(nn.Module):
    """The training objective as a module's forward, so DDP's gradient hooks see it. With ``idx`` and ``weight`` (a
    ``train.token_filter.Selection``) the LM head and loss cover the kept tokens only; without, the full loss."""

    def __init__(self, model: Transformer, entropy_coef: float) -> None:
        super().__init__()
        self.model, self.entropy_coef = model, entropy_coef

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if idx is not None:
            return token_filter.sparse_loss(self.model, x, y, idx, weight, self.entropy_coef)
        if self.entropy_coef == 0:
            return self.model.loss(x, y)
        logits = self.model(x).float()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        loss = ce - self.entropy_coef * entropy
        if self.model.config.n_experts:
            loss = loss + MOE_AUX_WEIGHT * self.model.moe_aux_loss()
        return loss, ce.detach()


def make_optimizers(model: Transformer, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """Muon for 2-D hidden matrices, AdamW for the rest (embeddings, the LM head, MoE routers and DeltaNet's float
    gate projections are not "hidden"; nor are DeltaNet's ``A_log`` and ``dt_bias``, vectors as the norms).

    ``cfg.optimizer`` picks the Muon variant (``muon8``: 8-bit momentum; ``galore``: momentum in a low-rank gradient
    subspace) and ``cfg.adamw_bits`` AdamW's; the matrix optimizer is ``"muon"`` in the returned dict either way."""
    matrices, others = [], []
    for name, p in model.named_parameters():
        hidden = p.ndim == 2 and not name.startswith(("tok_emb", "lm_head"))
        hidden = hidden and not name.endswith(("router.weight", ".w_alpha", ".w_beta"))
        (matrices if hidden else others).append(p)
    fused = next(model.parameters()).is_cuda
    kw = {"lr": cfg.lr_matrix, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "muon8":
        muon = Muon8bit(matrices, **kw)
    elif cfg.optimizer == "galore":
        muon = GaLoreMuon(matrices, rank=cfg.galore_rank, update_every=cfg.galore_update_every,
                          scale=cfg.galore_scale, seed=cfg.seed, **kw)  # fmt: skip
    else:
        muon = BatchedMuon(matrices, **kw)
    adam = {"lr": cfg.lr_embed, "betas": (0.9, 0.95), "weight_decay": 0.0}
    if cfg.adamw_bits == 8:
        adamw = AdamW8bit(others, **adam)
    else:
        adamw = torch.optim.AdamW(others, **adam, fused=fused)
    opts = {"muon": muon, "adamw": adamw}
    for opt in opts.values():
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def compile_objective(objective: nn.Module, cfg: TrainConfig, world: int):
    """``torch.compile`` the objective when asked; under DDP optionally as one graph (all-reduce after backward)."""
    if not cfg.compile:
        return objective
    if world > 1:
        torch._dynamo.config.optimize_ddp = cfg.ddp_split_graphs
    return torch.compile(objective)


def set_dense(model: Transformer) -> None:
    """Turn every BitLinear into a plain float linear layer: the dense baseline with the same shapes."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.quantize = False


def flops_per_token(model: Transformer, seq_len: int, token_keep: float = 1.0) -> float:
    """Training FLOPs per token: 6 × matmul parameters + attention (12·L·d·T), the usual estimate (MoE experts count
    for the share a token uses, ``n_experts_used / n_experts``; with token filtering the LM head's 6·V·d counts for
    the ``token_keep`` share of the tokens that reach it)."""
    c = model.config
    matmul = sum(p.numel() * c.ffn_active / c.ffn_copies if ".experts." in n else p.numel()
                 for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("tok_emb"))  # fmt: skip
    if c.tie_embeddings:
        matmul += model.tok_emb.weight.numel()  # the tied LM head is a matmul too
    return 6 * matmul + 12 * c.n_layers * c.d_model * seq_len - (1 - token_keep) * 6 * c.vocab_size * c.d_model


@torch.no_grad()
def output_stats(model: Transformer, x: torch.Tensor) -> dict[str, float]:
    """Entropy of the next-token distribution and max |logit|: collapse shows here before it shows in the loss."""
    logits = model(x[:4]).float()
    logp = logits.log_softmax(-1)
    return {"entropy": float(-(logp.exp() * logp).sum(-1).mean()), "logit_max": float(logits.abs().max())}


@torch.no_grad()
def moe_stats(model: Transformer) -> dict[str, float]:
    """The last forward's mean load-balancing loss and expert load (max / mean, the worst block's); {} if dense."""
    if not model.config.n_experts:
        return {}
    loads = torch.stack([b.ffn.last_load for b in model.blocks]).float()
    balance = (loads.amax(1) / loads.mean(1)).max()
    return {"moe_aux": float(model.moe_aux_loss().detach()), "moe_load_max": float(balance)}


@torch.no_grad()
def evaluate(model: Transformer, tokens: np.ndarray, cfg: TrainConfig, device, autocast) -> float:
    """Mean next-token CE (nats) over the first ``eval_tokens`` tokens of the val split, in contiguous windows."""
    model.eval()
    n = min(cfg.eval_tokens, tokens.size - 1) // cfg.seq_len * cfg.seq_len
    if n == 0:
        return float("nan")
    data = torch.from_numpy(tokens[: n + 1].astype(np.int64)).to(device)
    x, y = data[:-1].view(-1, cfg.seq_len), data[1:].view(-1, cfg.seq_len)
    total = 0.0
    for i in range(0, x.shape[0], cfg.batch_size):
        with autocast():
            logits = model(x[i : i + cfg.batch_size]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + cfg.batch_size].flatten(), reduction="sum"))
    model.train()
    return total / n


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` after ``step`` (logged after the checkpoint a run resumes from; the resumed
    run logs those steps again) and torn lines (a kill mid-write); returns how many rows went."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)
        log.warning("%s: dropped %d row(s) logged after step %d (the step resumed from) or torn", path, dropped, step)
    return dropped


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["ce"]) for r in rows if "ce" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train CE", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val CE", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits after the step in flight."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def dist_setup() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training; returns a summary (final step, losses, tokens/s, status)."""
    if problems := cfg.problems():
        raise TrainError("; ".join(problems))
    rank, world, device = dist_setup()
    is_main = rank == 0
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if is_main and ckpt_dir.is_dir():
        checkpoint.remove_stale(ckpt_dir)
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config()
    model = Transformer(mcfg)
    if not cfg.ternary:
        set_dense(model)
    model.to(device)
    opts = make_optimizers(model, cfg)
    start = 0
    path, state = checkpoint.resumable(ckpt_dir)
    if path is not None:
        saved = state["extra"]["train_config"]
        saved = TOKEN_FILTER_OFF | saved  # a checkpoint from before token filtering trained without it
        mismatched = checkpoint.changed_settings(saved, asdict(cfg), RESUMABLE_CHANGES)
        if mismatched:
            raise TrainError(f"{path} was trained with different settings: {mismatched}; use another --out")
        checkpoint.load(path, model, opts)
        start = state["step"]
        log.info("resuming from %s (step %d)", path, start)
    train_tokens = open_split(Path(cfg.data), "train")
    val_tokens = open_split(Path(cfg.data), "val")
    if int(train_tokens.max(initial=0)) >= mcfg.vocab_size:
        raise TrainError(f"--data {cfg.data}: token ids ≥ the model's vocab_size {mcfg.vocab_size}")
    try:
        batches = Batches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, rank, device)
    except ValueError as exc:
        raise TrainError(f"--data {cfg.data}: {exc}") from None
    # None when --token-keep is 1: the loop then calls the objective exactly as without token filtering
    tfilter = token_filter.from_config(cfg, train_tokens, mcfg.vocab_size, rank, device)
    objective: nn.Module = LossModule(model, cfg.entropy_coef)
    if world > 1:
        ids = [device.index] if device.index is not None else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids, gradient_as_bucket_view=True)
    step_fn = compile_objective(objective, cfg, world)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    metrics_path = out / "metrics.jsonl"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(metrics_path, start)
        (out / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": mcfg.to_dict()}, indent=2))
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    fpt = flops_per_token(model, cfg.seq_len, cfg.token_keep)
    stop = _StopFlag()
    extra = lambda: {"train_config": asdict(cfg), "model_config": mcfg.to_dict()}  # noqa: E731
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and is_main))
    t_last, step, status, last_logged = time.perf_counter(), start, "completed", start
    last = {}
    try:
        for step in range(start, cfg.steps):
            for opt in opts.values():
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(step, cfg)
            for micro in range(cfg.grad_accum):
                x, y = batches.get(step, micro)
                sync = micro == cfg.grad_accum - 1 or world == 1
                ctx = objective.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                # Batches' windows hold no IGNORE_INDEX: N = batch · seq_len and K are static, nothing syncs
                kept = () if tfilter is None else tfilter.select(x, y, step, micro, all_valid=True)
                with ctx, autocast():
                    loss, ce = step_fn(x, y, *kept)
                (loss / cfg.grad_accum).backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in opts.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            done = step + 1
            eval_due = done % cfg.eval_every == 0 or done == cfg.steps
            if is_main and (done % cfg.log_every == 0 or eval_due):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tps = tokens_per_step * (done - last_logged) / (now - t_last)
                last_logged = done
                t_last = now
                last = {"step": done, "loss": float(loss.detach()), "ce": float(ce), "grad_norm": float(grad_norm),
                        "lr_matrix": opts["muon"].param_groups[0]["lr"], "tokens_per_s": tps,
                        "mfu": tps * fpt / (cfg.peak_tflops * 1e12) if device.type == "cuda" else None,
                        "tokens": done * tokens_per_step} | moe_stats(model) | output_stats(model, x)  # fmt: skip
                if tfilter is not None:
                    last["kept_frac"] = tfilter.kept_frac
                if eval_due:
                    last["val_loss"] = evaluate(model, val_tokens, cfg, device, autocast)
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
                bar.set_postfix(ce=f"{last['ce']:.3f}", tps=f"{tps / 1e3:.0f}k")
                t_last = time.perf_counter()
            bar.update(1)
            if last.get("step") == done and not math.isfinite(last["loss"]):  # checked when logged: no per-step sync
                raise FloatingPointError(f"loss became {last['loss']} at step {done}")
            if stop.requested or (cfg.run_steps and done - start >= cfg.run_steps):
                status = "interrupted" if stop.requested else "paused"
                break
            if is_main and done % cfg.ckpt_every == 0 and done < cfg.steps:
                checkpoint.save(ckpt_dir, done, model, opts, extra())
        else:
            done = cfg.steps
        if is_main and done > start:
            checkpoint.save(ckpt_dir, done, model, opts, extra())
            if metrics_path.exists():
                plot_metrics(metrics_path, out / "loss.png")
    finally:
        stop.restore()
        bar.close()
        if world > 1:
            dist.destroy_process_group()
    return {"status": status, "step": done, "last": last}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block and no stack trace
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a :class:`TrainConfig`; a bad flag or path exits with one ``error:`` line."""
    fmt = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog="python -m train.train", description=__doc__, formatter_class=fmt)
    for f in fields(TrainConfig):
        if f.name == "model_overrides":
            ap.add_argument("--model", type=json.loads, default={}, dest="model_overrides",
                            help='model config overrides as JSON, e.g. \'{"n_streams": 4}\'')  # fmt: skip
        elif f.type in ("bool", bool):
            ap.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    cfg = TrainConfig(**vars(ap.parse_args(argv)))
    if problems := cfg.problems():
        ap.error("; ".join(problems))
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = train(cfg)
    except (TrainError, checkpoint.CheckpointError, ShardError, OSError) as exc:
        raise SystemExit(f"python -m train.train: error: {exc}") from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
