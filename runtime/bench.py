"""Whole-model benchmark: the compiled module vs PyTorch eager (fp32) on the same GGUF, 1 and 2 threads.

    python -m runtime.bench --model models/small.gguf --threads 1 2 --prompt-tokens 64 --decode-tokens 64 \\
        --json bench_results/runtime_small.json

Each (implementation, thread count) runs in its own subprocess (so peak memory is its own and thread pools never
fight): prefill tokens/s (one prompt of ``--prompt-tokens`` random ids), time to first token (prefill + first greedy
pick), decode tokens/s (``--decode-tokens`` greedy steps, median of the per-step rate over the run) and peak RSS
(``VmHWM``; it includes the interpreter and the imported libraries: torch is imported by ``tvm_ffi`` too).
Also printed: the bytes of weights one decode step reads, and the decode rate they imply as bytes/s. Timings on a
shared machine are only meaningful when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``). ``ru_maxrss`` would not do: Linux keeps it across ``execve``,
    so a worker started from a large parent reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(
    impl: str,
    model: str,
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    cache_dir,
    device: str = "cpu",
    dtype: str = "float32",
    entry: str | None = None,
    target: str = "auto",
) -> dict:
    rng = np.random.default_rng(0)
    if impl == "tvm":
        from runtime.engine import Engine, ensure_built

        entry = entry or ensure_built(model, target, cache_dir)
        eng = Engine(entry, None, threads=threads)
        vocab = eng.vocab
        prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]
        eng.prefill(prompt[:8])  # warm up
        eng.reset()
        t0 = time.perf_counter()
        logits = eng.prefill(prompt)
        tok = int(np.argmax(logits))
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            tok = int(np.argmax(eng.decode(tok)))
            steps.append(time.perf_counter() - t)
        weight_bytes = int(sum(p.numpy().nbytes for (n, _, dt), p in zip(eng.meta["params"], eng.params, strict=True)
                               if n.endswith(".weight") and dt in ("uint8", "int32")))  # fmt: skip
    else:
        import torch

        from model.gguf_io import read_gguf
        from model.transformer import Transformer

        torch.set_num_threads(threads)
        g = read_gguf(model)
        dt = getattr(torch, dtype)
        m = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval().to(device=device, dtype=dt)
        prompt = [int(t) for t in rng.integers(0, g.config.vocab_size, prompt_tokens)]

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
    return {
        "impl": impl, "threads": threads, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        "ttft_ms": ttft * 1e3, "prefill_tok_s": prompt_tokens / ttft, "decode_tok_s": 1.0 / float(np.median(steps)),
        "decode_ms_median": float(np.median(steps)) * 1e3, "peak_rss_mib": peak_rss_mib(),
        "block_weight_bytes_per_token": weight_bytes, "device": device, "dtype": dtype if impl == "torch" else "int8",
    }  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "small.gguf"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--impl", nargs="+", default=["tvm", "torch"], choices=["tvm", "torch"])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--target", default="auto", help="compiled module's target (auto | avx512 | avx2 | cuda)")
    ap.add_argument("--entry", default=None, help="a prebuilt compiler.build cache entry to run (no build)")
    ap.add_argument("--torch-device", default="cpu", help="device of the PyTorch reference (cpu | cuda)")
    ap.add_argument("--torch-dtype", default="float32", help="dtype of the PyTorch reference (float32 | bfloat16)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        r = _worker(
            a.worker,
            a.model,
            a.threads[0],
            a.prompt_tokens,
            a.decode_tokens,
            a.cache_dir,
            a.torch_device,
            a.torch_dtype,
            a.entry,
            a.target,
        )
        print(json.dumps(r))
        return
    if "tvm" in a.impl and not a.entry:
        from runtime.engine import ensure_built

        ensure_built(a.model, a.target, a.cache_dir)  # compile once, outside the timed workers
    rows = []
    for impl in a.impl:
        for n in a.threads:
            cmd = [sys.executable, "-m", "runtime.bench", "--worker", impl, "--model", a.model, "--threads", str(n),
                   "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens),
                   "--torch-device", a.torch_device, "--torch-dtype", a.torch_dtype, "--target", a.target]  # fmt: skip
            if a.entry:
                cmd += ["--entry", a.entry]
            if a.cache_dir:
                cmd += ["--cache-dir", a.cache_dir]
            env = dict(os.environ, TVM_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n))
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{impl} x{n} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["threads"]: r for r in rows if r["impl"] == "torch"}
    print(f"{'impl':6s} {'thr':>3s} {'prefill tok/s':>13s} {'TTFT ms':>8s} {'decode tok/s':>12s} {'vs torch':>8s} "
          f"{'peak MiB':>8s}")  # fmt: skip
    for r in rows:
        ratio = r["decode_tok_s"] / base[r["threads"]]["decode_tok_s"] if r["threads"] in base else float("nan")
        r["decode_vs_torch"] = ratio
        print(f"{r['impl']:6s} {r['threads']:3d} {r['prefill_tok_s']:13.1f} {r['ttft_ms']:8.1f} "
              f"{r['decode_tok_s']:12.1f} {ratio:8.2f} {r['peak_rss_mib']:8.0f}")  # fmt: skip
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": a.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
