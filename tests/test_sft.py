"""Instruction tuning and the chat evaluation (train/sft.py, train/chat_eval.py): pairs from the train split only,
the loss mask, the GGUF → PyTorch → GGUF round trip, answer scoring, batched greedy decoding and a tiny CPU run."""

from __future__ import annotations

import ast
import functools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import get_config
from model.generate import generate
from model.gguf_io import read_gguf, write_gguf
from model.sampling import SamplingParams
from model.tokenizer import hf_from_spec, spec_from_hf
from model.transformer import IGNORE_INDEX, Transformer
from train.chat_eval import (
    ChatEvalConfig,
    evaluate_gguf,
    first_code_block,
    greedy_batch,
    greedy_sequential,
    requests_of,
    score_answer,
)
from train.corpus import SourceFile
from train.sft import (
    CHAT_TUNED_KEY,
    END,
    SFTConfig,
    build_pairs,
    corpus_functions,
    encode_pairs,
    encode_turn,
    eval_request,
    inputs_and_labels,
    load_gguf_model,
    render_chat,
    that_clause,
    train_sft,
)
from train.tokenizer import CHAT_TEMPLATE, EOT, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

TRAIN_SRC = '''"""A module."""


def add_numbers(a, b):
    """Return the sum of a and b.

    Longer explanation that goes on
    for several lines and should be cut.
    """
    total = a + b
    return total


def _no_doc(x):
    return x


def nested_outer(items):
    """Count the items that are true."""

    def inner(v):
        """Check one value for truth."""
        return bool(v)

    return sum(1 for v in items if inner(v))


class Shelf:
    """A shelf."""

    def __init__(self):
        """Make an empty shelf."""
        self.items = []

    def put_book(self, book: str) -> None:
        """Put a book on the shelf."""
        self.items.append(book)

    def only_doc(self):
        """This method has a docstring only."""
'''

VAL_SRC = '''def held_out_function(path):
    """Read the file at path and return its lines."""
    with open(path) as fh:
        return fh.read().splitlines()


def another_held_out(n: int) -> int:
    """Compute the square of n."""
    return n * n
'''


def _corpus(tmp: Path) -> tuple[Path, list[SourceFile]]:
    """A two-file corpus (one train file, one held-out file) and its manifest."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = []
    for name, src, split in (("lib_train.py", TRAIN_SRC * 1, "train"), ("lib_val.py", VAL_SRC, "val")):
        p = tmp / name
        p.write_text(src)
        files.append(SourceFile(str(p), "tmp", p.stem, len(src), "0" * 64, split))
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(asdict(f)) + "\n" for f in files))
    return manifest, files


@functools.cache
def _tokenizer():
    texts = [TRAIN_SRC, VAL_SRC, (REPO / "train" / "sft.py").read_text(), (REPO / "train" / "eval.py").read_text()]
    return train_tokenizer(texts, vocab_size=512)


def _tiny_gguf(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = get_config("tiny")
    model = Transformer(cfg)
    spec = spec_from_hf(_tokenizer(), chat_template=CHAT_TEMPLATE, eos=EOT).padded(cfg.vocab_size)
    write_gguf(path, cfg, model.gguf_tensors(), spec, metadata={"training.steps": 1, "training.preset": "tiny"})
    return path


@pytest.mark.unit
def test_pairs_come_from_the_train_split_and_answer_with_the_function(tmp_path):
    _, files = _corpus(tmp_path)
    fns = corpus_functions([f for f in files if f.split == "train"], workers=1)
    assert sorted(f["name"] for f in fns) == ["add_numbers", "nested_outer", "put_book"]  # no nested/dunder/no body
    add = next(f for f in fns if f["name"] == "add_numbers")
    assert '"""Return the sum of a and b."""' in add["code"] and "several lines" not in add["code"]
    assert that_clause(add["summary"]) == "returns the sum of a and b"
    assert eval_request(add) == "Write a Python function `add_numbers(a, b)` that returns the sum of a and b."
    put = next(f for f in fns if f["name"] == "put_book")
    assert put["method"] and put["code"].startswith("def put_book(self, book: str) -> None:")
    pairs = build_pairs(fns * 40, seed=0)  # duplicates collapse to one turn per function
    assert len(pairs) == 3
    many = build_pairs([f | {"code": f["code"] + f"\n# {i}"} for i in range(60) for f in fns], seed=1)
    kinds = {k: sum(p["kind"] == k for p in many) for k in ("named", "unnamed", "complete")}
    assert kinds["named"] > kinds["unnamed"] > 0 and kinds["complete"] > 0
    for p in many:
        block = first_code_block(p["assistant"])
        assert p["assistant"].startswith("```python\n") and p["assistant"].endswith("\n```")
        assert score_answer(p["assistant"], p["name"])["ok"], p
        assert ast.parse(block)
        if p["kind"] == "named":
            assert p["name"] in p["user"]
    assert not {"held_out_function", "another_held_out"} & {p["name"] for p in many}


@pytest.mark.unit
def test_loss_mask_covers_exactly_the_assistant_tokens():
    tok = _tokenizer()
    pair = {
        "user": "Write a Python function `f(x)` that returns x.",
        "assistant": "```python\ndef f(x):\n    return x\n```",
    }
    ids, n_prompt = encode_turn(tok, pair, CHAT_TEMPLATE)
    prompt = render_chat([{"role": "user", "content": pair["user"]}], CHAT_TEMPLATE)
    assert prompt == f"<|user|>\n{pair['user']}<|end|>\n<|assistant|>\n"
    turns = [{"role": "user", "content": pair["user"]}, {"role": "assistant", "content": pair["assistant"]}]
    whole = render_chat(turns, CHAT_TEMPLATE, add_generation_prompt=False)
    assert whole.startswith(prompt + pair["assistant"] + END)
    x, y = inputs_and_labels(ids, n_prompt)
    assert len(x) == len(y) == len(ids) - 1 and (x == ids[:-1]).all()
    scored = y[y != IGNORE_INDEX]
    assert (y[: n_prompt - 1] == IGNORE_INDEX).all() and (y[n_prompt - 1 :] != IGNORE_INDEX).all()
    assert tok.decode(scored.tolist(), skip_special_tokens=False) == pair["assistant"] + END
    assert tok.decode(ids[:n_prompt].tolist(), skip_special_tokens=False) == prompt
    batched = encode_pairs(tok, [pair], CHAT_TEMPLATE, max_len=512, max_answer_tokens=512)
    assert len(batched) == 1 and np.array_equal(batched[0][0], ids) and batched[0][1] == n_prompt


@pytest.mark.unit
@pytest.mark.parametrize("source", ["random-tiny", "models/small.gguf"])
def test_gguf_to_torch_to_gguf_is_bit_exact(tmp_path, source):
    path = _tiny_gguf(tmp_path / "a.gguf") if source == "random-tiny" else REPO / source
    model, gg = load_gguf_model(path)
    again = tmp_path / "b.gguf"
    write_gguf(again, model.config, model.gguf_tensors(), gg.tokenizer, ternary_type=gg.ternary_type,
               metadata={k: v for k, v in gg.metadata.items() if k.startswith("training.")})  # fmt: skip
    back = read_gguf(again)
    a, b = gg.model_tensors(), back.model_tensors()
    assert set(a) == set(b)
    for name in a:
        if hasattr(a[name], "codes"):
            assert np.array_equal(a[name].codes, b[name].codes) and a[name].scale == b[name].scale, name
        else:
            assert np.array_equal(a[name], b[name]), name
    assert all(np.array_equal(gg.tensors[n].data, back.tensors[n].data) for n in gg.tensors)
    assert Path(again).read_bytes() == Path(path).read_bytes()


@pytest.mark.unit
def test_scoring_of_handwritten_answers():
    good = "Here it is:\n\n```python\ndef area(r):\n    return 3.14 * r * r\n```\nDone."
    assert score_answer(good, "area") == {"has_block": True, "parses": True, "defines": True, "ok": True}
    no_block = "def area(r):\n    return 3.14 * r * r\n"
    assert score_answer(no_block, "area") == {"has_block": False, "parses": True, "defines": True, "ok": True}
    prose = "The area is pi times r squared."
    assert not score_answer(prose, "area")["ok"] and not score_answer(prose, "area")["parses"]
    wrong = "```python\ndef volume(r):\n    return r ** 3\n```"
    assert score_answer(wrong, "area") == {"has_block": True, "parses": True, "defines": False, "ok": False}
    broken = "```python\ndef area(r):\n    return (3.14 * r\n```"
    assert score_answer(broken, "area") == {"has_block": True, "parses": False, "defines": False, "ok": False}
    cut = "```python\ndef area(r):\n    return 3.14 * r * r\n"  # the token limit stopped it before the fence
    assert score_answer(cut, "area")["ok"]
    first_only = "```python\nx = 1\n```\n```python\ndef area(r):\n    pass\n```"
    assert not score_answer(first_only, "area")["ok"]  # the first block counts
    method = "```python\nclass C:\n    def area(self):\n        return 1\n```"
    assert score_answer(method, "area")["ok"]


@pytest.mark.unit
def test_batched_greedy_matches_one_prompt_at_a_time():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).eval()
    prompts = [[5, 9, 30, 2], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [40, 41]]
    got = greedy_batch(model, prompts, max_new_tokens=6, stop_ids={0}, batch_size=3)
    assert greedy_sequential(model, prompts, max_new_tokens=6, stop_ids={0}) == got
    for p, g in zip(prompts, got, strict=True):
        ref = generate(model, p, SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(0,)))
        stopped = ref.tokens[-1:] == [0]
        assert g["ids"] == ref.tokens[: len(ref.tokens) - stopped] and g["finish_reason"] == (
            "stop" if stopped else "length"
        )


@pytest.mark.e2e
def test_tiny_cpu_sft_writes_a_chat_tuned_gguf_and_evaluates(tmp_path):
    manifest, _ = _corpus(tmp_path / "corpus")
    gguf = _tiny_gguf(tmp_path / "base.gguf")
    cfg = SFTConfig(gguf=str(gguf), out=str(tmp_path / "sft"), manifest=str(manifest), steps=3, batch_size=4,
                    plain_batch_size=2, seq_len=128, max_answer_tokens=120, warmup_steps=1, workers=1, log_every=1,
                    device="cpu", plain_mb=1.0)  # fmt: skip
    summary = train_sft(cfg, progress=False)
    out = tmp_path / "sft" / "model.gguf"
    assert summary["turns_used"] >= 1 and summary["last"]["step"] == 3 and summary["export"]["max_logit_gap"] <= 1e-5
    gg = read_gguf(out)
    assert gg.metadata[CHAT_TUNED_KEY] is True and gg.metadata["training.sft_steps"] == 3
    assert gg.metadata["training.preset"] == "tiny" and gg.tokenizer.chat_template == CHAT_TEMPLATE
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["chat_loss"]) for r in rows)
    shards = tmp_path / "sft" / "data" / "shards"
    report = evaluate_gguf(out, manifest, shards, ChatEvalConfig(n=2, max_new_tokens=4, bpb_tokens=64, seq_len=32),
                           "cpu", workers=1)  # fmt: skip
    assert report["chat_tuned"] and report["requests"] == 2 and 0 <= report["pass_rate"] <= 1
    assert report["bits_per_byte"] > 0 and {s["name"] for s in report["samples"]} == {"held_out_function",
                                                                                     "another_held_out"}  # fmt: skip
    assert hf_from_spec(gg.tokenizer).token_to_id(END) is not None
    (tmp_path / "report.json").write_text(json.dumps(report))
    again = evaluate_gguf(out, None, None, ChatEvalConfig(n=2, max_new_tokens=4, kv_cache=1), "cpu",
                          requests=tmp_path / "report.json")  # fmt: skip
    assert [s["request"] for s in again["samples"]] == [r["request"] for r in requests_of(tmp_path / "report.json")]
    assert [s["answer"] for s in again["samples"]] == [s["answer"] for s in report["samples"]]
