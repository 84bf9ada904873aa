"""Decode with the weights and KV cache on transparent huge pages (``targets.hugepages``) against 4 KiB pages: the
same compiled entry, each run in its own process with ``TERNARY_HUGEPAGES`` on and off in turn, interleaved.

    python -m bench.hugepages --entry ~/.cache/ternary-tvm/peer/cache/<entry> --threads 2 --runs 5 \\
        --json docs/runtime/hugepages/bitnet-2b4t_avx512.json

Each process loads the entry, prefills ``--prompt-tokens`` random ids and times ``--decode-tokens`` greedy steps
(:func:`bench.runtime.timed_generation`); it reports decode tokens/s (median step) and the process's
``AnonHugePages`` (what the kernel actually backed with huge pages). The table gives medians over the runs with
their ranges and the ratio on/off taken within each run; the tokens must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

WORKER = r"""
import json, sys
import numpy as np
from runtime.engine import Engine
from bench.runtime import timed_generation
from bench.llama_cpp import prompt_ids
eng = Engine(sys.argv[1], None, threads=int(sys.argv[2]))
g = timed_generation(eng.prefill, eng.decode, eng.reset, prompt_ids(eng.vocab, int(sys.argv[3])), int(sys.argv[4]))
huge = next((int(x.split()[1]) for x in open("/proc/self/smaps_rollup") if x.startswith("AnonHugePages")), 0)
print(json.dumps({"decode_tok_s": 1 / float(np.median(g["steps"])), "anon_huge_kib": huge, "tokens": g["tokens"]}))
"""


def run_once(a, on: bool) -> dict:
    env = {**os.environ, "TERNARY_HUGEPAGES": "1" if on else "0"}
    args = [a.entry, str(a.threads), str(a.prompt_tokens), str(a.decode_tokens)]
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"error: the worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hugepages", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entry", required=True, help="a compiler.build cache entry (CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.threads < 1 or a.prompt_tokens < 1 or a.decode_tokens < 1:
        ap.error("--runs, --threads, --prompt-tokens and --decode-tokens must be positive")
    runs = []
    for i in range(a.runs):
        off, on = run_once(a, False), run_once(a, True)
        runs.append({"off": off, "on": on, "ratio": on["decode_tok_s"] / off["decode_tok_s"]})
        print(f"run {i + 1}/{a.runs}: 4 KiB {off['decode_tok_s']:.2f} tok/s, huge {on['decode_tok_s']:.2f} tok/s "
              f"({on['anon_huge_kib'] >> 10} MiB on huge pages)", flush=True)  # fmt: skip

    def stat(xs):
        return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}

    summary = {"off_tok_s": stat([r["off"]["decode_tok_s"] for r in runs]),
               "on_tok_s": stat([r["on"]["decode_tok_s"] for r in runs]), "ratio": stat([r["ratio"] for r in runs]),
               "same_tokens": all(r["on"]["tokens"] == r["off"]["tokens"] for r in runs)}  # fmt: skip
    s = summary
    print(f"\n{'pages':8s} {'decode tok/s':>14s} {'range':>16s}\n{'4 KiB':8s} {s['off_tok_s']['median']:14.2f} "
          f"{s['off_tok_s']['min']:7.2f}-{s['off_tok_s']['max']:<7.2f}\n{'huge':8s} {s['on_tok_s']['median']:14.2f} "
          f"{s['on_tok_s']['min']:7.2f}-{s['on_tok_s']['max']:<7.2f}\nhuge / 4 KiB per run: {s['ratio']['median']:.3f} "
          f"({s['ratio']['min']:.3f}-{s['ratio']['max']:.3f}); tokens identical: {s['same_tokens']}")  # fmt: skip
    if a.json:
        from bench.machine import git_commit, machine, save_json

        for r in runs:
            for k in ("off", "on"):
                r[k].pop("tokens")
        save_json(a.json, {"bench": "hugepages", "command": " ".join(["python -m bench.hugepages", *sys.argv[1:]]),
                           "machine": machine(), "commit": git_commit(), "entry": a.entry, "threads": a.threads,
                           "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens, "runs": runs,
                           **summary})  # fmt: skip
    return 0 if summary["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
