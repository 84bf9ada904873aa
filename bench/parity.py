"""Compiled runtime vs the PyTorch reference on the same GGUF: greedy tokens and logits, on any device.

    python -m bench.parity --model models/small.gguf                           # this CPU's compiled module
    python -m bench.parity --model X.gguf --entry DIR --torch-device cuda      # a prebuilt (e.g. CUDA) entry
    python -m bench.parity --model models/small.gguf --reference exact         # vs model.exact_reference (CPU)

Both run the same random prompt; the compiled module is teacher-forced with the reference's greedy tokens (so one
flipped argmax does not make every later step differ) and the report gives: how many greedy tokens agree from the
start (the compiled module's own argmax at each step vs the reference's), the max |Δlogit| per step and overall, and
the logit scale. ``--reference torch`` (default): PyTorch in float32, whose logits drift ~0.1 away once an int8
activation rounds the other way; ``--reference exact``: :mod:`model.exact_reference`, the CPU graph's own float32
arithmetic in numpy (CPU builds only; expect 0). Prints one JSON line (and writes it with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _torch_steps(g, torch_device: str):
    """``step(tokens) -> logits`` of the PyTorch reference over its KV cache."""
    import torch

    from model.transformer import Transformer

    ref = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval().to(torch_device)
    cache = ref.new_cache(1)

    def step(tokens):
        with torch.no_grad():
            return ref(torch.tensor([tokens], device=torch_device), cache)[0, -1].float().cpu().numpy()

    return step


def _exact_steps(g, target: str):
    from compiler.arith import arith_of
    from model.exact_reference import ExactReference

    ref = ExactReference(g, arith_of(g.config, target))
    return lambda tokens: ref.prefill(tokens)


def run(model: str, entry: str | None, target: str, steps: int, prompt_len: int, torch_device: str,
        reference: str = "torch") -> dict:  # fmt: skip
    from model.gguf_io import read_gguf
    from runtime.engine import Engine, ensure_built

    eng = Engine(entry or ensure_built(model, target), None)
    g = read_gguf(model)
    step = _exact_steps(g, eng.target) if reference == "exact" else _torch_steps(g, torch_device)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, g.config.vocab_size, prompt_len)]
    diffs, agree, agreeing = [], 0, True
    want = step(prompt)
    got = eng.prefill(prompt)
    for _ in range(steps):
        diffs.append(float(np.abs(got - want).max()))
        tok = int(np.argmax(want))
        agreeing = agreeing and int(np.argmax(got)) == tok
        agree += agreeing
        want = step([tok])
        got = eng.decode(tok)
    return {"model": model, "target": eng.target, "reference": reference,
            "torch_device": torch_device if reference == "torch" else None, "steps": steps,
            "greedy_prefix_agree": agree, "max_abs_logit_diff": max(diffs), "median_step_diff": float(np.median(diffs)),
            "logit_absmax": float(np.abs(want).max())}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--entry", default=None, help="prebuilt compiler.build entry (default: build/reuse for --target)")
    p.add_argument("--target", default="auto")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--reference", default="torch", choices=["torch", "exact"], help="PyTorch, or the exact CPU mirror")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = run(a.model, a.entry, a.target, a.steps, a.prompt_len, a.torch_device, a.reference)
    print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
