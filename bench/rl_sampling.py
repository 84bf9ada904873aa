"""RL sampling throughput: a step's prompts one group at a time (``train.rl.sample_group`` per prompt) against all
of them in one left-padded batch (``train.rl.sample_groups``), with the RL run's sampling settings.

Prompts are the first ``--prompts`` tasks of a task file (default: the held-out execution tasks shipped with the
repository), tokenized with the GGUF's tokenizer; each variant samples ``--group`` completions of each with the same
seed, the model's weights quantized once (``model.bitlinear.frozen_weights``), as ``train.rl`` does. Rounds alternate
the order of the two variants; the table gives medians over the rounds with their ranges, and the ratio within each
round of completion tokens per second. With ``--engine-entry`` (a ``compiler.build`` entry of ``--gguf``) a third
variant samples through the compiled engine as ``bench.rl_engine`` does, the policy's weights put into the engine at
the start of each run (part of its time, as in an RL step), and its ratio to the one-batch variant is given too.

    python -m bench.rl_sampling --gguf models/small.gguf --prompts 4 --group 8 --max-new-tokens 64 --rounds 5 \\
        --threads 2 --json docs/train/rl/sampling_small_cpu.json
    python -m bench.rl_sampling --gguf models/small.gguf --prompts 4 --group 8 --max-new-tokens 64 --rounds 5 \
        --threads 2 --engine-entry ENTRY --json docs/train/rl/sampling_engine_small_cpu.json
    python3 -m bench.rl_sampling --device cuda --prompts 16 --group 16 --max-new-tokens 160 --rounds 5   # GPU host
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT_TASKS = Path(__file__).resolve().parent / "data" / "exec_heldout_v1.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="models/small.gguf")
    ap.add_argument("--tasks", default=str(DEFAULT_TASKS), help="a train.exec_tasks task file (its prompts)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine-entry", default="", help="also sample through this compiled entry of --gguf")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    for name in ("prompts", "group", "max_new_tokens", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    return a


def main(argv: list[str] | None = None) -> None:
    from bench.machine import git_commit, machine, save_json
    from bench.speculative import stats
    from model.bitlinear import frozen_weights
    from model.gguf_io import read_gguf
    from model.tokenizer import hf_from_spec
    from model.transformer import Transformer
    from train.exec_tasks import load_tasks
    from train.rl import RLConfig, sample_group, sample_groups

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gg = read_gguf(a.gguf)
    model = Transformer.from_gguf_tensors(gg.config, gg.model_tensors()).to(device).eval()
    tok = hf_from_spec(gg.tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    params = RLConfig(max_new_tokens=a.max_new_tokens).sampling(() if eot is None else (eot,))
    tasks = load_tasks(Path(a.tasks))[: a.prompts]
    prompts = [tok.encode(t.prompt).ids for t in tasks]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731

    def one_at_a_time(gen):
        return [sample_group(model, p, a.group, params, gen, decode) for p in prompts]

    def batched(gen):
        return sample_groups(model, prompts, a.group, params, gen, decode)

    variants = {"one_group_at_a_time": one_at_a_time, "one_batch": batched}
    if a.engine_entry:
        from bench.rl_engine import EngineSampler

        sampler = EngineSampler(a.engine_entry, a.gguf, a.threads or None)
        variants["engine"] = lambda gen: sampler(model, prompts, a.group, params, int(gen.initial_seed()))
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            gen = torch.Generator(device).manual_seed(r)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with frozen_weights(model):
                groups = variants[name](gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter() - t0
            tokens = sum(len(c) for g in groups for c in g)
            runs[name].append({"seconds": s, "tokens": tokens, "tokens_per_s": tokens / s})

    def ratio(num: str, den: str) -> dict:
        return stats([n["tokens_per_s"] / d["tokens_per_s"] for n, d in zip(runs[num], runs[den], strict=True)])

    summary = {k: stats([x["tokens_per_s"] for x in v]) for k, v in runs.items()}
    summary["ratio"] = ratio("one_batch", "one_group_at_a_time")
    if a.engine_entry:
        summary["engine_ratio"] = ratio("engine", "one_batch")
    print(f"{a.prompts} prompts x {a.group} completions, <= {a.max_new_tokens} tokens, {device}, {a.rounds} rounds")
    print(f"{'variant':22s} {'tokens/s median':>16s} {'[min, max]':>20s}")
    for k in variants:
        s = summary[k]
        print(f"{k:22s} {s['median']:16.1f} [{s['min']:8.1f}, {s['max']:8.1f}]")
    for key, label in (("ratio", "one_batch / one_group"), ("engine_ratio", "engine / one_batch")):
        if key in summary:
            r = summary[key]
            print(f"{label:22s} {r['median']:16.2f} [{r['min']:8.2f}, {r['max']:8.2f}]")
    if a.json:
        cmd = "python -m bench.rl_sampling " + " ".join(argv if argv is not None else sys.argv[1:])
        torch_info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}  # fmt: skip
        save_json(a.json, {"command": cmd, "machine": machine() | torch_info, "git": git_commit(),
                           "settings": vars(a), "sampling": {"temperature": params.temperature, "top_p": params.top_p},
                           "runs": runs, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
