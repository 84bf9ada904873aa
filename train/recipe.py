"""One recipe from nothing to a shipped model: corpus → tokenizer → shards → train → export → eval (→ dense baseline)
(→ SFT: with ``--sft-steps N``, instruction tuning of the exported model into ``sft/model.gguf``, chat-tuned, and its
chat evaluation; see ``train.sft``).

Every stage writes into ``--out`` and is skipped when its output already exists, so a recipe killed anywhere picks up
where it stopped (training itself resumes from its checkpoint).

    python -m train.recipe --preset tiny --out runs/tiny-recipe              # CPU, minutes: the end-to-end check
    python -m train.recipe --preset small --out runs/small --steps 3000 --batch-size 128 --compile --variant both
    python -m train.recipe --preset small --out runs/small --steps 3000 --batch-size 128 --compile --sft-steps 800
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from model.config import get_config
from train import eval as evaluation
from train.corpus import CorpusConfig, build_corpus, write_manifest
from train.export import export, load_checkpoint_model
from train.shards import build_shards
from train.tokenizer import iter_texts, train_tokenizer
from train.train import TrainConfig, train

TINY_ROOTS = ("json", "email", "asyncio", "logging", "unittest", "importlib")  # stdlib packages: ~2 MB of code


def _stage(name: str, log: dict):
    class _Timer:
        def __enter__(self):
            self.t = time.perf_counter()
            print(f"== {name}", flush=True)

        def __exit__(self, *exc):
            log[name] = round(time.perf_counter() - self.t, 2)
            return False

    return _Timer()


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = get_config(args.preset)
    timings: dict[str, float] = {}
    manifest, tok_path, shards = out / "corpus" / "manifest.jsonl", out / "tokenizer.json", out / "shards"
    if not manifest.exists():
        with _stage("corpus", timings):
            roots = tuple(args.roots) if args.roots else None
            if roots is None and args.preset == "tiny":
                import sysconfig

                roots = tuple(str(Path(sysconfig.get_paths()["stdlib"]) / p) for p in TINY_ROOTS)
            cfg = CorpusConfig(roots=roots or CorpusConfig.roots)
            corpus = build_corpus(cfg)
            write_manifest(corpus, manifest.parent)
    if not tok_path.exists():
        with _stage("tokenizer", timings):
            from train.corpus import read_manifest

            train_files = [f for f in read_manifest(manifest) if f.split == "train"]
            tok = train_tokenizer(iter_texts(train_files, int(args.tokenizer_mb * 1e6)), mcfg.vocab_size)
            tok.save(str(tok_path))
    if not (shards / "meta.json").exists():
        with _stage("shards", timings):
            build_shards(manifest, tok_path, shards)
    tcfg = TrainConfig(preset=args.preset, data=str(shards), out=str(out / "run"), steps=args.steps,
                       batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=min(100, args.steps // 10),
                       compile=args.compile, eval_every=max(1, args.steps // 8), log_every=max(1, args.steps // 100),
                       eval_tokens=min(args.eval_tokens, TrainConfig.eval_tokens),
                       ckpt_every=max(1, args.steps // 4))  # fmt: skip
    variants = {"ternary": tcfg, "dense": replace(tcfg, ternary=False, out=str(out / "dense"))}
    chosen = {"data": [], "ternary": ["ternary"], "dense": ["dense"], "both": ["ternary", "dense"]}[args.variant]
    runs = [(name, variants[name]) for name in chosen]
    summary = {"preset": args.preset, "variant": args.variant, "timings_s": timings}
    ecfg = evaluation.EvalConfig(seq_len=args.seq_len, max_tokens=args.eval_tokens, n_functions=args.eval_functions)
    for name, cfg in runs:
        with _stage(f"train-{name}", timings):
            summary[f"train_{name}"] = train(cfg)
        if name == "ternary":
            with _stage("export", timings):
                summary["export"] = export(Path(cfg.out), tok_path, out / "model.gguf")
        with _stage(f"eval-{name}", timings):
            from tokenizers import Tokenizer

            model, _ = load_checkpoint_model(Path(cfg.out))
            if name == "ternary":  # evaluate what ships: the model read back from the GGUF
                from model.gguf_io import read_gguf
                from model.transformer import Transformer

                gg = read_gguf(out / "model.gguf")
                model = Transformer.from_gguf_tensors(gg.config, gg.model_tensors())
            device = "cuda" if args.device == "cuda" else "cpu"
            report = evaluation.evaluate(model.to(device), Tokenizer.from_file(str(tok_path)), shards, manifest, ecfg)
            (out / f"eval_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
            summary[f"eval_{name}"] = {k: report[k] for k in ("val_loss", "bits_per_byte")} | {
                "validity_rate": report["code"]["validity_rate"]}  # fmt: skip
    sft_steps = getattr(args, "sft_steps", 0)
    if sft_steps and "ternary" in chosen and not (out / "sft" / "model.gguf").exists():
        with _stage("sft", timings):
            from train.chat_eval import ChatEvalConfig, evaluate_gguf
            from train.sft import SFTConfig, train_sft

            device = "cuda" if args.device == "cuda" else "cpu"
            scfg = SFTConfig(gguf=str(out / "model.gguf"), out=str(out / "sft"), manifest=str(manifest),
                             shards=str(shards), steps=sft_steps, seq_len=min(512, mcfg.max_seq_len),
                             device=device)  # fmt: skip
            sft = train_sft(scfg)
            summary["sft"] = {k: sft[k] for k in ("turns", "turns_used", "last", "seconds")}
            ccfg = ChatEvalConfig(n=args.eval_functions, bpb_tokens=args.eval_tokens, seq_len=args.seq_len)
            report = evaluate_gguf(out / "sft" / "model.gguf", manifest, shards, ccfg, device)
            (out / "sft" / "chat_eval.json").write_text(json.dumps(report, indent=2) + "\n")
            summary["eval_sft"] = {k: report[k] for k in ("bits_per_byte", "pass_rate")}
    (out / f"summary_{args.variant}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--roots", nargs="*", help="corpus roots (default: stdlib + site-packages; tiny: a few packages)")
    ap.add_argument("--tokenizer-mb", type=float, default=64.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--variant",
        choices=["data", "ternary", "dense", "both"],
        default="ternary",
        help="what to train after the data stages: the ternary model, the dense baseline, both, or none",
    )
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--eval-functions", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sft-steps", type=int, default=0, help="> 0: instruction-tune the exported model (train.sft)")
    print(json.dumps(run(ap.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
