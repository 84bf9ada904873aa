"""``train.eval`` with the compiled engine generating the code-validity samples (``runtime.engine.Engine`` on a
``compiler.build`` entry, CPU or CUDA): the same sampling and stop-string code path, ~30× faster than the PyTorch loop
on a GPU. Loss and bits per byte still come from the PyTorch model (``--max-tokens 0`` skips them).

    python -m bench.eval_engine --gguf models/small.gguf --data DIR --manifest M.jsonl --engine-entry ENTRY \
        --max-tokens 0 --out validity.json
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


def main(argv: list[str] | None = None) -> None:
    ap = train_eval.parser("python -m bench.eval_engine", __doc__)
    ap.add_argument("--engine-entry", type=Path, required=True, help="generate with this compiled module")
    args = ap.parse_args(argv)
    train_eval.run(ap, args, lambda tok: engine_generator(args.engine_entry, tok))


if __name__ == "__main__":
    main()
