"""Text generation with the PyTorch model and a KV cache: the numerical reference and eager baseline for the runtime.

:func:`stream` prefills the prompt once, then decodes one token per step from the cache and yields each token as it
is chosen (greedy at a temperature below :data:`GREEDY_BELOW`, 1e-5, else temperature → top-k → top-p sampling from a
seeded generator, in float64 with the maximum subtracted first: NaN logits count as -inf, +inf logits share the mass,
so no finite setting makes it raise or see a NaN probability, as in ``runtime.engine.sample``). It stops
at ``max_new_tokens``, a stop token id, a stop string (needs ``decode``), or the context limit. :func:`generate`
collects the stream into a :class:`Generation`.

    python -m model.generate path/to/model.gguf --prompt "def main(" --max-new-tokens 64 --temperature 0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch

from model.sampling import Generation, SamplingParams, penalize
from model.transformer import Transformer

GREEDY_BELOW = 1e-5  # a temperature below this is greedy (dividing by it would overflow; the result is argmax anyway)


def _finite_or_inf(logits: torch.Tensor) -> torch.Tensor:
    """A float64 copy with NaN as -inf."""
    x = logits.detach().to(torch.float64)
    return torch.where(torch.isnan(x), float("-inf"), x)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Probabilities over the last dimension, never NaN: +inf logits share the mass; all -inf gives the uniform."""
    top = x.amax(-1, keepdim=True)
    p = torch.where(top == float("inf"), (x == float("inf")).to(x.dtype), torch.exp(x - top))
    p = torch.where(top == float("-inf"), torch.ones_like(x), p)
    return p / p.sum(-1, keepdim=True)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the smallest set whose probability reaches top-p
    (float64; NaN counts as -inf; the most likely token always stays)."""
    logits = _finite_or_inf(logits)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = _softmax(sorted_logits)
        drop = p.cumsum(-1) - p >= top_p  # keep a token while the mass before it is < top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from the logits ``[vocab]`` of the last position (never raises for finite settings)."""
    x = _finite_or_inf(logits)
    t = params.temperature
    if not t >= GREEDY_BELOW:
        return int(torch.argmax(x))
    top = x.max()
    if torch.isfinite(top):
        x = (x - top) / t  # ≤ 0: overflow can only reach -inf
        x = torch.where(torch.isnan(x), float("-inf"), x)  # -inf / inf
    probs = _softmax(filter_logits(x, params.top_k, params.top_p))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def stream(
    model: Transformer,
    prompt: list[int],
    params: SamplingParams,
    decode: Callable[[list[int]], str] | None = None,
    finish: Generation | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one; ``finish`` (if given) receives the finish reason at the end."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if params.stop_strings and decode is None:
        raise ValueError("stop strings need a decode function")
    model.eval()
    limit = model.config.max_seq_len
    if len(prompt) >= limit:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len {limit}")
    generator = torch.Generator().manual_seed(params.seed)
    cache = model.new_cache(1, limit)
    device = model.tok_emb.weight.device
    logits = model(torch.tensor([prompt], device=device), cache)[0, -1]
    out: list[int] = []
    reason = "length"
    while len(out) < params.max_new_tokens:
        if params.penalized:
            logits = torch.from_numpy(penalize(logits.float().cpu().numpy(), out, params))
        token = sample(logits, params, generator)
        out.append(token)
        yield token
        if token in params.stop_token_ids:
            reason = "stop_token"
            break
        if params.stop_strings and any(s in decode(out) for s in params.stop_strings):
            reason = "stop_string"
            break
        if cache.pos >= limit:
            reason = "context"
            break
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    if finish is not None:
        finish.finish_reason = reason


def generate(
    model: Transformer, prompt: list[int], params: SamplingParams, decode: Callable[[list[int]], str] | None = None
) -> Generation:
    """Run :func:`stream` to the end; the text (if ``decode`` is given) is cut before the first stop string."""
    result = Generation()
    result.tokens = list(stream(model, prompt, params, decode, finish=result))
    if decode is not None:
        text = decode(result.tokens)
        cuts = [text.find(s) for s in params.stop_strings if s in text]
        result.text = text[: min(cuts)] if cuts else text
    return result


def main(argv: list[str] | None = None) -> None:
    from model.gguf_io import read_gguf
    from model.tokenizer import hf_from_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    gg = read_gguf(args.gguf)
    tok = hf_from_spec(gg.tokenizer)
    model = Transformer.from_gguf_tensors(gg.config, gg.model_tensors())
    prompt = ([gg.tokenizer.bos_id] if gg.tokenizer.bos_id is not None else []) + tok.encode(args.prompt).ids
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            stop_token_ids=tuple(i for i in (gg.tokenizer.eos_id,) if i is not None))  # fmt: skip
    out: list[int] = []
    printed = ""
    for token in stream(model, prompt, params):
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
            print(text[len(printed) :], end="", flush=True)
            printed = text
    print()


if __name__ == "__main__":
    main()
