"""RL from execution feedback (train/rl.py): GRPO advantages and clipped objective, MaxRL's success-only likelihood,
the KL term, batched group sampling against the one-sequence loop, several prompts' groups in one left-padded batch,
exact resume of a tiny run with a deterministic fake reward, and the CLI's refusal of a held-out task file."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import tiny_gguf

from model.config import get_config
from model.generate import generate
from model.gguf_io import read_gguf
from model.sampling import SamplingParams
from model.transformer import Transformer
from train import checkpoint, muon
from train.rl import (
    RLConfig,
    Rollout,
    grpo_advantages,
    kl_k3,
    maxrl_weights,
    micro_batches,
    rollouts_for_update,
    sample_group,
    sample_groups,
    step_tasks,
    stop_window,
    token_logprobs,
    token_objective,
    train_rl,
    update_policy,
)
from train.train import make_optimizers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch):
    """PyTorch on one thread (on a loaded 2-core machine its spinning OpenMP threads run many times slower) and
    Muon's Newton–Schulz in float32 (CPU bf16 batched matmuls are ~25x slower: a tiny Muon step 3.5 s)."""
    monkeypatch.setattr(muon, "orthogonalize", functools.partial(muon.orthogonalize, dtype=torch.float32))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_config("tiny"))


def _cfg(**kw) -> RLConfig:
    base = {"gguf": str(tiny_gguf()), "lr_matrix": 0.02, "lr_embed": 0.01, "kl_coef": 0.0, "device": "cpu"}
    return RLConfig(**(base | kw))


def _logp_sum(model: Transformer, prompt: list[int], completion: list[int]) -> float:
    (b,) = micro_batches([Rollout(prompt, completion)], 8, "cpu")
    with torch.no_grad():
        return float((token_logprobs(model, b["x"], b["y"]) * b["mask"]).sum())


@pytest.mark.unit
def test_grpo_advantages_normalise_each_group_and_skip_groups_without_signal():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.5]])
    adv, signal = grpo_advantages(rewards, eps=1e-6)
    assert signal.tolist() == [True, False, True]
    r = rewards.double().numpy()
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(adv[[0, 2]].numpy(), want[[0, 2]], rtol=1e-6)
    assert adv[1].abs().sum() == 0 and abs(float(adv[0].mean())) < 1e-6 and float(adv[0].std(unbiased=False)) > 0.99
    prompts, groups = [[1], [2], [3]], [[[10 + g * 4 + i] for i in range(4)] for g in range(3)]
    rows, with_signal = rollouts_for_update("grpo", prompts, groups, rewards, _cfg())
    assert with_signal == 2 and [r.prompt for r in rows] == [[1]] * 4 + [[3]] * 4
    assert [r.coef for r in rows] == pytest.approx(adv[[0, 2]].flatten().tolist())


@pytest.mark.unit
def test_maxrl_keeps_passing_samples_only_weighted_per_group():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.7], [0.0, 0.2, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert maxrl_weights(rewards, "group").tolist() == [[0.5, 0, 0.5, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert maxrl_weights(rewards, "mean").tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    groups = [[[g, i] for i in range(4)] for g in range(3)]
    rows, with_signal = rollouts_for_update("maxrl", [[7]] * 3, groups, rewards, _cfg(algo="maxrl"))
    assert with_signal == 2 and [r.completion for r in rows] == [[0, 0], [0, 2], [2, 0]]
    assert [r.weight for r in rows] == [0.5, 0.5, 1.0]


@pytest.mark.unit
def test_micro_batches_mask_exactly_the_completion_targets():
    (b,) = micro_batches([Rollout([1, 2, 3], [4, 5]), Rollout([6], [7, 8, 9])], 4, "cpu")
    assert b["x"].tolist() == [[1, 2, 3, 4], [6, 7, 8, 0]] and b["y"].tolist() == [[2, 3, 4, 5], [7, 8, 9, 0]]
    assert b["mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


@pytest.mark.unit
def test_clip_stops_the_gradient_only_where_it_should():
    old = torch.zeros(1, 3)
    for adv, clipped in ((1.0, True), (-1.0, False)):
        logp = torch.full((1, 3), 0.5, requires_grad=True)  # ratio e^0.5 ≈ 1.65, outside 1 ± 0.2
        token_objective("grpo", logp, old, torch.tensor([adv]), None, 0.2, 0.0).sum().backward()
        assert (logp.grad.abs().sum() == 0) == clipped


@pytest.mark.unit
@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_one_grpo_update_moves_the_sample_log_prob_with_its_advantage(adv):
    model = _tiny_model()
    prompt, completion = [5, 9, 30, 2], [40, 41, 42, 43]
    before = _logp_sum(model, prompt, completion)
    cfg = _cfg(inner_epochs=2)
    stats = update_policy(model, None, make_optimizers(model, cfg.schedule()), [Rollout(prompt, completion, adv)], cfg)
    after = _logp_sum(model, prompt, completion)
    assert stats["updated"] and stats["update_tokens"] == 4
    assert (after - before) * adv > 0.01, (before, after)


@pytest.mark.unit
def test_maxrl_makes_no_update_when_nothing_passes():
    model = _tiny_model()
    cfg = _cfg(algo="maxrl")
    rewards = torch.tensor([[0.0, 0.5, 0.9]])
    rows, signal = rollouts_for_update("maxrl", [[5, 9]], [[[1], [2, 3], [4]]], rewards, cfg)
    before = copy.deepcopy(model.state_dict())
    stats = update_policy(model, copy.deepcopy(model), make_optimizers(model, cfg.schedule()), rows, cfg)
    assert rows == [] and signal == 0 and stats["updated"] is False
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.unit
def test_kl_term_is_zero_with_zero_gradient_when_policy_is_the_reference():
    model = _tiny_model()
    ref = copy.deepcopy(model).requires_grad_(False)
    (b,) = micro_batches([Rollout([5, 9, 30], [40, 41, 42]), Rollout([7], [8, 9])], 4, "cpu")
    logp = token_logprobs(model, b["x"], b["y"])
    kl = kl_k3(logp, token_logprobs(ref, b["x"], b["y"]))
    assert float(kl.detach().abs().max()) == 0.0
    (kl * b["mask"]).sum().backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)
    assert float(kl_k3(torch.tensor([0.0]), torch.tensor([-1.0]))) > 0  # positive where they differ
    # through the update: advantage 0 leaves the KL term alone, and it is 0
    cfg = _cfg(kl_coef=1.0)
    stats = update_policy(model, ref, make_optimizers(model, cfg.schedule()), [Rollout([5, 9], [1, 2, 3], 0.0)], cfg)
    assert stats["updated"] and stats["loss"] == 0.0 and stats["kl"] == 0.0


@pytest.mark.unit
def test_batched_greedy_group_equals_one_sequence_generation():
    model = _tiny_model().eval()
    prompt = [5, 9, 30, 2, 77]
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    free = generate(model, prompt, SamplingParams(max_new_tokens=12, temperature=0.0)).tokens
    cases = [SamplingParams(max_new_tokens=12, temperature=0.0),
             SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(free[5],)),
             SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=(decode(free[3:5]),))]  # fmt: skip
    for params in cases:
        want = generate(model, prompt, params, decode=decode).tokens
        got = sample_group(model, prompt, 3, params, torch.Generator().manual_seed(0), decode)
        assert got == [want] * 3
        assert len(want) == 12 if params is cases[0] else len(want) < 12  # the stop fired


@pytest.mark.unit
def test_sampled_groups_are_seeded_and_each_row_keeps_its_own_context():
    model = _tiny_model().eval()
    prompt = [5, 9, 30, 2]
    free = sample_group(model, prompt, 6, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=3),
                        torch.Generator().manual_seed(1))  # fmt: skip
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=3, stop_token_ids=(free[0][2], free[1][4]))
    a = sample_group(model, prompt, 6, params, torch.Generator().manual_seed(1))
    assert a == sample_group(model, prompt, 6, params, torch.Generator().manual_seed(1))
    assert a != sample_group(model, prompt, 6, params, torch.Generator().manual_seed(2))
    assert len({len(r) for r in a}) > 1, "rows should finish at different steps (the cache is compacted)"
    for row in a:  # every token is in the top 3 of the full forward over its own prefix: no row read another's cache
        assert all(t not in params.stop_token_ids for t in row[:-1])
        assert row[-1] in params.stop_token_ids or len(row) == 10
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row[:-1]]))[0, len(prompt) - 1 :]
        top3 = logits.topk(3).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(row))


@pytest.mark.unit
def test_a_left_padded_batch_computes_each_prompt_as_alone_and_ignores_its_padding():
    from model.attention import KVCache

    model = _tiny_model().eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30]]
    longest = max(map(len, prompts))

    def batch(pad_token: int) -> list[torch.Tensor]:
        cache = KVCache(model.config, len(prompts), 32)
        cache.pad = torch.tensor([longest - len(p) for p in prompts])
        x = torch.tensor([[pad_token] * (longest - len(p)) + p for p in prompts])
        with torch.no_grad():
            first = model(x, cache)[:, -1]
            cache.repeat_rows(2)  # rows 2b, 2b + 1: prompt b
            second = model(torch.tensor([[40], [41]] * 3), cache)[:, -1]
            cache.keep_rows(torch.tensor([5, 0]))  # prompt 2's second row, prompt 0's first
            third = model(torch.tensor([[42], [43]]), cache)[:, -1]
        return [first, second, third]

    got = batch(0)
    assert all(torch.equal(a, b) for a, b in zip(got, batch(255), strict=True))  # padding is never attended to
    for b, p in enumerate(prompts):
        alone = []
        for step in ([40], [41]):
            with torch.no_grad():
                alone.append(model(torch.tensor([p + step]))[0, -2:])
        torch.testing.assert_close(got[0][b], alone[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1][2 * b], alone[0][1], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1][2 * b + 1], alone[1][1], rtol=0, atol=1e-5)
    with torch.no_grad():
        last = [model(torch.tensor([prompts[2] + [41, 42]]))[0, -1],
                model(torch.tensor([prompts[0] + [40, 43]]))[0, -1]]  # fmt: skip
    torch.testing.assert_close(got[2], torch.stack(last), rtol=0, atol=1e-5)


@pytest.mark.unit
def test_left_padded_batches_are_refused_for_mla_and_deltanet():
    from model.attention import KVCache

    mla = {"kv_lora_rank": 256, "n_kv_heads": 4, "qk_rope_dim": 32}
    for extra in (mla, {"full_attention_interval": 2}):  # MLA; a DeltaNet hybrid (every second layer softmax)
        torch.manual_seed(0)
        model = Transformer(get_config("tiny", **extra)).eval()
        cache = KVCache(model.config, 2, 16)
        cache.pad = torch.tensor([1, 0])
        with pytest.raises(ValueError, match="GQA"):
            model(torch.tensor([[1, 2], [3, 4]]), cache)


@pytest.mark.unit
def test_several_prompts_groups_in_one_batch_equal_their_own_groups_when_greedy():
    model = _tiny_model().eval()
    prompts = [[5, 9, 30, 2, 77, 4, 8], [11, 3], [60, 61, 62, 63]]
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    free = sample_group(model, prompts[0], 1, SamplingParams(max_new_tokens=10, temperature=0.0), torch.Generator())[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(free[4],))
    got = sample_groups(model, prompts, 2, params, torch.Generator().manual_seed(0), decode)
    want = [sample_group(model, p, 2, params, torch.Generator().manual_seed(0), decode) for p in prompts]
    assert got == want
    assert len(got[0][0]) == free.index(free[4]) + 1 < 10  # the stop token ended prompt 0's group
    # sampled: seeded, one row per (prompt, sample), each row's tokens in the top 3 of its own prompt's forward
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=3)
    a = sample_groups(model, prompts, 3, sampled, torch.Generator().manual_seed(1))
    assert a == sample_groups(model, prompts, 3, sampled, torch.Generator().manual_seed(1))
    assert [len(g) for g in a] == [3, 3, 3]
    for p, group in zip(prompts, a, strict=True):
        for row in group:
            with torch.no_grad():
                top3 = model(torch.tensor([p + row[:-1]]))[0, len(p) - 1 :].topk(3).indices
            assert all(t in top3[i].tolist() for i, t in enumerate(row))
    # the longest prompt plus the new tokens past the context: one group at a time, still every prompt's group
    long = SamplingParams(max_new_tokens=model.config.max_seq_len - 5, temperature=0.0)
    assert [len(g) for g in sample_groups(model, [[1, 2, 3, 4, 5, 6], [7]], 1, long, torch.Generator())] == [1, 1]
    assert sample_groups(model, [], 2, params, torch.Generator()) == []


@pytest.mark.unit
def test_the_eval_generator_batches_whole_tasks_and_keeps_each_jobs_place():
    """train.exec_eval's PyTorch generator samples the groups of a call with one setting in one batch: greedy rows
    equal each prompt's own group, every job's result lands in its own place, and a call repeats exactly."""
    from train.exec_eval import torch_group_generator

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(0x4E00 + i) for i in ids)  # one character per token, reversible

    model = _tiny_model().eval()
    prompts = [[5, 9, 30, 2, 77, 4, 8], [11, 3], [60, 61, 62, 63]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=3)
    jobs = [j for i, p in enumerate(prompts)
            for j in [(p, greedy)] + [(p, replace(sampled, seed=100 * i + k)) for k in range(3)]]  # fmt: skip
    run = torch_group_generator(model, Tok())
    out = run(jobs)
    assert len(out) == len(jobs) and out == run(jobs)
    for i, p in enumerate(prompts):
        (want,) = sample_group(model, p, 1, greedy, torch.Generator())
        assert out[4 * i] == (Tok().decode(want), "length")
    alone = run(jobs[4:8])  # the second task alone: its own greedy row, and sampled rows of its own prompt's forward
    assert alone[0] == out[4]
    for text, _ in alone[1:]:
        toks = [ord(c) - 0x4E00 for c in text]
        with torch.no_grad():
            top3 = model(torch.tensor([prompts[1] + toks[:-1]]))[0, len(prompts[1]) - 1 :].topk(3).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(toks))


@pytest.mark.unit
def test_step_tasks_visit_every_task_once_per_epoch():
    seen = [i for step in range(5) for i in step_tasks(10, 4, 0, step)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert step_tasks(10, 4, 0, 3) == step_tasks(10, 4, 0, 3) != step_tasks(10, 4, 1, 3)


@dataclass(frozen=True)
class FakeTask:
    task_id: str
    prompt: str


def fake_scorer(tasks, bodies):
    """Deterministic: a reward in {0, 0.5, 1} from a hash of the body (so groups have signal)."""
    return [int(hashlib.sha256(b.encode()).hexdigest(), 16) % 3 / 2 for b in bodies]


FAKE_TASKS = [FakeTask(f"t{i}", f'def f{i}(x):\n    """Return x plus {i}."""') for i in range(5)]
TIMING = ("sample_s", "reward_s", "update_s")


@pytest.mark.e2e
def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    cfg = _cfg(steps=4, prompts_per_step=2, group_size=3, max_new_tokens=6, temperature=1.0, top_p=0.9,
               inner_epochs=2, kl_coef=0.05, ckpt_every=10, warmup_steps=1)  # fmt: skip
    full = replace(cfg, out=str(tmp_path / "full"))
    split = replace(cfg, out=str(tmp_path / "split"), run_steps=2)
    a = train_rl(full, FAKE_TASKS, fake_scorer, progress=False)
    b1 = train_rl(split, FAKE_TASKS, fake_scorer, progress=False)
    assert b1["status"] == "paused" and b1["step"] == 2 and not (tmp_path / "split" / "model.gguf").exists()
    b2 = train_rl(split, FAKE_TASKS, fake_scorer, progress=False)
    assert a["status"] == b2["status"] == "completed" and b2["step"] == 4

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]

    assert rows("full") == rows("split") and [r["step"] for r in rows("full")] == [1, 2, 3, 4]
    assert any(r["updated"] for r in rows("full")) and all(r["kl"] is None or r["kl"] >= 0 for r in rows("full"))
    sd = {name: checkpoint.latest(tmp_path / name / "checkpoints") / "model.safetensors" for name in ("full", "split")}
    assert sd["full"].read_bytes() == sd["split"].read_bytes()
    gg = read_gguf(tmp_path / "full" / "model.gguf")
    assert gg.metadata["training.rl_algo"] == "grpo" and gg.metadata["training.rl_steps"] == 4
    assert (tmp_path / "full" / "rl_curves.png").stat().st_size > 0
    summary = json.loads((tmp_path / "full" / "rl_summary.json").read_text())
    assert summary["step"] == 4 and summary["export"]["max_logit_gap"] <= 1e-5


@pytest.mark.e2e
def test_maxrl_run_logs_steps_without_passes(tmp_path):
    cfg = _cfg(algo="maxrl", steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, temperature=1.0,
               out=str(tmp_path / "m"))  # fmt: skip
    summary = train_rl(cfg, FAKE_TASKS, lambda tasks, bodies: [0.0] * len(bodies), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and [r["updated"] for r in rows] == [False, False]
    assert all(r["pass_rate"] == 0 and r["groups_with_signal"] == 0 and r["tokens_sampled"] > 0 for r in rows)


@pytest.mark.e2e
def test_cli_refuses_a_held_out_task_file(tmp_path):
    tasks = tmp_path / "heldout.jsonl"
    task = {"task_id": "stdlib/m::f", "package": "m", "module": "m", "qualname": "f", "check": ">>> f()\n1\n",
            "prompt": 'def f():\n    """F."""', "reference": "\n    return 1\n", "examples": 1}  # fmt: skip
    tasks.write_text(json.dumps({"kind": "exec-tasks", "version": 1, "split": "val"}) + "\n" + json.dumps(task) + "\n")
    cmd = [sys.executable, "-m", "train.rl", "--gguf", str(tiny_gguf()), "--tasks", str(tasks), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "train-split tasks only" in proc.stderr and "split='val'" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.unit
def test_frozen_weights_give_the_same_outputs_and_end_on_exit():
    from model.bitlinear import BitLinear, frozen_weights

    torch.manual_seed(0)
    layer = torch.nn.Sequential(BitLinear(64, 32), BitLinear(32, 16))
    x = torch.randn(5, 64)
    want = layer(x)
    with frozen_weights(layer):
        assert all(m.frozen is not None for m in layer)
        got = layer(x)
    assert torch.equal(got, want) and all(m.frozen is None for m in layer)
    with torch.no_grad():
        layer[0].weight.mul_(-1)  # per-call quantization again after the block
    assert not torch.equal(layer(x), want)


@functools.cache
def _shipped_tokenizer():
    from model.tokenizer import hf_from_spec

    return hf_from_spec(read_gguf(REPO / "models" / "small.gguf").tokenizer)


@pytest.mark.unit
@settings(max_examples=150, deadline=None)
@given(
    text=st.lists(st.sampled_from([*"ab d\n@:éß€𝄞", "def ", "class ", "if __name__"]), max_size=40).map("".join),
    stops=st.sampled_from([("\ndef ", "\nclass ", "\n@"), ("é€",), ("𝄞\n",)]),
)
def test_the_stop_window_finds_each_stop_string_where_the_whole_text_does(text, stops):
    """Sampling checks only the last ``stop_window`` tokens each step (the earlier text held no stop string): the
    first step at which that sees a stop string is the first at which the whole decoded completion holds one, with
    multi-byte characters split over byte tokens (€, 𝄞) and stop strings made of them."""
    tok = _shipped_tokenizer()
    ids = tok.encode(text).ids
    decode = lambda x: tok.decode(x, skip_special_tokens=False)  # noqa: E731
    w = stop_window(SamplingParams(stop_strings=stops))

    def first(check) -> int | None:
        return next((i for i in range(1, len(ids) + 1) if check(ids[:i])), None)

    whole = first(lambda xs: any(s in decode(xs) for s in stops))
    assert first(lambda xs: any(s in decode(xs[-w:]) for s in stops)) == whole


# --- the compiled engine as the sampler (bench.rl_engine) and Engine.load_weights -----------------------------------
def _exact(path: Path, target: str):
    from compiler.arith import arith_of
    from model.exact_reference import ExactReference

    g = read_gguf(path)
    return ExactReference(g, arith_of(g.config, target))


@pytest.mark.e2e
def test_engine_load_weights_computes_with_the_new_weights_exactly(tmp_path):
    from runtime_helpers import built, write_tiny

    from compiler.build import entry_meta, pack_for
    from runtime.engine import Engine
    from runtime.kv_cache import Sequence

    a, b = tiny_gguf(), write_tiny(tmp_path / "b.gguf", seed=1)
    entry = built(a).dir
    eng, meta = Engine(entry, None), entry_meta(entry)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]

    def logits():
        seq = Sequence()
        out = eng.prefill(prompt, seq)
        eng.reset(seq)
        return out

    before = logits()
    np.testing.assert_array_equal(before, _exact(a, eng.target).prefill(prompt))
    eng.load_weights(pack_for(meta, b))
    np.testing.assert_array_equal(logits(), _exact(b, eng.target).prefill(prompt))
    assert not np.array_equal(logits(), before)
    bad = pack_for(meta, a)
    name = next(iter(bad))
    bad[name] = bad[name][:1]
    with pytest.raises(ValueError, match=f"'{name}' is"):
        eng.load_weights(bad)
    del bad[name]
    with pytest.raises(ValueError, match=f"no '{name}'"):
        eng.load_weights(bad)
    np.testing.assert_array_equal(logits(), _exact(b, eng.target).prefill(prompt))  # nothing changed


@pytest.mark.e2e
def test_engine_sampler_samples_the_policy_as_it_stands(tmp_path):
    """Greedy rollouts through the engine, after it took a policy's weights, are the exact reference's of that
    policy's export: the engine follows the PyTorch model, not the GGUF it was built from."""
    from runtime_helpers import built

    from bench.rl_engine import EngineSampler
    from model.gguf_io import write_gguf

    sampler = EngineSampler(built(tiny_gguf()).dir, tiny_gguf(), threads=1)
    torch.manual_seed(3)
    model = Transformer(read_gguf(tiny_gguf()).config)
    prompts, steps = [[5, 6, 7, 8], [9, 10]], 6
    groups = sampler(model, prompts, 2, SamplingParams(max_new_tokens=steps, temperature=0.0), seed=11)
    write_gguf(tmp_path / "policy.gguf", model.config, model.gguf_tensors(), read_gguf(tiny_gguf()).tokenizer)
    never = sampler.engine._never
    for prompt, group in zip(prompts, groups, strict=True):
        ref = _exact(tmp_path / "policy.gguf", sampler.engine.target)
        logits, want = ref.prefill(prompt), []
        for _ in range(steps):
            logits[never] = -np.inf
            want.append(int(np.argmax(logits)))
            logits = ref.decode(want[-1])
        assert group == [want, want]
    assert sampler.sync_s > 0


@pytest.mark.e2e
def test_rl_with_the_engine_sampler_resumes_only_with_it(tmp_path):
    from runtime_helpers import built

    from bench.rl_engine import EngineSampler
    from train.rl import RLError

    sampler = EngineSampler(built(tiny_gguf()).dir, tiny_gguf(), threads=1)
    cfg = _cfg(steps=2, prompts_per_step=2, group_size=3, max_new_tokens=6, temperature=1.0, top_p=0.9,
               out=str(tmp_path / "e"), run_steps=1)  # fmt: skip
    first = train_rl(cfg, FAKE_TASKS, fake_scorer, progress=False, sampler=sampler)
    assert first["status"] == "paused" and first["sampler"] == "engine"
    with pytest.raises(RLError, match="sampled by 'engine'"):
        train_rl(cfg, FAKE_TASKS, fake_scorer, progress=False)  # the PyTorch sampler
    again = train_rl(replace(cfg, out=str(tmp_path / "f"), run_steps=0), FAKE_TASKS, fake_scorer, progress=False,
                     sampler=sampler)  # fmt: skip
    rest = train_rl(cfg, FAKE_TASKS, fake_scorer, progress=False, sampler=sampler)
    assert again["status"] == rest["status"] == "completed"

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]

    assert rows("e") == rows("f") and all(r["tokens_sampled"] > 0 for r in rows("e"))


@pytest.mark.e2e
def test_rl_engine_cli_runs_a_step_and_refuses_bad_use(tmp_path, capsys, monkeypatch):
    from runtime_helpers import built

    from bench import rl_engine

    tasks = tmp_path / "train.jsonl"
    task = {"task_id": "stdlib/m::f", "package": "m", "module": "m", "qualname": "f", "check": ">>> f()\n1\n",
            "prompt": 'def f():\n    """F."""', "reference": "\n    return 1\n", "examples": 1}  # fmt: skip
    tasks.write_text(
        json.dumps({"kind": "exec-tasks", "version": 1, "split": "train"}) + "\n" + json.dumps(task) + "\n"
    )
    args = ["--gguf", str(tiny_gguf()), "--tasks", str(tasks), "--out", str(tmp_path / "run"), "--steps", "1",
            "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    rl_engine.main(["--engine-entry", str(built(tiny_gguf()).dir), "--threads", "1", *args])
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["sampler"] == "engine" and summary["engine_sync_s"] > 0
    with pytest.raises(SystemExit) as exc:
        rl_engine.main(["--engine-entry", str(tmp_path), *args])  # not an entry
    assert "not a compiler.build cache entry" in str(exc.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="one process only"):
        rl_engine.main(["--engine-entry", str(built(tiny_gguf()).dir), *args])
