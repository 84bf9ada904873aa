"""Generate with the compiled model: one prompt (``-p``) or an interactive loop.

    python -m runtime.chat -p "def fib(n):"                      # models/small.gguf; compiles on first use
    python -m runtime.chat --model X.gguf -p "import os" --max-tokens 128 --temperature 0.8 --top-p 0.95 --seed 1
    python -m runtime.chat                                       # interactive: one prompt per line, empty line quits

Text streams as it is generated (never splitting a UTF-8 character); a stats line (prompt tokens, time to first
token, decode tokens/s) goes to stderr. ``--stop`` may be given several times.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runtime.engine import Engine, Generation, SamplingParams

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "small.gguf"


def run_one(eng: Engine, prompt: str, params: SamplingParams, out=None, echo: bool = True) -> Generation:
    out = out or sys.stdout
    result = Generation()
    if echo:
        out.write(prompt)
    for piece in eng.stream_text(prompt, params, result):
        out.write(piece)
        out.flush()
    out.write("\n")
    n = len(result.tokens)
    tps = (n - 1) / result.decode_s if n > 1 and result.decode_s > 0 else float("nan")
    print(f"[{n} tokens, {result.finish_reason}; time to first token {result.prefill_s * 1e3:.1f} ms; "
          f"decode {tps:.1f} tokens/s]", file=sys.stderr)  # fmt: skip
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("-p", "--prompt", default=None, help="generate once for this prompt (else: interactive)")
    ap.add_argument("--target", default="auto", choices=["auto", "avx512", "avx2"])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not Path(a.model).exists():
        raise SystemExit(f"error: {a.model}: no such file")
    eng = Engine.from_gguf(a.model, a.target, a.cache_dir, a.threads)
    stops = (eng.eos,) if eng.eos is not None else ()
    params = SamplingParams(a.max_tokens, a.temperature, a.top_k, a.top_p, a.seed, stops, tuple(a.stop))
    if a.prompt is not None:
        run_one(eng, a.prompt, params)
        return
    print("interactive: type a prompt (an empty line quits)", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.rstrip("\n")
        if not prompt:
            break
        run_one(eng, prompt.replace("\\n", "\n"), params)


if __name__ == "__main__":
    main()
