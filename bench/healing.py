"""Token healing, measured: code validity of completions whose prompt ends at the docstring's closing quotes, after its
newline, and after the newline plus the body's indentation, with healing on and off.

    python -m bench.healing --gguf models/small.gguf --n 100 --out docs/runtime/healing_small.json

Prompts are held-out functions with a docstring (:func:`train.eval.function_prompts` over the ``val`` split of a
corpus manifest; ``--manifest``, else one built here from this machine's stdlib and site-packages with the training
split rule, so the held-out packages are held out from the shipped model's training too). Each function gives three
prompts: ending at the docstring's closing quotes (the form training saw), after them a newline, and after them a
newline and the body's indentation (:func:`ending`). A completion is greedy, at most
``--max-new-tokens``, stopped at the next top-level ``def``/``class``/decorator (:data:`train.eval.STOP_STRINGS`);
the body is the prompt's text after the closing quotes plus the completion, cut as :func:`train.eval.cut_body`
does, and it is valid if the function parses with a statement besides its docstring
(:func:`train.eval.is_valid_function`). All requests run through continuous batching (:class:`runtime.batch.Batcher`),
which gives each one the tokens it gets alone.

The issue's goal: with healing on, each newline-ended variant within 2 points of the closing-quotes one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.machine import git_commit, machine, save_json

ENDINGS = ("quotes", "newline", "indent")


def ending(prompt: str, kind: str) -> str:
    """What a prompt of that kind adds after the closing quotes: nothing, a newline, or a newline and the body's
    indentation (the docstring's last line's: 4 spaces in most code, 2 in Google's)."""
    last = prompt.rsplit("\n", 1)[-1]
    indent = last[: len(last) - len(last.lstrip())]
    return {"quotes": "", "newline": "\n", "indent": "\n" + indent}[kind]


@dataclass
class HealingBenchConfig:
    gguf: str = "models/small.gguf"
    manifest: str | None = None
    n: int = 100
    max_new_tokens: int = 160
    seed: int = 0
    threads: int | None = None


def held_out_functions(cfg: HealingBenchConfig) -> list[dict]:
    from train import eval as train_eval
    from train.corpus import CorpusConfig, build_corpus, read_manifest, write_manifest

    if cfg.manifest:
        files = [f for f in read_manifest(Path(cfg.manifest)) if f.split == "val"]
    else:
        with tempfile.TemporaryDirectory(prefix="healing-corpus-") as tmp:
            write_manifest(build_corpus(CorpusConfig()), Path(tmp))
            files = [f for f in read_manifest(Path(tmp) / "manifest.jsonl") if f.split == "val"]
    return train_eval.function_prompts(files, cfg.n, cfg.seed)


def run(cfg: HealingBenchConfig) -> dict:
    from model.sampling import SamplingParams
    from runtime.batch import Batcher, Request
    from runtime.engine import Engine
    from train import eval as train_eval

    funcs = held_out_functions(cfg)
    eng = Engine.from_gguf(cfg.gguf, threads=cfg.threads)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop_strings=train_eval.STOP_STRINGS)
    variants = [("quotes", True), ("newline", True), ("indent", True), ("newline", False), ("indent", False)]
    reqs = {(i, end, heal): Request(f["prompt"] + ending(f["prompt"], end), params, token_healing=heal)
            for i, f in enumerate(funcs) for end, heal in variants}  # fmt: skip
    t0 = time.perf_counter()
    Batcher(eng).run(list(reqs.values()))
    seconds = time.perf_counter() - t0
    rows, samples = [], []
    for end, heal in variants:
        ok = 0
        for i, f in enumerate(funcs):
            res = reqs[i, end, heal].result
            body = train_eval.cut_body(ending(f["prompt"], end) + res.text, res.finish_reason == "length")
            valid = train_eval.is_valid_function(f["prompt"], body)
            ok += valid
            samples.append({"name": f["name"], "file": f["file"], "ending": end, "healing": heal, "valid": valid,
                            "healed": res.healed, "finish": res.finish_reason, "completion": res.text})  # fmt: skip
        rows.append({"ending": end, "healing": heal, "valid": ok, "n": len(funcs), "rate": ok / max(len(funcs), 1)})
    return {"command": " ".join(["python -m bench.healing", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(), "git": git_commit(), "config": asdict(cfg), "seconds": round(seconds, 1),
            "rows": rows, "samples": samples}  # fmt: skip


def table(res: dict) -> str:
    out = [f"{'prompt ends at':26s} {'healing':>7s} {'valid':>11s}"]
    label = {"quotes": "the closing quotes", "newline": "quotes + newline", "indent": "quotes + newline + indent"}
    for r in res["rows"]:
        out.append(f"{label[r['ending']]:26s} {'on' if r['healing'] else 'off':>7s} "
                   f"{r['valid']:4d}/{r['n']:<4d} {100 * r['rate']:5.1f} %")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.healing", description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=HealingBenchConfig.gguf)
    ap.add_argument("--manifest", default=None, help="a corpus manifest (its val split); default: built here")
    ap.add_argument("--n", type=int, default=100, help="held-out functions")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0, help="which functions (function_prompts' shuffle)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    a = ap.parse_args(argv)
    if a.n < 1 or a.max_new_tokens < 1:
        ap.error("--n and --max-new-tokens must be positive")
    res = run(HealingBenchConfig(a.gguf, a.manifest, a.n, a.max_new_tokens, a.seed, a.threads))
    print(table(res))
    if a.out:
        save_json(a.out, res)


if __name__ == "__main__":
    main()
