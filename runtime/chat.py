"""Generate with the compiled model: one prompt (``-p``) or an interactive loop.

    python -m runtime.chat -p "def fib(n):"                      # models/small.gguf; compiles on first use
    python -m runtime.chat --model X.gguf -p "import os" --max-tokens 128 --temperature 0.8 --top-p 0.95 --seed 1
    python -m runtime.chat                                       # interactive: one prompt per line, empty line quits

Text streams as it is generated (never splitting a UTF-8 character, never showing a special token; the model's
end-of-text token ends it); a stats line (tokens, time to first token, decode tokens/s) goes to stderr. ``--stop`` may
be given several times. Decoding is speculative (:mod:`runtime.spec_decode`): prompt-lookup drafts
(``--lookup-tokens K``, :mod:`runtime.lookup`) and, on a model with multi-token-prediction heads, the heads' drafts
(``--draft-tokens K``); ``--no-speculative`` turns both off. The tokens are those of plain decoding when greedy,
the distribution the same when sampling; the stats line says how many drafted tokens were accepted. A prompt that
ends inside a word, a newline or indentation is token-healed (the last word is generated again under constraint, see
``runtime.healing``); ``--no-token-healing`` turns that off. The arguments,
including that ``--model`` is a regular file starting with the GGUF magic, are checked before anything loads; a bad
one ends the run with a one-line error and exit status 2. ``--jit-policy`` says when the model is compiled
(``on``/``off``/``redo``/``readonly``, see :func:`runtime.engine.ensure_built`); with ``off`` and no compiled module
the run ends with one error line naming the ``compiler.build`` command (exit status 1). ``--model`` defaults to the
shipped model, in a checkout or an installed package (:func:`default_model`).

Tests: ``pytest -q tests/test_runtime_engine.py -k chat``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from importlib import resources
from pathlib import Path

from runtime.engine import CHAIN_BURST_MAX, JIT_POLICIES, Engine, Generation, JITError, SamplingParams


def default_model() -> Path:
    """The shipped model: ``models/small.gguf`` of a source checkout, else the copy an installed package carries as
    ``runtime/models/small.gguf`` (setup.py puts it there)."""
    checkout = Path(__file__).resolve().parent.parent / "models" / "small.gguf"
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("runtime") / "models" / "small.gguf"))


DEFAULT_MODEL = default_model()


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
    healed = f", healed {result.healed!r}" if result.healed else ""
    drafts = f"; {result.accepted}/{result.drafted} drafted tokens accepted" if result.drafted else ""
    print(f"[{n - result.healed_tokens} tokens{healed}, {result.finish_reason}; time to first token "
          f"{result.prefill_s * 1e3:.1f} ms; decode {tps:.1f} tokens/s{drafts}]", file=sys.stderr)  # fmt: skip
    return result


def check_model_file(path: str) -> str | None:
    """Why ``path`` cannot be a GGUF model (None if it may be): it must be a readable regular file starting with
    ``GGUF``. Cheap, so a directory, ``/dev/zero`` or a text file is refused before anything is hashed or loaded."""
    p = Path(path)
    if not p.exists():
        return f"--model {path}: no such file"
    if not p.is_file():
        return f"--model {path}: not a regular file"
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"--model {path}: cannot read it ({e.strerror})"
    if magic != b"GGUF":
        return f"--model {path}: not a GGUF file (it does not start with the GGUF magic)"
    return None


def add_draft_args(ap: argparse.ArgumentParser) -> None:
    """``--draft-tokens`` / ``--no-speculative`` (shared with ``runtime.serve``)."""
    ap.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                    help="speculative decoding: tokens the model's MTP heads draft per step, also per call of a "
                    "device chain (default: per target, at most the heads; see docs/speculative.md)")  # fmt: skip
    ap.add_argument("--lookup-tokens", type=int, default=None, metavar="K",
                    help="speculative decoding with prompt-lookup drafts: at most K tokens a step copied from where "
                    "the context's last tokens occurred before, tried before the MTP heads (default: per target; "
                    "0: off; see docs/speculative.md)")  # fmt: skip
    ap.add_argument("--no-speculative", action="store_true",
                    help="plain decoding, no drafts (same as --draft-tokens 0 --lookup-tokens 0)")  # fmt: skip
    ap.add_argument("--chain-burst", type=int, default=None, metavar="N",
                    help="plain greedy or temperature generation (no top-k/top-p, no penalties) runs N steps at a "
                    "time on the device, with no host round trip between them (default: 16; 0: off)")  # fmt: skip


def check_draft_args(a: argparse.Namespace) -> str | None:
    if a.draft_tokens is not None and not 0 <= a.draft_tokens <= 16:
        return f"--draft-tokens must be in 0..16, not {a.draft_tokens}"
    if a.lookup_tokens is not None and not 0 <= a.lookup_tokens <= 15:
        return f"--lookup-tokens must be in 0..15, not {a.lookup_tokens}"
    if a.no_speculative and (a.draft_tokens or a.lookup_tokens):
        return "--no-speculative and --draft-tokens or --lookup-tokens > 0 contradict each other"
    if a.chain_burst is not None and not 0 <= a.chain_burst <= CHAIN_BURST_MAX:
        return f"--chain-burst must be in 0..{CHAIN_BURST_MAX}, not {a.chain_burst}"
    return None


def draft_tokens(a: argparse.Namespace) -> int | None:
    """The Engine's ``draft_tokens`` from the arguments (None: its default)."""
    return 0 if a.no_speculative else a.draft_tokens


def lookup_tokens(a: argparse.Namespace) -> int | None:
    """The Engine's ``lookup_tokens`` from the arguments (None: its default)."""
    return 0 if a.no_speculative else a.lookup_tokens


def chain_burst(a: argparse.Namespace) -> int | None:
    """The Engine's ``chain_burst`` from the arguments (None: its default)."""
    return a.chain_burst


def chain_drafts(a: argparse.Namespace) -> int | None:
    """The Engine's ``chain_drafts`` from the arguments (None: its default): ``--draft-tokens`` drafts per step on
    the host and per call of a chain alike."""
    return draft_tokens(a)


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Every argument in range, or ``ap.error`` (one line on stderr, exit status 2) before anything is loaded."""
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        ap.error(f"--temperature must be a finite number >= 0 (0: greedy), not {a.temperature}")
    if not (math.isfinite(a.top_p) and 0 < a.top_p <= 1):
        ap.error(f"--top-p must be in (0, 1], not {a.top_p}")
    if a.top_k < 0:
        ap.error(f"--top-k must be >= 0 (0: off), not {a.top_k}")
    if a.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, not {a.max_tokens}")
    if a.threads is not None and a.threads < 1:
        ap.error(f"--threads must be >= 1, not {a.threads}")
    if a.prompt == "":
        ap.error("--prompt is empty")
    why = check_draft_args(a)
    if why:
        ap.error(why)
    why = check_model_file(a.model)
    if why:
        ap.error(why)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("-p", "--prompt", default=None, help="generate once for this prompt (else: interactive)")
    ap.add_argument("--target", default="auto", choices=["auto", "avx512", "avx2"])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (so is anything below 1e-5)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-token-healing", action="store_true",
                    help="do not regenerate the prompt's last word (see runtime.healing)")  # fmt: skip
    ap.add_argument("--jit-policy", default="on", choices=JIT_POLICIES,
                    help="on: reuse the cached module, compile it if absent (default); off: never compile (error if "
                    "absent); redo: always recompile; readonly: compile into a temporary directory if absent, never "
                    "write the cache")  # fmt: skip
    ap.add_argument("--head", default="auto", choices=["auto", "int8"],
                    help="the LM head as the GGUF stores it, or int8 rows (half an F16 head's bytes)")  # fmt: skip
    add_draft_args(ap)
    a = ap.parse_args(argv)
    check_args(ap, a)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        eng = Engine.from_gguf(a.model, a.target, a.cache_dir, a.threads, a.jit_policy, head=a.head,
                               token_healing=not a.no_token_healing, draft_tokens=draft_tokens(a),
                               chain_burst=chain_burst(a), chain_drafts=chain_drafts(a),
                               lookup_tokens=lookup_tokens(a))  # fmt: skip
    except (JITError, ValueError) as exc:
        raise SystemExit(f"{ap.prog}: error: {exc}") from None
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
