"""Where a weight-streaming kernel's software prefetch should land: L1 (``prefetcht0``) or L2 (``prefetcht1``).

Times the 2B-4T shape's two largest tile8 GEMVs (``prefetch`` distance × ``prefetch_to`` level, the knobs of
``schedules.x86_common``) and its F16 and int8 LM heads (``compiler.graph_kernels.HEAD_PREFETCH`` /
``HEAD_I8_PREFETCH``, 0 = none) with DRAM-resident weights (rotated over copies, as ``compiler.tune --dram``), each
round timing every variant and the streaming-read roof in turn; prints each variant's fraction of the roof (median of
the per-round ratios) at 1 and 2 threads. Exploratory: kernels alone, not the model (``bench.knob_sweep`` and
``bench.runtime`` measure that; docs/foreign_models.md, "Prefetching into L2").

    python docs/bench/prefetch_l2/prefetch_level.py --rounds 7 --json docs/bench/prefetch_l2/prefetch_level_intel.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tvm

import targets
from bench.kernels import _roof_kernel, paired_times, rotated
from compiler import graph_kernels as G
from compiler import schedule as S
from compiler.measure import dram_copies, weight_bytes
from compiler.tune import parse_shape
from targets.hugepages import host_tensor

GEMVS = {"gemv_i8:M=13824:K=2560:tile=8": 2, "gemv_i8:M=2560:K=6912:tile=8": 1}  # shape: its unroll_k record
LEVELS = [(0, 1), (1024, 1), (2048, 1), (1024, 2), (2048, 2), (4096, 2)]  # (prefetch bytes, prefetch_to)
V, D = 128256, 2560  # the 2B-4T LM head


def gemv_variants(key: str, uk: int, tgt) -> tuple[list, float, list[str]]:
    op = parse_shape(key)
    ins = op.random_inputs(np.random.default_rng(0))
    copies = dram_copies(weight_bytes(op), dram=True)
    out, ref = [], op.reference(*ins)[0]
    for pf, to in LEVELS:
        knobs = {"rows": 8, "unroll_k": uk, "prefetch": pf, "prefetch_to": to}
        ex = tvm.compile(S.manual(op, "avx512", knobs).mod, target=tgt)
        args = [host_tensor(a, tvm.cpu()) for a in ins + op.empty_outputs()]
        ex.mod["main"](*args)
        assert np.array_equal(args[-1].numpy(), ref), f"{key} {knobs}: wrong result"
        out.append((ex, rotated(args, copies)))
    return out, weight_bytes(op), [f"pf{pf} L{to}" for pf, to in LEVELS]


def head_variants(int8: bool, tgt) -> tuple[list, float, list[str]]:
    rng = np.random.default_rng(0)
    if int8:
        E = G.tile_head(rng.integers(-127, 128, (V, D)).astype(np.int8), G.HEAD_I8_CHUNK)
        h8 = rng.integers(-127, 128, (1, D)).astype(np.int8)
        ins = [h8, np.ones(1, np.float32), h8.astype(np.int32).sum(1).astype(np.int32), E, np.ones(V, np.float32)]
        weights, dists, name = 3, (0, 1024, 2048), "HEAD_I8_PREFETCH"
    else:
        E = G.tile_head(rng.standard_normal((V, D)).astype(np.float16), G.HEAD_LANES)
        ins = [rng.standard_normal((1, D)).astype(np.float32), E]
        weights, dists, name = 1, (0, 1024, 2048, 4096), "HEAD_PREFETCH"
    ins.append(np.zeros((1, V), np.float32))
    keep, out, ref = getattr(G, name), [], None
    try:
        for d in dists:
            setattr(G, name, d)
            f = G.lm_head_i8(1, V, D) if int8 else G.lm_head(1, V, D, "float16")
            ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=tgt)
            args = [host_tensor(a, tvm.cpu()) for a in ins]
            ex.mod["main"](*args)
            ref = args[-1].numpy() if ref is None else ref
            assert np.array_equal(args[-1].numpy(), ref), f"{name}={d}: the logits changed"
            out.append((ex, rotated(args, 2, first=weights)))
    finally:
        setattr(G, name, keep)
    return out, float(E.nbytes), [f"pf{d}" for d in dists]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not targets.supported("avx512"):
        raise SystemExit(f"needs avx512: this CPU lacks {targets.missing_flags('avx512')}")
    tgt = targets.get_target("avx512")
    kernels = {key: gemv_variants(key, uk, tgt) for key, uk in GEMVS.items()}
    kernels["lm_head f16 128256x2560"] = head_variants(False, tgt)
    kernels["lm_head int8 128256x2560"] = head_variants(True, tgt)
    res = {"command": f"python docs/bench/prefetch_l2/prefetch_level.py --rounds {a.rounds}",
           "cpu": targets.cpu.cpu_name(), "machine_id": S.machine_dir("avx512").name, "rounds": a.rounds,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "kernels": {}}  # fmt: skip
    for name, (variants, nbytes, labels) in kernels.items():
        rk = _roof_kernel("read", int(nbytes), "avx512")
        pairs = [*variants, (rk[0], rotated(rk[1], len(variants[0][1])))]
        res["kernels"][name] = {}
        for th in (1, 2):
            targets.set_tvm_threads(th)
            ts = paired_times(pairs, rounds=a.rounds)
            roof = rk[2] / ts[:, -1]
            frac = {lab: float(np.median(nbytes / ts[:, i] / roof)) for i, lab in enumerate(labels)}
            res["kernels"][name][f"{th}_threads"] = {"roof_gbs": float(np.median(roof) / 1e9), "of_roof": frac}
            print(f"{name:34s} {th} thr, roof {np.median(roof) / 1e9:5.1f} GB/s: "
                  + "  ".join(f"{k} {v:.3f}" for k, v in frac.items()), flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
