"""Training-throughput benchmark: tokens/s and MFU of the real training step on random tokens (no data needed).

It runs exactly the step of ``train.train`` (the same objective, Muon + AdamW, gradient clipping, bf16 autocast,
optional ``torch.compile``), times ``--steps`` steps after ``--warmup`` with CUDA events, and reports the median.
Under ``torchrun`` every rank runs its own batch with DDP, and tokens/s counts all ranks.

``--token-keep k < 1`` times the token-filtered step (``train.token_filter``: selection, then the LM head and loss on
the kept tokens only), selection included in the time. There is no data here, so the ``bigram`` score looks up a table
counted on 1 M random tokens: nearly equal scores, but the same lookup cost as a real table of that size (a real one,
counted on up to 32 M tokens, has more pairs: ``searchsorted`` over it costs a little more). MFU counts the head's
FLOPs for the kept share only.

    python -m train.throughput --preset small --batch-size 128 --seq-len 512 --compile --out throughput.json
    python -m train.throughput --preset small --batch-size 128 --seq-len 512 --compile --token-keep 0.5
    torchrun --nproc_per_node 2 -m train.throughput --preset small --batch-size 128 --compile
    python -m train.throughput --summary results/r*_*.json --out summary.json   # rounds of scripts/gpu_throughput.sh
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.transformer import Transformer
from train import token_filter
from train.train import (
    LossModule,
    TrainConfig,
    compile_objective,
    dist_setup,
    flops_per_token,
    make_optimizers,
    set_dense,
)


def measure(cfg: TrainConfig, steps: int, warmup: int, profile: bool = False) -> dict:
    rank, world, device = dist_setup()
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config())
    if not cfg.ternary:
        set_dense(model)
    model.to(device)
    opts = make_optimizers(model, cfg)
    objective: nn.Module = LossModule(model, cfg.entropy_coef)
    if world > 1:
        ids = [device.index]
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids, gradient_as_bucket_view=True)
    step_fn = compile_objective(objective, cfg, world)
    vocab = model.config.vocab_size
    cuda = device.type == "cuda"
    tfilter = None
    if cfg.token_keep < 1:  # the bigram table's "train split": random tokens (see the module docstring)
        random_tokens = np.random.default_rng(cfg.seed).integers(0, vocab, 2**20)
        tfilter = token_filter.from_config(cfg, random_tokens, vocab, rank, device)

    def objective_step(x: torch.Tensor, i: int) -> torch.Tensor:
        x, y = x[:, :-1], x[:, 1:]
        kept = () if tfilter is None else tfilter.select(x, y, i, 0, all_valid=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = step_fn(x, y, *kept)
        return loss

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len + 1), device=device)
        objective_step(x, i).backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    if profile and rank == 0:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=acts) as prof:
            for i in range(3):
                x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len + 1), device=device)
                objective_step(x, i).backward()
                for opt in opts.values():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    tokens = cfg.batch_size * cfg.seq_len * world
    med = statistics.median(times)
    tps = tokens / med
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world_size": world, "preset": cfg.preset, "ternary": cfg.ternary, "compile": cfg.compile,
        "batch_size_per_rank": cfg.batch_size, "seq_len": cfg.seq_len, "params": model.num_params(),
        "median_step_s": med, "min_step_s": min(times), "tokens_per_s": tps,
        "mfu": tps * flops_per_token(model, cfg.seq_len, cfg.token_keep) / (cfg.peak_tflops * 1e12) if cuda else None,
        "peak_tflops_assumed": cfg.peak_tflops, "steps_timed": steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }  # fmt: skip
    if world > 1:
        dist.destroy_process_group()
    return result if rank == 0 else {}


def summarize(paths: list[Path]) -> dict:
    """Medians and ranges over repeated runs (``scripts/gpu_throughput.sh``'s rounds) per (GPUs, batch per GPU), and
    each 2-GPU run's tokens/s over the 1-GPU run of its own round (the file name's ``r<round>_`` prefix)."""
    runs = [(p.name.split("_", 1)[0], json.loads(p.read_text())) for p in paths]
    groups: dict[tuple[int, int], list[tuple[str, dict]]] = {}
    for rnd, r in runs:
        groups.setdefault((r["world_size"], r["batch_size_per_rank"]), []).append((rnd, r))
    one = {rnd: r["tokens_per_s"] for rnd, r in runs if r["world_size"] == 1}
    rows = []
    for (world, batch), rs in sorted(groups.items()):
        tps = [r["tokens_per_s"] for _, r in rs]
        mfu = [r["mfu"] for _, r in rs]
        scale = [r["tokens_per_s"] / one[rnd] for rnd, r in rs if world > 1 and rnd in one]
        rows.append({
            "gpus": world, "batch_per_gpu": batch, "seq_len": rs[0][1]["seq_len"], "runs": len(rs),
            "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)],
            "mfu": statistics.median(mfu), "mfu_range": [min(mfu), max(mfu)],
            "vs_1gpu_same_round": statistics.median(scale) if scale else None,
            "vs_1gpu_range": [min(scale), max(scale)] if scale else None,
            "peak_mem_gib": max(r["peak_mem_gib"] for _, r in rs),
        })  # fmt: skip
    first = runs[0][1]
    return {"preset": first["preset"], "device": first["device"], "params": first["params"],
            "peak_tflops_assumed": first["peak_tflops_assumed"], "rows": rows}  # fmt: skip


def print_summary(s: dict) -> None:
    print(f"{s['preset']} ({s['params'] / 1e6:.1f} M parameters), {s['device']}, MFU against "
          f"{s['peak_tflops_assumed']:.0f} TFLOP/s per GPU; medians [ranges]")  # fmt: skip
    print("| GPUs | batch / GPU | runs | tokens/s | MFU | vs 1 GPU, same round | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in s["rows"]:
        lo, hi = r["tokens_per_s_range"]
        vs = f"{r['vs_1gpu_same_round']:.3f}× [{r['vs_1gpu_range'][0]:.3f}–{r['vs_1gpu_range'][1]:.3f}]" \
            if r["vs_1gpu_same_round"] else "—"  # fmt: skip
        print(f"| {r['gpus']} | {r['batch_per_gpu']} × {r['seq_len']} | {r['runs']} | {r['tokens_per_s'] / 1e3:.1f} k "
              f"[{lo / 1e3:.1f}–{hi / 1e3:.1f}] | {100 * r['mfu']:.1f} % [{100 * r['mfu_range'][0]:.1f}–"
              f"{100 * r['mfu_range'][1]:.1f}] | {vs} | {r['peak_mem_gib']:.1f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dense", action="store_true", help="the dense baseline instead of ternary QAT")
    ap.add_argument("--model", type=json.loads, default={}, help="model config overrides, e.g. '{\"n_streams\": 4}'")
    ap.add_argument("--profile", action="store_true", help="print the top operators of 3 profiled steps")
    ap.add_argument(
        "--ddp-split-graphs",
        action="store_true",
        help="under DDP split the compiled graph at gradient buckets (default: one graph)",
    )
    ap.add_argument("--token-keep", type=float, default=1.0, help="token filtering: fraction of targets kept (1: off)")
    ap.add_argument("--token-score", default="bigram", choices=token_filter.SCORES)
    ap.add_argument("--token-floor", type=float, default=0.25)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary", nargs="+", type=Path, help="summarize these result files instead of measuring")
    args = ap.parse_args(argv)
    if args.summary:
        s = summarize(args.summary)
        print_summary(s)
        if args.out:
            args.out.write_text(json.dumps(s, indent=2) + "\n")
        return
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, compile=args.compile,
                      ternary=not args.dense, model_overrides=args.model,
                      ddp_split_graphs=args.ddp_split_graphs, token_keep=args.token_keep,
                      token_score=args.token_score, token_floor=args.token_floor)  # fmt: skip
    result = measure(cfg, args.steps, args.warmup, args.profile)
    if result:
        result["train_config"] = asdict(cfg)
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
