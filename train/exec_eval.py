"""pass@k on execution tasks (:mod:`train.exec_tasks`): sample completions, run their checks in the sandbox.

For every task: one greedy completion (``pass@1 greedy``) and ``n`` sampled ones (temperature / top-p from the
config, seeded per task and sample), each body cut like ``train.eval``'s validity rate, its program run by
:mod:`train.sandbox`. ``pass@k`` is the unbiased estimator of Chen et al. (2021),
``1 − C(n−c, k) / C(n, k)`` averaged over tasks (``c`` = passing samples), computed as a product so no binomial
overflows. The report also carries the parse rate of the same bodies (the old validity metric) and the reward mean,
per package as well as overall.

Run it through ``python -m train.eval --suite exec`` (the PyTorch loop) or ``python -m bench.eval_engine --suite exec``
(the compiled engine, batched).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from tqdm import tqdm

from model.sampling import SamplingParams
from train.completion import STOP_STRINGS, cut_body, is_valid_function
from train.exec_tasks import LIMITS, Task, check_candidates, check_many, reward
from train.sandbox import Limits

# gen_many([(prompt ids, params), ...]) -> [(text, finish reason), ...]
GenMany = Callable[[list[tuple[list[int], SamplingParams]]], list[tuple[str, str]]]


@dataclass(frozen=True)
class ExecEvalConfig:
    n: int = 20  # samples per task for pass@k
    ks: tuple[int, ...] = (1, 10)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    greedy: bool = True  # also one greedy completion per task (pass@1 greedy)
    workers: int = 0  # sandbox processes at once (0: one per core)
    jobs_per_call: int = 256  # completions handed to the generator at once (whole tasks; at least one task)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` passing of ``n`` samples: ``1 − C(n−c, k)/C(n, k)`` (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 ≤ c ≤ n and k ≥ 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task (n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def sample_params(cfg: ExecEvalConfig, eot: int | None, greedy: bool, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
                          top_p=1.0 if greedy else cfg.top_p, seed=seed,
                          stop_token_ids=() if eot is None else (eot,), stop_strings=STOP_STRINGS)  # fmt: skip


def generate_bodies(gen_many: GenMany, tok, tasks: Sequence[Task], cfg: ExecEvalConfig, eot: int | None, ctx: int,
                    progress: bool = True) -> list[list[str]]:  # fmt: skip
    """Per task: ``[greedy body] + n sampled bodies`` (the greedy one only when ``cfg.greedy``). The jobs of several
    tasks go to ``gen_many`` together (up to ``cfg.jobs_per_call``), so a batched generator keeps its rows busy; a
    job's seed depends on its task and sample only, not on which call it went in."""
    per_task = (1 if cfg.greedy else 0) + cfg.n
    tasks_per_call = max(1, cfg.jobs_per_call // max(1, per_task))
    out: list[list[str]] = []
    bar = tqdm(total=len(tasks), desc="sampling", unit="task", disable=not progress)
    for start in range(0, len(tasks), tasks_per_call):
        jobs = []
        for i in range(start, min(len(tasks), start + tasks_per_call)):
            ids = tok.encode(tasks[i].prompt).ids[-(ctx - cfg.max_new_tokens - 1) :]
            jobs += [(ids, sample_params(cfg, eot, True, 0))] if cfg.greedy else []
            jobs += [(ids, sample_params(cfg, eot, False, cfg.seed * 1_000_003 + i * 1009 + j)) for j in range(cfg.n)]
        texts = [cut_body(text, reason in ("length", "context")) for text, reason in gen_many(jobs)]
        out += [texts[k : k + per_task] for k in range(0, len(texts), per_task)]
        bar.update(len(jobs) // per_task)
    bar.close()
    return out


def score(tasks: Sequence[Task], bodies: list[list[str]], cfg: ExecEvalConfig, limits: Limits = LIMITS,
          progress: bool = True) -> dict:  # fmt: skip
    """Run every body's check; pass@k, greedy pass@1, parse rate and mean reward, overall and per package."""
    flat = [(i, b) for i, bs in enumerate(bodies) for b in bs]
    verdicts = []
    step = 256
    for s in tqdm(range(0, len(flat), step), desc="checking", unit="batch", disable=not progress):
        part = flat[s : s + step]
        verdicts += check_candidates([tasks[i] for i, _ in part], [b for _, b in part], limits, cfg.workers)
    per_task: dict[int, list] = defaultdict(list)
    for (i, b), v in zip(flat, verdicts, strict=True):
        per_task[i].append((b, v))
    rows = []
    for i, t in enumerate(tasks):
        runs = per_task[i]
        greedy, sampled = (runs[0], runs[1:]) if cfg.greedy else (None, runs)
        c = sum(v.passed for _, v in sampled)
        rows.append({"task_id": t.task_id, "package": t.package, "n": len(sampled), "passed": c,
                     "greedy_passed": bool(greedy and greedy[1].passed),
                     "parsed": sum(is_valid_function(t.prompt, b) for b, _ in runs) / max(1, len(runs)),
                     "reward": sum(reward(t, b, v) for b, v in runs) / max(1, len(runs)),
                     "statuses": dict(Counter(v.status for _, v in runs))})  # fmt: skip
    return {"settings": asdict(cfg) | {"limits": asdict(limits)}, **summarize(rows, cfg), "tasks": rows}


def summarize(rows: list[dict], cfg: ExecEvalConfig) -> dict:
    """The headline figures of per-task rows (overall, and per package in ``packages``)."""

    def figures(rs: list[dict]) -> dict:
        f = {"tasks": len(rs)}
        for k in cfg.ks:
            if cfg.n >= k:
                f[f"pass_at_{k}"] = sum(pass_at_k(r["n"], r["passed"], k) for r in rs) / max(1, len(rs))
        if cfg.greedy:
            f["pass_at_1_greedy"] = sum(r["greedy_passed"] for r in rs) / max(1, len(rs))
        f["parse_rate"] = sum(r["parsed"] for r in rs) / max(1, len(rs))
        f["mean_reward"] = sum(r["reward"] for r in rs) / max(1, len(rs))
        return f

    by_pkg: dict[str, list] = defaultdict(list)
    for r in rows:
        by_pkg[r["package"]].append(r)
    return {**figures(rows), "n_packages": len(by_pkg),
            "packages": {p: figures(rs) for p, rs in sorted(by_pkg.items())}}  # fmt: skip


def torch_group_generator(model, tok) -> GenMany:
    """A :data:`GenMany` over the PyTorch model. Runs of jobs with the same prompt and settings are one group; the
    groups of a call with the same settings and size are sampled as one batch (``train.rl.sample_groups``: the prompts
    left-padded and prefilled together, every row decoded together), its draws from one generator seeded by the
    batch's first seed, so a call's output depends on its jobs only (the same ``--jobs-per-call`` samples the same
    bodies). Each row ends as ``train.rl.completion_body`` says."""
    import torch

    from model.bitlinear import frozen_weights
    from train.rl import sample_groups, stopped

    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731

    def runs(jobs):  # (start, length) of each run of one prompt with one setting (seeds aside)
        i = 0
        while i < len(jobs):
            ids, p = jobs[i]
            j = i + 1
            while j < len(jobs) and jobs[j][0] == ids and replace(jobs[j][1], seed=p.seed) == p:
                j += 1
            yield i, j - i
            i = j

    def run(jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str]]:
        batches: dict[tuple, list[int]] = defaultdict(list)  # (settings, group size) -> the runs' starts, in order
        for start, n in runs(jobs):
            batches[replace(jobs[start][1], seed=0), n].append(start)
        out: list[tuple[str, str] | None] = [None] * len(jobs)
        for (_, n), starts in batches.items():
            p = jobs[starts[0]][1]
            gen = torch.Generator(model.tok_emb.weight.device).manual_seed(p.seed)
            with frozen_weights(model):
                groups = sample_groups(model, [jobs[s][0] for s in starts], n, p, gen, decode)
            for start, group in zip(starts, groups, strict=True):
                for k, toks in enumerate(group):
                    ended = stopped(toks, p, decode)
                    text = decode(toks[:-1] if toks and toks[-1] in p.stop_token_ids else toks)
                    cuts = [text.find(x) for x in p.stop_strings if x in text]
                    out[start + k] = (text[: min(cuts)] if cuts else text, "stop" if ended else "length")
        return out  # type: ignore[return-value]

    return run


def available(tasks: Sequence[Task], limits: Limits, workers: int = 0) -> tuple[list[Task], dict[str, str]]:
    """The tasks whose original body passes on this machine, and why each other one does not (a task file mined
    on one machine can name a module another lacks, or a library version whose outputs differ)."""
    verdicts = check_many(list(tasks), [t.reference for t in tasks], limits, workers)
    ok = [t for t, v in zip(tasks, verdicts, strict=True) if v.passed]
    why = {t.task_id: v.status if not v.attempted else f"{v.failed} of {v.attempted} examples fail"
           for t, v in zip(tasks, verdicts, strict=True) if not v.passed}  # fmt: skip
    return ok, why


def evaluate_exec(gen_many: GenMany, tok, tasks: Sequence[Task], cfg: ExecEvalConfig, ctx: int,
                  limits: Limits = LIMITS, progress: bool = True) -> dict:  # fmt: skip
    """Sample and score the tasks that run here (see :func:`available`; the others are listed in the report)."""
    tasks, unavailable = available(tasks, limits, cfg.workers)
    eot = tok.token_to_id("<|endoftext|>")
    bodies = generate_bodies(gen_many, tok, tasks, cfg, eot, ctx, progress)
    return score(tasks, bodies, cfg, limits, progress) | {"unavailable": unavailable}
