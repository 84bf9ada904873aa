"""Export a training checkpoint to a self-contained GGUF (weights, hyperparameters, tokenizer, chat template).

The ternary matrices go out as TQ2_0 (``--tq1`` for TQ1_0) through ``model.gguf_io``; the file is then read back
with the strict reader and the reloaded model's logits must equal the checkpoint's quantized forward (embeddings
rounded to F16, the one lossy step), so an export that does not reproduce the trained model fails here rather than
in the compiler.

    python -m train.export --run runs/small --tokenizer data/tokenizer.json --out model.gguf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model.config import ModelConfig
from model.gguf_io import GGMLType, read_gguf, write_gguf
from model.tokenizer import spec_from_hf
from model.transformer import Transformer
from train import checkpoint
from train.tokenizer import CHAT_TEMPLATE, EOT
from train.train import set_dense


def load_checkpoint_model(run: Path, ckpt: Path | None = None) -> tuple[Transformer, dict]:
    """The model of a run's ``latest`` checkpoint (or of ``ckpt``), on the CPU in eval mode, and its state."""
    path = ckpt or checkpoint.latest(Path(run) / "checkpoints")
    if path is None:
        raise checkpoint.CheckpointError(f"{run}: no checkpoint to export")
    state = checkpoint.read_state(path)
    config = ModelConfig(**state["extra"]["model_config"])
    model = Transformer(config)
    if not state["extra"]["train_config"].get("ternary", True):
        set_dense(model)
    checkpoint.load(path, model, restore_rng=False)
    return model.eval(), state


def write_checked(model: Transformer, out: Path, spec, ternary_type, metadata: dict, ids: torch.Tensor) -> float:
    """Write ``model`` as a GGUF (tokenizer ``spec``) to ``out`` through a temporary file, read it back and check it:
    the ternary matrices, norms and mHC logits are stored exactly and F16 embeddings are the one rounding, so the
    reloaded model must give the logits of ``model`` with its embeddings rounded to F16 (which this does to
    ``model``) on ``ids`` exactly, not merely closely. Returns the largest logit gap."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    model = model.float().cpu().eval()
    write_gguf(tmp, model.config, model.gguf_tensors(), spec, ternary_type=ternary_type, metadata=metadata)
    back = read_gguf(tmp)
    reloaded = Transformer.from_gguf_tensors(back.config, back.model_tensors()).eval()
    with torch.no_grad():
        for emb in (model.tok_emb.weight, None if model.lm_head is None else model.lm_head.weight):
            if emb is not None:
                emb.copy_(emb.half().float())
        gap = float((model(ids) - reloaded(ids)).abs().max())
    if gap > 1e-5:
        raise RuntimeError(f"the exported model's logits differ from the model's by {gap:.3g}")
    tmp.replace(out)
    return gap


def export(run: Path, tokenizer_path: Path, out: Path, tq1: bool = False, ckpt: Path | None = None) -> dict:
    model, state = load_checkpoint_model(run, ckpt)
    tcfg = state["extra"]["train_config"]
    if not tcfg.get("ternary", True):
        raise ValueError(f"{run} is a dense (non-ternary) baseline; only ternary models export to TQ2_0/TQ1_0")
    tok = Tokenizer.from_file(str(tokenizer_path))
    spec = spec_from_hf(tok, chat_template=CHAT_TEMPLATE, eos=EOT).padded(model.config.vocab_size)
    meta = {"training.steps": int(state["step"]), "training.preset": str(tcfg["preset"]),
            "training.seq_len": int(tcfg["seq_len"])}  # fmt: skip
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    return n if n < 2 else").ids])
    gap = write_checked(model, out, spec, GGMLType.TQ1_0 if tq1 else GGMLType.TQ2_0, meta, ids)
    return {"out": str(out), "bytes": out.stat().st_size, "step": state["step"], "max_logit_gap": gap}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="training output folder (its checkpoints/latest)")
    ap.add_argument("--ckpt", type=Path, default=None, help="a specific ckpt-* folder instead of latest")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tq1", action="store_true", help="store ternary matrices as TQ1_0 (1.69 bits/weight)")
    args = ap.parse_args(argv)
    print(json.dumps(export(args.run, args.tokenizer, args.out, args.tq1, args.ckpt), indent=2))


if __name__ == "__main__":
    main()
