"""Offline: how far could better CPU drafts go? Replays the shipped model's own greedy continuations of the held-out
code prompts against draft policies, and prices each replayed step with the verify-call costs measured here.

Greedy speculation never changes the tokens, so a policy's steps can be counted without running it: at each point of
a plain greedy generation a policy proposes drafts from the context so far, the step keeps the drafts that equal the
next greedy tokens plus one more token, and costs one verify call over ``1 + len(drafts)`` rows in the smallest
compiled batch that holds them. The estimate is ``tokens / Σ step costs`` over ``tokens / (1-row cost)``: plain
decoding's rate. Host time and the MTP heads are left out (the heads need the hidden states: ``bench.speculative``
measures them), so the estimates are for comparing policies, not figures of speed.

Policies: ``lookup`` (what :mod:`runtime.lookup` does: the tokens after the latest match of the last 4, else 3
tokens, up to ``k``), ``voted`` (the continuation seen most often after that n-gram), ``adaptive`` (7 drafts after a
step that kept all of its 3, else 3), ``lookup+corpus`` (where lookup finds nothing, an n-gram table of the corpus's
train split: the most frequent next token after the last 4, 3 or 2 tokens, chained up to 3, only where it was seen
``min_count`` times and followed ``min_share`` of them: REST-style retrieval), and ``lookup`` priced with a 3-row
function the build does not have.

The ceiling beside them: a drafter that is free and always right (``k`` drafts, all kept, so each call yields
``rows`` tokens) reaches ``rows · c(1) / c(rows)`` for each compiled batch size; and for a free drafter whose drafts
hold with probability ``α`` each (kept up to the first miss), the ``α`` a goal ratio needs:
``(1 − α^rows) / (1 − α) = goal · c(rows) / c(1)``.

    python docs/speculative/draft_policies.py --json docs/speculative/draft_policies_small_avx512_zen4.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.machine import REPO, git_commit, machine, save_json
from runtime.engine import Engine, SamplingParams
from train.corpus import CorpusConfig, build_corpus

V_BITS = 13  # token ids below 8192 pack into 13 bits: an n-gram of up to 4 tokens into one int64


def generations(eng: Engine, n: int, tokens: int) -> list[tuple[list[int], list[int]]]:
    prompts = json.loads((REPO / "bench/data/heldout_code_prompts.json").read_text())["prompts"][:n]
    out = []
    for p in prompts:
        g = eng.generate(p["prompt"], SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        out.append((eng.tokenize(p["prompt"]), list(g.tokens)))
    return out


def step_costs(eng: Engine, runs: int = 5, calls: int = 100) -> tuple[dict[int, float], dict[int, list[float]]]:
    """Median ms of one verify call over ``r`` rows of one sequence, for each compiled batch size up to 8, and each
    size's [min, max] over the runs (interleaved)."""
    eng.generate("def fib(n):", SamplingParams(max_new_tokens=60, ignore_eos=True))
    seq, base = eng.seq, eng.seq.length
    sizes = [b for b in eng.batch_sizes if b <= 8]
    times: dict[int, list[float]] = {r: [] for r in sizes}
    for _ in range(runs):  # the sizes in turn within each run
        for r in sizes:
            t = time.perf_counter()
            for _ in range(calls):
                seq.length = base
                eng.step([seq], [[7] * r])
            times[r].append((time.perf_counter() - t) / calls * 1e3)
    out = {r: float(np.median(v)) for r, v in times.items()}
    spread = {r: [min(v), max(v)] for r, v in times.items()}
    return out, spread


def lookup(ctx: list[int], k: int, vote: bool = False) -> list[int]:
    for n in (4, 3):
        if len(ctx) <= n:
            continue
        tail = ctx[-n:]
        ends = [s + n for s in range(len(ctx) - n - 1, -1, -1) if ctx[s : s + n] == tail]  # latest first
        if ends:
            if not vote:
                return ctx[ends[0] : ends[0] + k]
            seen = Counter(tuple(ctx[e : e + k]) for e in ends)  # in order of first sight: the latest first
            return list(seen.most_common(1)[0][0])  # most_common is stable: of equal counts, the latest
    return []


def corpus_tables(eng: Engine, min_count: int, min_share: float) -> dict[int, dict[int, int]]:
    """Per context length n (2..4): packed n-gram → its most frequent next token, where confident enough."""
    files = build_corpus(CorpusConfig(roots=("stdlib",)), progress=False).split("train")  # what small.gguf saw
    texts = [Path(f.path).read_text(encoding="utf-8", errors="replace") for f in files]
    seqs = [np.array(e.ids, np.int64) for e in eng.tokenizer.encode_batch(texts)]
    tables = {}
    for n in (2, 3, 4):
        keys, nxt = [], []
        for s in seqs:
            if len(s) > n:
                k = np.zeros(len(s) - n, np.int64)
                for j in range(n):
                    k = (k << V_BITS) + s[j : len(s) - n + j]
                keys.append(k)
                nxt.append(s[n:])
        pairs, counts = np.unique((np.concatenate(keys) << V_BITS) + np.concatenate(nxt), return_counts=True)
        key, tok = pairs >> V_BITS, pairs & ((1 << V_BITS) - 1)
        order = np.lexsort((-counts, key))
        key, tok, counts = key[order], tok[order], counts[order]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        total = np.add.reduceat(counts, first)
        ok = (counts[first] >= min_count) & (counts[first] >= min_share * total)
        tables[n] = dict(zip(key[first][ok].tolist(), tok[first][ok].tolist(), strict=True))
    return tables


def corpus_drafts(tables, ctx: list[int], k: int) -> list[int]:
    out, d = list(ctx), []
    for _ in range(k):
        for n in (4, 3, 2):
            key = 0
            for t in out[-n:]:
                key = (key << V_BITS) + t
            if key in tables[n]:
                d.append(tables[n][key])
                out.append(d[-1])
                break
        else:
            break
    return d


def replay(gens, policy, cost: dict[int, float]) -> dict:
    toks = total = steps = drafting = 0
    for prompt, gen in gens:
        ctx, t, last = [*prompt, gen[0]], 1, None
        while t < len(gen):
            d = policy(ctx, last)
            kept = 0
            while kept < len(d) and t + kept < len(gen) and d[kept] == gen[t + kept]:
                kept += 1
            n = min(kept + 1, len(gen) - t)
            ctx += gen[t : t + n]
            t, toks, steps, drafting = t + n, toks + n, steps + 1, drafting + bool(d)
            total += cost[min(b for b in cost if b >= len(d) + 1)]
            last = (len(d), kept)
    return {"estimate_x_plain": toks / total * cost[1], "tokens_per_step": toks / steps,
            "steps_with_drafts": drafting / steps}  # fmt: skip


def ceilings(cost: dict[int, float], goals: tuple[float, ...] = (1.5, 1.8)) -> list[dict]:
    """Per compiled batch size of ``rows`` rows: the ratio over plain decoding of a free drafter that is always
    right, and the per-draft acceptance a free drafter needs for each goal ratio (None: not reachable)."""
    out = []
    for rows in sorted(r for r in cost if r > 1):
        rel = cost[rows] / cost[1]
        need = {}
        for g in goals:  # expected tokens a call, (1 - a^rows) / (1 - a), rises from 1 to rows as a goes 0 -> 1
            lo, hi = 0.0, 1.0
            if rows < g * rel:
                need[str(g)] = None
                continue
            for _ in range(60):
                a = (lo + hi) / 2
                lo, hi = (a, hi) if sum(a**i for i in range(rows)) < g * rel else (lo, a)
            need[str(g)] = round(hi, 4)
        out.append({"rows": rows, "cost_x_one_row": rel, "perfect_free_drafts_x_plain": rows / rel,
                    "acceptance_needed": need})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "small.gguf"))
    ap.add_argument("--target", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=31)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    eng = Engine.from_gguf(a.model, a.target, threads=a.threads)
    eng.lookup_tokens = eng.draft_tokens = eng.chain_burst = 0
    gens = generations(eng, a.prompts, a.tokens)
    cost, spread = step_costs(eng)
    with3 = {**cost, 3: cost[2] + (cost[4] - cost[2]) / 2}  # a 3-row function priced halfway between 2 and 4 rows
    tables = {(c, s): corpus_tables(eng, c, s) for c, s in ((2, 0.5), (5, 0.6))}

    def adaptive(ctx, last):
        d = lookup(ctx, 7)
        return d if last and last[0] >= 3 and last[1] == last[0] else d[:3]

    def with_corpus(key):
        return lambda ctx, last: lookup(ctx, 3) or corpus_drafts(tables[key], ctx, 3)

    policies = {
        "lookup 3 (runtime.lookup)": (lambda ctx, last: lookup(ctx, 3), cost),
        "lookup 1": (lambda ctx, last: lookup(ctx, 1), cost),
        "lookup 7": (lambda ctx, last: lookup(ctx, 7), cost),
        "voted 3": (lambda ctx, last: lookup(ctx, 3, vote=True), cost),
        "adaptive 3/7": (adaptive, cost),
        "lookup 3 + corpus (2 seen, 50 %)": (with_corpus((2, 0.5)), cost),
        "lookup 3 + corpus (5 seen, 60 %)": (with_corpus((5, 0.6)), cost),
        "corpus alone (5 seen, 60 %)": (lambda ctx, last: corpus_drafts(tables[(5, 0.6)], ctx, 3), cost),
        "lookup 3, with a 3-row function": (lambda ctx, last: lookup(ctx, 3), with3),
    }
    rows = []
    print(f"verify call ms by rows: {cost}")
    print(f"{'policy':<36} {'estimate x plain':>16} {'tokens/step':>11} {'steps drafting':>14}")
    for name, (pol, c) in policies.items():
        r = {"policy": name, **replay(gens, pol, c)}
        rows.append(r)
        print(f"{name:<36} {r['estimate_x_plain']:16.3f} {r['tokens_per_step']:11.2f} {r['steps_with_drafts']:14.3f}")
    ceil = ceilings(cost)
    print(f"{'rows':>4} {'cost x 1 row':>12} {'perfect free drafts':>19} {'acceptance for 1.5x':>19} {'for 1.8x':>8}")
    for c in ceil:
        need = [("-" if v is None else f"{v:.3f}") for v in c["acceptance_needed"].values()]
        print(
            f"{c['rows']:>4} {c['cost_x_one_row']:12.3f} {c['perfect_free_drafts_x_plain']:19.3f} {need[0]:>19} "
            f"{need[1]:>8}"
        )
    if a.json:
        save_json(a.json, {"command": "python docs/speculative/draft_policies.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
            "machine": machine(), "git": git_commit(), "verify_ms_by_rows": cost, "verify_ms_range_by_rows": spread,
            "prompts": a.prompts,
            "tokens": a.tokens, "policies": rows, "ceilings": ceil})  # fmt: skip


if __name__ == "__main__":
    main()
