"""How far apart float32 PyTorch, float64 PyTorch and the compiled arithmetic (``model.exact_reference``, which the
compiled CPU module matches bit for bit) are on one GGUF, teacher-forced over 96 tokens of real code (this
repository's ``train/corpus.py``): per position, the largest |Δlogit|, and how often the argmax agrees.

    python docs/train/base/precision_check.py MODEL.gguf        (from the repository root)
"""

import sys

import numpy as np
import torch

from compiler.arith import arith_of
from model.exact_reference import ExactReference
from model.gguf_io import read_gguf
from model.tokenizer import hf_from_spec
from model.transformer import Transformer

g = read_gguf(sys.argv[1])
ids = hf_from_spec(g.tokenizer).encode(open("train/corpus.py").read()[:3000]).ids[:96]
with torch.no_grad():
    l32 = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()(torch.tensor([ids]))[0].numpy()
    r64 = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval().double()
    l64 = r64(torch.tensor([ids]))[0].numpy()
ex = ExactReference(g, arith_of(g.config, "avx2"))
lex = np.stack([ex.prefill([t]) for t in ids])
for name, a, b in [("f32 vs f64", l32, l64), ("compiled vs f64", lex, l64), ("compiled vs f32", lex, l32)]:
    d = np.abs(a - b).max(-1)
    agree = int((a.argmax(-1) == b.argmax(-1)).sum())
    print(f"{name:16} median {np.median(d):.4f}  max {d.max():.4f}  argmax agree {agree}/{len(ids)}")
