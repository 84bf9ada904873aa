"""Evaluate a model on held-out code: loss, bits per byte, and the code validity rate of generated function bodies.

* **Loss / bits per byte** over the val split's tokens (windows of ``seq_len``; targets that are the end-of-text token
  are left out). Bytes per target token come from the byte-level vocabulary (one character of a token = one byte),
  so ``bpb = Σ CE / (ln 2 · Σ bytes)`` is exact and comparable across tokenizers.
* **Code validity**: for held-out functions that have a docstring, the prompt is the (dedented) signature plus the
  docstring, up to its closing quotes; the model writes the body; the body ends at the first non-empty line back at
  column 0 (or at the token limit, where a partial last line is dropped); the function counts as valid when
  ``ast.parse`` accepts it as one function with at least one statement after the docstring. The sampling settings
  are recorded in the report.

    python -m train.eval --gguf model.gguf --data data/shards --manifest data/corpus/manifest.jsonl --out eval.json
    python -m train.eval --run runs/dense --tokenizer data/tokenizer.json --data data/shards --manifest ...

* **Execution** (``--suite exec``): pass@k and greedy pass@1 on a task file of ``train.exec_tasks`` (functions with
  doctests, checked in ``train.sandbox``), with the parse rate of the same bodies beside them (``train.exec_eval``).

    python -m train.eval --suite exec --gguf model.gguf --tasks data/exec/heldout.jsonl --n 20 --k 1,10 --out x.json

Generating with the compiled engine instead of the PyTorch loop is ``python -m bench.eval_engine`` (same flags plus
``--engine-entry``; batched for ``--suite exec``): ``train`` never imports ``runtime``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from model.generate import SamplingParams, generate
from model.transformer import Transformer
from train.completion import STOP_STRINGS, cut_body, is_valid_function, trim_to_statement
from train.corpus import read_manifest
from train.exec_eval import ExecEvalConfig, evaluate_exec, torch_group_generator
from train.shards import ShardError, open_split


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 512
    max_tokens: int = 1_000_000  # val tokens scored for loss / bpb
    batch_size: int = 16
    n_functions: int = 200  # prompts for the validity rate
    max_new_tokens: int = 160
    temperature: float = 0.0  # greedy by default: the rate then measures the model, not the sampler
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    no_repeat_ngram: int = 0  # repetition controls (model.sampling.penalize); 0 = plain decoding
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    prompt_seed: int = 0  # which held-out functions are drawn (settings chosen on one draw, reported on another)


class EvalDataError(ValueError):
    """The val split cannot give a loss: too short for one window, or no byte among its targets."""


def token_byte_lengths(tok) -> np.ndarray:
    """Bytes each token id decodes to (special tokens: 0). Byte-level BPE maps one byte to one character."""
    vocab = tok.get_vocab()
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(max(vocab.values()) + 1, np.int64)
    for text, i in vocab.items():
        out[i] = 0 if text in special else len(text)
    return out


@torch.no_grad()
def loss_and_bpb(model: Transformer, tokens: np.ndarray, byte_len: np.ndarray, cfg: EvalConfig) -> dict:
    model.eval()
    device = model.tok_emb.weight.device
    seq = min(cfg.seq_len, model.config.max_seq_len)
    n = max(0, min(cfg.max_tokens, tokens.size - 1)) // seq * seq
    if n == 0:
        raise EvalDataError(f"val split of {tokens.size} tokens is shorter than one window of {seq} (+ 1 target)")
    data = torch.from_numpy(np.asarray(tokens[: n + 1], dtype=np.int64))
    x, y = data[:-1].view(-1, seq), data[1:].view(-1, seq)
    weights = torch.from_numpy(byte_len)[y]
    nats = 0.0
    for i in range(0, x.shape[0], cfg.batch_size):
        xb, yb = x[i : i + cfg.batch_size].to(device), y[i : i + cfg.batch_size].to(device)
        ce = F.cross_entropy(model(xb).float().flatten(0, 1), yb.flatten(), reduction="none").cpu()
        nats += float((ce * (weights[i : i + cfg.batch_size].flatten() > 0)).sum())
    scored = int((weights > 0).sum())
    n_bytes = int(weights.sum())
    if not scored:
        raise EvalDataError(f"the val split's first {n} targets are all special tokens: no byte to score")
    return {"val_tokens": scored, "val_bytes": n_bytes, "val_loss": nats / scored,
            "bits_per_byte": nats / (math.log(2) * n_bytes)}  # fmt: skip


def function_prompts(files, n: int, seed: int) -> list[dict]:
    """Held-out functions with a docstring and a real body: (prompt, reference body) pairs, seeded sample."""
    found = []
    for f in files:
        try:
            source = Path(f.path).read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(getattr(doc.value, "value", None), str)):
                continue
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            prompt = textwrap.dedent("".join(lines[start - 1 : doc.end_lineno])).rstrip()
            if len(prompt) < 4000:
                found.append({"file": f.path, "name": node.name, "prompt": prompt})
    random.Random(seed).shuffle(found)
    return found[:n]


def torch_generator(model: Transformer, tok):
    """``(prompt ids, params) -> (text, finish reason)`` with the PyTorch generation loop."""

    def run(ids: list[int], params: SamplingParams) -> tuple[str, str]:
        gen = generate(model, ids, params, decode=lambda t: tok.decode(t, skip_special_tokens=False))
        return gen.text or "", gen.finish_reason

    return run


def code_validity(gen, tok, prompts: list[dict], cfg: EvalConfig, eot: int | None, ctx: int) -> dict:
    """Strict rate: the body as generated must parse. ``validity_rate_trimmed`` also accepts a body that the token
    limit cut mid-statement when its complete statements parse (the cut is ours, not the model's). ``gen`` is
    :func:`torch_generator` or :func:`bench.eval_engine.engine_generator`."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, seed=cfg.seed, stop_token_ids=() if eot is None else (eot,),
                            stop_strings=STOP_STRINGS, no_repeat_ngram=cfg.no_repeat_ngram,
                            frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty)  # fmt: skip
    valid = trimmed = hit_limit = 0
    samples = []
    for p in tqdm(prompts, desc="code validity", unit="fn"):
        ids = tok.encode(p["prompt"]).ids[-(ctx - cfg.max_new_tokens - 1) :]
        text, reason = gen(ids, params)
        cut = reason in ("length", "context")
        body = cut_body(text, cut)
        ok = is_valid_function(p["prompt"], body)
        ok_trimmed = ok or (cut and is_valid_function(p["prompt"], trim_to_statement(p["prompt"], body)))
        valid, trimmed, hit_limit = valid + ok, trimmed + ok_trimmed, hit_limit + cut
        if len(samples) < 8:
            samples.append({"name": p["name"], "prompt": p["prompt"][-300:], "body": body[:600], "valid": ok,
                            "hit_limit": cut})  # fmt: skip
    n = max(1, len(prompts))
    return {"functions": len(prompts), "valid": valid, "validity_rate": valid / n,
            "validity_rate_trimmed": trimmed / n, "hit_token_limit": hit_limit, "samples": samples}  # fmt: skip


def evaluate(model: Transformer, tok, data: Path, manifest: Path, cfg: EvalConfig, gen=None) -> dict:
    """Loss/bpb with the PyTorch model (skipped when ``cfg.max_tokens`` is 0), validity with ``gen`` (default: the
    PyTorch loop)."""
    report = {"settings": asdict(cfg)}
    if cfg.max_tokens:
        report |= loss_and_bpb(model, open_split(data, "val"), token_byte_lengths(tok), cfg)
    prompts = function_prompts([f for f in read_manifest(manifest) if f.split == "val"], cfg.n_functions,
                               cfg.prompt_seed)  # fmt: skip
    gen = gen or torch_generator(model, tok)
    report["code"] = code_validity(gen, tok, prompts, cfg, tok.token_to_id("<|endoftext|>"), model.config.max_seq_len)
    return report


def load_model(args) -> tuple[Transformer, object]:
    from tokenizers import Tokenizer

    if args.gguf:
        from model.gguf_io import read_gguf
        from model.tokenizer import hf_from_spec

        gg = read_gguf(args.gguf)
        return Transformer.from_gguf_tensors(gg.config, gg.model_tensors()), hf_from_spec(gg.tokenizer)
    from train.export import load_checkpoint_model

    model, _ = load_checkpoint_model(args.run)
    return model, Tokenizer.from_file(str(args.tokenizer))


def parser(prog: str | None = None, doc: str = __doc__) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", type=Path, help="an exported model")
    src.add_argument("--run", type=Path, help="a training run folder (e.g. the dense baseline), with --tokenizer")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--suite", choices=("validity", "exec"), default="validity",
                    help="validity: loss, bits/byte and the parse rate; exec: pass@k on --tasks")  # fmt: skip
    ap.add_argument("--data", type=Path, help="shard folder (val split); --suite validity")
    ap.add_argument("--manifest", type=Path, help="corpus manifest (held-out files); --suite validity")
    ap.add_argument("--tasks", type=Path, help="task file of train.exec_tasks; --suite exec")
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, default in asdict(EvalConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    x = ExecEvalConfig()
    ap.add_argument("--n", type=int, default=x.n, help="--suite exec: samples per task")
    ap.add_argument("--k", default=",".join(map(str, x.ks)), help="--suite exec: pass@k for these k (comma-separated)")
    ap.add_argument("--sample-temperature", type=float, default=x.temperature, help="--suite exec: sampling")
    ap.add_argument("--sample-top-p", type=float, default=x.top_p, help="--suite exec: sampling")
    ap.add_argument("--workers", type=int, default=x.workers, help="--suite exec: sandbox processes (0: per core)")
    ap.add_argument("--jobs-per-call", type=int, default=x.jobs_per_call,
                    help="--suite exec: completions given to the generator at once (whole tasks)")  # fmt: skip
    ap.add_argument("--task-sample", type=int, default=0,
                    help="--suite exec: score a seeded sample of this many tasks (--prompt-seed; 0: all)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None, make_gen=None) -> None:
    """The command line; ``make_gen(tok)`` makes the validity generator (default: the PyTorch loop)."""
    ap = parser()
    run(ap, ap.parse_args(argv), make_gen)


def exec_config(ap: argparse.ArgumentParser, args) -> ExecEvalConfig:
    try:
        ks = tuple(sorted({int(k) for k in args.k.split(",")}))
    except ValueError:
        ap.error(f"--k {args.k!r}: comma-separated integers, e.g. 1,10")
    if args.n < 1 or not ks or ks[0] < 1 or ks[-1] > args.n:
        ap.error(f"--k {args.k} needs 1 ≤ k ≤ --n ({args.n})")
    return ExecEvalConfig(n=args.n, ks=ks, temperature=args.sample_temperature, top_p=args.sample_top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, workers=args.workers,
                          jobs_per_call=max(1, args.jobs_per_call))  # fmt: skip


def run_exec(ap: argparse.ArgumentParser, args, make_gen_many=None) -> None:
    """``--suite exec``: ``make_gen_many(tok)`` makes the batch generator (default: PyTorch, a task's samples as one
    batch)."""
    from train.exec_tasks import TaskFileError, load_tasks, read_header

    if not args.tasks:
        ap.error("--suite exec needs --tasks (a task file of train.exec_tasks)")
    cfg = exec_config(ap, args)
    try:
        header, tasks = read_header(args.tasks), load_tasks(args.tasks)
    except TaskFileError as e:
        ap.error(str(e))
    if args.task_sample < 0:
        ap.error(f"--task-sample must be ≥ 0, got {args.task_sample}")
    if args.task_sample and args.task_sample < len(tasks):
        tasks = sorted(random.Random(args.prompt_seed).sample(tasks, args.task_sample), key=lambda t: t.task_id)
    model, tok = load_model(args)
    model = model.to(args.device).eval()
    gen_many = make_gen_many(tok) if make_gen_many else torch_group_generator(model, tok)
    report = evaluate_exec(gen_many, tok, tasks, cfg, model.config.max_seq_len)
    keys = ("split", "manifest_sha256", "python", "n_tasks")
    report |= {"model": str(args.gguf or args.run), "task_file": str(args.tasks),
               "task_file_header": {k: header.get(k) for k in keys}, "task_sample": args.task_sample}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in report.items() if k not in ("tasks", "packages", "settings", "unavailable")}
            | {"unavailable": len(report["unavailable"])}
        )
    )


def run(ap: argparse.ArgumentParser, args, make_gen=None, make_gen_many=None) -> None:
    if args.run and not args.tokenizer:
        ap.error("--run needs --tokenizer")
    if args.suite == "exec":
        return run_exec(ap, args, make_gen_many)
    if not (args.data and args.manifest):
        ap.error("--suite validity needs --data and --manifest")
    cfg = EvalConfig(**{k: getattr(args, k) for k in asdict(EvalConfig())})
    model, tok = load_model(args)
    gen = make_gen(tok) if make_gen else None
    try:
        report = evaluate(model.to(args.device), tok, args.data, args.manifest, cfg, gen)
    except (ShardError, EvalDataError) as e:  # no val split, or too short: a usage error, not a trace
        ap.error(f"{args.data}: {e}")
    report["model"] = str(args.gguf or args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    code = report["code"]
    rates = {"validity_rate": code["validity_rate"], "validity_rate_trimmed": code["validity_rate_trimmed"]}
    print(json.dumps({k: v for k, v in report.items() if k != "code"} | rates))


if __name__ == "__main__":
    main()
