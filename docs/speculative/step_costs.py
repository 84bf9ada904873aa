"""What a speculative step costs on the CPU: a verify call of 1–4 rows of one sequence and a draft call of 1–3
tokens, for the shipped model, with the draft vocabulary of the build (the first 2048 ids) and over the whole
vocabulary (a second build into a temporary cache). Medians of 7 rounds of 40 calls each, with their ranges.

Also, in the same rounds, the device-side chains (``Engine.chain``) from the same position: ``chain_b1`` and the
speculative ``spec_chain_b{K+1}`` (``K`` drafts a call), 4 chains of 32 greedy tokens a round; per call: time, tokens,
and time per token (the figure that says whether drafts pay on this machine).

    python docs/speculative/step_costs.py [--threads 2] [--json docs/speculative/step_costs_avx512.json] \
        [--build-vocab-only]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def costs(entry, gguf: str, threads: int) -> dict:
    from model.sampling import Generation
    from runtime.engine import Engine
    from runtime.kv_cache import Sequence

    eng = Engine(entry, gguf, threads=threads, draft_tokens=0)
    seq = Sequence()
    eng.prefill(list(range(100, 140)), seq)
    base, out = seq.length, {}
    for _ in range(7):
        for n in (1, 2, 3, 4):
            t0 = time.perf_counter()
            for _ in range(40):
                seq.length = base
                eng.step([seq], [[5] * n])
            out.setdefault(f"verify_{n}_rows_ms", []).append((time.perf_counter() - t0) / 40 * 1e3)
        for k in range(1, eng.mtp_heads + 1):
            t0 = time.perf_counter()
            for _ in range(40):
                eng.draft(seq.hidden[None], [5], k)
            out.setdefault(f"draft_{k}_ms", []).append((time.perf_counter() - t0) / 40 * 1e3)
        for k in range(eng.mtp_heads + 1):  # chains from the same position: K drafts a call
            stats, tokens = Generation(), 0
            t0 = time.perf_counter()
            for _ in range(4):
                seq.length, seq.drafts = base, None
                tokens += len(eng.chain(5, 32, seq, drafts=k, stats=stats))
            calls = stats.spec_steps if k else tokens
            elapsed = (time.perf_counter() - t0) * 1e3
            out.setdefault(f"chain_{k}_drafts_call_ms", []).append(elapsed / calls)
            out.setdefault(f"chain_{k}_drafts_tokens_per_call", []).append(tokens / calls)
            out.setdefault(f"chain_{k}_drafts_token_ms", []).append(elapsed / tokens)
    summary = {k: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))} for k, v in out.items()}
    return {"draft_vocab": eng.meta["draft_vocab"], "runs": 7, "calls_per_run": 40} | summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/small.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--build-vocab-only", action="store_true", help="skip the second build (drafts over every id)")
    a = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))
    from bench.machine import git_commit, machine, save_json
    from compiler import lower
    from compiler.build import build
    from runtime.engine import ensure_built

    rows = [costs(ensure_built(a.model, cores=a.threads), a.model, a.threads)]
    if not a.build_vocab_only:
        with tempfile.TemporaryDirectory() as tmp:  # the same module with drafts over the whole vocabulary
            lower.DRAFT_VOCAB_CPU = 1 << 30
            rows.append(costs(build(a.model, "auto", tmp, cores=a.threads).dir, a.model, a.threads))
    for r in rows:
        print(f"draft vocabulary {r['draft_vocab']}: " + ", ".join(
            f"{k} {v['median']:.3f}" for k, v in r.items() if isinstance(v, dict)))  # fmt: skip
    if a.json:
        cmd = (
            "python docs/speculative/step_costs.py "
            + f"--threads {a.threads} --json {a.json}"
            + (" --build-vocab-only" if a.build_vocab_only else "")
        )
        save_json(a.json, {"command": cmd, "machine": machine(), "git": git_commit(), "rows": rows})


if __name__ == "__main__":
    main()
