"""GPU time per call of each chain function (``chain_b1``, ``spec_chain_b{K+1}``): a ``torch.profiler`` trace of
repeated calls (``bench.cuda_trace``), each call at the same position with the same rows (its token and drafts
refilled before it), with the kernels that take the most time. Beside ``bench.speculative``'s tokens per call this
says what a speculative call costs against a plain one, without the host.

    python docs/speculative/chain_trace.py --entry .gpu/entries/small --json $OUT/chain_trace_cuda.json   # GPU host
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.cuda_trace import trace
from runtime.engine import Engine

PROMPT = 'def mean(xs):\n    """The arithmetic mean of a list of numbers."""\n'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entry", required=True)
    ap.add_argument("--model", default="models/small.gguf")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    eng = Engine(a.entry, a.model, chain_burst=0, draft_tokens=0)
    ids = eng.tokenize(PROMPT)
    out = {"entry": a.entry, "calls": a.calls, "rows": []}
    for k in range(eng.mtp_heads + 1):
        fn = "chain_b1" if k == 0 else f"spec_chain_b{k + 1}"
        if fn not in eng.meta["outputs"]:
            continue
        eng.reset()
        first = int(np.argmax(eng.prefill(ids)))
        got = eng.chain(first, 64, drafts=k)  # sets the inputs; then every traced call restarts at this position
        rows = [got[-1], *(eng.seq.drafts[:k] if k else [])]
        at = [eng.pos + j for j in range(k + 1)]
        assert eng.pool.reserve(eng.seq, eng.pos + k + 1), "no cache room for the traced rows"
        eng._in(f"{fn}_table", np.repeat(eng.seq.table(eng.pool.width)[None], k + 1, axis=0))  # its blocks, if new

        def call(fn=fn, rows=rows, at=at):  # the same token, drafts and positions each time: equal work per call
            eng._in(f"{fn}_token", rows)
            eng._in(f"{fn}_pos", at)
            eng.vm.invoke_stateful(fn)

        t = trace(call, calls=a.calls)
        row = {"function": fn, "drafts": k, "position": eng.pos} | t
        out["rows"].append(row)
        print(f"{fn}: busy {t['busy_us']:.1f} us per call at {eng.pos}, {t['kernels']:.0f} kernels", flush=True)
    with open(a.json, "w") as fh:
        json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
