"""Compare the hidden-matrix optimizers on the same data: final held-out loss and optimizer-state bytes.

Variants (:data:`VARIANTS`): ``muon`` (float32 Muon + float32 AdamW, the default), ``muon8`` (8-bit Muon momentum +
8-bit AdamW moments, ``train.optim8``) and ``galore`` (Muon's momentum in a rank-``r`` gradient subspace + float32
AdamW, ``train.galore``). Each trains the same preset with ``train.train`` for the same steps, once per seed; a seed
fixes both the initial weights and the batches (``train.train.Batches``), so the variants of one seed see identical
data and the per-seed differences are paired. Reported per variant: the median (and min–max) of the final held-out
loss (next-token CE in nats on the val split's first ``eval_tokens`` tokens), the median paired difference to
``muon``, and the bytes of the optimizers' state tensors (read from the final checkpoint: codes, scales, moments,
projectors, step counters). Not a speed benchmark.

Data: ``--data`` token shards, or (by default) shards built under ``<out>/data`` from a few packages of this
interpreter's standard library (:data:`ROOTS`; 10 % of the files held out) with a byte-level BPE of the preset's
vocabulary, so the command runs anywhere without downloads (the stdlib, hence the exact tokens, depends on the Python
version: the JSON records it).

``--quant-error-steps N`` also measures the 8-bit tables on the first seed's gradient stream (``quant_errors``): the
relative error that accumulates in Muon's momentum and Adam's ``exp_avg`` under each signed table, and in Adam's update
``m / (√v + ε)`` under each way of storing ``v`` — the measurement behind ``train.optim8``'s choice.

    python -m train.optim_compare --out scratch/optim_compare --json docs/train/optim/compare.json  # as committed
    python -m train.optim_compare --out scratch/a2 --variants muon galore --galore-scale 2 --quant-error-steps 0
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.config import get_config
from model.transformer import Transformer
from train import checkpoint
from train.cli import parse_config
from train.corpus import CorpusConfig, build_corpus, write_manifest
from train.muon import orthogonalize
from train.optim8 import MIN_8BIT_SIZE, Quantizer
from train.shards import build_shards, open_split
from train.tokenizer import iter_texts, train_tokenizer
from train.train import Batches, TrainConfig, lr_factor, make_optimizers, train

VARIANTS = {
    "muon": {"optimizer": "muon", "adamw_bits": 32},
    "muon8": {"optimizer": "muon8", "adamw_bits": 8},
    "galore": {"optimizer": "galore", "adamw_bits": 32},
}
ROOTS = ("email", "asyncio", "logging", "importlib", "xml", "multiprocessing", "http", "urllib", "unittest", "json")
SIGNED = {"linear": Quantizer("linear", signed=True), "dynamic": Quantizer("dynamic", signed=True)}
SECOND = {
    "linear v": Quantizer("linear", signed=False),
    "linear √v": Quantizer("linear", signed=False, sqrt=True),
    "dynamic v": Quantizer("dynamic", signed=False),
    "dynamic √v": Quantizer("dynamic", signed=False, sqrt=True),
}


@dataclass(frozen=True)
class CompareConfig:
    out: str = "runs/optim_compare"
    json: str = ""  # also write the report here (e.g. docs/train/optim/compare.json)
    data: str = ""  # token shards; "" builds them under <out>/data from ROOTS
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    preset: str = "tiny"
    steps: int = 80
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 8
    lr_matrix: float = 0.02
    lr_embed: float = 3e-3
    galore_rank: int = 64
    galore_update_every: int = 20
    galore_scale: float = 1.0
    eval_tokens: int = 32768
    holdout_file_frac: float = 0.1
    quant_error_steps: int = 40  # >0: also measure the 8-bit tables' error over this many steps (quant_errors)


def build_data(out: Path, vocab_size: int, holdout_file_frac: float) -> Path:
    """Token shards of :data:`ROOTS` (this interpreter's stdlib) with a fresh BPE of ``vocab_size``; reused if there."""
    shards = out / "shards"
    if (shards / "meta.json").is_file():
        return shards
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = tuple(str(stdlib / r) for r in ROOTS)
    corpus = build_corpus(CorpusConfig(roots=roots, holdout_package_frac=0.0, holdout_file_frac=holdout_file_frac),
                          progress=False)  # fmt: skip
    manifest = write_manifest(corpus, out / "corpus")
    tok = train_tokenizer(iter_texts(corpus.split("train"), None), vocab_size)
    tok.save(str(out / "tokenizer.json"))
    build_shards(manifest, out / "tokenizer.json", shards)
    return shards


def state_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes of each optimizer's state tensors in a checkpoint (``muon``: the matrix optimizer, ``adamw``)."""
    out = {"muon": 0, "adamw": 0}
    for key, t in load_file(str(ckpt / "optim.safetensors")).items():
        name = key.split(".", 1)[0]
        if name in out:
            out[name] += t.numel() * t.element_size()
    return out | {"total": out["muon"] + out["adamw"]}


def _rel(exact: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    """``‖exact − approx‖ / ‖exact‖`` pooled over a list of tensors."""
    num = sum(float((a - b).square().sum()) for a, b in zip(exact, approx, strict=True))
    return (num / max(sum(float(a.square().sum()) for a in exact), 1e-300)) ** 0.5


def _zeroed(exact: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    """The fraction of the nonzero entries of ``exact`` that ``approx`` holds as 0."""
    lost = sum(float(((b == 0) & (a != 0)).sum()) for a, b in zip(exact, approx, strict=True))
    return lost / max(1.0, sum(float((a != 0).sum()) for a in exact))


def _train_cfg(cfg: CompareConfig, shards: Path, variant: str, seed: int) -> TrainConfig:
    return TrainConfig(preset=cfg.preset, data=str(shards), out=str(Path(cfg.out) / f"{variant}-s{seed}"),
                       steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, warmup_steps=cfg.warmup_steps,
                       lr_matrix=cfg.lr_matrix, lr_embed=cfg.lr_embed, galore_rank=cfg.galore_rank,
                       galore_update_every=cfg.galore_update_every, galore_scale=cfg.galore_scale, seed=seed,
                       log_every=max(1, cfg.steps // 10), eval_every=cfg.steps, eval_tokens=cfg.eval_tokens,
                       ckpt_every=cfg.steps, **VARIANTS[variant])  # fmt: skip


def quant_errors(cfg: CompareConfig, shards: Path, steps: int, seed: int = 0) -> dict:
    """The 8-bit tables on a real gradient stream (the measurement behind ``train.optim8``'s choice).

    Trains ``muon`` (float32 state) for ``steps`` steps as ``train.train`` does and feeds every step's gradients also
    to shadow states kept in 8 bits with each table (dequantize → the same update → requantize, as the 8-bit
    optimizers do), so rounding errors accumulate as they would in training. At the end, ``‖exact − shadow‖ /
    ‖exact‖`` pooled over the tensors: ``momentum`` (Muon, every hidden matrix) and ``exp_avg`` (Adam, the tensors of
    ≥ 4096 elements that AdamW8bit quantizes); ``muon_update``: the error of the last step's orthogonalised update;
    ``adam_update_m`` / ``adam_update_v``: the error of Adam's update ``m̂ / (√v̂ + ε)`` with ``m`` (``v`` exact) or
    ``v`` (``m`` exact) stored each way; ``*_zeroed``: the fraction of nonzero entries held as 0."""
    tcfg = _train_cfg(cfg, shards, "muon", seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = Transformer(tcfg.model_config()).to(device)
    opts = make_optimizers(model, tcfg)
    batches = Batches(open_split(shards, "train"), cfg.seq_len, cfg.batch_size, seed, 0, device)
    hidden = list(opts["muon"].param_groups[0]["params"])
    adam = [p for p in opts["adamw"].param_groups[0]["params"] if p.numel() >= MIN_8BIT_SIZE]
    mu, (b1, b2), eps = opts["muon"].param_groups[0]["momentum"], opts["adamw"].param_groups[0]["betas"], 1e-8
    tables = {"momentum": SIGNED, "m": SIGNED, "v": SECOND}
    zeros = lambda ps: [torch.zeros(1, p.numel(), device=device) for p in ps]  # noqa: E731
    exact = {"momentum": zeros(hidden), "m": zeros(adam), "v": zeros(adam)}
    shadow = {(name, k): zeros(hidden if name == "momentum" else adam) for name, t in tables.items() for k in t}

    def ema(name: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if name == "v":
            return x * b2 + g * g * (1 - b2)
        return x.lerp(g, 1 - (mu if name == "momentum" else b1))

    for step in range(steps):
        for opt in opts.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, tcfg)
        x, y = batches.get(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        grads = {"momentum": [p.grad.float().view(1, -1) for p in hidden]}
        grads["m"] = grads["v"] = [p.grad.float().view(1, -1) for p in adam]
        for name in exact:
            exact[name] = [ema(name, s, g) for s, g in zip(exact[name], grads[name], strict=True)]
        for (name, label), states in shadow.items():
            q = tables[name][label]
            shadow[name, label] = [q.dequantize(*q.quantize(ema(name, s, g)))
                                   for s, g in zip(states, grads[name], strict=True)]  # fmt: skip
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    bc1, bc2 = 1 - b1**steps, 1 - b2**steps
    update = lambda m, v: [(a / bc1) / ((b / bc2).sqrt() + eps) for a, b in zip(m, v, strict=True)]  # noqa: E731
    u = update(exact["m"], exact["v"])

    def muon_update(bufs: list[torch.Tensor]) -> list[torch.Tensor]:  # the last step's Nesterov + Newton–Schulz
        return [orthogonalize(g.lerp(b, mu).view(1, *p.shape)).float()
                for g, b, p in zip(grads["momentum"], bufs, hidden, strict=True)]  # fmt: skip

    ortho = muon_update(exact["momentum"])
    return {"steps": steps, "seed": seed, "tensors": {"momentum": len(hidden), "adam_8bit": len(adam)},
            "momentum": {k: _rel(exact["momentum"], shadow["momentum", k]) for k in SIGNED},
            "momentum_zeroed": {k: _zeroed(exact["momentum"], shadow["momentum", k]) for k in SIGNED},
            "muon_update": {k: _rel(ortho, muon_update(shadow["momentum", k])) for k in SIGNED},
            "exp_avg": {k: _rel(exact["m"], shadow["m", k]) for k in SIGNED},
            "exp_avg_zeroed": {k: _zeroed(exact["m"], shadow["m", k]) for k in SIGNED},
            "adam_update_m": {k: _rel(u, update(shadow["m", k], exact["v"])) for k in SIGNED},
            "adam_update_v": {k: _rel(u, update(exact["m"], shadow["v", k])) for k in SECOND},
            "v_zeroed": {k: _zeroed(exact["v"], shadow["v", k]) for k in SECOND}}  # fmt: skip


def run_one(cfg: CompareConfig, shards: Path, variant: str, seed: int) -> dict:
    """One training run (reused when ``<out>/<variant>-s<seed>`` already finished); its final loss and state bytes."""
    tcfg = _train_cfg(cfg, shards, variant, seed)
    out = Path(tcfg.out)
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    t0 = time.perf_counter()
    if not (rows and rows[-1]["step"] == cfg.steps and "val_loss" in rows[-1]):
        shutil.rmtree(out, ignore_errors=True)
        train(tcfg, progress=False)
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    last = rows[-1]
    return {"variant": variant, "seed": seed, "val_loss": last["val_loss"], "train_ce": last["ce"],
            "state_bytes": state_bytes(checkpoint.latest(out / "checkpoints")),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    """Per variant: median, min and max final val loss, the median paired difference to muon, and state bytes."""
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    base = {r["seed"]: r["val_loss"] for r in by.get("muon", [])}
    out = {}
    for name, rs in by.items():
        losses = [r["val_loss"] for r in rs]
        deltas = [r["val_loss"] - base[r["seed"]] for r in rs if r["seed"] in base]
        sb = rs[0]["state_bytes"]
        out[name] = {"seeds": len(rs), "val_loss_median": statistics.median(losses), "val_loss_min": min(losses),
                     "val_loss_max": max(losses), "delta_vs_muon_median": statistics.median(deltas) if deltas else None,
                     "delta_vs_muon_min": min(deltas) if deltas else None,
                     "delta_vs_muon_max": max(deltas) if deltas else None, "state_bytes": sb}  # fmt: skip
    if "muon" in out:
        for s in out.values():
            s["state_vs_muon"] = s["state_bytes"]["total"] / out["muon"]["state_bytes"]["total"]
    return out


def table(summary: dict) -> str:
    lines = [f"{'variant':8s} {'seeds':>5s} {'val loss median':>15s} {'[min, max]':>17s} {'Δ vs muon (paired)':>26s} "
             f"{'state bytes':>12s} {'vs muon':>8s}"]  # fmt: skip
    for name, s in summary.items():
        d = s["delta_vs_muon_median"]
        delta = f"{d:+.4f} [{s['delta_vs_muon_min']:+.4f}, {s['delta_vs_muon_max']:+.4f}]" if d is not None else "-"
        lines.append(f"{name:8s} {s['seeds']:5d} {s['val_loss_median']:15.4f} "
                     f"[{s['val_loss_min']:.4f}, {s['val_loss_max']:.4f}] {delta:>26s} "
                     f"{s['state_bytes']['total']:12,d} {s.get('state_vs_muon', 1.0):8.1%}")  # fmt: skip
    return "\n".join(lines)


def compare(cfg: CompareConfig) -> dict:
    """Train every variant for every seed and return the report (config, runs, summary, quantizer errors)."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    out = Path(cfg.out)
    shards = Path(cfg.data) if cfg.data else build_data(out / "data", get_config(cfg.preset).vocab_size,
                                                        cfg.holdout_file_frac)  # fmt: skip
    meta = json.loads((shards / "meta.json").read_text())
    runs = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            runs.append(run_one(cfg, shards, variant, seed))
            print(json.dumps(runs[-1]), flush=True)
    report = {"config": asdict(cfg), "command": "python -m train.optim_compare " + " ".join(sys.argv[1:]),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
                          or platform.machine()},
              "data": {"roots": [] if cfg.data else list(ROOTS), "splits": meta["splits"]},
              "runs": runs, "summary": summarize(runs)}  # fmt: skip
    if cfg.quant_error_steps:
        report["quant_errors"] = quant_errors(cfg, shards, cfg.quant_error_steps, cfg.seeds[0])
    return report


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    return parse_config(CompareConfig, "python -m train.optim_compare", __doc__, argv)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    report = compare(cfg)
    print(table(report["summary"]))
    if "quant_errors" in report:
        print(json.dumps(report["quant_errors"], indent=1))
    text = json.dumps(report, indent=1) + "\n"
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "compare.json").write_text(text)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(text)


if __name__ == "__main__":
    main()
