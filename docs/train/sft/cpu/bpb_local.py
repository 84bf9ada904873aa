"""Held-out bits/byte of several GGUFs on this machine's held-out files (a CPU proxy for the GPU host's val split).

The val split of a corpus built here (``python -m train.corpus``; the split is a hash of the package and file names,
so these files are held out on the GPU host too), files in a seeded order, tokenized with each GGUF's tokenizer; the
first TOKENS tokens are scored by ``train.eval.loss_and_bpb`` (float32, windows of 512).

    python -m train.corpus --roots site-packages --out scratch/local_site/corpus
    python docs/train/sft/cpu/bpb_local.py 131072 out.json scratch/local_site/corpus/manifest.jsonl A.gguf B.gguf
"""

import json
import random
import sys
from pathlib import Path

import torch

from model.tokenizer import hf_from_spec
from train.corpus import read_manifest
from train.eval import EvalConfig, loss_and_bpb, token_byte_lengths
from train.sft import load_gguf_model
from train.shards import tokenize_files

torch.set_num_threads(2)
tokens_n, out, manifest, models = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
val = [f for f in read_manifest(manifest) if f.split == "val"]
random.Random(0).shuffle(val)
results = []
for gguf in models:
    model, gg = load_gguf_model(gguf)
    tok = hf_from_spec(gg.tokenizer)
    tokens = tokenize_files(val, tok, desc="val")
    cfg = EvalConfig(seq_len=512, max_tokens=tokens_n, batch_size=8)
    results.append(loss_and_bpb(model, tokens, token_byte_lengths(tok), cfg) | {"model": gguf})
    print(json.dumps(results[-1]), flush=True)
out.write_text(json.dumps(results, indent=2) + "\n")
