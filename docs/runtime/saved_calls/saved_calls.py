"""Saved calls (``runtime.engine.Engine._run``) against passing every argument on every call, on one CPU build: the same
entry loaded twice in one process, one Engine calling its functions the way builds did before (``vm[name](*args)``,
~170 arguments converted per call), in turn with the other, ``bench.compare``'s decode loop and logits check.

    python docs/runtime/saved_calls/saved_calls.py --entry <cache entry> --processes 6 --rounds 11 --tokens 64 \\
        --threads 2 --json docs/runtime/saved_calls/small_avx512_zen5.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _passing_every_argument(self, name: str, ins: tuple) -> None:
    self.vm[name](*ins, *self._out(name), *self.cache, *self.params)


def one_process(entry: str, rounds: int, tokens: int, threads: int, swap: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from bench.compare import decode_rate, logits_gap
    from runtime.engine import Engine

    saved, passing = Engine(entry, threads=threads), Engine(entry, threads=threads)
    passing._run = types.MethodType(_passing_every_argument, passing)
    logits = logits_gap(passing, saved, 32)
    decode_rate(saved, 4), decode_rate(passing, 4)
    rs, rp = [], []
    for _ in range(rounds):
        pair = [(rp, passing), (rs, saved)]
        for out, eng in reversed(pair) if swap else pair:
            out.append(decode_rate(eng, tokens))
    return {
        "order": "saved first" if swap else "passing first",
        "saved_tok_s": rs,
        "passing_tok_s": rp,
        "saved_over_passing": statistics.median(s / p for s, p in zip(rs, rp, strict=True)),
        "logits": logits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entry", required=True)
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a worker process: its index
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one_process(a.entry, a.rounds, a.tokens, a.threads, bool(a.one % 2))))
        return
    sys.path.insert(0, str(REPO))
    from bench.machine import git_commit, machine

    runs = []
    for i in range(a.processes):  # one process each, the order swapped every other one
        out = subprocess.run([sys.executable, __file__, "--entry", a.entry, "--rounds", str(a.rounds), "--tokens",
                              str(a.tokens), "--threads", str(a.threads), "--one", str(i)], check=True,
                             capture_output=True, text=True, cwd=REPO)  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{r['order']}: saved {statistics.median(r['saved_tok_s']):.1f} tok/s, passing "
              f"{statistics.median(r['passing_tok_s']):.1f}, ratio {r['saved_over_passing']:.4f}, logits identical "
              f"{r['logits']['identical']}/{r['logits']['steps']}")  # fmt: skip
    ratios = [r["saved_over_passing"] for r in runs]
    res = {"command": "python docs/runtime/saved_calls/saved_calls.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "git": git_commit(), "saved_over_passing": {"median": statistics.median(ratios), "min": min(ratios),
           "max": max(ratios)}, "runs": runs}  # fmt: skip
    print(f"saved / passing, median of {len(runs)} processes: {res['saved_over_passing']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
