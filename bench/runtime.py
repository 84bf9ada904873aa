"""Whole-model benchmark: the compiled module vs PyTorch eager (fp32) and onnxruntime on the same GGUF, 1 and 2
threads, with the bandwidth bound measured in the same run.

    python -m bench.runtime --model models/small.gguf --threads 1 2 --prompt-tokens 64 --decode-tokens 64 \\
        --json bench_results/runtime_small.json

Each (implementation, thread count) runs in its own subprocess (so peak memory is its own and thread pools never
fight): prefill tokens/s (one prompt of ``--prompt-tokens`` random ids), time to first token (prefill + first greedy
pick), decode tokens/s (``--decode-tokens`` greedy steps, median of the per-step rate over the run) and peak RSS
(``VmHWM``; it includes the interpreter and the imported libraries: torch is imported by ``tvm_ffi`` too).

Implementations (``--impl``): ``tvm`` (the compiled module of ``compiler.build``), ``torch`` (PyTorch eager fp32 with
its KV cache), ``onnxruntime`` (the ONNX export of :mod:`model.onnx_export`, CPU execution provider; skipped with a
note when onnxruntime is not installed). The export has **no KV cache** (``input_ids → logits`` over the whole
sequence), so its decode step recomputes the whole sequence (prompt + generated tokens): its row is labelled
``onnxrt*`` and its decode rate is not comparable with a KV-cached one.

Bandwidth bound (compiled rows): :func:`decode_bytes` counts the bytes one decode step must read from the compiled
entry's parameter list — every packed ternary matrix in full (2 bits per weight) and its scale, the LM head in full
(float16 when the GGUF stores F16), every norm weight, the mHC coefficients, one embedding row and one row of each
RoPE table. The KV cache read by attention grows with the position and is reported beside it, not in the bound (the
issue's "weight bytes per token"). Streaming read bandwidth is measured in the same run, for each thread count, in its
own subprocess right after the compiled row, with :func:`bench.kernels.roofline_gbs` (``read`` over a ``--roof-mib``
512 MiB array: DRAM, not cache; best of 1..n threads). ``bound tok/s = read GB/s / bytes per token``; each compiled
row shows its decode rate as % of it.
CUDA modules (``--target cuda`` with ``--entry``, on the GPU host: ``scripts/gpu_model.sh``): the bound is the bytes
a step reads, weights **and** the KV cache at the mean decode position, over a 2 GiB device-to-device copy (read +
write) timed in the same run (:func:`bench.cuda_trace.copy_gbs`); each compiled row also carries a ``torch.profiler``
trace of 50 decode steps (:func:`bench.cuda_trace.trace`: kernels, graph and host launches, allocations, GPU-busy
time per step) and the build's census of ``decode_b1`` (``meta.json``).

``--baseline-entry E`` (with ``--entry``, e.g. the same model built from an earlier commit) adds a row ``tvm-base``
that runs entry ``E`` right after the compiled row in every run, under the same conditions; each compiled row then
carries ``decode_vs_baseline`` and ``prefill_vs_baseline`` (medians of the per-run ratios, with their ranges): an A/B
of two builds in one run, interleaved; ``--baseline-src DIR`` runs the baseline's worker from that commit's source
tree (its own runtime for its own module, e.g. when the compiled functions' signatures changed). With
``--chain-burst`` the baseline's chained decode is a row too,
``tvm-base-chain``, and ``tvm-chain`` carries its own A/B against it.

``--runs N`` (default 5) repeats every row N times, interleaved (every implementation, then the roof, once per run);
a row is the run with the median decode rate, with ``runs`` and the ``*_range`` of decode, TTFT and prefill.
Timings on a shared machine are only meaningful when nothing else runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROOF_MIB = 512  # the streaming-read array: far beyond the L3, like the weights of a decode step
IMPLS = ("tvm", "torch", "onnxruntime")


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``). ``ru_maxrss`` would not do: Linux keeps it across ``execve``,
    so a worker started from a large parent reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_bytes(meta: dict, pos: float = 0.0) -> dict:
    """Bytes one decode step reads, by kind, from a cache entry's ``meta.json`` (parameter names, shapes, dtypes).

    Everything is read in full except ``token_embd.weight`` (one row; a tied model without it reads that row from
    its head), the RoPE tables (one row each) and a mixture of experts' stacks (``*_exps.weight``: the
    ``n_experts_used`` of ``n_experts`` a token picks). ``kv_cache`` is what
    attention reads at position ``pos`` (every layer's cache entries of ``0..pos``, ``meta["cache"]``: GQA keys and
    values, or MLA's latent rows; a DeltaNet layer's state, whatever ``pos``); it is not part of ``weights``."""
    out = {"ternary": 0, "lm_head": 0, "embedding_row": 0, "norms": 0, "scales_mhc_rope": 0}
    c = meta["config"]
    for name, shape, dtype in meta["params"]:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if "_exps." in name:  # [E, ...]: the active experts' share
            n = n * c["n_experts_used"] // c["n_experts"]
        if name == "token_embd.weight":
            out["embedding_row"] += n // shape[0]
        elif name.startswith("lm_head"):
            out["lm_head"] += n
        elif name.startswith("rope."):
            out["scales_mhc_rope"] += n // shape[0]
        elif name.endswith("norm.weight"):
            out["norms"] += n
        elif name.endswith(".weight"):
            out["ternary"] += n
        else:
            out["scales_mhc_rope"] += n
    names = {name: (shape, dtype) for name, shape, dtype in meta["params"]}
    if "token_embd.weight" not in names:  # tied: the row is read from the head (compiler.lower.shares_embedding)
        out["embedding_row"] += c["d_model"] * np.dtype(names["lm_head.weight"][1]).itemsize
    out["weights"] = sum(out.values())
    from runtime.kv_cache import cache_layout  # [name, shape, dtype, leading dimension] (or a build's older 3 fields)

    size = {n: int(np.prod(shape)) * np.dtype(dtype).itemsize for n, _, shape, dtype in cache_layout(meta["cache"])}
    per_block = sum(b for n, b in size.items() if not n.startswith("state_"))
    state = sum(b for n, b in size.items() if n.startswith("state_"))  # DeltaNet: one state per sequence
    out["kv_cache"] = int(per_block // int(meta["kv_block"]) * (pos + 1) + state)
    return out


# ---------------------------------------------------------------------------------------------------------------
# workers: one implementation, one thread count, one process
# ---------------------------------------------------------------------------------------------------------------
def _result(impl, threads, prompt_tokens, steps, ttft, **extra) -> dict:
    return {"impl": impl, "threads": threads, "prompt_tokens": prompt_tokens, "decode_tokens": len(steps),
            "ttft_ms": ttft * 1e3, "prefill_tok_s": prompt_tokens / ttft, "decode_tok_s": 1.0 / float(np.median(steps)),
            "decode_ms_median": float(np.median(steps)) * 1e3, "peak_rss_mib": peak_rss_mib(), **extra}  # fmt: skip


WARMUP_TOKENS = 8  # a prefill of this many tokens before the timed one (first-call costs)
# bench.cuda_trace.trace's per-call figures, divided by the burst for a chained decode's per-step ones
PER_CALL = ("wall_us", "busy_us", "kernels", "graph_launches", "host_launches", "allocations", "syncs", "copies")


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """The benchmarks' prompt: ``n`` random ids below ``vocab`` (the same for every implementation)."""
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def timed_generation(prefill, decode, reset, prompt: list[int], decode_tokens: int) -> dict:
    """The measurement every implementation runs: warm up, prefill + first greedy pick (TTFT), then greedy decode
    steps, each timed (``steps``); also the tokens and the prefill's top 5 (ids and logits)."""
    prefill(prompt[:WARMUP_TOKENS])
    reset()
    t0 = time.perf_counter()
    logits = prefill(prompt)
    tok = int(np.argmax(logits))
    ttft = time.perf_counter() - t0
    flat = np.ravel(logits)  # read now: llama.cpp's logits buffer is overwritten by the next call
    top5 = [int(i) for i in np.argsort(flat)[::-1][:5]]
    top5_logits = [float(flat[i]) for i in top5]
    tokens, steps = [tok], []
    for _ in range(decode_tokens):
        t = time.perf_counter()
        tok = int(np.argmax(decode(tok)))
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
    return {"ttft": ttft, "steps": steps, "tokens": tokens, "top5": top5, "top5_logits": top5_logits}


def timed_chain(eng, prompt: list[int], decode_tokens: int, burst: int) -> dict:
    """Greedy decode by ``Engine.chain`` in bursts of ``burst`` steps (as ``Engine.generate_tokens`` runs plain
    greedy generation), after a warm-up burst (a CUDA graph is captured at the first call): each step's time is its
    burst's over its length (``steps``), and the tokens."""
    eng.reset()
    eng.chain(int(np.argmax(eng.prefill(prompt[:WARMUP_TOKENS]))), min(burst, decode_tokens))
    eng.reset()
    tokens = [int(np.argmax(eng.prefill(prompt)))]
    steps = []
    while len(tokens) <= decode_tokens:
        n = min(burst, decode_tokens + 1 - len(tokens))
        t = time.perf_counter()
        tokens += eng.chain(tokens[-1], n)
        steps += [(time.perf_counter() - t) / n] * n
    return {"steps": steps, "tokens": tokens}


def _worker_tvm(model, threads, prompt_tokens, decode_tokens, cache_dir, entry, target, chain_burst=0) -> dict:
    from runtime.engine import Engine, ensure_built

    entry = entry or ensure_built(model, target, cache_dir)
    eng = Engine(entry, None, threads=threads)
    prompt = prompt_ids(eng.vocab, prompt_tokens)
    g = timed_generation(eng.prefill, eng.decode, eng.reset, prompt, decode_tokens)
    steps, ttft, tok = g["steps"], g["ttft"], g["tokens"][-1]
    mean_pos = prompt_tokens + (decode_tokens - 1) / 2
    extra = {}
    if chain_burst and eng.has_chain:  # the same greedy decode, steps queued on the device (a row tvm-chain)
        c = timed_chain(eng, prompt, decode_tokens, chain_burst)
        extra["chain"] = {"decode_tok_s": 1.0 / float(np.median(c["steps"])), "burst": chain_burst,
                          "decode_ms_median": float(np.median(c["steps"])) * 1e3,
                          "same_tokens": c["tokens"] == g["tokens"]}  # fmt: skip
    if eng.target == "cuda":  # where a step's time goes (bench.cuda_trace) and what the build says it launches
        from bench.cuda_trace import trace

        extra["trace"] = trace(lambda: eng.decode(tok), calls=50)
        extra["census"] = (eng.meta.get("census") or {}).get("decode_b1")
        if "chain" in extra:  # a burst at a fixed position, again and again: per step, where the time goes
            burst, at = extra["chain"]["burst"], eng.seq.length

            def chained():
                eng.seq.length = at
                eng.chain(tok, burst)

            t = trace(chained, calls=8, warmup=2)
            top = [k | {"us_per_call": k["us_per_call"] / burst, "launches_per_call": k["launches_per_call"] / burst}
                   for k in t["top"]]  # fmt: skip
            per_step = {k: t[k] / burst for k in PER_CALL if k in t}
            extra["chain"]["trace"] = t | per_step | {"calls": 8 * burst, "top": top}
            extra["chain"]["census"] = (eng.meta.get("census") or {}).get("chain_b1")
        eng.reset()
    return _result("tvm", threads, prompt_tokens, steps, ttft, device="cpu" if eng.target != "cuda" else "cuda",
                   dtype="int8", target=eng.target, entry=str(entry), mean_decode_pos=mean_pos,
                   bytes=decode_bytes(eng.meta, mean_pos), n_layers=eng.n_layers, **extra)  # fmt: skip


def _worker_torch(model, threads, prompt_tokens, decode_tokens, device, dtype) -> dict:
    import torch

    from model.gguf_io import read_gguf
    from model.transformer import Transformer

    torch.set_num_threads(threads)
    g = read_gguf(model)
    dt = getattr(torch, dtype)
    m = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval().to(device=device, dtype=dt)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, g.config.vocab_size, prompt_tokens)]

    def ids(t):
        return torch.tensor(t, device=device)

    with torch.no_grad():
        m(ids([prompt[:8]]), m.new_cache(1))  # warm up
        cache = m.new_cache(1)
        t0 = time.perf_counter()
        tok = int(torch.argmax(m(ids([prompt]), cache)[0, -1]))  # int(): waits for the device
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            tok = int(torch.argmax(m(ids([[tok]]), cache)[0, -1]))
            steps.append(time.perf_counter() - t)
    itemsize = torch.finfo(dt).bits // 8
    weight_bytes = int(sum(p.numel() * itemsize for n, p in m.named_parameters() if "blocks" in n and p.dim() == 2))
    return _result("torch", threads, prompt_tokens, steps, ttft, device=device, dtype=dtype,
                   block_weight_bytes_per_token=weight_bytes)  # fmt: skip


def _worker_onnxruntime(model, threads, prompt_tokens, decode_tokens, onnx_path) -> dict:
    """onnxruntime on the exported graph; no KV cache in the export, so each decode step runs the whole sequence."""
    import onnxruntime as ort

    from model.gguf_io import read_gguf

    vocab = read_gguf(model, check_values=False).config.vocab_size
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, prompt_tokens)]

    def last_logits(seq):
        return sess.run(None, {"input_ids": np.asarray([seq], np.int64)})[0][0, -1]

    last_logits(prompt[:8])  # warm up
    t0 = time.perf_counter()
    seq = [*prompt, int(np.argmax(last_logits(prompt)))]
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(decode_tokens):
        t = time.perf_counter()
        seq.append(int(np.argmax(last_logits(seq))))  # the whole sequence again: the export has no KV cache
        steps.append(time.perf_counter() - t)
    return _result("onnxruntime", threads, prompt_tokens, steps, ttft, device="cpu", dtype="float32",
                   decode_recomputes_sequence=True, onnxruntime=ort.__version__)  # fmt: skip


def _worker_roofline(threads, target, mib: int = ROOF_MIB, roof_dir: str | None = None) -> dict:
    """Read GB/s at ``threads``: over an array of at least twice this machine's last-level cache (so from DRAM), or,
    with ``roof_dir`` (a ``bench.threads export``: no TVM compiler needed), its prebuilt read kernel rotated
    over enough arrays to exceed the cache the same way."""
    if target == "cuda":  # the HBM roof: a device-to-device copy (read + write), as bench.kernels --target cuda
        from bench.cuda_trace import copy_gbs

        return {"impl": "roofline", "threads": threads, "copy_gbs": copy_gbs(), "array_mib": 2048, "target": target}
    from bench.threads import read_roof_gbs
    from targets.cpu import llc_bytes

    if roof_dir:
        gbs, nbytes = read_roof_gbs(roof_dir, threads)
        return {"impl": "roofline", "threads": threads, "read_gbs": gbs, "array_mib": nbytes >> 20, "target": target}
    from bench.kernels import roofline_gbs

    mib = max(mib, 2 * llc_bytes() >> 20)
    gbs = roofline_gbs("read", mib << 20, target, threads)
    return {"impl": "roofline", "threads": threads, "read_gbs": gbs, "array_mib": mib, "target": target}


def _worker_onnx_export(model, onnx_path) -> dict:
    import torch

    from model.gguf_io import read_gguf
    from model.onnx_export import export_onnx
    from model.transformer import Transformer

    g = read_gguf(model)
    with torch.no_grad():
        m = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()
    d = Path(onnx_path).parent
    d.mkdir(parents=True, exist_ok=True)
    export_onnx(m, onnx_path, in_place=True)  # over 2 GB: the weights go to files beside it, in the same folder
    (d / "complete").touch()
    return {"impl": "onnx_export", "path": str(onnx_path), "files": len(list(d.iterdir()))}


def onnx_path_for(model: str, cache_dir) -> Path:
    """Where the bench keeps the ONNX export of ``model``: its own folder, keyed by the GGUF's and the exporter's
    bytes; usable once the folder holds ``complete``."""
    import hashlib

    from compiler import cache

    key = "".join(cache.sha256_file(p) for p in (Path(model), REPO / "model" / "onnx_export.py"))
    d = Path(cache_dir or cache.default_cache_dir()) / "onnx" / hashlib.sha256(key.encode()).hexdigest()[:32]
    return d / "model.onnx"


# ---------------------------------------------------------------------------------------------------------------
# the parent: one subprocess per measurement, then the table
# ---------------------------------------------------------------------------------------------------------------
def _run_worker(args: list[str], threads: int, module: str = "bench.runtime", src: str | None = None) -> dict:
    """Run ``python -m <module> --worker ARGS --threads N`` with TVM's and OpenMP's pools at N threads; its last stdout
    line is the JSON result (``module``: another bench CLI with the same ``--worker`` convention; ``src``: another
    source tree to run it from, first on ``PYTHONPATH``)."""
    cmd = [sys.executable, "-m", module, "--worker", *args, "--threads", str(threads)]
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if src:
        src = str(Path(src).resolve())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, env=env, cwd=src or REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(args[:1])} x{threads} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _add_sample(samples: dict, r: dict, n: int) -> None:
    """One worker's result into ``samples[(impl, threads)]``; its chained decode (same process), if any, as a row of
    its own, ``<impl>-chain`` (``tvm-chain``, ``tvm-base-chain``)."""
    c = r.pop("chain", None)
    samples.setdefault((r["impl"], n), []).append(r)
    if c is not None:
        row = r | {"impl": f"{r['impl']}-chain", "decode_tok_s": c["decode_tok_s"], "chain": c,
                   "decode_ms_median": c["decode_ms_median"]}  # fmt: skip
        row.pop("trace", None)
        samples.setdefault((row["impl"], n), []).append(row)


def baseline_ratios(runs: list[dict], base_runs: list[dict]) -> dict:
    """The A/B of ``--baseline-entry``: run ``i`` of the build over run ``i`` of the baseline (they ran back to
    back), for decode and prefill tokens/s: ``{k}_vs_baseline`` (the median ratio) and ``{k}_vs_baseline_range``."""
    if len(runs) != len(base_runs):
        raise ValueError(f"{len(runs)} runs against {len(base_runs)} baseline runs: the A/B pairs runs")
    out = {}
    for k in ("decode", "prefill"):
        ratios = [x[f"{k}_tok_s"] / y[f"{k}_tok_s"] for x, y in zip(runs, base_runs, strict=True)]
        out[f"{k}_vs_baseline"] = float(np.median(ratios))
        out[f"{k}_vs_baseline_range"] = [min(ratios), max(ratios)]
    return out


def _median_row(runs: list[dict]) -> dict:
    """One row from the runs of one (implementation, thread count): the run with the median decode rate, with the
    number of runs and the range of the decode rate, TTFT and prefill rate over them."""
    runs = sorted(runs, key=lambda r: r["decode_tok_s"])
    row = dict(runs[(len(runs) - 1) // 2])
    row["runs"] = len(runs)
    for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s"):
        v = [r[k] for r in runs]
        row[k] = float(np.median(v))
        row[f"{k}_range"] = [float(min(v)), float(max(v))]
    return row


def run(a) -> dict:
    load0 = os.getloadavg()
    impls = list(a.impl)
    notes = []
    if "onnxruntime" in impls and importlib.util.find_spec("onnxruntime") is None:
        impls.remove("onnxruntime")
        notes.append("onnxruntime: not installed (pip install onnxruntime), skipped")
    target = a.target
    if "tvm" in impls:
        from runtime.engine import ensure_built
        from targets import resolve

        target = resolve(a.target) if not a.entry else json.loads((Path(a.entry) / "meta.json").read_text())["target"]
        if not a.entry:
            ensure_built(a.model, target, a.cache_dir)  # compile once, outside the timed workers
    onnx = None
    if "onnxruntime" in impls:
        onnx = onnx_path_for(a.model, a.cache_dir)
        if not (onnx.parent / "complete").exists():
            print(f"exporting ONNX to {onnx} ...", file=sys.stderr)
            _run_worker(["onnx_export", "--model", a.model, "--onnx", str(onnx)], 1)
    common = ["--model", str(Path(a.model).resolve()), "--prompt-tokens", str(a.prompt_tokens),
              "--decode-tokens", str(a.decode_tokens), "--chain-burst", str(a.chain_burst)]  # fmt: skip
    samples: dict[tuple, list] = {}
    roof_runs: dict[int, list] = {}
    roof = "tvm" in impls
    for _ in range(a.runs):  # interleaved: every implementation (and the roof) once per run
        for impl in impls:
            for n in a.threads:
                extra = {"tvm": ["--target", target] + (["--entry", a.entry] if a.entry else []),
                         "torch": ["--torch-device", a.torch_device, "--torch-dtype", a.torch_dtype],
                         "onnxruntime": ["--onnx", str(onnx)]}[impl]  # fmt: skip
                if a.cache_dir:
                    extra += ["--cache-dir", a.cache_dir]
                r = _run_worker([impl, *common, *extra], n)
                _add_sample(samples, r, n)
                if impl == "tvm" and a.baseline_entry:  # the A/B: the baseline build right after, same conditions
                    extra = ["--target", target, "--entry", str(Path(a.baseline_entry).resolve())]
                    r = _run_worker(["tvm", *common, *extra], n, src=a.baseline_src)
                    r |= {"impl": "tvm-base", "entry": a.baseline_entry}
                    _add_sample(samples, r, n)
                if impl == "tvm" and roof:  # right after the compiled row: the bound under the same conditions
                    roof_args = ["--roof-dir", a.roof_dir] if a.roof_dir else []
                    r = _run_worker(["roofline", "--target", target, "--roof-mib", str(a.roof_mib), *roof_args], n)
                    roof_runs.setdefault(n, []).append(r.get("copy_gbs", r.get("read_gbs")))
    rows = [_median_row(runs) for runs in samples.values()]
    for r in rows:  # each build's A/B against the baseline build, step by step and chained
        base = {"tvm": "tvm-base", "tvm-chain": "tvm-base-chain"}.get(r["impl"])
        if base and (base, r["threads"]) in samples:
            r |= baseline_ratios(samples[(r["impl"], r["threads"])], samples[(base, r["threads"])])
    for r in rows:  # the chained decode over the step-by-step one of the same process, run by run
        if r["impl"] in ("tvm-chain", "tvm-base-chain"):
            stepwise = r["impl"].removesuffix("-chain")
            pairs = zip(samples[(r["impl"], r["threads"])], samples[(stepwise, r["threads"])], strict=True)
            ratios = [c["decode_tok_s"] / t["decode_tok_s"] for c, t in pairs]
            r["decode_vs_stepwise"] = float(np.median(ratios))
            r["decode_vs_stepwise_range"] = [min(ratios), max(ratios)]
            r["same_tokens_all_runs"] = all(c["chain"]["same_tokens"] for c in samples[(r["impl"], r["threads"])])
    roofs = {n: float(np.median(v)) for n, v in roof_runs.items()}
    base = {r["threads"]: r for r in rows if r["impl"] == "torch"}
    for r in rows:
        b = base.get(r["threads"])
        r["decode_vs_torch"] = r["decode_tok_s"] / b["decode_tok_s"] if b else float("nan")
        if r["impl"] in ("tvm", "tvm-base", "tvm-chain", "tvm-base-chain") and r["threads"] in roofs:
            gbs = roofs[r["threads"]]
            r["read_gbs"] = gbs
            per_token = r["bytes"]["weights"] + (r["bytes"]["kv_cache"] if target == "cuda" else 0)
            r["bound_tok_s"] = gbs * 1e9 / per_token
            r["pct_of_bound"] = 100.0 * r["decode_tok_s"] / r["bound_tok_s"]
            r["decode_gbs"] = r["decode_tok_s"] * per_token / 1e9
    return {"model": a.model, "target": target, "rows": rows, "read_gbs": roofs, "roof_mib": a.roof_mib, "runs": a.runs,
            "notes": notes, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


def table(res: dict) -> str:
    lines = [f"medians of {res.get('runs', 1)} interleaved runs (decode range in brackets)",
             f"{'impl':14s} {'thr':>3s} {'prefill tok/s':>13s} {'TTFT ms':>8s} {'decode tok/s':>12s} {'range':>17s} "
             f"{'vs torch':>8s} {'peak MiB':>8s} {'% bound':>7s}"]  # fmt: skip
    for r in res["rows"]:
        name = {"onnxruntime": "onnxrt*"}.get(r["impl"], r["impl"])
        pct = f"{r['pct_of_bound']:7.1f}" if "pct_of_bound" in r else f"{'-':>7s}"
        lo, hi = r.get("decode_tok_s_range", [r["decode_tok_s"]] * 2)
        lines.append(f"{name:14s} {r['threads']:3d} {r['prefill_tok_s']:13.1f} {r['ttft_ms']:8.1f} "
                     f"{r['decode_tok_s']:12.2f} {f'[{lo:.1f}, {hi:.1f}]':>17s} {r['decode_vs_torch']:8.2f} "
                     f"{r['peak_rss_mib']:8.0f} {pct}")  # fmt: skip
    if any(r["impl"] == "onnxruntime" for r in res["rows"]):
        lines.append("onnxrt*: the ONNX export has no KV cache; each decode step recomputes the whole sequence")
    for r in res["rows"]:
        if "decode_vs_stepwise" in r:
            lo, hi = r["decode_vs_stepwise_range"]
            lines.append(f"{r['impl']}, {r['threads']} thread(s): chained decode (bursts of {r['chain']['burst']}) "
                         f"{r['decode_vs_stepwise']:.3f}x the step-by-step decode of the same process [{lo:.3f}, "
                         f"{hi:.3f}]; tokens identical in every run: {r['same_tokens_all_runs']}")  # fmt: skip
        if "decode_vs_baseline" in r:
            lo, hi = r["decode_vs_baseline_range"]
            plo, phi = r["prefill_vs_baseline_range"]
            lines.append(f"{r['impl']}, {r['threads']} thread(s): decode {r['decode_vs_baseline']:.3f}x the "
                         f"baseline build [{lo:.3f}, {hi:.3f}], prefill {r['prefill_vs_baseline']:.3f}x "
                         f"[{plo:.3f}, {phi:.3f}] (per-run ratios, back to back)")  # fmt: skip
    tvm = [r for r in res["rows"] if r["impl"] == "tvm"]
    cuda = res["target"] == "cuda"
    if tvm and res["read_gbs"]:
        b = tvm[0]["bytes"]
        mb = {k: v / 1e6 for k, v in b.items()}
        kv = "in the bound" if cuda else "not in the bound"
        lines.append(f"decode reads {mb['weights']:.2f} MB/token: ternary {mb['ternary']:.2f} + LM head "
                     f"{mb['lm_head']:.2f} + norms {mb['norms']:.3f} + scales/mHC/RoPE rows {mb['scales_mhc_rope']:.3f}"
                     f" + embedding row {mb['embedding_row']:.4f}; KV cache at the mean decode position "
                     f"{tvm[0]['mean_decode_pos']:.0f}: {mb['kv_cache']:.2f} MB ({kv})")  # fmt: skip
        roof = "device copy, read + write" if cuda else f"{res['roof_mib']} MiB stream"
        for r in [r for r in res["rows"] if r["impl"] in ("tvm", "tvm-chain")]:
            lines.append(f"  {r['impl']}, {r['threads']} thread(s): {r['read_gbs']:.1f} GB/s ({roof}) -> bound "
                         f"{r['bound_tok_s']:.1f} tok/s; compiled decode {r['decode_tok_s']:.1f} tok/s = "
                         f"{r['pct_of_bound']:.1f} % ({r['decode_gbs']:.1f} GB/s)")  # fmt: skip
    for r in [r for r in res["rows"] if r["impl"].startswith("tvm")]:
        t, c = (
            (r["chain"].get("trace"), r["chain"].get("census")) if "chain" in r else (r.get("trace"), r.get("census"))
        )
        if t:
            lines.append(f"  {r['impl']} per decode step (profiler, {t['calls']} steps): {t['wall_us']:.0f} us wall, "
                         f"GPU busy "
                         f"{t['busy_us']:.0f} us ({100 * t['busy_fraction']:.0f} %), {t['kernels']:.0f} kernels, "
                         f"{t['graph_launches']:.0f} graph launches, {t['host_launches']:.0f} host kernel launches, "
                         f"{t['allocations']:.0f} allocations, {t['syncs']:.0f} syncs, "
                         f"{t['copies']:.0f} copies")  # fmt: skip
        if c:
            fn = "chain_b1" if r["impl"].endswith("-chain") else "decode_b1"
            lines.append(f"  compiled {fn}: {c['graphs']} graph, {c['kernels_in_graphs']} kernels in graphs "
                         f"({c['kernels_in_graphs'] / r['n_layers']:.1f} per layer), {c['kernels_outside']} outside, "
                         f"{c['allocations']} allocations per call")  # fmt: skip
    lines += res["notes"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "small.gguf"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="runs of every row, interleaved; the table gives medians")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--target", default="auto", help="compiled module's target (auto | avx512 | avx2 | cuda)")
    ap.add_argument("--entry", default=None, help="a prebuilt compiler.build cache entry to run (no build)")
    ap.add_argument(
        "--baseline-entry",
        default=None,
        help="with --entry: another build of the same model, run right after it in every run (an A/B)",
    )
    ap.add_argument("--baseline-src", default=None, help="source tree that runs --baseline-entry (default: this one)")
    ap.add_argument("--torch-device", default="cpu", help="device of the PyTorch reference (cpu | cuda)")
    ap.add_argument("--torch-dtype", default="float32", help="dtype of the PyTorch reference (float32 | bfloat16)")
    ap.add_argument("--roof-mib", type=int, default=ROOF_MIB, help="size of the streaming-read array (MiB)")
    ap.add_argument(
        "--roof-dir",
        default=None,
        help="the read roof from a `bench.threads export` folder (for a machine with TVM's runtime only)",
    )
    ap.add_argument(
        "--chain-burst",
        type=int,
        default=0,
        help="also time greedy decode as chains of this many steps queued on the device (Engine.chain): a row "
        "tvm-chain from the same process as the tvm row (0: off)",
    )
    ap.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        n = a.threads[0]
        p, d = a.prompt_tokens, a.decode_tokens
        r = {
            "tvm": lambda: _worker_tvm(a.model, n, p, d, a.cache_dir, a.entry, a.target, a.chain_burst),
            "torch": lambda: _worker_torch(a.model, n, p, d, a.torch_device, a.torch_dtype),
            "onnxruntime": lambda: _worker_onnxruntime(a.model, n, p, d, a.onnx),
            "roofline": lambda: _worker_roofline(n, a.target, a.roof_mib, a.roof_dir),
            "onnx_export": lambda: _worker_onnx_export(a.model, a.onnx),
        }[a.worker]()
        print(json.dumps(r))
        return
    if a.baseline_entry and not (a.entry and "tvm" in a.impl):
        ap.error("--baseline-entry needs --entry and --impl tvm (it is the A/B of two builds)")
    res = run(a)
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
