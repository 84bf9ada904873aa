"""MTP heads by self-distillation (train/mtp.py): the loss falls while the frozen backbone stays bit for bit, the
chained acceptance count equals the runtime's drafting loop (each step fed the previous step's own draft), position
by position, and a tiny CPU run writes a GGUF whose backbone tensors are the input's and whose three heads read back."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from model.config import get_config
from model.gguf_io import read_gguf, write_gguf
from model.tokenizer import spec_from_hf
from model.transformer import Transformer
from train.corpus import SourceFile
from train.mtp import MTPConfig, backbone_differences, distill_loss, draft_counts, train_mtp, with_heads
from train.muon import BatchedMuon
from train.tokenizer import CHAT_TEMPLATE, EOT, train_tokenizer

TRAIN_SRC = '''"""Helpers."""


def add_numbers(a, b):
    """Return the sum of a and b."""
    total = a + b
    return total


def scale_list(items, factor):
    """Multiply every item by the factor."""
    return [x * factor for x in items]


class Counter:
    """Counts things."""

    def bump(self, n: int) -> int:
        """Increase the count by n."""
        self.count = getattr(self, "count", 0) + n
        return self.count
'''
VAL_SRC = '''def held_out_square(n):
    """Compute the square of n."""
    return n * n


def held_out_join(parts, sep=","):
    """Join the parts with the separator."""
    return sep.join(str(p) for p in parts)
'''


def _model(seed: int = 0) -> Transformer:
    """A tiny model with peaked outputs (larger embeddings than the init), so the distillation target is not flat."""
    torch.manual_seed(seed)
    model = Transformer(get_config("tiny"))
    with torch.no_grad():
        model.tok_emb.weight.mul_(50)
    return model


@pytest.mark.unit
def test_distillation_lowers_the_loss_and_leaves_the_backbone_bit_identical():
    model = with_heads(_model(), 3, seed=1)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    heads = [p for p in model.parameters() if p.requires_grad]
    expected = [p for m in model.mtp for p in (m.proj.weight, m.embed_proj.weight, m.embed_norm.weight)]
    assert {id(p) for p in heads} == {id(p) for p in expected} and len(heads) == 9
    assert all(torch.equal(m.embed_norm.weight, torch.ones_like(m.embed_norm.weight)) for m in model.mtp)
    x = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x, dtype=torch.bool)
    opts = [BatchedMuon([p for p in heads if p.ndim == 2], lr=0.05),
            torch.optim.AdamW([p for p in heads if p.ndim == 1], lr=3e-3)]  # fmt: skip
    first, kl0 = (t.detach() for t in distill_loss(model, x, mask))
    for _ in range(15):
        loss, _ = distill_loss(model, x, mask)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    last, kl = (t.detach() for t in distill_loss(model, x, mask))
    assert float(last) < 0.8 * float(first) and (kl < kl0).all()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone.items())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mtp."))


@pytest.mark.unit
def test_chained_acceptance_counts_equal_a_position_by_position_loop():
    model = with_heads(_model(2), 3, seed=3).eval()
    with torch.no_grad():  # zero projections draft the main argmax at t itself: right where the text repeats
        for k in (0, 2):
            model.mtp[k].proj.weight.zero_()
            model.mtp[k].embed_proj.weight.zero_()
    x = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    x[0, :] = 7
    x[2, 10:30] = 9
    first, length = torch.tensor([0, 5, 12]), torch.tensor([40, 33, 40])
    counts = draft_counts(model, x, first, length)
    with torch.no_grad():
        h = model.hidden(x)
        main = model.head(h).argmax(-1)

        def drafts(b: int, t: int) -> list[int]:
            """The runtime's drafting at ``t`` of row ``b``, one position at a time: step 0 is fed the main pick,
            step k > 0 the previous step's own draft."""
            g, tok, out = h[b, t], main[b, t], []
            for step in model.mtp:
                g = step(g, model.tok_emb(tok))
                tok = model.head(g).argmax(-1)
                out.append(int(tok))
            return out

    positions, agree, chain, data = 0, [0] * 3, [0] * 3, [0] * 3
    for b in range(3):
        for t in range(int(first[b]), int(length[b]) - 3 - 1):
            positions += 1
            ok = True
            d = drafts(b, t)
            for k in range(3):
                hit = bool(d[k] == main[b, t + k + 1])
                ok = ok and hit
                agree[k] += hit
                chain[k] += ok
                data[k] += bool(d[k] == x[b, t + k + 2])
    assert (counts["positions"], counts["agree"], counts["chain"], counts["data"]) == (positions, agree, chain, data)
    assert 0 < chain[2] < chain[0] < positions and agree[1] < agree[0]
    assert all(0 < p <= positions + 1e-3 for p in counts["accept_prob"])


def _corpus(tmp):
    files = []
    for name, src, split in (("lib_train.py", TRAIN_SRC, "train"), ("lib_val.py", VAL_SRC, "val")):
        p = tmp / name
        p.write_text(src * 8)
        files.append(SourceFile(str(p), "tmp", p.stem, len(src) * 8, "0" * 64, split))
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(asdict(f)) + "\n" for f in files))
    return manifest


@pytest.mark.e2e
def test_tiny_cpu_run_writes_three_heads_on_the_unchanged_backbone(tmp_path):
    manifest = _corpus(tmp_path)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    base = Transformer(cfg)
    spec = spec_from_hf(train_tokenizer([TRAIN_SRC, VAL_SRC], vocab_size=400), chat_template=CHAT_TEMPLATE, eos=EOT)
    src = tmp_path / "base.gguf"
    write_gguf(src, cfg, base.gguf_tensors(), spec.padded(cfg.vocab_size), metadata={"training.steps": 7})
    run = MTPConfig(gguf=str(src), out=str(tmp_path / "mtp"), manifest=str(manifest), steps=3, batch_size=2,
                    chat_batch_size=2, seq_len=128, max_answer_tokens=120, warmup_steps=1, workers=1, log_every=1,
                    eval_tokens=256, eval_windows=2, eval_prompts=2, eval_prompt_tokens=8, eval_requests=2,
                    eval_new_tokens=6, device="cpu", plain_mb=1.0)  # fmt: skip
    report = train_mtp(run, progress=False)
    out = tmp_path / "mtp" / "model.gguf"
    gg, orig = read_gguf(out), read_gguf(src)
    names = {f"mtp.{k}.{n}.weight" for k in range(3) for n in ("proj", "embed_proj", "embed_norm")}
    assert gg.config.mtp_heads == 3 and names <= set(gg.tensors)
    assert backbone_differences(src, out) == [] and report["backbone_byte_identical"]
    ours, theirs = gg.model_tensors(), orig.model_tensors()
    for name, t in theirs.items():
        a, b = ours[name], t
        assert np.array_equal(getattr(a, "codes", a), getattr(b, "codes", b)) and getattr(a, "scale", 0) == getattr(
            b, "scale", 0)  # fmt: skip
    assert gg.metadata["training.steps"] == 7 and gg.metadata["training.mtp_distilled"] is True
    assert gg.metadata["training.mtp_steps"] == 3 and report["train"]["steps"] == 3
    bpb = report["bits_per_byte"]
    assert bpb["before"] == bpb["after"]
    for name in ("plain_teacher_forced", "chat_teacher_forced", "plain_greedy", "chat_greedy"):
        r = report["eval"][name]
        assert r["positions"] > 0 and len(r["heads"]) == 3, name
        acc = [r["expected_accepted"][str(k)] for k in (1, 2, 3)]
        assert acc == sorted(acc) and all(h["chain_accepted"] <= h["agree_top1"] for h in r["heads"])
    assert json.loads((tmp_path / "mtp" / "mtp_report.json").read_text())["train"]["steps"] == 3
    rows = (tmp_path / "mtp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
