"""Batched decode in process: aggregate and per-stream decode tokens/s and time between tokens at each concurrency.

    python -m bench.batch --model models/small.gguf --model /tmp/nano-1b.gguf --concurrency 1,2,4,8,16 \\
        --threads 1 2 --tokens 64 --repeats 5 --json docs/runtime/batch_cpu.json

For each (model, thread count), in its own subprocess: ``c`` requests of ``--prompt-tokens`` tokens each (different
prompts) run through :class:`runtime.batch.Batcher` (greedy, ``ignore_eos``: every request generates ``--tokens``
tokens once every request is decoding; the first ones to start generate more, so all end together) until all end.
The figures come from the **steady** steps, those that decode all ``c`` sequences and prefill
nothing: aggregate tokens/s = ``c`` × steps / their time; per-stream = aggregate / ``c``; time between tokens (TBT) =
a step's time (every stream gets one token per step), p50 and p99 over the run's steady steps; time to first token
(TTFT) = admission to first token, median over the requests (they queue behind one another's prefill chunks). The
levels are interleaved: each of ``--repeats`` rounds runs every concurrency once, in a rotated order, and the
``×c1`` ratio is taken within a round; the table shows the median of the rounds and their range.

Timings on a shared machine are only meaningful when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.machine import REPO, git_commit, machine, save_json

PROMPT = '''import os
import sys


def read_config(path):
    """Read a key = value file into a dict, skipping comments and blank lines."""
    out = {}
    with open(path) as f:
        for line in f:
'''


@dataclass
class BatchBenchConfig:
    models: list[str] = field(default_factory=lambda: [str(REPO / "models" / "small.gguf")])
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    threads: list[int] = field(default_factory=lambda: [1, 2])
    tokens: int = 64
    prompt_tokens: int = 32
    repeats: int = 5
    target: str = "auto"
    cache_dir: str | None = None


def percentile(x, q: float) -> float:
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else float("nan")


def one_level(eng, c: int, cfg: BatchBenchConfig, prompts: list[list[int]]) -> dict:
    """Run ``c`` requests to their end; the steady-state figures of that run."""
    from model.sampling import SamplingParams
    from runtime.batch import Batcher, Request

    # request i starts decoding after the prefill chunks of requests 0..i; it generates that many chunks' tokens
    # fewer than request 0 does, so all c end together after `tokens` steps that decode every one of them
    k = -(-cfg.prompt_tokens // eng.chunk)
    reqs = [Request(None, SamplingParams(max_new_tokens=cfg.tokens + (c - 1 - i) * k, ignore_eos=True),
                    prompt_ids=prompts[i % len(prompts)]) for i in range(c)]  # fmt: skip
    b = Batcher(eng, max_batch=c)
    for r in reqs:
        if not b.admit(r):
            raise RuntimeError(f"concurrency {c}: the KV cache cannot hold every request (raise --kv-tokens)")
    steady = []
    while b.running:
        s = b.step()
        if s.batch == c and not s.prefill_tokens:
            steady.append(s.seconds)
    if not steady:
        raise RuntimeError(f"concurrency {c}: no steady step (raise --tokens)")
    agg = c * len(steady) / sum(steady)
    return {"aggregate_tok_s": agg, "per_stream_tok_s": agg / c, "tbt_p50_ms": percentile(steady, 50) * 1e3,
            "tbt_p99_ms": percentile(steady, 99) * 1e3, "steady_steps": len(steady),
            "ttft_p50_ms": percentile([r.result.prefill_s for r in reqs], 50) * 1e3}  # fmt: skip


def worker(model: str, threads: int, cfg: BatchBenchConfig) -> dict:
    from runtime.engine import Engine, ensure_built

    entry = ensure_built(model, cfg.target, cfg.cache_dir, cores=threads)
    ctx = json.loads((entry / "meta.json").read_text())["config"]["max_seq_len"]
    top = max(cfg.concurrency)
    longest = cfg.prompt_tokens + cfg.tokens + (top - 1) * -(-cfg.prompt_tokens // 8) + 16  # see one_level
    eng = Engine(entry, model, threads, kv_tokens=max(ctx, top * longest), max_seqs=top + 1)  # DeltaNet: states
    base = eng.tokenize(PROMPT)
    prompts = [(base[i:] + base[:i])[: cfg.prompt_tokens] for i in range(top)]  # distinct prompts, same length
    one_level(eng, min(cfg.concurrency), cfg, prompts)  # warm-up
    rounds = []
    for r in range(cfg.repeats):
        order = cfg.concurrency[r % len(cfg.concurrency) :] + cfg.concurrency[: r % len(cfg.concurrency)]
        rounds.append({c: one_level(eng, c, cfg, prompts) for c in order})
    return {
        "model": model,
        "threads": threads,
        "target": eng.target,
        "weights": eng.meta.get("weights", "tile8"),
        "batch_sizes": list(eng.batch_sizes),
        "rounds": [{str(c): v for c, v in rd.items()} for rd in rounds],
    }


def summarize(res: dict, concurrency: list[int]) -> list[dict]:
    rows, c1 = [], min(concurrency)
    for c in concurrency:
        runs = [rd[str(c)] for rd in res["rounds"]]
        row = {"model": Path(res["model"]).stem, "threads": res["threads"], "concurrency": c}
        for k in ("aggregate_tok_s", "per_stream_tok_s", "tbt_p50_ms", "tbt_p99_ms", "ttft_p50_ms"):
            v = [x[k] for x in runs]
            row[k] = {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
        ratio = [rd[str(c)]["aggregate_tok_s"] / rd[str(c1)]["aggregate_tok_s"] for rd in res["rounds"]]
        tbt = [rd[str(c)]["tbt_p99_ms"] / rd[str(c1)]["tbt_p50_ms"] for rd in res["rounds"]]
        row["x_c1"] = {"median": float(np.median(ratio)), "min": float(np.min(ratio)), "max": float(np.max(ratio))}
        row["tbt_p99_over_c1_p50"] = float(np.median(tbt))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':12s} {'thr':>3s} {'conc':>4s} {'aggregate tok/s':>22s} {'×c1':>5s} {'per-stream':>10s} "
            f"{'TBT p50':>8s} {'TBT p99':>8s} {'p99/c1':>6s} {'TTFT p50':>9s}")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in rows:
        a = r["aggregate_tok_s"]
        out.append(f"{r['model'][:12]:12s} {r['threads']:3d} {r['concurrency']:4d} "
                   f"{a['median']:8.1f} [{a['min']:5.0f}–{a['max']:5.0f}] {r['x_c1']['median']:5.2f} "
                   f"{r['per_stream_tok_s']['median']:10.1f} {r['tbt_p50_ms']['median']:6.2f}ms "
                   f"{r['tbt_p99_ms']['median']:6.2f}ms {r['tbt_p99_over_c1_p50']:6.2f} "
                   f"{r['ttft_p50_ms']['median']:7.1f}ms")  # fmt: skip
    return "\n".join(out)


def run(cfg: BatchBenchConfig, argv: list[str]) -> dict:
    results, rows = [], []
    for model in cfg.models:
        for t in cfg.threads:
            cmd = [sys.executable, "-m", "bench.batch", "--worker", json.dumps([model, t, asdict(cfg)])]
            env = dict(os.environ, TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
            print(f"== {Path(model).stem}, {t} thread(s)", flush=True)
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{model} x{t} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            rows += summarize(res, cfg.concurrency)
            print(table(summarize(res, cfg.concurrency)), flush=True)
    return {"command": " ".join(["python -m bench.batch", *argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(), "git": git_commit(), "config": asdict(cfg), "rows": rows, "raw": results}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="a GGUF (repeat for several; default: the shipped model)")
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated request counts")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=64, help="tokens each request generates")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        model, threads, c = json.loads(a.worker)
        print(json.dumps(worker(model, threads, BatchBenchConfig(**c))))
        return
    try:
        conc = sorted({int(x) for x in a.concurrency.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"error: --concurrency {a.concurrency!r}: expected comma-separated integers") from None
    if not conc or conc[0] < 1 or a.tokens < 4 or a.prompt_tokens < 1 or a.repeats < 1:
        raise SystemExit("error: --concurrency ≥ 1, --tokens ≥ 4, --prompt-tokens ≥ 1 and --repeats ≥ 1")
    cfg = BatchBenchConfig(a.model or BatchBenchConfig().models, conc, a.threads, a.tokens, a.prompt_tokens,
                           a.repeats, a.target, a.cache_dir)  # fmt: skip
    res = run(cfg, argv)
    if a.json:
        save_json(a.json, res)


if __name__ == "__main__":
    main()
