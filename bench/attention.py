"""Attention variants against GQA at the same width: cache bytes per token and compiled decode speed as the context
grows, interleaved runs.

Every model has random weights (:mod:`model.random_model`) and a context of ``--max-seq-len`` (default 2176): the
GQA baseline ``small`` (8 heads, 4 KV heads of 64) and the ``--variants``, presets with optional config overrides
(``PRESET:field=value,...``): ``small-mla`` (a 256-wide int8 latent and 32 RoPE dimensions), ``small-deltanet``
(DeltaNet and attention layers alternating) and ``small-deltanet:full_attention_interval=9`` (DeltaNet layers only).
At each context ``n`` a run prefills ``n`` tokens and times the next ``decode_tokens`` decode steps
(``bench.runtime``'s worker, one process per model, alternating); the table gives medians with their ranges and the
per-run ratio variant / baseline. The issue's goals: MLA's cache bytes per token ≤ 1/4 of GQA's and its decode at
context 2048 faster than GQA's; a DeltaNet model's decode time per token flat (within 10 %) from 128 to 2048.

    python -m bench.attention --threads 2 --runs 5 --json docs/attention/attention_avx2.json
    python -m bench.attention --entry small=DIR --entry small-mla=DIR --threads 16 --json ...   # prebuilt entries
    python -m bench.attention --build-only --target cuda --out-dir .gpu/attention   # CUDA modules, built here
    OUT=<results folder> bash scripts/gpu_attention.sh                                # then, on the GPU host
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
from model.config import ModelConfig, get_config
from model.random_model import write_random_gguf

VARIANTS = "small-mla,small-deltanet,small-deltanet:full_attention_interval=9"


def config_of(spec: str, ctx: int) -> ModelConfig:
    """``PRESET[:field=value,...]`` at context ``ctx`` (integer values)."""
    preset, _, over = spec.partition(":")
    fields = dict(kv.split("=", 1) for kv in over.split(",") if kv)
    return get_config(preset, max_seq_len=ctx, **{k: int(v) for k, v in fields.items()})


def prepare(preset: str, ctx: int, work: Path, target: str, cache_dir: str | None, entry: str | None = None):
    """``(worker arguments, meta.json)``: the prebuilt ``entry`` (a GPU host), else the preset's random GGUF at context
    ``ctx`` (written once) built here."""
    if entry:
        return ["--entry", entry], json.loads((Path(entry) / "meta.json").read_text())
    from runtime.engine import ensure_built

    path = gguf_path(work, preset, ctx)
    built = ensure_built(str(path), target, cache_dir)
    return ["--model", str(path)], json.loads((Path(built) / "meta.json").read_text())


def slug(spec: str) -> str:
    """A file and folder name for a model spec."""
    return spec.replace(":", "-").replace("=", "").replace(",", "-")


def gguf_path(work: Path, spec: str, ctx: int) -> Path:
    """The spec's random GGUF at context ``ctx`` (seed 0: the same bytes on every host), written once."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{slug(spec)}-ctx{ctx}.gguf"
    if not path.exists():
        write_random_gguf(config_of(spec, ctx), path)
    return path


def run(a) -> dict:
    from targets import resolve

    entries = dict(e.split("=", 1) for e in a.entry)
    first = next(iter(entries.values()), None)
    target = json.loads((Path(first) / "meta.json").read_text())["target"] if first else resolve(a.target)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    names = (a.baseline, *a.variants.split(","))
    models = {n: prepare(n, a.max_seq_len, work, target, a.cache_dir, entries.get(slug(n))) for n in names}
    contexts = [int(c) for c in a.contexts.split(",")]
    samples: dict[tuple, list] = {(n, c): [] for n in names for c in contexts}
    load0 = os.getloadavg()
    for _ in range(a.runs):  # interleaved: every (context, model) once per run
        for c in contexts:
            prompt = c
            for n, (which, _) in models.items():
                args = ["tvm", *which, "--prompt-tokens", str(prompt), "--decode-tokens", str(a.decode_tokens)]
                args += ["--target", target] + (["--cache-dir", a.cache_dir] if a.cache_dir else [])
                samples[(n, c)].append(_run_worker(args, a.threads))
    rows, ratios = [], {}
    for v in names[1:]:
        for c in contexts:
            per = [m["decode_tok_s"] / g["decode_tok_s"] for m, g in
                   zip(samples[(v, c)], samples[(a.baseline, c)], strict=True)]  # fmt: skip
            ratios[f"{v} @ {c}"] = {"variant": v, "context": c, "median": float(np.median(per)),
                                   "range": [min(per), max(per)], "runs": per}  # fmt: skip
    flat = {}
    for n in names:
        lo, hi = contexts[0], contexts[-1]
        per = [s_hi["decode_tok_s"] / s_lo["decode_tok_s"] for s_lo, s_hi in
               zip(samples[(n, lo)], samples[(n, hi)], strict=True)]  # fmt: skip
        flat[n] = {"contexts": [lo, hi], "decode_rate_ratio": float(np.median(per)), "range": [min(per), max(per)]}
    for c in contexts:
        for n, (_, meta) in models.items():
            row = _median_row(samples[(n, c)])
            cfg = config_of(n, a.max_seq_len)
            read = decode_bytes(meta, c - 1)
            row |= {"model": n, "context": c, "kv_bytes_per_token": cfg.kv_bytes_per_token,
                    "state_bytes": cfg.state_bytes, "kv_bytes_read": read["kv_cache"],
                    "weight_bytes": read["weights"]}  # fmt: skip
            rows.append(row)
    base = config_of(a.baseline, a.max_seq_len).kv_bytes_per_token
    per_token = {n: config_of(n, a.max_seq_len).kv_bytes_per_token for n in names}
    kv = {n: {"kv_bytes_per_token": b, "ratio": b / base} for n, b in per_token.items()}
    return {"target": target, "threads": a.threads, "runs": a.runs, "max_seq_len": a.max_seq_len, "rows": rows,
            "variant_vs_baseline_decode": ratios, "decode_rate_last_vs_first_context": flat, "kv_bytes": kv,
            "goals": {"mla_kv_bytes_ratio_max": 0.25, "mla_decode_at_2048_ratio_min": 1.0,
                      "deltanet_flat_within": 0.10},
            "machine": machine(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python -m bench.attention " + " ".join(a.argv)}  # fmt: skip


def table(res: dict) -> str:
    head = f"{'context':>7s} {'model':42s} {'KV B/token':>10s} {'KV MiB read':>11s} {'decode tok/s':>12s}"
    lines = [f"{res['target']}, {res['threads']} threads, medians of {res['runs']} interleaved runs (range)",
             head + f" {'range':>13s}"]  # fmt: skip
    for r in res["rows"]:
        lo, hi = r["decode_tok_s_range"]
        span = f"{lo:.0f}-{hi:.0f}"
        lines.append(f"{r['context']:7d} {r['model']:42s} {r['kv_bytes_per_token']:10d} "
                     f"{r['kv_bytes_read'] / 2**20:11.2f} {r['decode_tok_s']:12.1f} {span:>13s}")  # fmt: skip
    for k, r in res["variant_vs_baseline_decode"].items():
        lines.append(f"{k}: {r['median']:.3f} ({r['range'][0]:.3f}-{r['range'][1]:.3f}) of the baseline's decode rate")
    for n, r in res["decode_rate_last_vs_first_context"].items():
        lo, hi = r["contexts"]
        lines.append(
            f"{n}: decode rate at {hi} / at {lo}: {r['decode_rate_ratio']:.3f} ({r['range'][0]:.3f}-"
            f"{r['range'][1]:.3f}); KV bytes per token {res['kv_bytes'][n]['ratio']:.3f} of the baseline's"
        )
    return "\n".join(lines)


def build_only(a) -> None:
    """Build both presets' modules (random weights, context ``--max-seq-len``) for ``--target`` and copy ``model.so``
    and ``meta.json`` to ``<--out-dir>/<slug>``: what ``scripts/gpu_attention.sh`` carries to a GPU host, which writes
    the same random GGUFs (:func:`gguf_path`) and repacks their weights there (``compiler.build --repack-into``)."""
    import shutil

    from runtime.engine import ensure_built

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n in (a.baseline, *a.variants.split(",")):
        path = gguf_path(Path(a.work_dir), n, a.max_seq_len)
        built = ensure_built(str(path), a.target, a.cache_dir)
        (out / slug(n)).mkdir(exist_ok=True)
        for f in ("model.so", "meta.json"):
            shutil.copy(Path(built) / f, out / slug(n) / f)
        print(out / slug(n))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="small", help="the GQA preset")
    ap.add_argument("--variants", default=VARIANTS, help="comma-separated PRESET[:field=value,...] of the same width")
    ap.add_argument(
        "--max-seq-len",
        type=int,
        default=2176,
        help="both models' context (2048 + room for the decode steps and a CUDA run's 50 traced steps)",
    )
    ap.add_argument("--contexts", default="128,512,2048", help="positions at which decode is timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--work-dir", default=str(cache.default_cache_dir() / "bench-attention"), help="the random GGUFs")
    ap.add_argument("--cache-dir", default=None, help="compiler.build's cache (default: its own)")
    ap.add_argument("--entry", action="append", default=[], metavar="PRESET=DIR",
                    help="a prebuilt entry with its weights, per model slug (no build: a GPU host)")  # fmt: skip
    ap.add_argument("--build-only", action="store_true", help="only build both modules into --out-dir")
    ap.add_argument("--write-gguf", action="store_true", help="only write both random GGUFs (into --work-dir)")
    ap.add_argument("--out-dir", default=".gpu/attention")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    a.argv = list(argv) if argv is not None else sys.argv[1:]
    if a.write_gguf:
        for n in (a.baseline, *a.variants.split(",")):
            print(gguf_path(Path(a.work_dir), n, a.max_seq_len))
        return
    if a.build_only:
        build_only(a)
        return
    res = run(a)
    print(table(res))
    if a.json:
        save_json(a.json, res)


if __name__ == "__main__":
    main()
