"""Chat evaluation: held-out docstrings as chat requests; does the answer's code define the requested function?

* **Requests**: functions of the corpus's held-out split (held-out files and whole held-out packages) that have a
  docstring summary (the same extraction as ``train.sft``), in a seeded order; ``--offset`` picks a disjoint slice
  (e.g. a dev slice for choosing settings). Each becomes one user turn, "Write a Python function `name(args)` that
  <summary>." (``train.sft.eval_request``), rendered with the GGUF's chat template and the generation prompt.
* **Answers**: greedy (temperature 0), at most ``--max-new-tokens`` (256) tokens, ending at any control token
  (``<|end|>``, ``<|endoftext|>``, ...); generated in batches with the PyTorch model (GPU or CPU).
* **Metric**: the fraction of answers whose first fenced code block (unterminated: up to the end of the answer; no
  block: the whole answer) parses with ``ast`` and defines a function with the requested name
  (:func:`score_answer`). Also reported: answers with a block, blocks that parse, answers cut by the token limit.
* **Bits per byte** on the held-out split's tokens (``train.eval.loss_and_bpb``) when ``--shards`` is given.

    python -m train.chat_eval --gguf models/small.gguf --manifest runs/sft/data/corpus/manifest.jsonl \
        --shards runs/sft/data/shards --out chat_before.json
    python -m train.chat_eval --gguf runs/sft/model.gguf --manifest ... --shards ... --out chat_after.json

JSON report (settings, rates, bits/byte, every request with its answer and score) plus a printed table. The compiled
engine is not used here (``train`` never imports ``runtime``); generation is the PyTorch model's.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.generate import generate
from model.sampling import SamplingParams
from model.tokenizer import hf_from_spec
from model.transformer import Transformer
from train.corpus import read_manifest
from train.eval import EvalConfig, loss_and_bpb, token_byte_lengths
from train.sft import corpus_functions, eval_request, load_gguf_model, render_chat
from train.shards import open_split

FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def first_code_block(answer: str) -> str | None:
    """The first fenced block's code (an unterminated block runs to the end of the answer); None if there is none."""
    m = FENCE.search(answer)
    return m.group(1) if m else None


def score_answer(answer: str, name: str) -> dict:
    """``ok`` when the first code block (or, without one, the whole answer) parses and defines ``name``."""
    block = first_code_block(answer)
    code = answer if block is None else block
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {"has_block": block is not None, "parses": False, "defines": False, "ok": False}
    defines = any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name for n in ast.walk(tree))
    return {"has_block": block is not None, "parses": True, "defines": defines, "ok": defines}


def held_out_functions(manifest: Path, n: int, offset: int = 0, seed: int = 0, workers: int = 0) -> list[dict]:
    """``n`` distinct held-out functions (from the val split), seeded order, starting at ``offset``."""
    files = [f for f in read_manifest(manifest) if f.split == "val"]
    seen, found = set(), []
    for fn in corpus_functions(files, workers, desc="held-out functions"):
        key = (fn["name"], hashlib.sha256(fn["code"].encode()).hexdigest())
        if key not in seen:
            seen.add(key)
            found.append(fn)
    random.Random(seed).shuffle(found)
    return found[offset : offset + n]


@torch.no_grad()
def greedy_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                 batch_size: int = 64) -> list[dict]:  # fmt: skip
    """Greedy continuations of ``prompts`` (token ids), many at a time: rows are right-padded and every step runs the
    whole prefix (causal attention, so padding after a row's end never reaches it). Returns per prompt the generated
    ids (without the stop token) and why it ended (``stop`` or ``length``)."""
    model.eval()
    device = model.tok_emb.weight.device
    ctx = model.config.max_seq_len
    out: list[dict] = [{}] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="chat answers", unit="req")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids = [prompts[i][-(ctx - max_new_tokens) :] for i in chunk]
        width = max(len(p) for p in ids) + max_new_tokens
        buf = torch.zeros(len(ids), width, dtype=torch.long, device=device)
        for r, p in enumerate(ids):
            buf[r, : len(p)] = torch.tensor(p)
        lens = torch.tensor([len(p) for p in ids], device=device)
        first = lens.clone()
        active = torch.ones(len(ids), dtype=torch.bool, device=device)
        reason = ["length"] * len(ids)
        stop = torch.tensor(sorted(stop_ids), device=device)
        for _ in range(max_new_tokens):
            rows = active.nonzero().flatten()
            if rows.numel() == 0:
                break
            t = int(lens[rows].max())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                h = model.hidden(buf[rows, :t])
                h = h[torch.arange(rows.numel(), device=device), lens[rows] - 1]
                nxt = model.head(h).float().argmax(-1)
            hit = torch.isin(nxt, stop)
            keep = rows[~hit]
            buf[keep, lens[keep]] = nxt[~hit]
            lens[keep] += 1
            for r in rows[hit].tolist():
                reason[r] = "stop"
            active[rows[hit]] = False
        for r, i in enumerate(chunk):
            out[i] = {"ids": buf[r, first[r] : lens[r]].tolist(), "finish_reason": reason[r]}
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def greedy_sequential(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]
) -> list[dict]:
    """The same answers one prompt at a time with the KV cache (``model.generate``): much cheaper on a CPU, where the
    batched path's recomputation of every prefix dominates."""
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(sorted(stop_ids)))
    out = []
    for p in tqdm(prompts, desc="chat answers", unit="req"):
        ids = generate(model, p[-(model.config.max_seq_len - max_new_tokens) :], params).tokens
        stopped = bool(ids) and ids[-1] in stop_ids
        out.append({"ids": ids[: len(ids) - stopped], "finish_reason": "stop" if stopped else "length"})
    return out


@dataclass(frozen=True)
class ChatEvalConfig:
    n: int = 200  # requests
    offset: int = 0  # first request of the seeded order (a dev slice: --offset 200)
    prompt_seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 100  # requests generated together
    bpb_tokens: int = 1_000_000  # held-out tokens for bits/byte (0: skip)
    seq_len: int = 512  # bits/byte windows
    kv_cache: int = 0  # 1: generate one request at a time with the KV cache (faster on a CPU)


def chat_eval(model: Transformer, tok, template: str | None, functions: list[dict], cfg: ChatEvalConfig) -> dict:
    """Answer every function's request and score it; the report holds the rates and every sample."""
    stop_ids = {tok.token_to_id(t) for t in _control_tokens(tok)}
    requests = [fn.get("request") or eval_request(fn) for fn in functions]
    prompts = [tok.encode(render_chat([{"role": "user", "content": r}], template), add_special_tokens=False).ids
               for r in requests]  # fmt: skip
    if cfg.kv_cache:
        answers = greedy_sequential(model, prompts, cfg.max_new_tokens, stop_ids)
    else:
        answers = greedy_batch(model, prompts, cfg.max_new_tokens, stop_ids, cfg.batch_size)
    samples, counts = [], {"has_block": 0, "parses": 0, "defines": 0, "ok": 0, "hit_limit": 0}
    for fn, req, ans in zip(functions, requests, answers, strict=True):
        text = tok.decode(ans["ids"], skip_special_tokens=True)
        score = score_answer(text, fn["name"])
        for k in ("has_block", "parses", "defines", "ok"):
            counts[k] += score[k]
        counts["hit_limit"] += ans["finish_reason"] == "length"
        samples.append({"name": fn["name"], "file": fn["file"], "request": req, "answer": text,
                        "finish_reason": ans["finish_reason"], "tokens": len(ans["ids"])} | score)  # fmt: skip
    n = max(1, len(functions))
    return (
        {"requests": len(functions), "pass_rate": counts["ok"] / n}
        | {f"{k}_rate": v / n for k, v in counts.items() if k != "ok"}
        | {"passed": counts["ok"], "samples": samples}
    )


def _control_tokens(tok) -> set[str]:
    return {t.content for t in tok.get_added_tokens_decoder().values() if t.special}


def requests_of(report: Path) -> list[dict]:
    """The requests (name, file, request text) of an earlier report, to ask another model exactly the same."""
    data = json.loads(Path(report).read_text())
    first = data[0] if isinstance(data, list) else data
    return [{"name": s["name"], "file": s["file"], "request": s["request"]} for s in first["samples"]]


def evaluate_gguf(gguf: Path, manifest: Path | None, shards: Path | None, cfg: ChatEvalConfig, device: str,
                  workers: int = 0, requests: Path | None = None) -> dict:  # fmt: skip
    if requests is not None:
        functions = requests_of(requests)[cfg.offset : cfg.offset + cfg.n]
    else:  # forks the parsing workers before CUDA starts
        functions = held_out_functions(manifest, cfg.n, cfg.offset, cfg.prompt_seed, workers)
    model, gg = load_gguf_model(gguf)
    model.to(device)
    tok = hf_from_spec(gg.tokenizer)
    report = {"model": str(gguf), "chat_tuned": bool(gg.metadata.get("training.chat_tuned", False)),
              "settings": asdict(cfg), "manifest": str(manifest)}  # fmt: skip
    if shards is not None and cfg.bpb_tokens:
        ecfg = EvalConfig(seq_len=cfg.seq_len, max_tokens=cfg.bpb_tokens, batch_size=32)
        report |= loss_and_bpb(model, open_split(shards, "val"), token_byte_lengths(tok), ecfg)
    report |= chat_eval(model, tok, gg.tokenizer.chat_template, functions, cfg)
    return report


def table(reports: list[dict]) -> str:
    head = f"{'model':40s} {'n':>4s} {'pass':>7s} {'block':>7s} {'parses':>7s} {'limit':>7s} {'bits/byte':>9s}"
    rows = [head, "-" * len(head)]
    for r in reports:
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-"
        rows.append(f"{r['model'][-40:]:40s} {r['requests']:4d} {r['pass_rate']:7.1%} {r['has_block_rate']:7.1%} "
                    f"{r['parses_rate']:7.1%} {r['hit_limit_rate']:7.1%} {bpb:>9s}")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.chat_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--gguf", type=Path, nargs="+", required=True, help="one or more models, evaluated in turn")
    ap.add_argument("--manifest", type=Path, help="corpus manifest (its val split is held out)")
    ap.add_argument("--requests", type=Path, help="ask the requests of this earlier report instead (no --manifest)")
    ap.add_argument("--shards", type=Path, default=None, help="token shards for bits/byte (the GGUF's tokenizer)")
    ap.add_argument("--out", type=Path, required=True, help="JSON report (a list when several models)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0, help="processes parsing the held-out files (0: per core)")
    for name, default in asdict(ChatEvalConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args(argv)
    if (args.manifest is None) == (args.requests is None):
        ap.error("give --manifest or --requests")
    cfg = ChatEvalConfig(**{k: getattr(args, k) for k in asdict(ChatEvalConfig())})
    reports = [evaluate_gguf(g, args.manifest, args.shards, cfg, args.device, args.workers, args.requests)
               for g in args.gguf]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n")
    print(table(reports))
    for r in reports:
        print(json.dumps({k: v for k, v in r.items() if k not in ("samples", "settings")}))


if __name__ == "__main__":
    main()
