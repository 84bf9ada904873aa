"""Speculative decoding with the model's MTP heads against plain decoding, in one run: decode tokens/s, acceptance,
tokens per verify step, and whether the greedy tokens are identical.

    python -m bench.speculative --model models/small.gguf --threads 2 --draft-tokens 0 1 2 3 --rounds 5 \\
        --json docs/speculative/spec_small_avx512.json
    python -m bench.speculative --entry <cuda cache entry> --model models/small.gguf ...   # prebuilt (GPU host)

Prompts: ``bench/data/heldout_code_prompts.json``, signatures + docstrings of held-out functions (the corpus's val
split: never trained on). Each prompt is generated greedily (``--temperature T``: sampled at ``T``, prompt ``i`` with
seed ``i``) for ``--tokens`` tokens (``ignore_eos``, so every setting decodes the same number of tokens) with each
``--draft-tokens`` setting (0 = plain decoding) on one Engine, switching ``Engine.draft_tokens`` between generations;
``--chain-burst N`` adds a setting ``cN``, plain greedy generation as device chains of ``N`` steps (``Engine.chain``;
the draft settings run with chains off), and with ``--chain-drafts K ...`` a setting ``cNdK`` for each ``K``:
speculative chains, each call verifying ``K`` drafts on the device (``spec_chain_b{K+1}``). The settings are
interleaved: each of ``--rounds`` rounds runs every setting over all prompts, in a rotated order. Decode tokens/s of a
round = its tokens after the first (per prompt) / their decode time; the table gives the median over rounds, the
range, and the ratio to plain decoding taken within each round. ``identical``: every setting's tokens equal plain
decoding's for every prompt (greedy speculation is exact; sampled, chains draw the host's own noise, while drafts keep
only the distribution: no entry). Acceptance = accepted / drafted tokens; tokens per step = (accepted + verify steps)
/ verify steps.

Timings on a shared machine are only meaningful when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.machine import REPO, git_commit, machine, save_json

PROMPTS = REPO / "bench" / "data" / "heldout_code_prompts.json"


@dataclass
class SpecBenchConfig:
    model: str = str(REPO / "models" / "small.gguf")
    entry: str | None = None  # a prebuilt compiler.build entry (else built or reused for --target)
    target: str = "auto"
    threads: int | None = None
    draft_tokens: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    prompts: str = str(PROMPTS)
    n_prompts: int = 16
    tokens: int = 128
    rounds: int = 5
    chain_burst: int = 0  # > 0: one more setting, plain greedy as device chains of this many steps (Engine.chain)
    chain_drafts: list[int] = field(default_factory=list)  # with chain_burst: a setting per K, speculative chains
    temperature: float = 0.0  # > 0: plain temperature sampling (prompt i with seed i) instead of greedy
    lookup_tokens: list[int] = field(default_factory=list)  # a setting lK per K: prompt-lookup drafts, chains off
    lookup_heads: int = 0  # > 0: also a setting lKdJ per K: lookup drafts, else J MTP drafts


def stats(x) -> dict:
    x = np.asarray(x, np.float64)
    return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def run(cfg: SpecBenchConfig) -> dict:
    from runtime.engine import Engine, SamplingParams

    eng = (Engine(cfg.entry, cfg.model, cfg.threads) if cfg.entry else
           Engine.from_gguf(cfg.model, cfg.target, threads=cfg.threads))  # fmt: skip
    bad = [k for k in cfg.draft_tokens if not 0 <= k <= eng.mtp_heads]
    if bad:
        raise SystemExit(f"error: --draft-tokens {bad}: the model has {eng.mtp_heads} MTP heads")
    prompts = [p["prompt"] for p in json.loads(Path(cfg.prompts).read_text())["prompts"][: cfg.n_prompts]]
    params = [SamplingParams(max_new_tokens=cfg.tokens, ignore_eos=True, temperature=cfg.temperature, seed=i)
              for i in range(len(prompts))]  # fmt: skip
    # setting → (host MTP drafts, chain burst, chain drafts, prompt-lookup drafts)
    settings = {k: (k, 0, 0, 0) for k in cfg.draft_tokens}
    if cfg.chain_burst and eng.has_chain:
        settings[f"c{cfg.chain_burst}"] = (0, cfg.chain_burst, 0, 0)
        for k in cfg.chain_drafts:
            if not 1 <= k <= eng.mtp_heads or f"spec_chain_b{k + 1}" not in eng.meta["outputs"]:
                raise SystemExit(f"error: --chain-drafts {k}: this build has no spec_chain_b{k + 1}")
            settings[f"c{cfg.chain_burst}d{k}"] = (0, cfg.chain_burst, k, 0)
    for k in cfg.lookup_tokens:
        settings[f"l{k}"] = (0, 0, 0, k)
        if cfg.lookup_heads:
            settings[f"l{k}d{cfg.lookup_heads}"] = (cfg.lookup_heads, 0, 0, k)
    # warm-up (first calls, tables)
    for eng.draft_tokens, eng.chain_burst, eng.chain_drafts, eng.lookup_tokens in settings.values():
        for p, pp in zip(prompts[:2], params, strict=False):
            eng.generate(p, pp)
    plain_tokens: dict[int, list[int]] = {}
    rows = {k: {"tps": [], "ratio": [], "acceptance": [], "tokens_per_step": [], "identical": True}
            for k in settings}  # fmt: skip
    names = list(settings)
    for r in range(cfg.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        rate = {}
        for k in order:
            eng.draft_tokens, eng.chain_burst, eng.chain_drafts, eng.lookup_tokens = settings[k]
            toks = secs = drafted = accepted = steps = 0
            for i, p in enumerate(prompts):
                g = eng.generate(p, params[i])
                if k == 0:
                    plain_tokens.setdefault(i, g.tokens)
                elif i in plain_tokens and g.tokens != plain_tokens[i]:
                    rows[k]["identical"] = False
                toks, secs = toks + len(g.tokens) - 1, secs + g.decode_s
                drafted, accepted, steps = drafted + g.drafted, accepted + g.accepted, steps + g.spec_steps
            rate[k] = toks / secs
            rows[k]["tps"].append(rate[k])
            rows[k]["acceptance"].append(accepted / drafted if drafted else 0.0)
            rows[k]["tokens_per_step"].append((accepted + steps) / steps if steps else 1.0)
            print(f"round {r + 1}/{cfg.rounds} draft {k}: {rate[k]:.1f} tokens/s", file=sys.stderr, flush=True)
        if 0 in rate:
            for k in settings:
                rows[k]["ratio"].append(rate[k] / rate[0])

    def exact(setting):  # token for token plain decoding's: greedy, or a chain's draws (the host's own Gumbel noise)
        return cfg.temperature == 0 or setting[0] == setting[3] == 0  # a speculative chain draws a chain's noise too

    out = []
    for k, v in rows.items():
        out.append({"setting": str(k), "draft_tokens": settings[k][0], "chain_burst": settings[k][1],
                    "chain_drafts": settings[k][2], "lookup_tokens": settings[k][3], "decode_tok_s": stats(v["tps"]),
                    "runs": cfg.rounds,
                    "x_plain": stats(v["ratio"]) if v["ratio"] else None,
                    "acceptance": stats(v["acceptance"]), "tokens_per_step": stats(v["tokens_per_step"]),
                    "identical": v["identical"] if 0 in cfg.draft_tokens and exact(settings[k]) else None})  # fmt: skip
    return {"target": eng.target, "mtp_heads": eng.mtp_heads, "threads": cfg.threads, "gpu": gpu_name(),
            "temperature": cfg.temperature, "rows": out}  # fmt: skip


def table(res: dict) -> str:
    head = f"{'setting':>7} {'decode tok/s (median, range)':>30} {'x plain':>16} {'accept':>7} {'tok/step':>8}"
    lines = [head + " identical"]
    for r in res["rows"]:
        d, x = r["decode_tok_s"], r["x_plain"]
        xs = f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})" if x else "-"
        rate = f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})"
        acc, tps = r["acceptance"]["median"], r["tokens_per_step"]["median"]
        name = r.get("setting", r["draft_tokens"])
        lines.append(f"{name:>7} {rate:>30} {xs:>16} {acc:>7.3f} {tps:>8.2f} {r['identical']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n")[0])
    d = SpecBenchConfig()
    ap.add_argument("--model", default=d.model, help="the GGUF (weights, tokenizer)")
    ap.add_argument("--entry", default=None, help="a prebuilt compiler.build cache entry to run (no build)")
    ap.add_argument("--target", default=d.target, help="auto | avx512 | avx2 | cuda (ignored with --entry)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=d.draft_tokens, help="settings; 0 = plain")
    ap.add_argument("--prompts", default=d.prompts)
    ap.add_argument("--n-prompts", type=int, default=d.n_prompts)
    ap.add_argument("--tokens", type=int, default=d.tokens, help="generated per prompt")
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--chain-burst", type=int, default=0,
                    help="also plain greedy as device chains of this many steps (a row c<N>; 0: none)")  # fmt: skip
    ap.add_argument("--chain-drafts", type=int, nargs="*", default=[],
                    help="with --chain-burst: speculative chains, these drafts per call (rows c<N>d<K>)")  # fmt: skip
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: plain temperature sampling, prompt i with seed i (default: greedy)")  # fmt: skip
    ap.add_argument(
        "--lookup-tokens",
        type=int,
        nargs="*",
        default=[],
        help="settings l<K>: prompt-lookup drafts (runtime.lookup), at most K a step, chains off",
    )
    ap.add_argument("--lookup-heads", type=int, default=0,
                    help="> 0: also settings l<K>d<J>: lookup drafts, else J MTP drafts")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the report here")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.tokens < 2 or a.n_prompts < 1 or not 0 <= a.temperature <= 2:
        ap.error("--rounds ≥ 1, --tokens ≥ 2, --n-prompts ≥ 1 and --temperature in [0, 2]")
    if a.threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))
    cfg = SpecBenchConfig(a.model, a.entry, a.target, a.threads, a.draft_tokens, a.prompts, a.n_prompts, a.tokens,
                          a.rounds, a.chain_burst, a.chain_drafts, a.temperature, a.lookup_tokens,
                          a.lookup_heads)  # fmt: skip
    res = run(cfg)
    print(table(res))
    if a.json:
        cmd = "python -m bench.speculative " + " ".join(argv if argv is not None else sys.argv[1:])
        save_json(a.json, {"command": cmd, "machine": machine(), "git": git_commit(), "config": asdict(cfg)} | res)


if __name__ == "__main__":
    main()
