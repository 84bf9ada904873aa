"""What ``compiler.build --head int8`` does to a model's outputs: the int8 LM head against the GGUF's own (F16/F32).

Both builds of one GGUF decode the same prompts; the int8 build is teacher-forced on the float build's greedy tokens,
so every step compares the two heads on the same context. Reported per model: top-1 agreement over all steps, the
float head's top-1/top-2 margin at the steps where they disagree, ``|Δlogits|`` (max and mean of each step's max) in
absolute terms and relative to the step's largest logit, free-running greedy (each build on its own tokens): the
number of prompts whose ``--steps`` tokens are identical and the mean common prefix, and the head's bytes.

    python -m bench.head_int8 --model models/small.gguf --prompts 16 --steps 64 \
        --json docs/bench/head_int8_small_avx512.json

Prompts: text prompts of Python (``--text``, default a fixed list of function headers) tokenized by the GGUF's own
tokenizer, or ``--random`` token ids (for random-weight models, whose text is meaningless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = (
    "def fib(n):\n", "def read_json(path):\n", "class Stack:\n    def __init__(self):\n", "import os\n\ndef walk(",
    "def quicksort(xs):\n    if len(xs) <= 1:\n", "for i in range(10):\n", "def parse_args(argv=None):\n",
    "def mean(values):\n    \"\"\"Return the arithmetic mean.\"\"\"\n", "with open(path) as f:\n",
    "def is_prime(n):\n", "try:\n    import numpy as np\nexcept ImportError:\n", "def merge(a, b):\n",
    "class Node:\n", "def flatten(items):\n", "async def fetch(session, url):\n", "def to_snake_case(name):\n",
)  # fmt: skip


def _greedy(eng, prompt: list[int], steps: int, forced: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
    eng.reset()
    logits = [eng.prefill(prompt)]
    toks = [int(np.argmax(logits[0]))]
    for k in range(steps - 1):
        logits.append(eng.decode(forced[k] if forced else toks[-1]))
        toks.append(int(np.argmax(logits[-1])))
    return toks, logits


def compare(model: str, target: str, prompts: list[list[int]], steps: int, cache_dir=None) -> dict:
    from compiler.build import build
    from runtime.engine import Engine

    ref = Engine(build(model, target, cache_dir).dir, model)
    q8 = Engine(build(model, target, cache_dir, head="int8").dir, model)
    agree = total = same = 0
    prefix, margins, errs, rel = [], [], [], []
    for p in prompts:
        want, ref_logits = _greedy(ref, p, steps)
        _, forced = _greedy(q8, p, steps, forced=want)
        for w, g in zip(ref_logits, forced, strict=True):
            total += 1
            if np.argmax(w) == np.argmax(g):
                agree += 1
            else:
                top = np.sort(w)[-2:]
                margins.append(float(top[1] - top[0]))
            e = float(np.abs(w - g).max())
            errs.append(e)
            rel.append(e / float(np.abs(w).max()))
        free, _ = _greedy(q8, p, steps)
        n = next((i for i, (a, b) in enumerate(zip(want, free, strict=True)) if a != b), steps)
        prefix.append(n)
        same += n == steps
    return {"model": model, "target": ref.target, "prompts": len(prompts), "steps": steps,
            "top1_agreement": agree / total, "disagreements": total - agree, "disagree_margins": sorted(margins),
            "max_abs_dlogit": max(errs), "mean_step_max_abs_dlogit": float(np.mean(errs)), "max_rel_dlogit": max(rel),
            "free_running_identical": same, "mean_common_prefix": float(np.mean(prefix)),
            "head_bytes_float": _head_bytes(ref.meta), "head_bytes_int8": _head_bytes(q8.meta)}  # fmt: skip


def _head_bytes(meta: dict) -> int:
    return sum(int(np.prod(s)) * np.dtype(d).itemsize for n, s, d in meta["params"] if n.startswith("lm_head"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--random", action="store_true", help="random token ids as prompts (random-weight models)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    from model.gguf_io import read_gguf
    from model.tokenizer import hf_from_spec

    g = read_gguf(a.model, check_values=False)
    rng = np.random.default_rng(0)
    if a.random:
        prompts = [[int(t) for t in rng.integers(0, g.config.vocab_size, 16)] for _ in range(a.prompts)]
    else:
        tok = hf_from_spec(g.tokenizer)
        prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]).ids for i in range(a.prompts)]
    t0 = time.perf_counter()
    res = compare(a.model, a.target, prompts, a.steps, a.cache_dir)
    res |= {"command": "python -m bench.head_int8 " + " ".join(sys.argv[1:] if argv is None else argv),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    for k, v in res.items():
        if k != "disagree_margins":
            print(f"{k:28s} {v}")
    print(f"{'disagree_margins':28s} {[round(m, 4) for m in res['disagree_margins'][:10]]}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
