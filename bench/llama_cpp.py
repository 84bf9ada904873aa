"""Head to head with llama.cpp on the same GGUF: our compiled module vs llama.cpp as a Python user gets it
(``pip install llama-cpp-python``: a benchmark peer, not a dependency of the project or its tests), 1 and 2 threads,
decode and prefill tokens/s, each as % of the bandwidth bound measured in the same run.

    python -m bench.llama_cpp --models bitnet-2b4t nano-1b-llama --threads 1 2 --runs 5 \\
        --json docs/bench/vs_llama_cpp.json
    python -m bench.llama_cpp --gguf my-model.gguf --weights tile8 tl --runs 3

Models (``--models``): ``bitnet-2b4t`` (the exact shape of Microsoft's BitNet b1.58 2B-4T, llama.cpp arch ``bitnet``,
relu² gate), ``nano-1b-llama`` (``nano-1b`` as llama.cpp's ``llama``: SwiGLU, plain residual, untied F16 LM head),
any preset by name, or ``<preset>-llama`` / ``<preset>-bitnet``; ``--gguf PATH`` adds a file of the user's. Each named
model becomes a random-weight GGUF (:func:`model.random_model.write_random_gguf`, seed 0, TQ2_0 ternaries, F16
embeddings) under ``--workdir``, written once and reused, as is our compiled module (``compiler.build`` into
``--workdir``/cache, one per ``--weights`` layout; ``tl`` entries are built per thread count). Both are made in
subprocesses before anything is timed, after a one-token llama.cpp run on the file: a file we write that llama.cpp
cannot load is a bug in our writer, and the run stops there and says so, with llama.cpp's errors (its warnings, at
load and while running, go into the JSON as ``llama_cpp_warnings``).

The 2B-4T file says ``bitnet.feed_forward_activation = relu2``; llama.cpp ignores the key and gates with silu (its
``bitnet`` graph is the 1bitLLM models'): on that file llama.cpp computes a slightly different function with the same
work (same tensors, same matmuls, one elementwise op apart). The comparison is about speed over the same bytes; the
greedy-token check (below) runs only on files both sides read as the same function (``llama``, silu ``bitnet``).

Measurements, each (implementation, weights, thread count) in its own subprocess (``bench.runtime``'s pattern:
``TVM_NUM_THREADS`` and ``OMP_NUM_THREADS`` set to the thread count; llama.cpp gets ``n_threads`` = ``n_threads_batch``
= it), interleaved: for each of ``--runs`` runs, for each thread count, ours (each layout), then llama.cpp, then the
streaming-read roof (``bench.runtime``'s roofline worker: :func:`bench.kernels.roofline_gbs` over an array of
``--roof-mib`` 512 MiB or twice the last-level cache, whichever is larger). Both sides run the same token ids
(``--prompt-tokens`` ids drawn below the vocabulary from ``numpy.random.default_rng(0)``), warm up on the first 8, then:
prefill = one call on the whole prompt plus the argmax of its logits (llama.cpp: ``Llama.eval`` with ``n_batch`` = the
prompt, so one batch), prefill tok/s = prompt / that time; decode = ``--decode-tokens`` single-token calls, each fed the
numpy argmax of the previous logits (both sides pay the argmax), decode tok/s = 1 / the median step time. A row is the
run with the median decode rate, with ``runs`` and the ``*_range`` of decode, TTFT and prefill
(:func:`bench.runtime._median_row`). llama.cpp runs with llama-cpp-python's defaults otherwise (flash attention off, F16
KV cache, mmap).

Bounds (bytes one decode step must read, over the read GB/s measured at the same thread count in the same run):

* ours: :func:`bench.runtime.decode_bytes` of the compiled entry: every packed ternary matrix in our layout (``tile8``
  2 bits per weight, ``tl`` 1.67) and its scale, the LM head in full (F16 as the GGUF stores it; the tied head is a
  copy of the embedding), the norms, one embedding row and one row of each RoPE table;
* llama.cpp: :func:`gguf_decode_bytes` of the file: every ternary tensor in its GGUF type (TQ2_0: 66 bytes per 256
  weights, 2.06 bits), the LM head in full (``output.weight``, or the F16 ``token_embd.weight`` as the tied head), one
  embedding row, the norms.

The KV cache that attention reads (ours float32, llama.cpp F16) is in neither bound; the JSON gives it at the mean
decode position. ``bound tok/s = read GB/s / bytes per token``; the prefill bound is the same weights read once for
the whole prompt (``prompt tokens x`` the decode bound): a ceiling that a compute-bound prefill stays far below, given
so that both rates are on one scale. Our rows carry ``decode_vs_llama_cpp`` and ``prefill_vs_llama_cpp`` (ours /
llama.cpp at the same thread count). Timings on a shared machine are only meaningful when nothing else runs.

The JSON (``--json``): ``command``, ``machine`` (:func:`bench.machine.machine`: CPU model and ISA flags, plus our
target, the flags our build uses, llama-cpp-python's version and llama.cpp's system info), ``git``, ``runs``,
``prompt_tokens``, ``decode_tokens``, ``rows`` (every row of every model: rates, ``*_range``, ``bytes`` and
``bytes_per_token``, ``read_gbs``, ``bound_tok_s``, ``pct_of_bound``, ``prefill_pct_of_bound``, and in ours the two
ratios) and ``models`` (per model: the GGUF, its config, our entries, ``read_gbs``, ``argmax_check``,
``llama_cpp_warnings``, ``notes`` and its rows).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from bench.runtime import (
    ROOF_MIB,
    WARMUP_TOKENS,
    _median_row,
    _result,
    _run_worker,
    decode_bytes,
    prompt_ids,
    timed_generation,
)

MODULE = "bench.llama_cpp"
DEFAULT_MODELS = ("bitnet-2b4t", "nano-1b-llama")
SETUPS = {  # named setups: preset, fields replaced
    "bitnet-2b4t": ("bitnet-2b4t", {}),
    "nano-1b-llama": ("nano-1b", {"arch": "llama", "n_streams": 1, "mtp_heads": 0}),
}
FOREIGN = {"llama": {"arch": "llama", "n_streams": 1, "mtp_heads": 0},  # as `python -m model.random_model --arch`
           "bitnet": {"arch": "bitnet", "n_streams": 1, "mtp_heads": 0, "tie_embeddings": True}}  # fmt: skip
WEIGHTS = ("tile8", "tl", "tile8+int8", "tl+int8")  # our layout, "+int8": with the int8 LM head (build --head int8)
SEED = 0

INSTALL = "pip install llama-cpp-python"
WRITER_BUG = "a file we write that llama.cpp cannot load is a bug in our writer (model.gguf_io.write_gguf)"


def default_workdir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ternary-tvm" / "peer"


def have_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def setup_config(name: str):
    """The :class:`~model.config.ModelConfig` of a named setup, a preset, or ``<preset>-llama`` / ``-bitnet``."""
    from model.config import PRESETS, get_config

    if name in SETUPS:
        preset, fields = SETUPS[name]
        return replace(get_config(preset), **fields)
    if name in PRESETS:
        return get_config(name)
    preset, _, arch = name.rpartition("-")
    if preset in PRESETS and arch in FOREIGN:
        return replace(get_config(preset), **FOREIGN[arch])  # llama.cpp's bitnet graph always ties the LM head
    raise SystemExit(f"error: unknown model {name!r}: one of {', '.join(SETUPS)}, a preset ({', '.join(PRESETS)}) "
                     "or <preset>-llama / <preset>-bitnet")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the pure pieces: bytes per token of a GGUF, the rows' bounds and ratios, the table
# ---------------------------------------------------------------------------------------------------------------
def gguf_decode_bytes(path_or_file, pos: float = 0.0) -> dict:
    """Bytes one llama.cpp decode step reads from the GGUF (``path`` or a parsed :class:`model.gguf_io.GGUFFile`), by
    kind: every ternary tensor in full in its GGUF type, the LM head in full (``output.weight``, or
    ``token_embd.weight`` when the head is tied to it), one embedding row, every norm weight; ``other``: any other
    tensor, in full. ``kv_cache``: the F16 keys and values attention reads at position ``pos`` (not in ``weights``)."""
    from model.gguf_io import FILE_TYPE, GGUFFile, parse_gguf

    f = path_or_file if isinstance(path_or_file, GGUFFile) else parse_gguf(path_or_file)
    out = {"ternary": 0, "lm_head": 0, "embedding_row": 0, "norms": 0, "other": 0}
    tied = "output.weight" not in f.tensors
    types = set()
    for name, t in f.tensors.items():
        n = int(t.data.nbytes)
        if name == "token_embd.weight":
            out["embedding_row"] += n // t.shape[0]
            out["lm_head"] += n if tied else 0
        elif name == "output.weight":
            out["lm_head"] += n
        elif t.ggml_type in FILE_TYPE:  # the ternary types
            out["ternary"] += n
            types.add(t.ggml_type.name)
        elif name.endswith("norm.weight"):
            out["norms"] += n
        else:
            out["other"] += n
    out["weights"] = sum(out.values())
    m, arch = f.metadata, f.metadata.get("general.architecture", "")
    layers, heads = m.get(f"{arch}.block_count", 0), m.get(f"{arch}.attention.head_count", 1)
    kv_heads, d = m.get(f"{arch}.attention.head_count_kv", heads), m.get(f"{arch}.embedding_length", 0)
    out["kv_cache"] = int(2 * layers * kv_heads * (d // heads) * 2 * (pos + 1))
    out["ternary_types"] = sorted(types)
    return out


def add_bounds(rows: list[dict], read_gbs: dict[int, float]) -> list[dict]:
    """Each row's bounds from its ``bytes["weights"]`` and the read GB/s at its thread count (in place), then each of
    our rows' ratios to the llama.cpp row of the same model and thread count."""
    for r in rows:
        gbs = read_gbs.get(r["threads"])
        if gbs is None:
            continue
        per_token = r["bytes"]["weights"]
        r["read_gbs"] = gbs
        r["bytes_per_token"] = per_token
        r["bound_tok_s"] = gbs * 1e9 / per_token
        r["pct_of_bound"] = 100.0 * r["decode_tok_s"] / r["bound_tok_s"]
        r["decode_gbs"] = r["decode_tok_s"] * per_token / 1e9
        r["prefill_bound_tok_s"] = r["prompt_tokens"] * r["bound_tok_s"]
        r["prefill_pct_of_bound"] = 100.0 * r["prefill_tok_s"] / r["prefill_bound_tok_s"]
    peer = {(r.get("model"), r["threads"]): r for r in rows if r["impl"] == "llama.cpp"}
    for r in rows:
        p = peer.get((r.get("model"), r["threads"]))
        if r["impl"] == "ours":
            r["decode_vs_llama_cpp"] = r["decode_tok_s"] / p["decode_tok_s"] if p else float("nan")
            r["prefill_vs_llama_cpp"] = r["prefill_tok_s"] / p["prefill_tok_s"] if p else float("nan")
    return rows


def argmax_check(ours: dict, peer: dict) -> dict:
    """Greedy tokens of one run of ours vs one of llama.cpp on the same prompt: the first pick (after the prefill),
    the overlap of the first logits' top 5, each side's gap between its first and second logit (a near tie flips on
    rounding), and how many greedy picks agree before the first difference."""
    a, b = ours["tokens"], peer["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return {"weights": ours["weights"], "threads": ours["threads"], "ours_first": a[0], "llama_cpp_first": b[0],
            "first_match": a[0] == b[0], "top5_overlap": len(set(ours["top5"]) & set(peer["top5"])),
            "ours_top2_gap": _gap(ours), "llama_cpp_top2_gap": _gap(peer),
            "greedy_tokens_agreeing": same, "greedy_tokens": min(len(a), len(b))}  # fmt: skip


def _gap(row: dict) -> float | None:
    v = row.get("top5_logits") or []
    return v[0] - v[1] if len(v) > 1 else None


def _fmt_rate(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(model: dict) -> str:
    """One model's rows as text: rates, % of bound, bytes per token, ours / llama.cpp."""
    runs = max((r.get("runs", 1) for r in model["rows"]), default=0)
    lines = [f"== {model['name']}: {model['gguf']} ({model['arch']}, {model['ffn_act']}); medians of {runs} "
             "interleaved runs",
             f"{'impl':9s} {'weights':10s} {'thr':>3s} {'prefill tok/s':>13s} {'% bound':>7s} {'decode tok/s':>12s} "
             f"{'range':>15s} {'% bound':>7s} {'MB/token':>8s} {'ours/llama.cpp prefill, decode':>31s}"]  # fmt: skip
    for r in model["rows"]:
        lo, hi = r.get("decode_tok_s_range", [r["decode_tok_s"]] * 2)
        pct = f"{r['pct_of_bound']:7.1f}" if "pct_of_bound" in r else f"{'-':>7s}"
        ppct = f"{r['prefill_pct_of_bound']:7.2f}" if "prefill_pct_of_bound" in r else f"{'-':>7s}"
        vs = f"{r['prefill_vs_llama_cpp']:.2f}x, {r['decode_vs_llama_cpp']:.2f}x" if r["impl"] == "ours" else ""
        lines.append(f"{r['impl']:9s} {r['weights']:10s} {r['threads']:3d} {r['prefill_tok_s']:13.1f} {ppct} "
                     f"{r['decode_tok_s']:12.2f} {f'[{_fmt_rate(lo)}, {_fmt_rate(hi)}]':>15s} {pct} "
                     f"{r['bytes']['weights'] / 1e6:8.1f} {vs:>31s}")  # fmt: skip
    if model.get("read_gbs"):
        gbs = ", ".join(f"{n} thr {g:.1f} GB/s" for n, g in sorted(model["read_gbs"].items()))
        lines.append(f"read roof ({model['roof_mib']} MiB stream, same run): {gbs}")
    seen = set()
    for r in model["rows"]:
        b, key = r["bytes"], (r["impl"], r["weights"])
        if key in seen:
            continue
        seen.add(key)
        mb = {k: v / 1e6 for k, v in b.items() if isinstance(v, int | float)}
        extra = (f" + scales/RoPE rows {mb['scales_mhc_rope']:.3f}" if "scales_mhc_rope" in mb
                 else f" + other {mb['other']:.3f}")  # fmt: skip
        lines.append(f"bytes/token {r['impl']} {r['weights']}: {mb['weights']:.2f} MB = ternary {mb['ternary']:.2f} "
                     f"+ LM head {mb['lm_head']:.2f} + norms {mb['norms']:.3f} + embedding row "
                     f"{mb['embedding_row']:.4f}{extra}; KV cache at decode position "
                     f"{r.get('mean_decode_pos', 0):.0f} (not in the bound): {mb['kv_cache']:.2f} MB")  # fmt: skip
    for c in model.get("argmax_check") or []:
        lines.append(f"greedy check ({c['weights']}, {c['threads']} thr): first token ours {c['ours_first']} vs "
                     f"llama.cpp {c['llama_cpp_first']} ({'same' if c['first_match'] else 'DIFFERENT'}), top-5 "
                     f"overlap {c['top5_overlap']}/5, top-2 logit gap ours {c['ours_top2_gap']:.3g} / llama.cpp "
                     f"{c['llama_cpp_top2_gap']:.3g}, {c['greedy_tokens_agreeing']}/{c['greedy_tokens']} greedy "
                     "tokens agree before the first difference (reported, not checked)")  # fmt: skip
    lines += model.get("notes", [])
    return "\n".join(lines)


def summarize(name: str, info: dict, samples: dict[tuple, list[dict]], roof_runs: dict[int, list[float]]) -> dict:
    """A model's result from its raw runs: median rows (ours first), bounds and ratios, the greedy check."""
    read_gbs = {n: float(np.median(v)) for n, v in roof_runs.items()}
    rows = [dict(_median_row(runs), model=name) for runs in samples.values()]
    rows.sort(key=lambda r: (r["threads"], r["impl"] != "ours", r["weights"]))
    add_bounds(rows, read_gbs)
    checks = []
    if info.get("same_function"):
        for (impl, _, n), runs in samples.items():
            peer = samples.get(("llama.cpp", "-", n))
            if impl == "ours" and peer:
                checks.append(argmax_check(runs[0], peer[0]))
    for r in rows:
        r.pop("tokens", None)
    return {**info, "name": name, "rows": rows, "read_gbs": read_gbs, "argmax_check": checks}


# ---------------------------------------------------------------------------------------------------------------
# workers: each in its own process
# ---------------------------------------------------------------------------------------------------------------
def _worker_write(model: str, gguf: str) -> dict:
    from model.random_model import write_random_gguf

    path, tmp = Path(gguf), Path(f"{gguf}.tmp{os.getpid()}")
    try:
        write_random_gguf(setup_config(model), tmp, SEED)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"gguf": str(path), "bytes": path.stat().st_size}


def _worker_build(gguf: str, target: str, weights: str, cores: int, cache_dir: str) -> dict:
    from compiler.build import build

    layout, _, head = weights.partition("+")
    r = build(gguf, target, cache_dir, weights=layout, cores=cores, head=head or "auto")
    return {"dir": str(r.dir), "compiled": r.compiled, "target": r.meta.get("target")}


def _worker_ours(entry: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    from runtime.engine import Engine

    eng = Engine(entry, None, threads=threads)
    g = timed_generation(eng.prefill, eng.decode, eng.reset, prompt_ids(eng.vocab, prompt_tokens), decode_tokens)
    mean_pos = prompt_tokens + (decode_tokens - 1) / 2
    weights = eng.meta.get("weights", "tile8") + ("+int8" if eng.meta.get("head") == "int8" else "")
    return _result("ours", threads, prompt_tokens, g["steps"], g["ttft"], weights=weights,
                   target=eng.target, entry=str(entry), cpu_flags=list(eng.meta.get("cpu_flags", ())),
                   mean_decode_pos=mean_pos, bytes=decode_bytes(eng.meta, mean_pos), tokens=g["tokens"],
                   top5=g["top5"], top5_logits=g["top5_logits"])  # fmt: skip


_LOG: dict = {"warnings": [], "last": 0}  # llama.cpp's warnings and errors in this worker; "cb": the C callback


def _capture_llama_log() -> None:
    """Route llama.cpp's log to :data:`_LOG` (warnings and errors kept). The ctypes callback lives in ``_LOG`` for the
    life of the process: llama.cpp logs from its destructors too, and a freed callback crashes the process."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def cb(level, text, _user):  # ggml_log_level: 3 WARN, 4 ERROR, 5 continues the previous message
        level = _LOG["last"] if level == 5 else level
        _LOG["last"] = level
        if level >= 3:
            _LOG["warnings"].append(text.decode("utf-8", "replace").rstrip("\n"))

    _LOG["cb"] = cb
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))  # replaces llama-cpp-python's own (it prints to stderr)


def _worker_llama(gguf: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    import llama_cpp

    _capture_llama_log()
    n_ctx = prompt_tokens + decode_tokens + WARMUP_TOKENS
    try:
        llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=prompt_tokens, logits_all=False, verbose=False)  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        return {"impl": "llama.cpp", "load_error": str(exc), "log": [w for w in _LOG["warnings"] if w.strip()]}
    load_warnings = [w for w in _LOG["warnings"] if w.strip()]
    vocab = llm.n_vocab()

    def logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def prefill(tokens):
        llm.eval(tokens)
        return logits()

    def decode(tok):
        llm.eval([tok])
        return logits()

    g = timed_generation(prefill, decode, llm.reset, prompt_ids(vocab, prompt_tokens), decode_tokens)
    mean_pos = prompt_tokens + (decode_tokens - 1) / 2
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = [p.split("=")[0].strip() for p in info.replace("CPU :", "").split("|") if p.strip().endswith("= 1")]
    return _result("llama.cpp", threads, prompt_tokens, g["steps"], g["ttft"], weights="-", tokens=g["tokens"],
                   top5=g["top5"], top5_logits=g["top5_logits"], mean_decode_pos=mean_pos, n_ctx=llm.n_ctx(),
                   n_batch=llm.n_batch, flash_attn=False, system_info=info.strip(), cpu_features=features,
                   load_warnings=load_warnings, run_warnings=_LOG["warnings"][len(load_warnings):],
                   llama_cpp_python=llama_cpp.__version__)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_loaded(r: dict, gguf, ours: bool) -> dict:
    """A llama.cpp worker's result, or the exit that says llama.cpp cannot load the file, with its errors."""
    if "load_error" not in r:
        return r
    log = "".join(f"\n  {line}" for line in r["log"][-20:])
    why = WRITER_BUG if ours else "is it a GGUF of an architecture llama.cpp knows?"
    raise SystemExit(f"error: llama.cpp cannot load {gguf}: {r['load_error']}{log}\n({why})")


def prepare(a, target: str) -> list[dict]:
    """Every model to bench: its GGUF (written once) and our entries (built once), outside any timing."""
    from model.gguf_io import GGUFError, parse_gguf, read_gguf

    work = Path(a.workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = str(work / "cache")
    todo = [(m, work / f"{m}-seed{SEED}.gguf", True) for m in a.models]
    todo += [(Path(p).stem, Path(p), False) for p in a.gguf]
    for name, path, ours in todo:  # an unknown name or a missing file fails here, before anything is written or built
        if ours:
            setup_config(name)
        elif not path.is_file():
            raise SystemExit(f"error: {path}: no such file")
    models = []
    for name, path, ours in todo:
        reuse = path.exists()
        if reuse and ours:
            try:
                parse_gguf(path)
            except GGUFError as exc:
                _say(f"{path}: {exc}; writing it again")
                reuse = False
        if not reuse:
            _say(f"writing the random-weight GGUF of {name} to {path} (seed {SEED}) ...")
            _run_worker(["write", "--model", name, "--gguf", str(path)], 1, MODULE)
        try:
            cfg = read_gguf(path, check_values=False).config
        except (GGUFError, ValueError, OSError) as exc:
            raise SystemExit(f"error: {path}: {exc}") from None
        same = cfg.arch == "llama" or (cfg.arch == "bitnet" and cfg.ffn_act == "silu")
        notes = []
        if cfg.arch == "bitnet" and cfg.ffn_act != "silu":
            notes.append(f"{name}: the file's FFN gate is {cfg.ffn_act} (bitnet.feed_forward_activation); llama.cpp's "
                         "bitnet graph gates with silu whatever the key says, so it computes a slightly different "
                         "function with the same work (same tensors and matmuls); the speed comparison holds, the "
                         "greedy-token check is skipped")  # fmt: skip
        _say(f"checking that llama.cpp loads and runs {path} ...")  # before any build: a refusal costs nothing
        _check_loaded(_run_worker(["llama", "--gguf", str(path), "--prompt-tokens", "1", "--decode-tokens", "1"], 1,
                                  MODULE), path, ours)  # fmt: skip
        from compiler import cache
        from compiler.lower import amx_for

        entries = {}
        for w in a.weights:
            layout = w.partition("+")[0]
            per_thread = cache.per_thread(target, layout, amx_for(target, layout))
            for n in a.threads if per_thread else a.threads[:1]:  # other entries serve every thread count
                per = f", built for {n} thread(s)" if per_thread else ""
                _say(f"compiling our module for {name} ({w}, {target}{per}; reused when cached, minutes for a 2B "
                     "model) ...")  # fmt: skip
                r = _run_worker(["build", "--gguf", str(path), "--target", target, "--weights", w,
                                 "--cache-dir", cache_dir], n, MODULE)  # fmt: skip
                for m in [n] if per_thread else a.threads:
                    entries[(w, m)] = r["dir"]
        models.append({"name": name, "gguf": str(path), "ours": ours, "gguf_bytes": path.stat().st_size,
                       "arch": cfg.arch, "ffn_act": cfg.ffn_act, "config": asdict(cfg), "same_function": same,
                       "notes": notes, "entries": {f"{w}/{n}": d for (w, n), d in entries.items()}})  # fmt: skip
    return models


def bench_model(a, model: dict, target: str) -> dict:
    common = ["--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens)]
    samples: dict[tuple, list[dict]] = {}
    roof_runs: dict[int, list[float]] = {}
    mean_pos = a.prompt_tokens + (a.decode_tokens - 1) / 2
    peer_bytes = gguf_decode_bytes(model["gguf"], mean_pos)
    warnings: list[str] = []
    for run in range(a.runs):
        for n in a.threads:
            _say(f"{model['name']}: run {run + 1}/{a.runs}, {n} thread(s)")
            for w in a.weights:
                r = _run_worker(["ours", "--entry", model["entries"][f"{w}/{n}"], *common], n, MODULE)
                samples.setdefault(("ours", w, n), []).append(r)
            r = _check_loaded(_run_worker(["llama", "--gguf", model["gguf"], *common], n, MODULE), model["gguf"],
                              model["ours"])  # fmt: skip
            r["weights"] = "+".join(peer_bytes["ternary_types"]) or "-"
            r["bytes"] = peer_bytes
            warnings += [w for w in r.pop("load_warnings") + r.pop("run_warnings") if w not in warnings]
            samples.setdefault(("llama.cpp", "-", n), []).append(r)
            roof = _run_worker(["roofline", "--target", target, "--roof-mib", str(a.roof_mib)], n)
            roof_runs.setdefault(n, []).append(roof["read_gbs"])
    res = summarize(model["name"], dict(model), samples, roof_runs)
    res["roof_mib"] = a.roof_mib
    res["llama_cpp_warnings"] = warnings
    return res


def run(a) -> dict:
    import targets
    from bench.machine import git_commit, machine

    load0 = os.getloadavg()
    target = targets.resolve(a.target)
    models = prepare(a, target)
    results = [bench_model(a, m, target) for m in models]
    rows = [r for m in results for r in m["rows"]]
    ours = next((r for r in rows if r["impl"] == "ours"), {})
    peer = next((r for r in rows if r["impl"] == "llama.cpp"), {})
    mach = {**machine(), "target": target, "ours_isa": ours.get("cpu_flags"),
            "llama_cpp_cpu_features": peer.get("cpu_features"), "llama_cpp_system_info": peer.get("system_info"),
            "llama_cpp_python": llama_cpp_version()}  # fmt: skip
    return {"bench": "llama_cpp", "command": " ".join([f"python -m {MODULE}", *sys.argv[1:]]), "argv": sys.argv[1:],
            "models": results, "rows": rows, "runs": a.runs, "threads": a.threads, "weights": a.weights,
            "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens, "target": target, "machine": mach,
            "git": git_commit(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--models", nargs="*", default=None,
                    help=f"named setups (default {' '.join(DEFAULT_MODELS)} unless --gguf is given; also any preset "
                    "or <preset>-llama / <preset>-bitnet)")  # fmt: skip
    ap.add_argument(
        "--gguf", nargs="+", default=[], help="a GGUF of your own to bench as well (llama.cpp must load it)"
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=5, help="runs of every row, interleaved; the table gives medians")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--target", default="auto", help="our module's target (auto | avx512 | avx2)")
    ap.add_argument("--weights", nargs="+", default=["tile8"], choices=WEIGHTS,
                    help="our CPU ternary layout(s): tile8 (2-bit), tl (1.67-bit, AVX-512 VBMI); several: one row "
                    "each")  # fmt: skip
    ap.add_argument("--workdir", default=str(default_workdir()),
                    help="random GGUFs and our build cache (reused when present)")  # fmt: skip
    ap.add_argument("--roof-mib", type=int, default=ROOF_MIB, help="size of the streaming-read array (MiB)")
    ap.add_argument("--json", default=None, help="write the results here")
    for hidden in ("--worker", "--model", "--entry", "--cache-dir"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.worker:
        n, p, d = a.threads[0], a.prompt_tokens, a.decode_tokens
        r = {
            "write": lambda: _worker_write(a.model, a.gguf[0]),
            "build": lambda: _worker_build(a.gguf[0], a.target, a.weights[0], n, a.cache_dir),
            "ours": lambda: _worker_ours(a.entry, n, p, d),
            "llama": lambda: _worker_llama(a.gguf[0], n, p, d),
        }[a.worker]()
        print(json.dumps(r))
        return 0
    if a.models is None:
        a.models = [] if a.gguf else list(DEFAULT_MODELS)
    if not a.models and not a.gguf:
        print("error: nothing to bench: give --models or --gguf", file=sys.stderr)
        return 2
    if min(a.threads) < 1 or a.runs < 1 or a.prompt_tokens < 1 or a.decode_tokens < 1:
        print("error: --threads, --runs, --prompt-tokens and --decode-tokens must be positive", file=sys.stderr)
        return 2
    if not have_llama_cpp():
        print(f"error: llama-cpp-python is not installed; it is this benchmark's peer, not a dependency: {INSTALL}",
              file=sys.stderr)  # fmt: skip
        return 2
    res = run(a)
    print("\n\n".join(table(m) for m in res["models"]))
    if a.json:
        from bench.machine import save_json

        save_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
