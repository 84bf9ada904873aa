"""Sampling (numpy, float64: :func:`sample`, :func:`filter_logits`, :func:`constrain`) and one generation's state
between model steps: which token comes next (:class:`TokenPicker`) and which text the user sees (:class:`TextStream`).

Both are driven from outside, a step at a time, so the same code serves one sequence (:meth:`runtime.engine.Engine.
generate_tokens` / ``stream_text``) and many at once (:mod:`runtime.batch`, where each request has its own pair):

    picker = TokenPicker(engine, params, result, heal)     # then, for each step's logits:
    tok = picker.pick(logits, cache_length)               # picker.done says whether the generation has ended
    piece = text.push()                                   # the visible text that token completed ("" if none)

:class:`TokenPicker` applies the repetition penalties, never samples an unused token, constrains the first tokens to
spell the healed prompt text again (:mod:`runtime.healing`), samples and decides when to stop. Plain temperature
sampling (no top-k, no top-p) is a Gumbel-max draw with counter noise (:func:`gumbel_pick`), a function of the seed,
the position and the token id, as the device's chains draw (``chain_b1``), so a seeded generation gives the same
tokens step by step, chained or batched; with top-k or top-p it draws by :func:`sample`. It stops at an
end-of-generation token, a stop string, the token limit or the context. :class:`TextStream` turns the tokens into text
pieces that never end inside a UTF-8 character and never show a stop string or its prefix.

Tests: ``pytest -q tests/test_runtime_engine.py tests/test_token_healing.py tests/test_batch.py``.
"""

from __future__ import annotations

import time

import numpy as np

from model.sampling import FMIX, GOLDEN, GUMBEL_SPAN, SAMPLE_SEEDS, Generation, SamplingParams, penalize
from runtime.healing import Heal
from runtime.lookup import NgramIndex

GREEDY_BELOW = 1e-5  # a temperature below this is greedy (dividing by it would overflow; the result is argmax anyway)


def _finite_or_inf(logits) -> np.ndarray:
    """A float64 copy with NaN as -inf."""
    x = np.array(logits, dtype=np.float64)
    x[np.isnan(x)] = -np.inf
    return x


def softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities from float64 logits, never NaN: +inf logits share the mass; all -inf gives the uniform."""
    top = x.max()
    if top == np.inf:
        p = (x == np.inf).astype(np.float64)
    elif top == -np.inf:
        p = np.ones_like(x)
    else:
        p = np.exp(x - top)
    return p / p.sum()


def filter_logits(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """numpy twin of :func:`model.generate.filter_logits`: -inf outside the top-k, then outside the top-p nucleus
    (float64; NaN counts as -inf; the most likely token always stays)."""
    x = _finite_or_inf(logits)
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k)[-top_k]
        x[x < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = softmax(x[order])
        drop = np.cumsum(p) - p >= top_p
        drop[0] = False
        x[order[drop]] = -np.inf
    return x


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    """The probabilities (float64) :func:`sample` draws from: temperature, then top-k, then top-p; None when greedy
    (below :data:`GREEDY_BELOW`, or a NaN temperature: :func:`sample` takes the argmax)."""
    x = _finite_or_inf(logits)
    t = params.temperature
    if not t >= GREEDY_BELOW:
        return None
    top = x.max()
    if np.isfinite(top):
        with np.errstate(over="ignore", invalid="ignore"):
            x = (x - top) / t  # ≤ 0: overflow can only reach -inf
        x[np.isnan(x)] = -np.inf  # -inf / inf
    return softmax(filter_logits(x, params.top_k, params.top_p))


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id. Greedy below :data:`GREEDY_BELOW` (and for a NaN temperature); never raises for finite
    settings, whatever the logits hold (NaN counts as -inf; if +inf logits are present, they alone share the mass)."""
    p = distribution(logits, params)
    if p is None:
        return int(np.argmax(_finite_or_inf(logits)))
    return int(rng.choice(p.shape[0], p=p))


def gumbel_noise(seed: int, pos: int, ids: int | np.ndarray) -> np.ndarray:
    """Standard Gumbel noise (float32) for the token ids ``ids`` (an int ``n``: ``0 .. n-1``) at position ``pos`` of
    stream ``seed``: the numpy twin of :func:`compiler.graph_kernels.gumbel` (the same counter hash, the same float32
    steps)."""

    def fmix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(FMIX[0])
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(FMIX[1])
        return h ^ (h >> np.uint32(16))

    phi = np.uint32(GOLDEN)
    row = fmix(fmix(np.array([seed], np.uint32)) + np.array([pos], np.uint32) * phi)  # arrays wrap without warnings
    ids = np.arange(ids, dtype=np.uint32) if np.ndim(ids) == 0 else np.asarray(ids).astype(np.uint32)
    return gumbel_of_hash(fmix(row + ids * phi))


def gumbel_of_hash(h: np.ndarray) -> np.ndarray:
    """``-log(-log u)``, ``u = (k + 1/2) / 2^23`` from the top 23 bits ``k`` of the uint32 hashes ``h``: always finite
    (``2^-24 ≤ u ≤ 1 - 2^-24``, both exact in float32)."""
    u = ((h >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    return -np.log(-np.log(u))


def gumbel_pick(logits: np.ndarray, temperature: float, seed: int, pos: int) -> int:
    """A draw from ``softmax(logits / temperature)`` as ``chain_b1`` makes it: the first maximum of ``logits·s +
    gumbel_noise(seed, pos)`` in float32, ``s = float32(1 / temperature)``, over the ids within
    :data:`model.sampling.GUMBEL_SPAN` of the largest ``logit·s`` (no other can win). -inf and NaN logits are never
    drawn; if +inf logits are present they alone are drawn from, uniformly; all -inf: uniform."""
    x = _finite_or_inf(logits)
    if x.max() == np.inf:
        x = np.where(x == np.inf, 0.0, -np.inf)
    elif x.max() == -np.inf:
        x = np.zeros_like(x)
    s = np.float32(1.0 / temperature)
    if s == 0:  # a temperature past float32's range: 1/T rounds to 0, which the device takes for greedy
        return int(np.argmax(x))
    with np.errstate(over="ignore"):  # huge logits overflow to +inf, as on the device
        y = x.astype(np.float32) * s
    ids = np.flatnonzero(y >= y.max() - np.float32(GUMBEL_SPAN))  # the others cannot win (the CPU kernel skips them)
    return int(ids[np.argmax(y[ids] + gumbel_noise(seed, pos, ids))])


def constrain(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """float64 logits with every id outside ``allowed`` at -inf; if no allowed id has a usable logit, they tie."""
    x = np.full(np.shape(logits), -np.inf)
    v = _finite_or_inf(np.asarray(logits)[allowed])
    x[allowed] = v if (v > -np.inf).any() else 0.0
    return x


class TokenPicker:
    """The sampling and stopping state of one generation (``result`` receives the tokens, finish reason, timings).

    With ``heal`` (a :func:`runtime.healing.plan` of the prompt) the first tokens are constrained to spell
    ``heal.prefix`` again and ``max_new_tokens`` counts from the whole prompt (it grows by the tokens backed off);
    stop strings are looked for in the text after ``heal.text``. ``prompt``: the tokens prefilled, for the
    prompt-lookup drafts (``lookup``, an :class:`~runtime.lookup.NgramIndex`, when the engine makes them and the
    generation is greedy)."""

    def __init__(
        self, engine, params: SamplingParams, result: Generation, heal: Heal | None = None, prompt: list[int] = ()
    ) -> None:
        self.engine, self.params, self.result = engine, params, result
        # prompt-lookup drafts (runtime.lookup), greedy only: they look for the context's end in the prompt and in
        # result.tokens
        self.prompt_len = len(prompt)
        greedy = params.temperature < GREEDY_BELOW
        self.lookup = NgramIndex(prompt) if greedy and getattr(engine, "lookup_tokens", 0) else None
        heal = heal if heal is not None and params.max_new_tokens > 0 else None
        self.pending = heal.prefix if heal else b""  # healed bytes still to be spelled
        result.healed, result.healed_tokens = (heal.text, heal.removed) if heal else ("", 0)
        self.limit = params.max_new_tokens + result.healed_tokens
        eog = frozenset() if params.ignore_eos else engine.eog
        self.stop_ids = eog.union(params.stop_token_ids)
        self.n_heal = 0  # generated tokens that (partly) spell the healed text
        self.rng = np.random.default_rng(params.seed)
        self.noise_seed = params.seed % SAMPLE_SEEDS  # the Gumbel noise's stream (plain temperature sampling)
        self.done = self.limit <= 0
        self.t0 = time.perf_counter()  # the request's start: prefill_s runs from here to the first token
        self.t1: float | None = None

    def pick(self, logits: np.ndarray, length: int) -> int:
        """The next token from this step's ``logits``, the sequence holding ``length`` tokens in its cache."""
        tok = self._greedy(logits)
        if tok is None and self.gumbel:
            tok = gumbel_pick(self.processed(logits), self.params.temperature, self.noise_seed, length - 1)
        elif tok is None:
            tok = sample(self.processed(logits), self.params, self.rng)
        self.push(tok, length)
        return tok

    def processed(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` as this generation samples from them: the repetition penalties over the tokens so far, unused
        tokens at -inf, the token-healing constraint (the raw array when none applies)."""
        eng, params = self.engine, self.params
        if params.penalized:
            logits = penalize(logits, self.result.tokens[self.n_heal :], params)
        if eng._never.size:
            logits = np.array(logits, dtype=np.float32)  # a copy: the step's own array may be read-only
            logits[eng._never] = -np.inf
        if self.pending:
            logits = constrain(logits, eng.token_table.allowed(self.pending))
        return logits

    def push(self, tok: int, length: int) -> None:
        """Record ``tok`` as the next token (picked by :meth:`pick` or accepted from a draft) and decide whether the
        generation ends; ``length``: the tokens in the sequence's cache when ``tok`` was chosen."""
        eng, params, result = self.engine, self.params, self.result
        now = time.perf_counter()
        if self.t1 is None:
            self.t1 = now
            result.prefill_s = now - self.t0
        result.decode_s = now - self.t1
        result.tokens.append(tok)
        if self.pending:
            self.pending, self.n_heal = eng.token_table.advance(self.pending, tok), self.n_heal + 1
        if tok in self.stop_ids:
            self._finish("stop_token")
        elif params.stop_strings and eng.tokenizer is not None and not self.pending and self._stop_string():
            self._finish("stop_string")
        elif length >= eng.ctx:
            self._finish("context")
        elif len(result.tokens) >= self.limit:
            self.done = True

    @property
    def gumbel(self) -> bool:
        """Sampling at a temperature with no top-k or top-p filter: a Gumbel-max draw (:func:`gumbel_pick`)."""
        p = self.params
        return p.temperature >= GREEDY_BELOW and p.top_k == 0 and p.top_p >= 1.0

    @property
    def plain_sample(self) -> bool:
        """The next pick is a Gumbel-max draw from the raw logits: no penalties, no healing constraint (unused tokens
        aside): what a device chain draws (``Engine.chain`` with a temperature)."""
        return self.gumbel and not self.params.penalized and not self.pending

    @property
    def plain_greedy(self) -> bool:
        """The next pick is the argmax of the raw logits: greedy, no penalties, no healing constraint (unused tokens
        and NaN logits aside, which :meth:`_greedy` checks)."""
        p = self.params
        return p.temperature < GREEDY_BELOW and not p.penalized and not self.pending

    def _greedy(self, logits: np.ndarray) -> int | None:
        """The greedy pick without copying the logits, when nothing else applies (no penalties, no healing
        constraint) and the argmax is an ordinary token with a number for a logit; else None (the full path). Same
        result as the full path: ``np.argmax`` returns the first maximum, as it does on the float64 copy."""
        if not self.plain_greedy:
            return None
        i = int(np.argmax(logits))
        if np.isnan(logits[i]) or i in self.engine.never_ids:
            return None
        return i

    def _finish(self, reason: str) -> None:
        self.result.finish_reason, self.done = reason, True

    def _stop_string(self) -> bool:
        # a stop string that the newest token completes lies in the last (its bytes + 1) tokens: decode only those
        # (a whole-list decode per token made long generations quadratic); while the window reaches back to the
        # healed text, decode from the start and drop it
        toks, eng = self.result.tokens, self.engine
        window = max(len(s.encode()) for s in self.params.stop_strings) + 2
        if len(toks) - window < self.n_heal:
            text = eng.detokenize(toks)[len(self.result.healed) :]
        else:
            text = eng.detokenize(toks[-window:])
        return any(s in text for s in self.params.stop_strings)


class TextStream:
    """The visible text of a generation, a piece per :meth:`push`: a piece never ends inside a UTF-8 character (an
    incomplete byte sequence decodes to U+FFFD and is held back until the following tokens complete it), stop strings
    are cut (and their prefixes held back until they cannot be one), the healed characters are not shown again.
    Decoding is incremental: only the tokens after the last character boundary are decoded each step.
    :meth:`finish` returns the last piece and sets ``result.text``."""

    def __init__(self, engine, params: SamplingParams, result: Generation) -> None:
        self.engine, self.stops, self.result = engine, params.stop_strings, result
        self.emitted = self.text = ""
        self.read = 0  # result.tokens[:read] decode to `text`, ending on a character boundary
        self.held = max((len(s) for s in self.stops), default=1) - 1

    def push(self) -> str:
        piece = self.engine.detokenize(self.result.tokens[self.read :])  # byte-level BPE: text of tokens[:read] + this
        if piece.endswith("\ufffd"):
            return ""
        self.text, self.read = self.text + piece, len(self.result.tokens)
        visible = self.text[len(self.result.healed) :]  # empty until the healed characters are spelled again
        cut = _stop_cut(visible, self.stops)
        safe = visible[:cut] if cut is not None else visible[: len(visible) - self.held]  # hold back a stop's prefix
        return self._emit(safe)

    def finish(self) -> str:
        text = self.text + self.engine.detokenize(self.result.tokens[self.read :])
        visible = text[len(self.result.healed) :]
        cut = _stop_cut(visible, self.stops)
        piece = self._emit(visible[:cut] if cut is not None else visible.rstrip("\ufffd"))
        self.result.text = self.emitted
        return piece

    def _emit(self, safe: str) -> str:
        if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
            piece, self.emitted = safe[len(self.emitted) :], safe
            return piece
        return ""


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None
