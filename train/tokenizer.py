"""Byte-level BPE tokenizer for Python source, trained locally with HF ``tokenizers`` (nothing downloaded).

Byte-level means every byte string is encodable (no unknown token) and decoding is exact. Special tokens mark
document boundaries and chat turns; the chat template that uses them is :data:`CHAT_TEMPLATE` (Jinja, stored in the
GGUF as ``tokenizer.chat_template``).

    python -m train.tokenizer --manifest data/corpus/manifest.jsonl --vocab 8192 --out data/tokenizer.json
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.corpus import SourceFile, read_manifest

EOT = "<|endoftext|>"  # document boundary; also the end of a generated completion
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def iter_texts(files: list[SourceFile], max_bytes: int | None, seed: int = 0) -> Iterator[str]:
    """Texts of ``files`` in a seeded random order, stopping after ``max_bytes`` (a sample is plenty for merges)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    total = 0
    for f in order:
        if max_bytes is not None and total >= max_bytes:
            return
        try:
            text = Path(f.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text


def train_tokenizer(texts, vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on an iterable of strings; special tokens get the first ids (EOT = 0)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 byte tokens and {len(SPECIAL_TOKENS)} specials")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--sample-mb", type=float, default=64.0, help="train on this many MB of the train split")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    files = [f for f in read_manifest(args.manifest) if f.split == "train"]
    tok = train_tokenizer(iter_texts(files, int(args.sample_mb * 1e6)), args.vocab)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")


if __name__ == "__main__":
    main()
