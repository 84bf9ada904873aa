"""Token shards: a corpus tokenized into one flat uint16 array per split, memory-mapped for training.

Format (a folder): ``train.npy`` and ``val.npy`` are ``.npy`` files (their header records dtype and length, so a
reader can never mistake the token width: the predecessor once read u16 shards as u32 and "found" corruption), each
document followed by the end-of-text token; ``meta.json`` holds the dtype, vocab size, token counts and the sha256 of
the tokenizer that made them. :func:`open_split` checks all of it before training touches a token.

    python -m train.shards --manifest data/corpus/manifest.jsonl --tokenizer data/tokenizer.json --out data/shards
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from model.files import sha256_file
from train.corpus import SourceFile, read_manifest
from train.tokenizer import EOT

TOKEN_DTYPE = np.dtype(np.uint16)
FORMAT_VERSION = 1


class ShardError(ValueError):
    """A shard folder that does not match its metadata or its tokenizer."""


def tokenize_files(files: list[SourceFile], tok: Tokenizer, batch: int = 256, desc: str = "") -> np.ndarray:
    """All files' tokens, each document followed by EOT, as one uint16 array (tokenizers parallelises batches)."""
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise ShardError(f"tokenizer has no {EOT} token")
    if tok.get_vocab_size() > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ShardError(f"vocab {tok.get_vocab_size()} does not fit {TOKEN_DTYPE.name}")
    parts: list[np.ndarray] = []
    for i in tqdm(range(0, len(files), batch), desc=f"tokenizing {desc}", unit="batch"):
        texts = []
        for f in files[i : i + batch]:
            try:
                texts.append(Path(f.path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue  # a file that vanished or changed since the manifest: skip, the count below tells
        for enc in tok.encode_batch(texts):
            parts.append(np.asarray(enc.ids, dtype=TOKEN_DTYPE))
            parts.append(np.array([eot], dtype=TOKEN_DTYPE))
    return np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    tmp.replace(path)


def write_shards(out: Path, splits: dict[str, np.ndarray], vocab_size: int, tokenizer_sha256: str, eot: int,
                 info: dict | None = None) -> dict:  # fmt: skip
    """Write ``<split>.npy`` for each split and ``meta.json`` (last, so a folder without it is incomplete)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "dtype": TOKEN_DTYPE.name, "vocab_size": vocab_size,
            "tokenizer_sha256": tokenizer_sha256, "eot": eot, "splits": {}}  # fmt: skip
    for split, tokens in splits.items():
        if tokens.dtype != TOKEN_DTYPE:
            raise ShardError(f"{split}: tokens must be {TOKEN_DTYPE.name}, got {tokens.dtype}")
        _save_atomic(out / f"{split}.npy", tokens)
        meta["splits"][split] = {"tokens": int(tokens.size)} | (info or {}).get(split, {})
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_shards(manifest: Path, tokenizer_path: Path, out: Path) -> dict:
    """Tokenize the manifest's train and val files into a shard folder."""
    files = read_manifest(manifest)
    tok = Tokenizer.from_file(str(tokenizer_path))
    splits, info = {}, {}
    for split in ("train", "val"):
        chosen = [f for f in files if f.split == split]
        splits[split] = tokenize_files(chosen, tok, desc=split)
        info[split] = {"files": len(chosen), "bytes": sum(f.size for f in chosen)}
    return write_shards(out, splits, tok.get_vocab_size(), sha256_file(tokenizer_path), tok.token_to_id(EOT), info)


def open_split(folder: Path, split: str, tokenizer_path: Path | None = None) -> np.ndarray:
    """Memory-map one split after checking dtype, length, vocab range and (optionally) the tokenizer hash."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{folder}: unreadable meta.json ({exc})") from exc
    if meta.get("format") != FORMAT_VERSION or meta.get("dtype") != TOKEN_DTYPE.name:
        raise ShardError(f"{folder}: format {meta.get('format')}/{meta.get('dtype')}, expected {FORMAT_VERSION}/uint16")
    if tokenizer_path is not None and sha256_file(tokenizer_path) != meta["tokenizer_sha256"]:
        raise ShardError(f"{folder}: made by a different tokenizer than {tokenizer_path}")
    try:
        tokens = np.load(folder / f"{split}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{folder}/{split}.npy: not a readable .npy file ({exc})") from exc
    if tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1:
        raise ShardError(f"{folder}/{split}.npy holds {tokens.dtype}{list(tokens.shape)}, expected 1-D uint16")
    if tokens.size != meta["splits"][split]["tokens"]:
        raise ShardError(f"{folder}/{split}.npy has {tokens.size} tokens, meta.json says {meta['splits'][split]}")
    if tokens.size and int(tokens.max()) >= meta["vocab_size"]:
        raise ShardError(f"{folder}/{split}.npy holds token ids ≥ vocab size {meta['vocab_size']}")
    return tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    print(json.dumps(build_shards(args.manifest, args.tokenizer, args.out), indent=2))


if __name__ == "__main__":
    main()
