"""Two kernel figures behind this session's changes, timed interleaved in one process (medians of 7 rounds, each round
the min of 5 calls; ranges over the rounds):

* the LM head: ``compiler.graph_kernels.lm_head`` now against the rfactor kernel it replaced (loaded from
  ``git show 29ef917:compiler/graph_kernels.py``), float16 heads of the shipped model (8192×512) and nano-1b
  (32000×2048), 1 and 8 rows (the old kernel takes one row: 8 rows are 8 calls);
* ``gemm_i8`` at N = 16 on 1536×512 (the shipped model's gate/up) with the prefill record's N = 8 knobs (what a
  decode batch borrowed before it had a record) and with its own tuned record.

    TVM_NUM_THREADS=2 PYTHONPATH=. python docs/runtime/head_and_knobs.py docs/runtime/head_and_knobs.json
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tvm

from bench.machine import git_commit, machine
from compiler import graph_kernels as new
from compiler.ops import make_op
from compiler.schedule import best_record, borrowed_knobs, build, get_primfunc, open_database
from targets import get_target

ROUNDS, CALLS = 7, 5


def old_module():
    src = subprocess.run(["git", "show", "29ef917:compiler/graph_kernels.py"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    f.write(src)
    f.close()
    spec = importlib.util.spec_from_file_location("gk_old", f.name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_one(func, tgt):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt)["main"]


def timed(fns: dict) -> dict:
    """{name: [per-round min seconds]} with the names interleaved in every round."""
    out = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, f in fns.items():
            ts = []
            for _ in range(CALLS):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            out[k].append(min(ts))
    return out


def stat(v):
    return {"median_us": float(np.median(v) * 1e6), "min_us": float(np.min(v) * 1e6), "max_us": float(np.max(v) * 1e6)}


def main(out_path: str) -> None:
    tgt = get_target("avx512")
    old = old_module()
    rng = np.random.default_rng(0)
    rows = []
    for V, D in ((8192, 512), (32000, 2048)):
        rows_np = rng.standard_normal((V, D)).astype("float16")
        E = tvm.runtime.tensor(rows_np)  # the old kernel's rows
        Eb = tvm.runtime.tensor(new.tile_head(rows_np, new.HEAD_LANES))  # the blocked layout today's kernel reads
        for B in (1, 8):
            f_new = compile_one(new.lm_head(B, V, D, "float16"), tgt)
            f_old = compile_one(old.lm_head(V, D, "float16"), tgt)
            h = rng.standard_normal((B, D)).astype(np.float32)
            hn, on = tvm.runtime.tensor(h), tvm.runtime.tensor(np.zeros((B, V), np.float32))
            ho = [tvm.runtime.tensor(h[b]) for b in range(B)]
            oo = tvm.runtime.tensor(np.zeros(V, np.float32))

            def run_old(f_old=f_old, ho=ho, E=E, oo=oo):
                for x in ho:
                    f_old(x, E, oo)

            t = timed({"new": lambda f=f_new, h=hn, E=Eb, o=on: f(h, E, o), "old": run_old})
            rows.append({"kernel": "lm_head", "V": V, "D": D, "rows": B, "new": stat(t["new"]), "old": stat(t["old"]),
                         "old_over_new": float(np.median(np.array(t["old"]) / np.array(t["new"])))})  # fmt: skip
    op = make_op("gemm_i8", N=16, M=1536, K=512, tile=8)
    like = make_op("gemm_i8", N=8, M=1536, K=512, tile=8)
    knobs = borrowed_knobs(op, like, "avx512")
    own = best_record(open_database("avx512"), op)
    ex_b, ex_o = build(op, "avx512", knobs=knobs), get_primfunc(op, "avx512", mode="tuned").build()
    ins = [tvm.runtime.tensor(a) for a in op.random_inputs(rng)]
    outs = [tvm.runtime.tensor(np.zeros(a.shape, a.dtype)) for a in op.outputs()]
    t = timed({"borrowed": lambda: ex_b["main"](*ins, *outs), "own": lambda: ex_o[op.func_name](*ins, *outs)})
    ratio = float(np.median(np.array(t["borrowed"]) / np.array(t["own"])))
    rows.append({"kernel": op.key, "borrowed_knobs": knobs, "own_record": own is not None,
                 "borrowed": stat(t["borrowed"]), "own": stat(t["own"]), "borrowed_over_own": ratio})  # fmt: skip
    res = {"command": "TVM_NUM_THREADS=2 PYTHONPATH=. python docs/runtime/head_and_knobs.py " + out_path,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": os.environ.get("TVM_NUM_THREADS"),
           "machine": machine(), "git": git_commit(), "rounds": ROUNDS, "calls_per_round": CALLS,
           "rows": rows}  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
