#!/usr/bin/env bash
# Batched decode on the GPU host: for the shipped model and random nano-1b, compiled for CUDA on the build machine
# (model.so + meta.json per entry under $ENTRIES/<name>; the weights are repacked here from the GGUF), with TVM's
# runtime only:
#   1. exactness: the greedy tokens (and logits) of 5 sequences of mixed prompt lengths, each decoded alone
#      (decode_b1), equal those of the same sequences decoded together (decode_b8 with padding rows), one of them
#      joining late and one leaving early;
#   2. speed: Engine.decode_batch at concurrency 1, 2, 4, ..., 64 (a greedy step: decode_batch + argmax per
#      sequence), interleaved over $RUNS rounds; aggregate and per-stream decode tokens/s, median with min/max;
#      also the module's own step time (the compiled decode_b{B} called back to back, one device sync).
# JSON: $OUT/cuda_batch.json (committed as docs/runtime/cuda_batch.json). Every entry under $ENTRIES (default
# .gpu/batch) is measured: <model>[_<variant>], model small or nano-1b (the variant names another build of it).
# Build machine first:
#   bash scripts/gpu_runtime_bundle.sh
#   python -m compiler.build --model models/small.gguf --target cuda         → model.so + meta.json to .gpu/batch/small
#   python -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf && \
#     python -m compiler.build --model /tmp/nano-1b.gguf --target cuda        → .gpu/batch/nano-1b
# then carry .gpu/rt, .gpu/batch and .whl (the gguf wheel) and run: bash scripts/gpu_batch.sh
# CPU smoke test of the Python part (CPU entries; nothing is compiled): ENTRIES=DIR NO_GPU=1 bash scripts/gpu_batch.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
ENTRIES=${ENTRIES:-.gpu/batch}
if [ "${NO_GPU:-0}" != 1 ]; then
  source scripts/gpu_env.sh
  ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt"
fi
ls "$ENTRIES"/nano-1b*/model.so >/dev/null 2>&1 && [ ! -f /tmp/nano-1b.gguf ] &&
  python3 -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf > /dev/null
for d in "$ENTRIES"/*/; do  # entries <model>[_<variant>]: the weights are repacked once per model, then linked
  e=$(basename "$d"); m=${e%%_*}; g=models/small.gguf; [ "$m" = nano-1b ] && g=/tmp/nano-1b.gguf
  [ -f "$d/model.so" ] && [ ! -f "$d/params.npz" ] || continue
  src=$(ls "$ENTRIES/$m"*/params.npz 2>/dev/null | head -1)
  if [ -n "$src" ]; then ln -f "$src" "$d/params.npz"
  else python3 -m compiler.build --model $g --target cuda --repack-into "$d" > /dev/null; fi
done
python3 - "$ENTRIES" "$OUT" <<'PY'
import json, os, statistics, sys, time
from pathlib import Path

import numpy as np

from runtime.engine import Engine
from runtime.kv_cache import Sequence

entries, out = Path(sys.argv[1]), Path(sys.argv[2])
CONC = [int(c) for c in os.environ.get("CONCURRENCY", "1,2,4,8,16,32,64").split(",")]
RUNS, STEPS, WARM, PROMPT = (int(os.environ.get(k, d)) for k, d in
                             (("RUNS", 5), ("STEPS", 64), ("WARM", 4), ("PROMPT", 16)))
MODELS = os.environ.get("MODELS", "").split(",") if os.environ.get("MODELS") else \
    sorted(d.name for d in entries.iterdir() if (d / "model.so").exists())
GGUF = {"small": "models/small.gguf", "nano-1b": "/tmp/nano-1b.gguf"}  # by the entry name's model part


def sync(eng):
    if eng.target == "cuda":
        eng.dev.sync()


def greedy(logits):
    return [int(i) for i in np.argmax(logits, axis=-1)]


def prompts(n, length, vocab, seed):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, length)] for _ in range(n)]


def exactness(eng, steps=24):
    """5 sequences (prompts of 5, 16, 23, 40, 9 tokens): alone (decode_b1) vs together (one batch: sequence 4
    joins after 6 steps, sequence 1 leaves after 12); greedy tokens and logits must be identical."""
    rng = np.random.default_rng(7)
    ps = [[int(t) for t in rng.integers(3, eng.vocab, n)] for n in (5, 16, 23, 40, 9)]
    join, leave = {4: 6}, {1: 12}

    def run_alone(p, n):
        s = Sequence()
        lg = eng.prefill(p, s)
        toks, logits = [], []
        for _ in range(n):
            t = int(np.argmax(lg))
            toks.append(t)
            lg = eng.decode_batch([s], [t])[0]
            logits.append(lg)
        eng.reset(s)
        return toks, logits

    n_of = {i: steps - join.get(i, 0) if i not in leave else leave[i] for i in range(len(ps))}
    alone = [run_alone(p, n_of[i]) for i, p in enumerate(ps)]
    seqs = [Sequence() for _ in ps]
    last = {}
    toks = {i: [] for i in range(len(ps))}
    logits = {i: [] for i in range(len(ps))}
    for step in range(steps):
        for i, p in enumerate(ps):
            if join.get(i, 0) == step:
                last[i] = eng.prefill(p, seqs[i])
        live = [i for i in last if len(toks[i]) < n_of[i]]
        if not live:
            break
        tk = [int(np.argmax(last[i])) for i in live]
        lg = eng.decode_batch([seqs[i] for i in live], tk)
        for i, t, row in zip(live, tk, lg):
            toks[i].append(t)
            logits[i].append(row)
            last[i] = row
    for s in seqs:
        eng.reset(s)
    same = all(toks[i] == alone[i][0] for i in range(len(ps)))
    diff = max(float(np.max(np.abs(np.array(logits[i]) - np.array(alone[i][1])))) for i in range(len(ps)))
    return {"sequences": len(ps), "prompt_tokens": [len(p) for p in ps], "steps": n_of, "joins": join,
            "leaves": leave, "greedy_tokens_identical": same, "max_abs_logit_diff": diff}


def measure(eng, c, seed):
    """c sequences of PROMPT tokens; WARM greedy steps, then STEPS timed steps (decode_batch + argmax)."""
    seqs = [Sequence() for _ in range(c)]
    last = [eng.prefill(p, s) for p, s in zip(prompts(c, PROMPT, eng.vocab, seed), seqs)]
    toks = greedy(np.stack(last))
    for _ in range(WARM):
        toks = greedy(eng.decode_batch(seqs, toks))
    sync(eng)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        toks = greedy(eng.decode_batch(seqs, toks))
    dt = time.perf_counter() - t0
    # the module alone: decode_b{B} back to back on fixed inputs (rewrites the same cache slots), one sync
    B = next(b for b in eng.batch_sizes if b >= c)
    pos = np.full(B, -1, np.int32)
    pos[:c] = [s.length for s in seqs]
    table = np.zeros((B, eng.pool.width), np.int32)
    for i, s in enumerate(seqs):
        table[i] = s.table(eng.pool.width)
    args = [eng._in("tokens", toks + [0] * (B - c)), eng._in("pos", pos), eng._in("table", table),
            *eng._out(f"decode_b{B}"), *eng.cache, *eng.params]  # results into the Engine's tensors (a CUDA graph)
    fn = eng._decode[B]
    fn(*args)
    sync(eng)
    t1 = time.perf_counter()
    for _ in range(STEPS):
        fn(*args)
    sync(eng)
    mod = time.perf_counter() - t1
    for s in seqs:
        eng.reset(s)
    return c * STEPS / dt, 1e3 * dt / STEPS, 1e3 * mod / STEPS


def profile(eng, c, seed, steps=3):
    """Where a decode_b{B} step's time goes: every VM call (kernel, captured CUDA graph, builtin) timed between
    device syncs (so each includes its launch and a sync: an upper bound per kernel), summed over ``steps`` steps
    after one untimed step; the top 12 by time per step, and the sum."""
    import collections
    import re

    seqs = [Sequence() for _ in range(c)]
    toks = greedy(np.stack([eng.prefill(p, s) for p, s in zip(prompts(c, PROMPT, eng.vocab, seed), seqs)]))
    toks = greedy(eng.decode_batch(seqs, toks))
    acc, t0 = collections.defaultdict(lambda: [0.0, 0]), [0.0]

    def inst(func, sym, before, ret, *args):
        sync(eng)
        if before:
            t0[0] = time.perf_counter()
        else:
            k = acc[re.sub(r"^vm\.builtin\..*", "vm.builtin.*", sym)]
            k[0] += time.perf_counter() - t0[0]
            k[1] += 1
        return 0

    eng.vm.set_instrument(inst)
    try:
        for _ in range(steps):
            toks = greedy(eng.decode_batch(seqs, toks))
    finally:
        eng.vm.set_instrument(lambda *a: 0)
    for s in seqs:
        eng.reset(s)
    rows = sorted(((k, 1e3 * v[0] / steps, v[1] // steps) for k, v in acc.items()), key=lambda r: -r[1])
    return {"batch": c, "sum_ms_per_step": sum(r[1] for r in rows), "calls_per_step": sum(r[2] for r in rows),
            "top": [{"name": k, "ms_per_step": ms, "calls_per_step": n} for k, ms, n in rows[:12]]}


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


result = {"command": os.environ.get("BATCH_COMMAND", "bash scripts/gpu_batch.sh"),
          "device": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "cpu (smoke test)",
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "method": f"per concurrency c: c fresh sequences, prompts of {PROMPT} random tokens (one prefill chunk), "
                    f"{WARM} warm-up greedy steps, then {STEPS} timed steps of Engine.decode_batch + argmax; "
                    f"{RUNS} rounds, the concurrencies interleaved within each round; module_step_ms: the compiled "
                    "decode_b{B} called back to back on fixed inputs (no sampling, no logits copy), one device sync",
          "models": {}}
for m in MODELS:
    eng = Engine(entries / m, GGUF[m.split("_")[0]], kv_tokens=64 * 256)
    meta = eng.meta
    r = {"entry_key": meta["key"], "batch_sizes": meta["batch_sizes"], "exactness": exactness(eng)}
    print(m, "exactness", r["exactness"], flush=True)
    raw = {c: {"agg": [], "step": [], "mod": []} for c in CONC}
    measure(eng, CONC[-1], 0)  # first calls of every shape (CUDA graph capture, allocations) out of the timings
    for c in CONC[:-1]:
        measure(eng, c, 0)
    for run in range(RUNS):
        for c in CONC:
            agg, step, mod = measure(eng, c, 100 * run + c)
            raw[c]["agg"].append(agg); raw[c]["step"].append(step); raw[c]["mod"].append(mod)
        print(m, "round", run, {c: round(raw[c]["agg"][-1], 1) for c in CONC}, flush=True)
    table = {}
    for c in CONC:
        agg = stats(raw[c]["agg"])
        table[str(c)] = {"aggregate_tok_s": agg, "per_stream_tok_s": stats([a / c for a in raw[c]["agg"]]),
                         "step_ms": stats(raw[c]["step"]), "module_step_ms": stats(raw[c]["mod"])}
    r["concurrency"] = table
    base = table[str(CONC[0])]["aggregate_tok_s"]["median"]
    r["aggregate_vs_c1"] = {c: table[c]["aggregate_tok_s"]["median"] / base for c in table}
    if os.environ.get("PROFILE", "1") == "1":
        r["profile"] = [profile(eng, c, 9) for c in (CONC[0], CONC[-1])]
        for p in r["profile"]:
            print(m, "profile B =", p["batch"], f"{p['sum_ms_per_step']:.2f} ms", p["top"][:4], flush=True)
    result["models"][m] = r
    print(f"{m}: c  aggregate tok/s (min-max)  per-stream  step ms  module ms  ×c1", flush=True)
    for c, row in table.items():
        a = row["aggregate_tok_s"]
        print(f"  {c:>3} {a['median']:9.1f} ({a['min']:.1f}-{a['max']:.1f}) {row['per_stream_tok_s']['median']:8.1f} "
              f"{row['step_ms']['median']:7.2f} {row['module_step_ms']['median']:7.2f} "
              f"{r['aggregate_vs_c1'][c]:5.1f}", flush=True)
    del eng
(out / "cuda_batch.json").write_text(json.dumps(result, indent=1))
print("wrote", out / "cuda_batch.json")
PY
