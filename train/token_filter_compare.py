"""Measure token filtering (``train.token_filter``): held-out loss over all tokens at equal steps, and step time.

Variants (:data:`VARIANTS`): ``off`` (every target through the LM head and loss, the default), ``uniform-0.5`` (half
the targets, all alike), ``bigram-0.5`` and ``bigram-0.25`` (a half / a quarter, kept in proportion to their bigram
surprisal with the default floor). Each trains the same preset with ``train.train`` for the same steps, once per seed;
a seed fixes the initial weights and the batches (``train.train.Batches``), so the variants of one seed see identical
data and the differences are paired. Reported per variant: the final held-out loss (next-token CE in nats over *every*
token of the val split's first ``eval_tokens``; the filter never touches evaluation), its median and range, the median
and range of the paired difference to ``off``, the step at which ``off`` (same seed, val loss every ``eval_every``
steps, linear in between) came down to the variant's final loss, and times: the median wall time of a whole step in
the runs (they go ``--workers`` at a time, so they share the CPU), and, measured apart in one process on the same
batches with the variants taking turns, the selection (``select_ms``) and the objective's forward + backward
(``objective_ms``), medians of ``--time-reps``.

``flop_share`` is the arithmetic bound on what filtering can save: the LM head's share ``6·V·d / FLOPs per token``
(``train.train.flops_per_token``) of a training step's FLOPs for the measured model and for larger ones; keeping a
fraction ``k`` saves at most ``(1 − k)`` of that share (the logits' memory traffic aside).

Data: ``--data`` token shards, or (by default) shards built under ``<out>/data`` from packages of this interpreter's
standard library with a BPE of the preset's vocabulary (``train.optim_compare.build_data``; no downloads).

    OMP_NUM_THREADS=1 python -m train.token_filter_compare --out scratch/token_filter --report docs/train/token_filter
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from model.config import get_config
from model.transformer import Transformer
from targets.cpu import cpu_name
from train import token_filter
from train.cli import parse_config
from train.optim_compare import ROOTS, build_data
from train.shards import open_split
from train.train import Batches, LossModule, TrainConfig, flops_per_token, train

VARIANTS = {
    "off": {"token_keep": 1.0},
    "uniform-0.5": {"token_keep": 0.5, "token_score": "uniform"},
    "bigram-0.5": {"token_keep": 0.5, "token_score": "bigram"},
    "bigram-0.25": {"token_keep": 0.25, "token_score": "bigram"},
}
# (label, preset, overrides, seq_len) of the models whose LM-head FLOP share is reported
FLOP_MODELS = (("small (d 512, 8 layers, vocab 8192)", "small", {}, 512),
               ("d 768, 12 layers, vocab 8192", "nano-125m", {"vocab_size": 8192}, 512),
               ("nano-125m (d 768, 12 layers, vocab 32000)", "nano-125m", {}, 512))  # fmt: skip


@dataclass(frozen=True)
class CompareConfig:
    out: str = "runs/token_filter_compare"
    report: str = ""  # also write compare.json and compare.md here (e.g. docs/train/token_filter)
    data: str = ""  # token shards; "" builds them under <out>/data from train.optim_compare.ROOTS
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    preset: str = "tiny"
    steps: int = 40
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 4
    lr_matrix: float = 0.02
    lr_embed: float = 3e-3
    token_floor: float = 0.25
    eval_tokens: int = 32768
    eval_every: int = 10  # the val loss curve: where off reaches each variant's final loss (off_steps_to_match)
    holdout_file_frac: float = 0.1
    workers: int = 2  # training runs at a time (processes)
    threads: int = 1  # torch threads per process
    time_reps: int = 20  # timed selections + forward/backward passes per variant (after one warm-up)

    def problems(self) -> list[str]:
        return [f"--{n.replace('_', '-')} must be ≥ 1" for n in ("workers", "threads", "time_reps")
                if getattr(self, n) < 1]  # fmt: skip


def _train_cfg(cfg: CompareConfig, shards: Path, variant: str, seed: int) -> TrainConfig:
    return TrainConfig(preset=cfg.preset, data=str(shards), out=str(Path(cfg.out) / f"{variant}-s{seed}"),
                       steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, warmup_steps=cfg.warmup_steps,
                       lr_matrix=cfg.lr_matrix, lr_embed=cfg.lr_embed, seed=seed, log_every=1,
                       eval_every=cfg.eval_every, eval_tokens=cfg.eval_tokens, ckpt_every=cfg.steps,
                       token_floor=cfg.token_floor, **VARIANTS[variant])  # fmt: skip


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_one(cfg: CompareConfig, shards: Path, variant: str, seed: int) -> dict:
    """One training run (reused when ``<out>/<variant>-s<seed>`` already finished): final val loss, step times."""
    tcfg = _train_cfg(cfg, shards, variant, seed)
    out = Path(tcfg.out)
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    reused = bool(rows and rows[-1]["step"] == cfg.steps and "val_loss" in rows[-1])
    t0 = time.perf_counter()
    if not reused:
        shutil.rmtree(out, ignore_errors=True)
        train(tcfg, progress=False)
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    tokens = cfg.batch_size * cfg.seq_len
    # a row per step (its tokens/s covers the step alone, not the logging or evaluation); the first holds start-up
    step_s = [tokens / r["tokens_per_s"] for r in rows[1:]]
    last = rows[-1]
    return {"variant": variant, "seed": seed, "val_loss": last["val_loss"], "train_ce": last["ce"],
            "val_curve": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
            "kept_frac": last.get("kept_frac", 1.0), "step_s_median": statistics.median(step_s),
            "seconds": None if reused else round(time.perf_counter() - t0, 1)}  # fmt: skip


def steps_to_reach(curve: list[list[float]], loss: float) -> float | None:
    """The step at which a val curve ``[[step, loss], ...]`` first comes down to ``loss`` (linear between its points);
    ``None`` when it never does; the first point's step when that is already at or below ``loss`` (an upper bound:
    there is no point before it)."""
    if curve[0][1] <= loss:
        return float(curve[0][0])
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= loss:
            return s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)
    return None


def time_objectives(cfg: CompareConfig, shards: Path) -> dict[str, dict]:
    """Milliseconds of the selection and of the objective's forward + backward, per variant, on seed 0's batches: the
    variants take turns within each repetition (so a change in the machine's load hits them alike); medians over
    ``time_reps`` repetitions after a warm-up."""
    train_tokens = open_split(shards, "train")
    batches = Batches(train_tokens, cfg.seq_len, cfg.batch_size, 0, 0, torch.device("cpu"))
    setups = {}
    for variant in cfg.variants:
        tcfg = _train_cfg(cfg, shards, variant, 0)
        torch.manual_seed(0)
        model = Transformer(tcfg.model_config())
        tfilter = token_filter.from_config(tcfg, train_tokens, model.config.vocab_size, 0, torch.device("cpu"))
        setups[variant] = (model, LossModule(model, 0.0), tfilter)
    times: dict[str, dict[str, list[float]]] = {v: {"select": [], "objective": []} for v in cfg.variants}
    for rep in range(cfg.time_reps + 1):
        x, y = batches.get(rep)
        for variant, (model, objective, tfilter) in setups.items():
            t0 = time.perf_counter()
            kept = () if tfilter is None else tfilter.select(x, y, rep, 0, all_valid=True)
            t1 = time.perf_counter()
            loss, _ = objective(x, y, *kept)
            loss.backward()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if rep:
                times[variant]["select"].append(t1 - t0)
                times[variant]["objective"].append(t2 - t1)
    return {v: {"select_ms_median": 1e3 * statistics.median(t["select"]),
                "objective_ms_median": 1e3 * statistics.median(t["objective"]),
                "objective_ms_min": 1e3 * min(t["objective"])} for v, t in times.items()}  # fmt: skip


def flop_share(cfg: CompareConfig) -> list[dict]:
    """The LM head's share of the training FLOPs per token (built on the meta device: no memory, no time)."""
    rows = []
    models = ((f"{cfg.preset} (measured here)", cfg.preset, {}, cfg.seq_len), *FLOP_MODELS)
    for label, preset, overrides, seq_len in models:
        with torch.device("meta"):
            model = Transformer(get_config(preset, **overrides))
        c = model.config
        total, head = flops_per_token(model, seq_len), 6 * c.vocab_size * c.d_model
        rows.append({"model": label, "d_model": c.d_model, "n_layers": c.n_layers, "vocab": c.vocab_size,
                     "seq_len": seq_len, "flops_per_token": total, "head_flops_per_token": head,
                     "head_share": head / total, "max_saving_keep_0.5": 0.5 * head / total,
                     "max_saving_keep_0.25": 0.75 * head / total})  # fmt: skip
    return rows


def summarize(runs: list[dict], timing: dict[str, dict]) -> dict:
    """Per variant: median and range of the final val loss, of the paired difference to ``off``, and the times."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    base = {r["seed"]: r["val_loss"] for r in by.get("off", [])}
    off_curve = {r["seed"]: r["val_curve"] for r in by.get("off", [])}
    out = {}
    for name, rs in by.items():
        losses = [r["val_loss"] for r in rs]
        deltas = [r["val_loss"] - base[r["seed"]] for r in rs if r["seed"] in base]
        # the step at which off (same seed) reached this variant's final loss: the steps' worth of off it equals
        match = [steps_to_reach(off_curve[r["seed"]], r["val_loss"]) for r in rs if r["seed"] in off_curve]
        curve = {}
        for r in rs:
            for step, loss in r["val_curve"]:
                curve.setdefault(step, []).append(loss)
        out[name] = {"seeds": len(rs), "kept_frac": rs[0]["kept_frac"], "val_loss_median": statistics.median(losses),
                     "val_loss_min": min(losses), "val_loss_max": max(losses),
                     "delta_vs_off_median": statistics.median(deltas) if deltas else None,
                     "delta_vs_off_min": min(deltas) if deltas else None,
                     "delta_vs_off_max": max(deltas) if deltas else None,
                     "off_steps_to_match": match,
                     "val_curve_median": [[s, statistics.median(v)] for s, v in sorted(curve.items())],
                     "step_s_median": statistics.median(r["step_s_median"] for r in rs)}  # fmt: skip
        out[name] |= timing.get(name, {})
    return out


def table(summary: dict) -> str:
    """The summary as a Markdown table."""
    lines = ["| variant | kept | seeds | val loss, median [min, max] | paired Δ vs off, median [min, max] | "
             "off reached it at step (per seed) | step s (median) | selection ms | objective fwd+bwd ms |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in summary.items():
        d = s["delta_vs_off_median"]
        off = name == "off"
        delta = "—" if off or d is None else (
            f"{d:+.4f} [{s['delta_vs_off_min']:+.4f}, {s['delta_vs_off_max']:+.4f}]")  # fmt: skip
        ms = "— | —"
        if "objective_ms_median" in s:
            ms = f"{'—' if off else format(s['select_ms_median'], '.1f')} | {s['objective_ms_median']:.0f}"
        first = s["val_curve_median"][0][0]
        match = ", ".join("never" if m is None else f"≤ {m:.0f}" if m == first else f"{m:.0f}"
                          for m in s["off_steps_to_match"]) if not off else "—"  # fmt: skip
        lines.append(f"| {name} | {s['kept_frac']:.2f} | {s['seeds']} | {s['val_loss_median']:.4f} "
                     f"[{s['val_loss_min']:.4f}, {s['val_loss_max']:.4f}] | {delta} | {match} | "
                     f"{s['step_s_median']:.2f} | {ms} |")  # fmt: skip
    return "\n".join(lines)


def flop_table(rows: list[dict]) -> str:
    lines = ["| model | seq len | LM head share of training FLOPs | max saving, keep 0.5 | max saving, keep 0.25 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['head_share']:.1%} | {r['max_saving_keep_0.5']:.1%} | "
                     f"{r['max_saving_keep_0.25']:.1%} |")  # fmt: skip
    return "\n".join(lines)


def compare(cfg: CompareConfig) -> dict:
    """Train every variant for every seed, time the objectives, and return the report."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    out = Path(cfg.out)
    shards = Path(cfg.data) if cfg.data else build_data(out / "data", get_config(cfg.preset).vocab_size,
                                                        cfg.holdout_file_frac)  # fmt: skip
    meta = json.loads((shards / "meta.json").read_text())
    jobs = [(v, s) for s in cfg.seeds for v in cfg.variants]
    t0 = time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg.threads,)) as pool:
        futures = [pool.submit(run_one, cfg, shards, v, s) for v, s in jobs]
        runs = []
        for f in futures:
            runs.append(f.result())
            print(json.dumps(runs[-1]), flush=True)
    torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()[0]
    timing = time_objectives(cfg, shards)
    command = "python -m train.token_filter_compare " + " ".join(sys.argv[1:])
    return {"config": asdict(cfg), "command": command,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": cpu_name(), "threads": cfg.threads, "workers": cfg.workers,
                        "load_avg_1min_around_timing": [load_before, os.getloadavg()[0]]},
            "data": {"roots": [] if cfg.data else list(ROOTS), "splits": meta["splits"]},
            "wall_s": round(time.perf_counter() - t0, 1), "runs": runs, "summary": summarize(runs, timing),
            "flop_share": flop_share(cfg)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    return parse_config(CompareConfig, "python -m train.token_filter_compare", __doc__, argv)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    report = compare(cfg)
    text = table(report["summary"]) + "\n\n" + flop_table(report["flop_share"]) + "\n"
    print(text)
    blob = json.dumps(report, indent=1) + "\n"
    for folder in {Path(cfg.out), *([Path(cfg.report)] if cfg.report else [])}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare.json").write_text(blob)
        (folder / "compare.md").write_text(f"    {report['command']}\n\n{text}")


if __name__ == "__main__":
    main()
