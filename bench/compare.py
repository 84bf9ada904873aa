"""Decode speed of two compiled entries, measured in turn in one process: the ratio survives a drifting machine.

On a shared VM the DRAM bandwidth moves by ±20 % from minute to minute, so two ``bench.runtime`` runs a minute apart
cannot tell a 5 % difference. This loads both entries (``compiler.build`` cache directories of the same model, e.g.
``--weights tile8`` and ``--weights tl``), then alternates rounds of ``--tokens`` decode steps between them and
reports each one's median tokens/s and the median of the per-round ratios B/A. First it checks that the two give the
same outputs: a 4-token prompt, then ``--check-steps`` greedy steps fed with A's picks into both, each step's logits
compared (``logits``: the largest absolute difference, the steps whose logits are bit-identical, the steps whose
greedy pick agrees), so a faster build that changed the maths shows it.

    python -m bench.compare ENTRY_A ENTRY_B [--rounds 11] [--tokens 24] [--threads 2] [--check-steps 32] \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def decode_rate(engine, tokens: int) -> float:
    """Tokens/s of ``tokens`` decode steps after a 4-token prompt (the same tokens for every entry)."""
    engine.reset()
    engine.prefill([1, 2, 3, 4])
    t0 = time.perf_counter()
    for i in range(tokens):
        engine.decode(10 + i)
    return tokens / (time.perf_counter() - t0)


def logits_gap(a, b, steps: int) -> dict:
    """The outputs of engines ``a`` and ``b`` on the same tokens: a 4-token prompt, then ``steps`` greedy steps that
    feed ``a``'s pick to both. ``max_abs_diff`` over every step's logits, ``identical`` (bit-identical steps) and
    ``greedy_agree`` (steps whose argmax agrees), out of ``steps + 1``."""
    import numpy as np

    a.reset()
    b.reset()
    la, lb = a.prefill([1, 2, 3, 4]), b.prefill([1, 2, 3, 4])
    gaps, agree = [], 0
    for i in range(steps + 1):
        gaps.append(float(np.abs(np.asarray(la, np.float64) - np.asarray(lb, np.float64)).max()))
        tok = int(np.argmax(la))
        agree += tok == int(np.argmax(lb))
        if i < steps:
            la, lb = a.decode(tok), b.decode(tok)
    return {"steps": steps + 1, "max_abs_diff": max(gaps), "identical": sum(g == 0 for g in gaps),
            "greedy_agree": agree}  # fmt: skip


def compare(entry_a: str, entry_b: str, rounds: int = 11, tokens: int = 24, threads: int | None = None,
            check_steps: int = 32) -> dict:  # fmt: skip
    from runtime.engine import Engine

    a, b = Engine(entry_a, threads=threads), Engine(entry_b, threads=threads)
    if a.meta["config"] != b.meta["config"]:
        raise SystemExit("the two entries are builds of different model configs")
    logits = logits_gap(a, b, check_steps)
    decode_rate(a, 4), decode_rate(b, 4)  # warm-up: weights paged in, thread pool started
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(decode_rate(a, tokens))
        rb.append(decode_rate(b, tokens))
    return {
        "a": {"entry": str(entry_a), "weights": a.meta.get("weights", "tile8"), "tok_s": ra},
        "b": {"entry": str(entry_b), "weights": b.meta.get("weights", "tile8"), "tok_s": rb},
        "median_a": statistics.median(ra), "median_b": statistics.median(rb),
        "ratio_b_over_a": statistics.median(y / x for x, y in zip(ra, rb, strict=True)),
        "rounds": rounds, "tokens": tokens, "threads": threads, "logits": logits,
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("entry_a")
    p.add_argument("entry_b")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--tokens", type=int, default=24, help="decode steps per round")
    p.add_argument("--threads", type=int, default=None, help="TVM threads (default: all cores)")
    p.add_argument("--check-steps", type=int, default=32, help="greedy steps whose logits are compared first")
    p.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)
    for e in (a.entry_a, a.entry_b):
        if not (Path(e) / "meta.json").exists():
            raise SystemExit(f"{e}: not a compiler.build cache entry (no meta.json)")
    r = compare(a.entry_a, a.entry_b, a.rounds, a.tokens, a.threads, a.check_steps)
    g = r["logits"]
    print(f"logits over {g['steps']} steps: max |A - B| {g['max_abs_diff']:.3g}, bit-identical steps "
          f"{g['identical']}, greedy picks agreeing {g['greedy_agree']}")  # fmt: skip
    print(f"A ({r['a']['weights']}): {r['median_a']:.1f} tok/s   B ({r['b']['weights']}): {r['median_b']:.1f} tok/s   "
          f"B/A, median of {a.rounds} paired rounds: {r['ratio_b_over_a']:.3f}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
