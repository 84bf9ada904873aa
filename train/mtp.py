"""Multi-token-prediction (MTP) heads for a shipped GGUF, trained by self-distillation on a frozen backbone.

The heads are the drafters of self-speculative decoding, recurrent draft steps (EAGLE-like;
:class:`model.transformer.MTPHead`, :meth:`model.transformer.Transformer.mtp_chain`): step ``k`` gives
``g_k = g_{k-1} + silu(P_k g_{k-1} + Q_k norm_k(emb(x_{t+k+1})))`` with ``g_{-1} = h_t`` (the final normed hidden
state; ``P_k``, ``Q_k`` ternary d × d BitLinears, ``norm_k`` an RMSNorm) and proposes ``lm_head(g_k)``'s argmax as the
token ``k + 2`` positions ahead; the runtime feeds step 0 the main model's pick at ``t`` and step ``k > 0`` the
previous step's draft, and keeps a draft only when the main model agrees with it.

* **Model**: the GGUF is rebuilt in PyTorch (``train.sft.load_gguf_model``, exact), ``--heads`` fresh heads are added
  (any it had are replaced) and every other parameter is frozen, the embedding / LM head included. Only the heads
  train: ``P_k`` and ``Q_k`` by ternary QAT through BitLinear with Muon, the norm gains with AdamW; warmup then linear
  decay, bf16 autocast on CUDA. The main model is therefore unchanged by construction: its held-out bits/byte is
  measured before and after (from the written file), and the backbone tensors of the written GGUF are checked byte
  for byte against the input's.
* **Objective**: self-distillation, on-policy for greedy decoding. The chain is fed the main model's own argmax
  tokens (what the runtime feeds it while its drafts hold), and the target of step ``k`` at position ``t`` is the main
  model's next-token distribution at position ``t + k + 1``, both computed in the same forward under ``no_grad``;
  the loss is ``KL(p_main(t + k + 1) ‖ q_k(t))``, optionally mixed with the data token's cross-entropy
  (``--data-weight``). A draft is accepted when it equals the main model's argmax (greedy) or with probability
  ``min(1, p/q)`` (speculative sampling), so what matters is agreeing with the main model, not with the data.
* **Data**: as ``train.sft``: the corpus (by default the host's stdlib and site-packages) and shards tokenized with
  the GGUF's own tokenizer (``train.sft.prepare_data``), train split only: plain windows of ``--seq-len`` tokens and
  chat turns (``train.sft`` request/answer pairs rendered with the GGUF's chat template; answer positions only).
* **Evaluation** (held-out split only), four sets: plain windows and chat turns with the reference answers (teacher
  forced), and the main model's own greedy continuations of held-out plain prompts and of held-out chat requests
  (the trajectory greedy decoding drafts on). Per head: top-1 agreement with the main model's argmax at the target
  position, top-1 accuracy against the data token (teacher-forced sets), the mean speculative-sampling acceptance
  ``Σ min(p, q)`` at temperature 1; and the expected accepted drafts per step with 1 … m drafts under greedy chain
  acceptance (head ``j``'s draft counts only if heads ``0 … j−1`` were accepted too), counted on the chained event
  position by position, not multiplied from marginals.
* **Output** in ``--out``: ``model.gguf`` (the input's ``training.*`` keys plus ``training.mtp_distilled`` and
  ``training.mtp_steps``), ``mtp_report.json`` (settings, training, bits/byte before and after, the evaluation) and
  ``metrics.jsonl``.

    python -m train.mtp --gguf models/small.gguf --out runs/mtp --heads 3 --steps 1500
    python -m train.mtp --gguf runs/tiny/model.gguf --out runs/tiny-mtp --manifest runs/tiny/corpus/manifest.jsonl \\
        --shards runs/tiny/shards --steps 20 --device cpu

On the GPU host: ``OUT=<folder> bash scripts/mtp_small_h200.sh`` (docs/train/mtp/README.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from model.gguf_io import parse_gguf
from model.tokenizer import hf_from_spec
from model.transformer import IGNORE_INDEX, Transformer
from train.chat_eval import greedy_batch, held_out_functions
from train.cli import parse_config
from train.corpus import read_manifest
from train.eval import EvalConfig, loss_and_bpb, token_byte_lengths
from train.muon import BatchedMuon
from train.sft import (
    PAD,
    build_pairs,
    corpus_functions,
    encode_pairs,
    encode_turn,
    eval_request,
    export_gguf,
    load_gguf_model,
    prepare_data,
    render_chat,
    sft_batch,
)
from train.shards import open_split
from train.tokenizer import CHAT_TEMPLATE, EOT
from train.train import Batches


@dataclass(frozen=True)
class MTPConfig:
    gguf: str = "models/small.gguf"
    out: str = "runs/mtp"
    heads: int = 3
    manifest: str = ""  # corpus manifest; empty: build one in <out>/data
    shards: str = ""  # token shards made with the GGUF's tokenizer; empty: build them in <out>/data
    roots: str = "stdlib,site-packages"  # corpus roots when building one
    plain_mb: float = 160.0  # MB of the train split tokenized for plain windows when building shards
    steps: int = 1200
    time_limit_s: float = 0.0  # >0: the schedule also ends (decaying to 0) when this much training time has passed
    batch_size: int = 64  # plain windows per step
    chat_batch_size: int = 32  # chat turns per step (0: none)
    seq_len: int = 512
    max_answer_tokens: int = 256  # chat turns with longer answers are dropped
    data_weight: float = 0.0  # weight of the data token's cross-entropy next to the distillation KL
    lr: float = 0.015  # Muon, the heads' matrices (0.05 plateaued by step 300, then drifted up: docs/train/mtp)
    lr_norm: float = 3e-3  # AdamW, the gains of the heads' embedding norms
    warmup_steps: int = 50
    decay_frac: float = 0.3
    grad_clip: float = 1.0
    eval_tokens: int = 1_000_000  # held-out tokens for the main model's bits/byte
    eval_windows: int = 256  # held-out plain windows (teacher forced) for the head metrics
    eval_prompts: int = 128  # held-out plain prompts continued greedily
    eval_prompt_tokens: int = 64
    eval_requests: int = 128  # held-out chat requests (teacher forced and answered greedily)
    eval_new_tokens: int = 192  # greedy tokens per prompt / request
    eval_batch_size: int = 32
    seed: int = 0
    workers: int = 0  # processes that parse the corpus (0: one per core, at most 16)
    log_every: int = 25
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def problems(self) -> list[str]:
        out = []
        for name in ("heads", "steps", "batch_size", "seq_len", "max_answer_tokens", "log_every", "eval_batch_size",
                     "eval_prompt_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be ≥ 1")
        for name in ("chat_batch_size", "eval_tokens", "eval_windows", "eval_prompts", "eval_requests",
                     "eval_new_tokens", "warmup_steps", "time_limit_s"):  # fmt: skip
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must be ≥ 0")
        for name in ("data_weight", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"--{name.replace('_', '-')} must be in [0, 1]")
        for name in ("lr", "lr_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                out.append(f"--{name.replace('_', '-')} must be finite and > 0")
        if not Path(self.gguf).is_file():
            out.append(f"--gguf {self.gguf}: no such file")
        return out


# --- model ------------------------------------------------------------------------------------------------------------
def with_heads(model: Transformer, heads: int, seed: int = 0) -> Transformer:
    """``model`` with ``heads`` fresh MTP heads (replacing any it has); every other parameter is frozen."""
    torch.manual_seed(seed)
    out = Transformer(replace(model.config, mtp_heads=heads))
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = out.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("mtp.") for k in missing):
        raise ValueError(f"backbone mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in out.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
    return out


def distill_loss(model: Transformer, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None = None,
                 data_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, kl per step)`` on tokens ``x [B, T]``: the draft chain (:meth:`Transformer.mtp_chain`) is fed the main
    model's argmax at every position (what the runtime feeds it under greedy decoding while its drafts hold), and
    step ``k`` at ``t`` is trained against the main model's distribution at ``t + k + 1``, over the positions where
    ``mask`` holds at both; ``y`` (the next tokens) is needed only when ``data_weight > 0`` (step ``k``'s data token
    at ``t`` is ``y[t + k + 1]``). The loss is the mean over the steps."""
    with torch.no_grad():
        h = model.hidden(x)
        logits = model.head(h)
        nxt = logits.argmax(-1)
        logp = logits.float().log_softmax(-1)
        del logits
    losses, kls = [], []
    for k, g in enumerate(model.mtp_chain(h, nxt)):
        s = k + 1
        logq = model.head(g[:, :-1]).float().log_softmax(-1)
        target = logp[:, s:]
        valid = (mask[:, :-s] & mask[:, s:]).float()
        n = valid.sum().clamp(min=1)
        kl = ((target.exp() * (target - logq)).sum(-1) * valid).sum() / n
        loss = kl
        if data_weight:
            ce = F.nll_loss(logq.flatten(0, 1), y[:, s:].flatten(), ignore_index=IGNORE_INDEX, reduction="none")
            loss = (1 - data_weight) * kl + data_weight * (ce.view_as(valid) * valid).sum() / n
        losses.append(loss)
        kls.append(kl.detach())
    return torch.stack(losses).mean(), torch.stack(kls)


# --- evaluation -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def draft_counts(model: Transformer, x: torch.Tensor, first: torch.Tensor, length: torch.Tensor) -> dict:
    """Summed draft statistics of rows ``x [B, L]`` (right-padded to ``length``): the drafting positions of row ``b``
    are ``first[b] ≤ t ≤ length[b] − m − 2`` (``m`` steps: every step's target and data token exist). The chain is fed
    the main model's argmax tokens, as the runtime feeds it while the drafts hold (step 0 the main model's pick at
    ``t``, step ``k > 0`` its own previous draft, which equals the main pick whenever the chain still counts); step
    ``k``'s draft at ``t`` is compared with the main argmax at ``t + k + 1`` and with the token ``x[t + k + 2]``."""
    m = len(model.mtp)
    t_end = x.shape[1] - m - 1
    if t_end <= 0:
        return {}
    pos = torch.arange(t_end, device=x.device)
    at = (pos >= first[:, None]) & (pos <= length[:, None] - m - 2)
    h = model.hidden(x)
    p = model.head(h).float().softmax(-1)
    main = p.argmax(-1)
    out = {"positions": int(at.sum()), "main_data": int((main[:, :t_end] == x[:, 1 : t_end + 1])[at].sum()),
           "agree": [], "data": [], "accept_prob": [], "chain": []}  # fmt: skip
    chain = torch.ones_like(at)
    for k, g in enumerate(model.mtp_chain(h, main)):
        q = model.head(g[:, :t_end]).float().softmax(-1)
        draft = q.argmax(-1)
        agree = draft == main[:, k + 1 : t_end + k + 1]
        chain &= agree
        out["agree"].append(int(agree[at].sum()))
        out["chain"].append(int(chain[at].sum()))
        out["data"].append(int((draft == x[:, k + 2 : t_end + k + 2])[at].sum()))
        out["accept_prob"].append(float(torch.minimum(q, p[:, k + 1 : t_end + k + 1]).sum(-1)[at].sum()))
    return out


def draft_metrics(model: Transformer, rows: list[tuple[list[int], int]], batch_size: int, teacher_forced: bool) -> dict:
    """Per-head agreement, data accuracy and acceptance, and the expected accepted drafts per step, over ``rows``
    ``(ids, first drafting position)``; ``teacher_forced`` False: the rows are the main model's greedy output, whose
    "data" token is the main argmax itself (reported as ``trajectory_consistency``, ≈ 1 up to bf16 ties)."""
    device = model.tok_emb.weight.device
    total: dict = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            x[r, : len(ids)] = torch.tensor(ids)
        first = torch.tensor([f for _, f in chunk], device=device)
        length = torch.tensor([len(ids) for ids, _ in chunk], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            counts = draft_counts(model, x.to(device), first, length)
        for key, value in counts.items():
            if isinstance(value, list):
                total[key] = [a + b for a, b in zip(total.get(key, [0] * len(value)), value, strict=True)]
            else:
                total[key] = total.get(key, 0) + value
    n = max(1, total.get("positions", 0))
    chain = [c / n for c in total.get("chain", [])]
    heads = [{"head": k, "predicts": f"t+{k + 2}", "agree_top1": total["agree"][k] / n,
              "accept_prob_t1": total["accept_prob"][k] / n, "chain_accepted": chain[k]}
             | ({"data_top1": total["data"][k] / n} if teacher_forced else {})
             for k in range(len(chain))]  # fmt: skip
    out = {"rows": len(rows), "positions": total.get("positions", 0), "heads": heads,
           "expected_accepted": {str(j): sum(chain[:j]) for j in range(1, len(chain) + 1)}}  # fmt: skip
    key = "main_top1_data" if teacher_forced else "trajectory_consistency"
    return out | {key: total.get("main_data", 0) / n}


def control_ids(tok) -> set[int]:
    return {tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special}


def evaluate(model: Transformer, tok, template: str, val: np.ndarray, functions: list[dict], cfg: MTPConfig) -> dict:
    """The four held-out sets of the module docstring, each through :func:`draft_metrics`."""
    seq = min(cfg.seq_len, model.config.max_seq_len)
    n = min(cfg.eval_windows, (val.size - 1) // seq)
    plain = [(val[i * seq : (i + 1) * seq + 1].astype(np.int64).tolist(), 0) for i in range(n)]
    turns = [encode_turn(tok, {"user": eval_request(fn), "assistant": f"```python\n{fn['code']}\n```"}, template)
             for fn in functions]  # fmt: skip
    chat = [(ids.tolist(), n_prompt - 1) for ids, n_prompt in turns if len(ids) <= model.config.max_seq_len]
    stride = max(cfg.eval_prompt_tokens, val.size // max(1, cfg.eval_prompts + 1))
    prompts = [val[i : i + cfg.eval_prompt_tokens].astype(np.int64).tolist()
               for i in range(0, val.size - cfg.eval_prompt_tokens, stride)][: cfg.eval_prompts]  # fmt: skip
    requests = [tok.encode(render_chat([{"role": "user", "content": eval_request(fn)}], template),
                           add_special_tokens=False).ids for fn in functions]  # fmt: skip
    stop = control_ids(tok)
    greedy = {}
    for name, ps in (("plain_greedy", prompts), ("chat_greedy", requests)):
        answers = greedy_batch(model, ps, cfg.eval_new_tokens, stop, cfg.eval_batch_size) if ps else []
        greedy[name] = [(p + a["ids"], len(p) - 1) for p, a in zip(ps, answers, strict=True)]
    return {"plain_teacher_forced": draft_metrics(model, plain, cfg.eval_batch_size, True),
            "chat_teacher_forced": draft_metrics(model, chat, cfg.eval_batch_size, True),
            "plain_greedy": draft_metrics(model, greedy["plain_greedy"], cfg.eval_batch_size, False),
            "chat_greedy": draft_metrics(model, greedy["chat_greedy"], cfg.eval_batch_size, False)}  # fmt: skip


def backbone_differences(a: str | Path, b: str | Path) -> list[str]:
    """Names of the non-MTP tensors whose type, shape or bytes differ between two GGUFs (or exist in one only)."""
    ta, tb = parse_gguf(a).tensors, parse_gguf(b).tensors
    names = {n for n in (*ta, *tb) if not n.startswith("mtp.")}
    same = lambda n: n in ta and n in tb and (ta[n].ggml_type, ta[n].shape, ta[n].data.tobytes()) == (  # noqa: E731
        tb[n].ggml_type, tb[n].shape, tb[n].data.tobytes())  # fmt: skip
    return sorted(n for n in names if not same(n))


# --- training ---------------------------------------------------------------------------------------------------------
def lr_factor(step: int, progress: float, cfg: MTPConfig) -> float:
    """Linear warmup over ``warmup_steps``, flat, then linear decay to 0 over the last ``decay_frac`` of progress."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay = min(1.0, (1 - progress) / cfg.decay_frac) if cfg.decay_frac else 1.0
    return max(0.0, warm * decay)


def train_mtp(cfg: MTPConfig, progress: bool = True) -> dict:
    """Distil ``cfg.heads`` heads onto ``cfg.gguf``'s frozen model, write ``<out>/model.gguf`` and the report."""
    if problems := cfg.problems():
        raise ValueError("; ".join(problems))
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    base, gg = load_gguf_model(cfg.gguf)
    tok = hf_from_spec(gg.tokenizer)
    template = gg.tokenizer.chat_template or CHAT_TEMPLATE
    manifest, shards = prepare_data(gg, out / "data", Path(cfg.manifest) if cfg.manifest else None,
                                    Path(cfg.shards) if cfg.shards else None, tuple(cfg.roots.split(",")),
                                    cfg.plain_mb, cfg.seed)  # fmt: skip
    seq = min(cfg.seq_len, base.config.max_seq_len)
    encoded = []
    if cfg.chat_batch_size:  # parsing forks workers: before CUDA starts
        train_files = [f for f in read_manifest(manifest) if f.split == "train"]
        pairs = build_pairs(corpus_functions(train_files, cfg.workers), cfg.seed)
        encoded = encode_pairs(tok, pairs, template, seq, cfg.max_answer_tokens)
        if not encoded:
            raise ValueError(f"{manifest}: no usable chat turns in the train split (--chat-batch-size 0: none)")
    functions = held_out_functions(manifest, cfg.eval_requests, workers=cfg.workers) if cfg.eval_requests else []
    val = open_split(shards, "val")
    byte_len = token_byte_lengths(tok)
    bpb_cfg = EvalConfig(seq_len=seq, max_tokens=cfg.eval_tokens, batch_size=32)
    bpb_before = loss_and_bpb(base.to(device), val, byte_len, bpb_cfg) if cfg.eval_tokens else {}
    print(f"{len(encoded)} chat turns, {len(functions)} held-out functions, bits/byte before "
          f"{bpb_before.get('bits_per_byte')}", flush=True)  # fmt: skip

    model = with_heads(base, cfg.heads, cfg.seed).to(device).train()
    del base
    heads = [p for p in model.parameters() if p.requires_grad]
    muon = BatchedMuon([p for p in heads if p.ndim == 2], lr=cfg.lr)  # P_k, Q_k
    adamw = torch.optim.AdamW([p for p in heads if p.ndim != 2], lr=cfg.lr_norm, betas=(0.9, 0.95),
                              weight_decay=0.0)  # the embedding norms' gains  # fmt: skip
    opts = ((muon, cfg.lr), (adamw, cfg.lr_norm))
    plain = Batches(open_split(shards, "train"), seq, cfg.batch_size, cfg.seed + 1, 0, device)
    pad_id = tok.token_to_id(PAD)
    pad_id = tok.token_to_id(EOT) if pad_id is None else pad_id
    rng = np.random.default_rng(cfg.seed)
    use_bf16 = device.type == "cuda"
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    last, step, done, positions = {}, 0, 0.0, 0
    t_train = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="mtp", unit="step", disable=not progress)
    while done < 1:
        for opt, lr in opts:
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, done, cfg)
        x, y = plain.get(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            plain_loss, plain_kl = distill_loss(model, x, torch.ones_like(x, dtype=torch.bool), y, cfg.data_weight)
            loss = plain_loss
            if encoded:
                cx, cy = sft_batch(encoded, rng.integers(0, len(encoded), cfg.chat_batch_size), pad_id)
                cx, cy = cx.to(device, non_blocking=True), cy.to(device, non_blocking=True)
                chat_loss, chat_kl = distill_loss(model, cx, cy != IGNORE_INDEX, cy, cfg.data_weight)
                loss = loss + chat_loss
                positions += cx.numel()
        positions += x.numel()
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(heads, cfg.grad_clip)
        for opt, _ in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        elapsed = time.perf_counter() - t_train
        done = max(step / cfg.steps, elapsed / cfg.time_limit_s if cfg.time_limit_s else 0.0)
        if step % cfg.log_every == 0 or done >= 1:
            last = {"step": step, "loss": float(loss.detach()), "plain_kl": [round(float(v), 4) for v in plain_kl],
                    "grad_norm": float(grad_norm), "lr": muon.param_groups[0]["lr"],
                    "elapsed_s": round(time.perf_counter() - t0, 1), "positions": positions}  # fmt: skip
            if encoded:
                last["chat_kl"] = [round(float(v), 4) for v in chat_kl]
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"loss became {last['loss']} at step {step}")
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(last) + "\n")
            bar.set_postfix(kl="/".join(f"{v:.2f}" for v in last["plain_kl"]))
    bar.close()
    train_s = time.perf_counter() - t_train

    model.eval()
    report = {"config": asdict(cfg), "manifest": str(manifest), "shards": str(shards), "chat_turns": len(encoded),
              "train": {"steps": step, "seconds": round(train_s, 1), "positions": positions, "last": last}}  # fmt: skip
    report["eval"] = evaluate(model, tok, template, val, functions, cfg)
    path = out / "model.gguf"
    meta = {"training.mtp_distilled": True, "training.mtp_steps": step}
    report["export"] = export_gguf(model, gg, path, meta)
    differences = backbone_differences(cfg.gguf, path)
    if differences:
        raise RuntimeError(f"the backbone changed: {differences[:5]}")
    report["backbone_byte_identical"] = True
    if cfg.eval_tokens:
        after = loss_and_bpb(load_gguf_model(path)[0].to(device), val, byte_len, bpb_cfg)
        report["bits_per_byte"] = {"before": bpb_before, "after": after}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "mtp_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary_lines(report: dict) -> list[str]:
    """The report's figures as a few printable lines."""
    lines = []
    for name, r in report["eval"].items():
        heads = ", ".join(f"h{h['head']} agree {h['agree_top1']:.3f}" for h in r["heads"])
        acc = ", ".join(f"{k}: {v:.3f}" for k, v in r["expected_accepted"].items())
        lines.append(f"{name:21s} {r['positions']:7d} pos  {heads}  accepted/step {acc}")
    if "bits_per_byte" in report:
        b = report["bits_per_byte"]
        lines.append(f"bits/byte before {b['before']['bits_per_byte']:.6f} after {b['after']['bits_per_byte']:.6f}")
    return lines


def parse_args(argv: list[str] | None = None) -> MTPConfig:
    return parse_config(MTPConfig, "python -m train.mtp", __doc__, argv)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        report = train_mtp(cfg)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"python -m train.mtp: error: {exc}") from None
    print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
