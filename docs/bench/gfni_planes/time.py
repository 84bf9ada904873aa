"""Time two builds of the same kernels (``build.py``) against each other: 11 rounds, the two alternating with the
order swapped every round, each a ``time_evaluator`` of 200 calls (≥ 100 ms); prints and writes, per op key, the
medians, old / new as the median of the 11 paired ratios with its range, and whether both outputs equal the
reference bit for bit.

    TVM_NUM_THREADS=2 python docs/bench/gfni_planes/time.py OLD NEW 2 OUT.json gemv_i8:M=13824:K=2560:tile=8 ...
"""

import json
import os
import sys

import numpy as np
import tvm

from compiler.measure import weight_bytes
from compiler.tune import parse_shape

sys.path.insert(0, os.path.dirname(__file__))
from build import file_name


def main(old: str, new: str, threads: int, out: str, keys: list[str]) -> None:
    rng = np.random.default_rng(0)
    res = {}
    for key in keys:
        op = parse_shape(key)
        ins = op.random_inputs(rng)
        args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
        mods = [tvm.runtime.load_module(os.path.join(d, file_name(key))) for d in (old, new)]
        outs = []
        for m in mods:
            m[op.func_name](*args)
            outs.append(args[-1].numpy().copy())
        exact = all(np.array_equal(o, op.reference(*ins)[0]) for o in outs)
        ts = {0: [], 1: []}
        for r in range(11):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                ev = mods[i].time_evaluator(op.func_name, tvm.cpu(), number=200, repeat=1, min_repeat_ms=100)
                ts[i].append(ev(*args).mean * 1e6)
        ratios = sorted(a / b for a, b in zip(ts[0], ts[1], strict=True))
        res[key] = dict(old_us=float(np.median(ts[0])), new_us=float(np.median(ts[1])),
                        speedup=float(np.median(ratios)), lo=ratios[0], hi=ratios[-1], exact=bool(exact),
                        weight_gbs_new=weight_bytes(op) / np.median(ts[1]) / 1e3)  # fmt: skip
        print(
            f"{key:34s} {threads} thr  old {res[key]['old_us']:8.2f} us  new {res[key]['new_us']:8.2f} us  "
            f"old/new {res[key]['speedup']:.3f} [{ratios[0]:.3f}-{ratios[-1]:.3f}]  exact {exact}",
            flush=True,
        )
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
