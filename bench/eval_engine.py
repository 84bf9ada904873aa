"""``train.eval`` with the compiled engine generating the code-validity samples (``runtime.engine.Engine`` on a
``compiler.build`` entry, CPU or CUDA): the same sampling and stop-string code path, ~30× faster than the PyTorch loop
on a GPU. Loss and bits per byte still come from the PyTorch model (``--max-tokens 0`` skips them).

    python -m bench.eval_engine --gguf models/small.gguf --data DIR --manifest M.jsonl --engine-entry ENTRY \
        --max-tokens 0 --out validity.json

``--suite exec`` (pass@k, ``train.exec_eval``) runs the samples of a task as one continuous batch
(``runtime.batch.Batcher``: every compiled decode batch row busy; a sequence's tokens are the same alone or batched):

    python -m bench.eval_engine --suite exec --gguf models/small.gguf --tasks T.jsonl --engine-entry ENTRY --out x.json
"""

from __future__ import annotations

from pathlib import Path

from model.generate import SamplingParams
from train import eval as train_eval


def engine_generator(entry: Path, tok):
    """The same with the compiled runtime (``runtime.engine.Engine`` on a ``compiler.build`` entry, CPU or CUDA):
    the same sampling and stop-string code path, much faster than the PyTorch loop."""
    from runtime.engine import Engine, Generation

    eng = Engine(entry, None, tokenizer=tok)

    def run(ids: list[int], params: SamplingParams) -> tuple[str, str]:
        res = Generation()
        out = list(eng.generate_tokens(ids, params, res))
        text = tok.decode(out, skip_special_tokens=False)
        cuts = [text.find(x) for x in params.stop_strings if x in text]
        return (text[: min(cuts)] if cuts else text), res.finish_reason

    return run


def engine_batch_generator(entry: Path, tok):
    """``gen_many([(ids, params), ...]) -> [(text, finish reason), ...]`` over one continuous batch of the engine."""
    from runtime.batch import Batcher
    from runtime.engine import Engine

    batcher = Batcher(Engine(entry, None, tokenizer=tok))

    def run(jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str]]:
        return [(r.result.text, r.result.finish_reason) for r in run_batch(batcher, jobs)]

    return run


def run_batch(batcher, jobs: list[tuple[list[int], SamplingParams]]) -> list:
    """Run ``jobs`` (prompt ids, sampling parameters) to the end through ``batcher`` (a ``runtime.batch.Batcher``),
    admitting each as rows free up; their finished ``Request``s in job order. A job the engine refuses is a
    RuntimeError that says how many were refused and why the first was."""
    from runtime.batch import Request

    errors: dict[int, str] = {}
    reqs = [Request(None, params, prompt_ids=ids, emit=_on_error(errors, i)) for i, (ids, params) in enumerate(jobs)]
    waiting = list(reqs)
    while waiting or batcher.running:
        while waiting and batcher.admit(waiting[0]):
            waiting.pop(0)
        if batcher.running:
            batcher.step()
    if errors:
        raise RuntimeError(f"the engine refused {len(errors)} of {len(jobs)} requests: {next(iter(errors.values()))}")
    return reqs


def _on_error(errors: dict, i: int):
    def emit(kind: str, value) -> None:
        if kind == "error":
            errors[i] = value

    return emit


def main(argv: list[str] | None = None) -> None:
    ap = train_eval.parser("python -m bench.eval_engine", __doc__)
    ap.add_argument("--engine-entry", type=Path, required=True, help="generate with this compiled module")
    args = ap.parse_args(argv)
    train_eval.run(ap, args, lambda tok: engine_generator(args.engine_entry, tok),
                   lambda tok: engine_batch_generator(args.engine_entry, tok))  # fmt: skip


if __name__ == "__main__":
    main()
