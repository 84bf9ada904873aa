"""Mixture of experts against the dense model with the same active parameters: compiled decode, interleaved runs.

Both models have random weights (:mod:`model.random_model`) and the same attention; the MoE preset's ``k`` active
experts together have the dense model's FFN size (``small-moe``: 8 experts of 768, top 2, against ``small``'s 1536),
so a token reads the same ternary bytes in both. Each run times the compiled decode of each model in its own process
(``bench.runtime``'s worker), alternating; the table gives medians with their ranges and the per-run ratio. The
issue's goal is MoE ≥ 0.8× dense.

    python -m bench.moe --threads 2 --runs 5 --json docs/moe/moe_vs_dense_avx2.json
    python -m bench.moe --entry small=.gpu/entries/small --entry small-moe=.gpu/entries/small-moe --threads 16  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import machine, save_json
from bench.runtime import _median_row, _run_worker, decode_bytes
from compiler import cache
from model.config import get_config
from model.random_model import write_random_gguf


def prepare(preset: str, work: Path, target: str, cache_dir: str | None, entry: str | None = None):
    """``(worker arguments, meta.json)`` of the preset: its prebuilt ``entry`` (with its weights: a GPU host, which
    has TVM's runtime only), else its random GGUF (written once) built here."""
    if entry:
        return ["--entry", entry], json.loads((Path(entry) / "meta.json").read_text())
    from runtime.engine import ensure_built

    path = work / f"{preset}.gguf"
    if not path.exists():
        write_random_gguf(preset, path)
    built = ensure_built(str(path), target, cache_dir)
    return ["--model", str(path)], json.loads((Path(built) / "meta.json").read_text())


def run(a) -> dict:
    from targets import resolve

    entries = dict(e.split("=", 1) for e in a.entry)
    target = json.loads((Path(next(iter(entries.values()))) / "meta.json").read_text())["target"] if entries else (
        resolve(a.target))  # fmt: skip
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    models = {name: prepare(name, work, target, a.cache_dir, entries.get(name)) for name in (a.dense, a.moe)}
    common = ["--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens), "--target", target]
    common += ["--cache-dir", a.cache_dir] if a.cache_dir else []
    samples: dict[str, list] = {name: [] for name in models}
    load0 = os.getloadavg()
    for _ in range(a.runs):  # interleaved: both models once per run
        for name, (which, _) in models.items():
            samples[name].append(_run_worker(["tvm", *which, *common], a.threads))
    ratios = [m["decode_tok_s"] / d["decode_tok_s"] for m, d in zip(samples[a.moe], samples[a.dense], strict=True)]
    rows = []
    for name, (_, meta) in models.items():
        row = _median_row(samples[name])
        cfg, read = get_config(name), decode_bytes(meta)
        total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in meta["params"])
        row |= {"model": name, "n_experts": cfg.n_experts, "n_experts_used": cfg.n_experts_used,
                "active_weight_bytes": read["weights"], "ternary_bytes_read": read["ternary"],
                "total_params_bytes": total}  # fmt: skip
        rows.append(row)
    return {"target": target, "threads": a.threads, "runs": a.runs, "rows": rows,
            "moe_vs_dense": float(np.median(ratios)), "moe_vs_dense_range": [min(ratios), max(ratios)],
            "moe_vs_dense_runs": ratios, "goal": 0.8, "machine": machine(), "loadavg_start": load0,
            "loadavg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python -m bench.moe " + " ".join(a.argv)}  # fmt: skip


def table(res: dict) -> str:
    head = f"{'model':10s} {'experts':>8s} {'active MiB':>10s} {'total MiB':>9s} {'decode tok/s':>12s} {'range':>17s}"
    lines = [f"{res['target']}, {res['threads']} threads, medians of {res['runs']} interleaved runs (range)", head]
    for r in res["rows"]:
        experts = f"{r['n_experts_used']}/{r['n_experts']}" if r["n_experts"] else "dense"
        lo, hi = r["decode_tok_s_range"]
        lines.append(
            f"{r['model']:10s} {experts:>8s} {r['active_weight_bytes'] / 2**20:10.2f} "
            f"{r['total_params_bytes'] / 2**20:9.2f} {r['decode_tok_s']:12.1f} {f'{lo:.0f}-{hi:.0f}':>17s}"
        )
    lo, hi = res["moe_vs_dense_range"]
    lines.append(f"MoE / dense: {res['moe_vs_dense']:.3f} ({lo:.3f}-{hi:.3f}); goal >= {res['goal']}")
    return "\n".join(lines)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__.split("\n")[0])
    ap.add_argument("--dense", default="small", help="the dense preset")
    ap.add_argument("--moe", default="small-moe", help="the MoE preset with the same active FFN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--work-dir", default=str(cache.default_cache_dir() / "bench-moe"), help="the random GGUFs")
    ap.add_argument("--cache-dir", default=None, help="compiler.build's cache (default: its own)")
    ap.add_argument("--entry", action="append", default=[], metavar="PRESET=DIR",
                    help="a prebuilt cache entry with its weights for a preset (no build: a GPU host)")  # fmt: skip
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    a.argv = list(argv) if argv is not None else sys.argv[1:]
    res = run(a)
    print(table(res))
    if a.json:
        save_json(a.json, res)


if __name__ == "__main__":
    main()
