"""Instruction tuning (SFT) of a shipped GGUF so that it answers chat requests with code.

* **Start**: the model is rebuilt from the GGUF alone (:func:`load_gguf_model`): every ternary matrix gets master
  weights ``W = codes · s / p`` (``p`` = fraction of non-zero codes), whose absmean scale is ``s`` again and which
  round back to the same codes, so exporting the loaded model reproduces the file's tensors bit for bit
  (``tests/test_sft.py``). The training checkpoint is not needed.
* **Pairs** (:func:`build_pairs`), from the corpus's **train split only**: every top-level function or method that has
  a docstring and a body gives a user request written from its docstring's first sentence and its signature (several
  phrasings; most name the function, some do not) and an answer that is one fenced ```python block holding the
  function (a docstring longer than two lines is cut to its summary, so answers stay short). A fraction of the turns
  are "complete this code" requests (the signature and docstring in a block). Answers over ``max_answer_tokens``
  tokens are dropped.
* **Rendering**: the GGUF's own chat template (``tokenizer.chat_template``, rendered with jinja2 as the runtime
  renders it); the prompt is the template with the generation prompt, the target is the answer followed by
  ``<|end|>``; the loss covers exactly those assistant tokens (everything else is ``IGNORE_INDEX``).
* **Training**: ternary QAT throughout (BitLinear quantizes in every forward), Muon for the hidden matrices and AdamW
  for the rest (``train.train.make_optimizers``), warmup then linear decay, bf16 autocast on CUDA. Every step also
  takes a batch of plain pretraining windows from the train split (weight ``plain_weight``) so that plain
  completion does not regress.
* **Output**: ``<out>/model.gguf`` with the file's ``training.*`` keys plus ``training.chat_tuned = true`` and
  ``training.sft_steps``; read back and checked against the trained model's logits; ``<out>/sft_summary.json`` and
  ``<out>/metrics.jsonl``.

Standalone, from a shipped model (builds the corpus, the tokenizer file and shards in ``<out>/data`` if missing; the
defaults are the settings of the shipped SFT model, whose base is ``git show 3a4026f:models/small.gguf``):

    python -m train.sft --gguf base.gguf --out runs/sft --steps 800
    python -m train.sft --gguf runs/tiny/model.gguf --out runs/tiny-sft --manifest runs/tiny/corpus/manifest.jsonl \
        --shards runs/tiny/shards --steps 20 --device cpu

The chat evaluation of the result is ``python -m train.chat_eval``; ``train.recipe --sft-steps N`` runs this stage
after export.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import random
import re
import textwrap
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.gguf_io import GGUFModel, read_gguf
from model.tokenizer import hf_from_spec
from model.transformer import IGNORE_INDEX, Transformer
from train.cli import parse_config
from train.corpus import CorpusConfig, SourceFile, build_corpus, read_manifest, write_manifest
from train.export import write_checked
from train.shards import open_split, tokenize_files, write_shards
from train.tokenizer import CHAT_TEMPLATE, EOT
from train.train import Batches, TrainConfig, lr_factor, make_optimizers

CHAT_TUNED_KEY = "training.chat_tuned"  # read by runtime.serve: the chat page opens in chat mode
END = "<|end|>"  # ends an assistant turn (a control token: generation stops on it)
PAD = "<|pad|>"


# --- the model from a GGUF --------------------------------------------------------------------------------------------
def load_gguf_model(source: str | Path | GGUFModel) -> tuple[Transformer, GGUFModel]:
    """The PyTorch model of a GGUF, ready to train: its export reproduces the file's tensors exactly."""
    gg = source if isinstance(source, GGUFModel) else read_gguf(source)
    return Transformer.from_gguf_tensors(gg.config, gg.model_tensors()), gg


def export_gguf(model: Transformer, gg: GGUFModel, out: Path, extra_metadata: dict | None = None) -> dict:
    """Write ``model`` with ``gg``'s tokenizer, ternary type and ``training.*`` keys (plus ``extra_metadata``); read
    it back and check that the reloaded model reproduces ``model`` (embeddings rounded to F16, the one lossy step)."""
    meta = {k: v for k, v in gg.metadata.items() if k.startswith("training.")} | (extra_metadata or {})
    out = Path(out)
    ids = torch.arange(min(32, model.config.max_seq_len))[None] % model.config.vocab_size
    gap = write_checked(model, out, gg.tokenizer, gg.ternary_type, meta, ids)
    return {"out": str(out), "bytes": out.stat().st_size, "max_logit_gap": gap, "metadata": meta}


# --- chat template ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as runtime.chat_template renders
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    return env.from_string(source)


def render_chat(messages: list[dict], template: str | None = None, add_generation_prompt: bool = True) -> str:
    return _template(template or CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       bos_token="", eos_token="")  # fmt: skip


# --- functions, requests and answers ----------------------------------------------------------------------------------
VERBS = frozenset("""
    accept access add adjust advance allocate append apply assert assign attach build calculate call cancel check
    clean clear clone close collect combine compare compile complete compute configure connect construct convert copy
    count create decode decorate define delete describe detect determine disable discover dispatch display do dump
    emit enable encode ensure enter escape evaluate execute exit expand extend extract fetch fill filter find finish
    fix flatten flush format generate get give guess handle hash import initialize insert inspect install invoke
    iterate join keep list load locate log look make map mark match merge move normalize notify open output pack
    parse patch perform pick pop populate prepare print process produce provide push put query quote raise read
    rebuild receive record reduce refresh register reject release reload remove rename render reorder repeat replace
    report represent request reset resize resolve restore retrieve return reverse rewrite round run save scan search
    select send serialize set setup show shuffle skip sort split start stop store strip substitute swap take tell
    test transform translate traverse trim truncate try turn unpack unregister unwrap update upgrade use validate
    verify visit wait walk wrap write yield""".split())  # fmt: skip
SUMMARY_BAD_START = (":", ">>>", "..", "@", "#", "*", "-", "=", "|", "(", "[", "{", "<", "`", "~", "+")


def summarize(doc: str | None) -> str | None:
    """The docstring's first sentence as one line ending in a full stop, or None when it is no usable summary."""
    if not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", para)[0].strip().rstrip(":;,")
    if not 12 <= len(sentence) <= 200 or sentence.startswith(SUMMARY_BAD_START) or not sentence[0].isalpha():
        return None
    if '"""' in sentence or "\\" in sentence or len(sentence.split()) < 3:
        return None
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in ("a", "e", "i", "o", "u"):
        return verb[:-1] + "ies"
    return verb + "s"


def that_clause(summary: str) -> str | None:
    """``"Return the sum."`` → ``"returns the sum"`` (for "a function that ..."); None if it does not start with a
    known verb."""
    first, _, rest = summary.rstrip(".!?").partition(" ")
    w = first.lower()
    if w in VERBS:
        w = _third_person(w)
    elif not (
        w.endswith("s") and (w[:-1] in VERBS or w[:-2] in VERBS or (w.endswith("ies") and w[:-3] + "y" in VERBS))
    ):
        return None
    return f"{w} {rest}".strip()


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def _docstring_span(node, lines: list[str]) -> tuple[int, int, str] | None:
    """``(first line, last line, indent)`` (1-based) when the docstring sits alone on its own lines."""
    doc = node.body[0]
    if doc.lineno <= node.lineno or doc.end_lineno is None:
        return None
    head, tail = lines[doc.lineno - 1], lines[doc.end_lineno - 1]
    if head[: doc.col_offset].strip() or tail[doc.end_col_offset :].strip():
        return None
    if any(n.lineno >= doc.lineno for n in node.args.defaults + node.args.kw_defaults if n is not None):
        return None
    return doc.lineno, doc.end_lineno, head[: doc.col_offset]


def function_record(node, lines: list[str], method: bool) -> dict | None:
    """One function as a dict: name, args, summary, code (dedented; a long docstring cut to its summary) and header
    (code up to the docstring); None when it has no usable docstring summary or body."""
    if len(node.body) < 2 or node.name.startswith("__"):
        return None
    doc = ast.get_docstring(node, clean=True)
    summary = summarize(doc)
    span = _docstring_span(node, lines) if summary else None
    if span is None:
        return None
    first, last, indent = span
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    if last - first >= 2:  # a long docstring becomes its summary: answers stay short, the request says the same
        body_doc = [f'{indent}"""{summary}"""\n']
    else:
        body_doc = lines[first - 1 : last]
    head = lines[start - 1 : first - 1] + body_doc
    code = textwrap.dedent("".join(head + lines[last : node.end_lineno])).rstrip()
    header = textwrap.dedent("".join(head)).rstrip()
    if len(code) > 4000:
        return None
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    fn = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.name != node.name:
        return None
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return {"name": node.name, "args": ast.unparse(node.args), "returns": returns, "summary": summary,
            "method": method, "code": code, "header": header}  # fmt: skip


def extract_functions(source: str) -> list[dict]:
    """Top-level functions and methods of top-level classes that have a docstring summary (see function_record)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for fn in members:
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                rec = function_record(fn, lines, method=isinstance(node, ast.ClassDef))
                if rec is not None:
                    out.append(rec)
    return out


def _file_functions(path: str) -> list[dict]:
    try:
        return [r | {"file": path} for r in extract_functions(Path(path).read_text(encoding="utf-8"))]
    except (OSError, UnicodeDecodeError):
        return []


def corpus_functions(files: list[SourceFile], workers: int = 0, desc: str = "functions") -> list[dict]:
    """Every usable function of ``files`` (in file order), parsed in ``workers`` processes (0: one per core)."""
    paths = [f.path for f in files]
    workers = workers or min(16, os.cpu_count() or 1)
    out: list[dict] = []
    if workers > 1 and len(paths) > 50:
        with Pool(workers) as pool:
            for recs in tqdm(pool.imap(_file_functions, paths, chunksize=16), total=len(paths), desc=desc, unit="file"):
                out += recs
    else:
        for p in tqdm(paths, desc=desc, unit="file", disable=len(paths) < 50):
            out += _file_functions(p)
    return out


def signature(fn: dict, returns: bool = False) -> str:
    return f"{fn['name']}({fn['args']})" + (fn["returns"] if returns else "")


def eval_request(fn: dict) -> str:
    """The chat evaluation's request (also one of the training phrasings, not the most common one)."""
    that = that_clause(fn["summary"])
    if that:
        return f"Write a Python function `{signature(fn)}` that {that}."
    return f"Write a Python function `{signature(fn)}`. {fn['summary']}"


def _named_requests(fn: dict) -> list[str]:
    s, name, sig, that = fn["summary"], fn["name"], signature(fn), that_clause(fn["summary"])
    kind = "method" if fn["method"] else "function"
    out = [f"Implement `{signature(fn, True)}` in Python. {s}", f"Write a Python {kind} called `{name}`. {s}",
           f"{s} Write it as a Python {kind} named `{name}`.", f"I need a Python function `{sig}`: {_lower_first(s)}",
           f"Can you write `{name}` for me? {s}", f"Define `{sig}`. {s}"]  # fmt: skip
    if that:
        out += [f"Write a Python function `{sig}` that {that}.", f"Please write `{name}`, a {kind} that {that}.",
                f"Create a function named {name} that {that}."]  # fmt: skip
    return out


def _unnamed_requests(fn: dict) -> list[str]:
    s, that = fn["summary"], that_clause(fn["summary"])
    out = [f"{s} Write this in Python.", f"How would I write this in Python? {s}"]
    if that:
        out += [f"Write a Python function that {that}.", f"I need a function that {that}."]
    return out


def make_turn(fn: dict, rng: random.Random, named_frac: float, complete_frac: float) -> dict:
    """One (user, assistant) pair for ``fn``: a request (named with probability ``named_frac``) or, with probability
    ``complete_frac``, a "complete this code" turn; the answer is the function in a fenced block."""
    answer = f"```python\n{fn['code']}\n```"
    if rng.random() < complete_frac:
        ask = rng.choice(["Complete this Python function:", "Finish this code:", "Fill in the body:"])
        user = f"{ask}\n\n```python\n{fn['header']}\n```"
        kind = "complete"
    elif rng.random() < named_frac:
        user, kind = rng.choice(_named_requests(fn)), "named"
    else:
        user, kind = rng.choice(_unnamed_requests(fn)), "unnamed"
    return {"user": user, "assistant": answer, "kind": kind, "name": fn["name"]}


def build_pairs(
    functions: list[dict], seed: int = 0, named_frac: float = 0.8, complete_frac: float = 0.15
) -> list[dict]:
    """One turn per distinct function (duplicates by code dropped), in a seeded order."""
    rng = random.Random(seed)
    seen, out = set(), []
    for fn in functions:
        key = hashlib.sha256(fn["code"].encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(make_turn(fn, rng, named_frac, complete_frac))
    rng.shuffle(out)
    return out


# --- tokens and loss mask ---------------------------------------------------------------------------------------------
def encode_turn(tok, pair: dict, template: str | None) -> tuple[np.ndarray, int]:
    """``(ids, n_prompt)``: the rendered prompt (user turn + generation prompt) then the answer and ``<|end|>``,
    tokenized separately, as generation sees them (the prompt alone, then the model's tokens)."""
    prompt = render_chat([{"role": "user", "content": pair["user"]}], template, add_generation_prompt=True)
    p = tok.encode(prompt, add_special_tokens=False).ids
    a = tok.encode(pair["assistant"] + END, add_special_tokens=False).ids
    return np.asarray(p + a, np.int64), len(p)


def inputs_and_labels(ids: np.ndarray, n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """``x = ids[:-1]``, ``y = ids[1:]`` with every target before the answer set to ``IGNORE_INDEX``."""
    x, y = ids[:-1].copy(), ids[1:].copy()
    y[: n_prompt - 1] = IGNORE_INDEX
    return x, y


def encode_pairs(tok, pairs: list[dict], template: str | None, max_len: int, max_answer_tokens: int) -> list[tuple]:
    """``(ids, n_prompt)`` of every pair that fits ``max_len`` tokens and ``max_answer_tokens`` answer tokens (the same
    tokens as :func:`encode_turn`, encoded in parallel batches)."""
    out = []
    for i in tqdm(range(0, len(pairs), 4096), desc="tokenizing turns", unit="batch", disable=len(pairs) < 4096):
        chunk = pairs[i : i + 4096]
        prompts = [render_chat([{"role": "user", "content": p["user"]}], template) for p in chunk]
        p_ids = tok.encode_batch(prompts, add_special_tokens=False)
        a_ids = tok.encode_batch([p["assistant"] + END for p in chunk], add_special_tokens=False)
        for p, a in zip(p_ids, a_ids, strict=True):
            ids = p.ids + a.ids
            if len(ids) <= max_len + 1 and len(a.ids) <= max_answer_tokens:
                out.append((np.asarray(ids, np.int64), len(p.ids)))
    return out


def sft_batch(encoded: list[tuple], idx, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(x, y)`` of the chosen examples (padding targets are ``IGNORE_INDEX``)."""
    rows = [inputs_and_labels(*encoded[i]) for i in idx]
    t = max(len(x) for x, _ in rows)
    x = np.full((len(rows), t), pad_id, np.int64)
    y = np.full((len(rows), t), IGNORE_INDEX, np.int64)
    for r, (xi, yi) in enumerate(rows):
        x[r, : len(xi)], y[r, : len(yi)] = xi, yi
    return torch.from_numpy(x), torch.from_numpy(y)


# --- data folder ------------------------------------------------------------------------------------------------------
def prepare_data(gg: GGUFModel, work: Path, manifest: Path | None, shards: Path | None, roots: tuple[str, ...],
                 plain_mb: float, seed: int) -> tuple[Path, Path]:  # fmt: skip
    """``(manifest, shards)``: the given ones, else built in ``work`` (the corpus of ``roots``; shards of the whole
    val split and ``plain_mb`` MB of the train split, tokenized with the GGUF's own tokenizer)."""
    work.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = work / "corpus" / "manifest.jsonl"
        if not manifest.exists():
            print("== corpus", flush=True)
            write_manifest(build_corpus(CorpusConfig(roots=roots)), manifest.parent)
    if shards is None:
        shards = work / "shards"
        if not (shards / "meta.json").exists():
            print("== shards", flush=True)
            tok_path = work / "tokenizer.json"
            tok = hf_from_spec(gg.tokenizer)
            tok.save(str(tok_path))
            files = read_manifest(manifest)
            train = [f for f in files if f.split == "train"]
            random.Random(seed).shuffle(train)
            chosen, total = [], 0
            for f in train:
                if total >= plain_mb * 1e6:
                    break
                chosen.append(f)
                total += f.size
            val = [f for f in files if f.split == "val"]
            splits = {"train": tokenize_files(chosen, tok, desc="train"), "val": tokenize_files(val, tok, desc="val")}
            from model.files import sha256_file

            info = {"train": {"files": len(chosen), "bytes": total}, "val": {"files": len(val)}}
            write_shards(shards, splits, tok.get_vocab_size(), sha256_file(tok_path), tok.token_to_id(EOT), info)
    return Path(manifest), Path(shards)


# --- training ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTConfig:
    gguf: str = "models/small.gguf"
    out: str = "runs/sft"
    manifest: str = ""  # corpus manifest (train split → pairs and plain batches); empty: build one in <out>/data
    shards: str = ""  # token shards made with the GGUF's tokenizer; empty: build them in <out>/data
    roots: str = "stdlib,site-packages"  # corpus roots when building one
    plain_mb: float = 48.0  # MB of the train split tokenized for plain batches when building shards
    steps: int = 800
    batch_size: int = 64  # chat turns per step
    plain_batch_size: int = 16  # plain pretraining windows per step (0: none)
    plain_weight: float = 1.0  # weight of the plain loss next to the chat loss
    seq_len: int = 512  # plain windows; chat turns longer than this are dropped
    max_answer_tokens: int = 128
    named_frac: float = 0.8  # requests that name the function (the rest describe it only)
    complete_frac: float = 0.15  # "complete this code" turns
    lr_matrix: float = 0.004  # Muon (ternary matrices' master weights)
    lr_embed: float = 5e-4  # AdamW (embeddings, norms, mHC logits)
    warmup_steps: int = 30
    decay_frac: float = 0.5
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 0  # processes that parse the corpus (0: one per core, at most 16)
    prepare_only: int = 0  # 1: build the corpus and shards in <out>/data, then stop (other runs can share them)
    log_every: int = 25
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def problems(self) -> list[str]:
        out = []
        for name in ("steps", "batch_size", "seq_len", "max_answer_tokens", "log_every"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be ≥ 1")
        for name in ("named_frac", "complete_frac", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"--{name.replace('_', '-')} must be in [0, 1]")
        if not Path(self.gguf).is_file():
            out.append(f"--gguf {self.gguf}: no such file")
        return out


def _schedule(cfg: SFTConfig) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, warmup_steps=cfg.warmup_steps, decay_frac=cfg.decay_frac,
                       lr_matrix=cfg.lr_matrix, lr_embed=cfg.lr_embed)  # fmt: skip


def train_sft(cfg: SFTConfig, progress: bool = True) -> dict:
    """Run SFT from ``cfg.gguf`` and write ``<out>/model.gguf`` (chat-tuned); returns the summary."""
    if problems := cfg.problems():
        raise ValueError("; ".join(problems))
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model, gg = load_gguf_model(cfg.gguf)
    tok = hf_from_spec(gg.tokenizer)
    template = gg.tokenizer.chat_template or CHAT_TEMPLATE
    manifest, shards = prepare_data(gg, out / "data", Path(cfg.manifest) if cfg.manifest else None,
                                    Path(cfg.shards) if cfg.shards else None, tuple(cfg.roots.split(",")),
                                    cfg.plain_mb, cfg.seed)  # fmt: skip
    if cfg.prepare_only:
        return {"manifest": str(manifest), "shards": str(shards)}
    train_files = [f for f in read_manifest(manifest) if f.split == "train"]
    functions = corpus_functions(train_files, cfg.workers)
    pairs = build_pairs(functions, cfg.seed, cfg.named_frac, cfg.complete_frac)
    encoded = encode_pairs(tok, pairs, template, min(cfg.seq_len, model.config.max_seq_len), cfg.max_answer_tokens)
    if not encoded:
        raise ValueError(f"{manifest}: no usable (docstring, function) pairs in the train split")
    kinds = {k: sum(p["kind"] == k for p in pairs) for k in ("named", "unnamed", "complete")}
    (out / "pairs_sample.json").write_text(json.dumps(pairs[:20], indent=2) + "\n")
    print(f"{len(functions)} functions, {len(pairs)} distinct turns {kinds}, {len(encoded)} within the limits",
          flush=True)  # fmt: skip
    plain = None
    if cfg.plain_batch_size:
        tokens = open_split(shards, "train")
        plain = Batches(tokens, min(cfg.seq_len, tokens.size - 2), cfg.plain_batch_size, cfg.seed + 1, 0, device)
    pad_id = tok.token_to_id(PAD)
    pad_id = tok.token_to_id(EOT) if pad_id is None else pad_id
    model.to(device).train()
    sched = _schedule(cfg)
    opts = make_optimizers(model, sched)
    use_bf16 = device.type == "cuda"
    rng = np.random.default_rng(cfg.seed)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    last = {}
    bar = tqdm(range(cfg.steps), desc="sft", unit="step", disable=not progress)
    for step in bar:
        for opt in opts.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, sched)
        x, y = sft_batch(encoded, rng.integers(0, len(encoded), cfg.batch_size), pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            chat_loss, _ = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = chat_loss
            if plain is not None:
                px, py = plain.get(step)
                plain_loss, _ = model.loss(px, py)
                loss = loss + cfg.plain_weight * plain_loss
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            last = {
                "step": step + 1,
                "chat_loss": float(chat_loss.detach()),
                "grad_norm": float(grad_norm),
                "lr_matrix": opts["muon"].param_groups[0]["lr"],
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
            if plain is not None:
                last["plain_loss"] = float(plain_loss.detach())
            if not math.isfinite(last["chat_loss"]):
                raise FloatingPointError(f"chat loss became {last['chat_loss']} at step {step + 1}")
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(last) + "\n")
            bar.set_postfix(chat=f"{last['chat_loss']:.3f}", plain=f"{last.get('plain_loss', float('nan')):.3f}")
    bar.close()
    exported = export_gguf(model, gg, out / "model.gguf", {CHAT_TUNED_KEY: True, "training.sft_steps": cfg.steps})
    summary = {"config": asdict(cfg), "functions": len(functions), "turns": len(pairs), "turn_kinds": kinds,
               "turns_used": len(encoded), "manifest": str(manifest), "shards": str(shards), "last": last,
               "export": exported, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> SFTConfig:
    return parse_config(SFTConfig, "python -m train.sft", __doc__, argv)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        summary = train_sft(cfg)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"python -m train.sft: error: {exc}") from None
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
