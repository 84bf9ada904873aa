"""RL from execution feedback (``train.rl``) with the compiled engine sampling the rollouts.

``train.rl`` samples with the PyTorch policy, a batched forward per token (``train.rl.sample_groups``), which is most
of an RL step (docs/train/rl). Here each step's groups run through the compiled engine instead
(``runtime.engine.Engine`` on a ``compiler.build`` entry of the starting GGUF, CPU or CUDA) as one continuous batch
(``runtime.batch.Batcher``, as ``bench.eval_engine`` samples pass@k). Before each step the policy's current weights
go into the engine in place (:class:`EngineSampler`): its ternary matrices, norms and mHC logits are written as a
GGUF (embeddings rounded to F16, as every export does), packed as the entry takes them (``compiler.build.pack_for``)
and copied over the engine's tensors (``Engine.load_weights``), so nothing is compiled again. The update, rewards,
checkpoints and exports are ``train.rl``'s.

* Each completion's draws come from its own seed (the step's, then its prompt and row), so a step samples the same
  tokens alone or in any batch, and a resumed run samples what the uninterrupted one would have. A run resumes only
  with the sampler it started with (``train.rl`` checks the checkpoint's).
* The engine computes with int8 activations, exactly as ``model.exact_reference``; the PyTorch policy that scores the
  samples in the update rounds differently, so the two policies differ by float rounding (docs/train/base, "Compiled
  parity"). GRPO's ratio is taken against the update's own first pass, as in ``train.rl``.
* One process: under ``torchrun`` every rank would sample on the same device, so more than one rank is refused.

    python -m compiler.build --model models/small.gguf                  # prints ENTRY
    python -m bench.rl_engine --engine-entry ENTRY --algo grpo --gguf models/small.gguf --tasks T.jsonl --out runs/rl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.eval_engine import run_batch
from compiler.build import BuildError, check_config, entry_meta, pack_for
from model.gguf_io import read_gguf, write_gguf
from model.sampling import SamplingParams
from model.tokenizer import hf_from_spec
from model.transformer import Transformer
from runtime.batch import Batcher
from runtime.engine import Engine
from train import checkpoint, rl


class EngineSampler:
    """A ``train.rl`` sampler over the compiled engine of ``entry``, which must be a build of ``gguf``'s
    configuration. ``threads``: the engine's CPU threads (default: the machine's cores)."""

    name = "engine"

    def __init__(self, entry: Path | str, gguf: Path | str, threads: int | None = None) -> None:
        gg = read_gguf(gguf)
        self.spec, self.ternary_type = gg.tokenizer, gg.ternary_type
        self.entry = Path(entry)
        self.meta = entry_meta(self.entry)
        check_config(self.meta, gg.config, gguf, self.entry)  # at the start, not at the first step
        self.engine = Engine(self.entry, None, tokenizer=hf_from_spec(gg.tokenizer), threads=threads)
        self.batcher = Batcher(self.engine)
        self._dir = tempfile.TemporaryDirectory(prefix="rl_engine_")
        self.sync_s = 0.0  # seconds spent putting the policy's weights into the engine, all steps

    def sync(self, model: Transformer) -> None:
        """Put ``model``'s current weights into the engine (in place)."""
        t0 = time.perf_counter()
        path = Path(self._dir.name) / "policy.gguf"
        with torch.no_grad():
            tensors = model.gguf_tensors()
        write_gguf(path, model.config, tensors, self.spec, ternary_type=self.ternary_type)
        self.engine.load_weights(pack_for(self.meta, path, self.entry))
        self.sync_s += time.perf_counter() - t0

    def __call__(self, model: Transformer, prompts: list[list[int]], n: int, params: SamplingParams,
                 seed: int) -> list[list[list[int]]]:  # fmt: skip
        self.sync(model)
        jobs = [
            (list(p), replace(params, seed=rl.seed_for(seed, i, j))) for i, p in enumerate(prompts) for j in range(n)
        ]
        reqs = run_batch(self.batcher, jobs)
        tokens = [list(r.result.tokens) for r in reqs]
        return [tokens[i * n : (i + 1) * n] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--engine-entry")
    ap.add_argument("--threads", type=int)
    ap.add_argument("-h", "--help", action="store_true")
    own, rest = ap.parse_known_args(argv)
    if own.help or not own.engine_entry:
        print(__doc__)
        print("--engine-entry ENTRY  a compiler.build entry of --gguf (required)\n--threads N  the engine's CPU "
              "threads\n\nand train.rl's options:\n")  # fmt: skip
        rl.parse_args(["--help"])  # prints train.rl's options and exits
    cfg = rl.parse_args(rest)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("python -m bench.rl_engine: error: one process only (every rank would sample on one device)")
    try:
        sampler = EngineSampler(own.engine_entry, cfg.gguf, own.threads)
        summary = rl.train_rl(cfg, sampler=sampler)
    except (ValueError, OSError, BuildError, checkpoint.CheckpointError) as exc:
        raise SystemExit(f"python -m bench.rl_engine: error: {exc}") from None
    summary["engine_sync_s"] = round(sampler.sync_s, 2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
