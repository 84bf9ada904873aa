"""Whole-model build: GGUF → one Relax module (``prefill`` + ``decode`` over a KV cache) → ``model.so`` + packed params.

    python -m compiler.build --model models/small.gguf --target auto [--cache-dir DIR] [--dump-ir DIR] [--force]
    python -m compiler.build --model models/small.gguf --target avx512 --weights tl   # 1.67-bit ternary weights

Phases (each logged with its time): ``read`` (parse + validate the GGUF), ``key`` (cache lookup: a complete entry with
the same key is reused and nothing is compiled), ``pack`` (repack ternaries to the kernels' layout, mHC coefficients,
RoPE tables), ``lower`` (the Relax IRModule; every tuned-operator kernel says whether it is tuned, and an untuned one
warns loudly), ``compile`` (``tvm.compile``), ``export`` (``model.so``, ``params.npz``, ``meta.json``, written into a
temporary directory and renamed into place). ``--dump-ir DIR`` writes the Relax module after ``lower``
(``lower.relax.py``) and after the Relax pipeline (``compile.relax.py``), and every kernel's scheduled TIR
(``tir/<name>.py``).
The cache layout and key are in :mod:`compiler.cache`; the graph in :mod:`compiler.lower`.

Nothing is read or compiled before the arguments hold: the model path (:func:`model.gguf_io.check_model_file`: a
regular file of bounded size with the GGUF magic), the target, the weight layout (``tl`` needs the avx512 target and
a CPU with AVX-512 VBMI), ``--dump-ir``, and, when there is something to compile, a writable cache directory. The CLI
reports every such failure, and every invalid model, as one ``error:`` line with exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import targets
from compiler import cache
from model.files import atomic_dir

log = logging.getLogger("compiler.build")


class BuildError(RuntimeError):
    """A model that cannot be compiled (wrong architecture, missing tensor, unsupported shape...)."""


@dataclass
class BuildResult:
    dir: Path
    key: str
    compiled: bool  # False: an existing cache entry was reused
    meta: dict

    @property
    def so(self) -> Path:
        return self.dir / "model.so"

    @property
    def params(self) -> Path:
        return self.dir / "params.npz"


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    log.info("[%s] ...", name)
    yield
    log.info("[%s] done in %.2f s", name, time.perf_counter() - t0)


def read_model(path: Path | str):
    from model.gguf_io import GGUFError, read_gguf

    try:
        return read_gguf(path)
    except (GGUFError, ValueError, OSError) as exc:
        raise BuildError(f"{path}: cannot compile: {exc}") from exc


def check_model(path: Path | str) -> Path:
    """``path`` if it can be a model file (:func:`model.gguf_io.check_model_file`: a regular file of bounded size
    with the GGUF magic), else a one-line :class:`BuildError`; reads 8 bytes."""
    from model.gguf_io import GGUFError, check_model_file

    try:
        return check_model_file(path)
    except GGUFError as exc:
        raise BuildError(str(exc)) from None


def check_writable(d: Path, what: str) -> Path:
    """Create ``d`` if needed and write (then remove) a file in it: an unwritable cache fails before the compile."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BuildError(f"{what} {d} is not writable: {exc.strerror or exc}") from None
    return d


def check_cpu_layout(weights: str, target: str) -> None:
    """``weights="tl"`` needs the avx512 target and a CPU with the instructions its kernel executes (AVX-512 VBMI's
    ``vpermb``): refused here, before the model is read and packed (the module could not run on this CPU)."""
    if weights != "tl" or target == "cuda":  # lower.check_weights has refused tl for CUDA
        return
    from compiler.ops.ternary_gemv_tl import TernaryGemvI8TL

    missing = targets.missing_op_flags(TernaryGemvI8TL)
    if target != "avx512" or missing:
        why = f"this CPU lacks {', '.join(missing)}" if missing else f"the target is {target}"
        raise BuildError(f"--weights tl needs the avx512 target on a CPU with AVX-512 VBMI (avx512vbmi), but {why}; "
                         "use --weights tile8")  # fmt: skip


def selected_records(kernels: dict[str, str], target: str, tuning_logs: Path | str | None = None) -> dict:
    """The tuning records a build selected: for each tuned kernel (op key), the sha256 of its record (this CPU kind's
    own or the target's shared one, as :func:`compiler.schedule.find_record` chose it) and its measured seconds.
    Written to ``meta.json`` (the key, computed before the build, hashes the whole database)."""
    from compiler import schedule as S
    from compiler.ops import parse_key

    tuned = sorted(k for k, source in kernels.items() if source == "tuned")
    out = {}
    for k in tuned:  # the databases were parsed by the lowering: cached
        rec = S.find_record(parse_key(k), target, tuning_logs)
        if rec is not None:
            text = json.dumps(rec.as_json(), sort_keys=True, default=str)
            out[k] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "run_secs": min(map(float, rec.run_secs))}
    return out


def build(
    model: Path | str,
    target: str = "auto",
    cache_dir: Path | str | None = None,
    dump_ir: Path | str | None = None,
    force: bool = False,
    tuning_logs: Path | str | None = None,
    weights: str = "tile8",
    cores: int | None = None,
    head: str = "auto",
    amx: str = "auto",
) -> BuildResult:
    """Compile ``model`` for ``target`` into the cache (or reuse the cached entry); see the module docstring.
    ``weights``: the CPU ternary layout, ``tile8`` (2-bit) or ``tl`` (1.67-bit, AVX-512 VBMI). ``cores``: the
    thread count the CPU kernels are built for (default :func:`targets.build_cores`: TVM's pool size). ``head``: the
    LM head as the GGUF stores it (``auto``) or ``int8`` rows with a float32 scale each (half an F16 head's bytes;
    :func:`compiler.lower.quantize_head`). ``amx``: the GEMMs where Intel AMX pays take the AMX kernel
    (:func:`compiler.lower.amx_for`: ``auto`` where this CPU has AMX-INT8, ``on``, ``off``)."""
    from compiler import lower

    model = check_model(model)
    try:
        target = targets.resolve(target)
        lower.check_weights(weights, target == "cuda")
        if head not in lower.HEADS:
            raise ValueError(f"head={head!r}: expected one of {', '.join(lower.HEADS)}")
        use_amx = lower.amx_for(target, weights, amx)
    except (ValueError, RuntimeError) as exc:
        raise BuildError(str(exc)) from exc
    check_cpu_layout(weights, target)
    if dump_ir:
        check_writable(Path(dump_ir), "--dump-ir directory")
    with phase("key"):
        cores = None if target == "cuda" else int(cores or targets.build_cores())  # meta.json records it
        key = cache.cache_key(model, target, tuning_logs, weights, cores, head=head, amx=use_amx)  # = entry_key
        d = cache.entry_dir(cache_dir, key)
        ok, why = cache.check_entry(d, key)
        log.info("cache entry %s: %s", d, why)
    if ok and not force:
        log.info("reusing %s (nothing to compile)", d)
        return BuildResult(d, key, False, cache.read_meta(d))
    check_writable(Path(cache_dir or cache.default_cache_dir()), "cache directory")  # before any compiling
    with phase("read"):
        g = read_model(model)
        cfg = g.config
        log.info("model %s: d=%d layers=%d heads=%d/%d ffn=%d streams=%d vocab=%d ctx=%d", cfg.name, cfg.d_model,
                 cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.n_streams, cfg.vocab_size,
                 cfg.max_seq_len)  # fmt: skip
    with phase("pack"):
        try:
            params = lower.pack_params(g, target, weights=weights, head=head)
        except ValueError as exc:  # a shape the layout cannot take
            raise BuildError(f"{model}: {exc}") from exc
        log.info("%d parameter arrays, %.1f MiB", len(params), sum(a.nbytes for a in params.values()) / 2**20)
    import tvm
    from tvm import relax

    with phase("lower"):
        embed = params.get("token_embd.weight", params["lm_head.weight"])  # a tied head is the embedding
        lw = lower.Lowering(cfg, target, logs_root=tuning_logs, embed_dtype=str(embed.dtype),
                            head_dtype=str(params["lm_head.weight"].dtype), weights=weights, cores=cores,
                            amx=use_amx)  # fmt: skip
        mod = lw.module()
        untuned = sorted(k for k, s in lw.kernels.items() if s == "hand")
        if untuned:
            log.warning("UNTUNED kernels (%d of %d): %s", len(untuned), len(lw.kernels), ", ".join(untuned))
        if dump_ir:
            Path(dump_ir).mkdir(parents=True, exist_ok=True)
            (Path(dump_ir) / "lower.relax.py").write_text(mod.script())
            tir_dir = Path(dump_ir) / "tir"
            tir_dir.mkdir(exist_ok=True)
            for gv, func in mod.functions_items():
                if isinstance(func, tvm.tirx.PrimFunc):
                    (tir_dir / f"{gv.name_hint}.py").write_text(func.script())
    tgt = targets.get_target(target, amx=use_amx)
    with phase("compile"):
        config = {}
        if target == "cuda":
            from compiler import cuda_cross

            cuda_cross.enable()
            mod = _dlight(_static_inputs(_mark_scheduled(mod)), tgt)
            config = {"relax.backend.use_cuda_graph": True}  # see _static_inputs: what the CUDA graphs capture
        census = None
        with tgt, tvm.transform.PassContext(opt_level=3, config=config):
            if dump_ir or target == "cuda":
                opt = relax.get_pipeline("default")(mod)
                if target == "cuda":  # what each call launches: one graph, no host launch, no allocation
                    from compiler.graph_census import census as count

                    census = count(opt)
                if dump_ir:
                    (Path(dump_ir) / "compile.relax.py").write_text(opt.script())
            pipeline = "default"
            if target != "cuda":  # weights checked once at load (runtime.engine.load_params), not on every call
                from compiler.vm_pipeline import cpu_pipeline

                pipeline = cpu_pipeline({lower.var_name(s.name) for s in lw.specs()})
            ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    with phase("export"), atomic_dir(d, prefix=".build-") as tmp:
        ex.export_library(str(tmp / "model.so"))
        np.savez(tmp / "params.npz", **params)
        meta = {
            "key": key, "target": target, "weights": weights, "head": head, "cores": cores, "amx": use_amx,
            "cpu_flags": lw.cpu_flags(),
            "compiler_version": cache.compiler_version(),
            "model": str(model),
            "config": cfg.to_dict(), "prefill_chunk": lw.chunk, "batch_sizes": list(lw.k.batch_sizes),
            "kv_block": lower.KV_BLOCK,
            "cache": lower.cache_meta(cfg),  # each after its leading dimension, n_blocks or n_states
            "params": [[s.name, list(s.shape), s.dtype] for s in lw.specs()],
            "draft_params": [s.name for s in lower.draft_specs(lw.specs())] if cfg.mtp_heads else [],
            "draft_vocab": lower.draft_vocab(cfg.vocab_size, target == "cuda"),
            "fused_draft": bool(cfg.mtp_heads and lw.k.fused_draft),  # verify_b{B} functions
            "outputs": lw.outputs(),  # per function, the result tensors the caller passes (lower.output_specs)
            "kernels": lw.kernels, "tuning_records": selected_records(lw.kernels, target, tuning_logs),
            "census": census,  # CUDA: per function, graph replays, kernels in and out of them, allocations per call
            "sha256": {n: cache.sha256_file(tmp / n) for n in cache.FILES},
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("wrote %s", d)
    return BuildResult(d, key, True, meta)


def entry_key(model: Path | str, target: str, cores: int | None = None, head: str = "auto", amx: str = "auto") -> str:
    """The cache key :func:`build` gives ``model`` with these settings (``target`` resolved, ``amx`` resolved by
    :func:`compiler.lower.amx_for`, tile8 weights, the default tuning logs): what the runtime's JIT looks up."""
    from compiler import lower

    target = targets.resolve(target)
    return cache.cache_key(model, target, cores=cores, head=head, amx=lower.amx_for(target, "tile8", amx))


def repack_into(entry: Path | str, model: Path | str) -> Path:
    """Write ``params.npz`` for an existing entry's compiled module from another GGUF of the same configuration
    (the module depends only on the config): how a GPU host without TVM's compiler gets a large model's weights
    without carrying them. Checks the config; updates the entry's checksums."""
    entry = Path(entry)
    check_model(model)  # the model's faults first, then the entry's
    meta = entry_meta(entry)
    np.savez(entry / "params.npz", **pack_for(meta, model, entry))
    meta["model"] = str(model)
    meta["sha256"] = {n: cache.sha256_file(entry / n) for n in cache.FILES}
    (entry / "meta.json").write_text(json.dumps(meta, indent=1))
    return entry


def entry_meta(entry: Path | str) -> dict:
    """A cache entry's ``meta.json``, checked to be one of :func:`build`'s (BuildError otherwise)."""
    try:
        meta = cache.read_meta(Path(entry))
    except (OSError, ValueError) as exc:
        raise BuildError(f"{entry}: not a compiler.build cache entry ({exc})") from None
    if not isinstance(meta, dict) or not {"config", "params", "target"} <= set(meta):
        raise BuildError(f"{entry}: not a compiler.build cache entry (meta.json lacks config, params or target)")
    return meta


def check_config(meta: dict, config, model: Path | str, entry: Path | str = "the entry") -> None:
    """BuildError unless ``config`` (of the GGUF ``model``) is the one the entry of ``meta`` was compiled for."""
    if config.to_dict() != meta["config"]:
        raise BuildError(f"{model}: its config differs from the one {entry} was compiled for")


def pack_for(meta: dict, model: Path | str, entry: Path | str = "the entry") -> dict[str, np.ndarray]:
    """The GGUF ``model``'s weights packed as the entry of ``meta`` (:func:`entry_meta`) takes them: its target,
    weight layout and head. The model's config must be the one the entry was compiled for (BuildError otherwise)."""
    check_model(model)
    g = read_model(model)
    check_config(meta, g.config, model, entry)
    from compiler import lower

    try:
        weights, head = meta.get("weights", "tile8"), meta.get("head", "auto")
        params = lower.pack_params(g, meta["target"], weights=weights, head=head)
    except ValueError as exc:
        raise BuildError(f"{model}: {exc}") from exc
    packed = {n: [list(a.shape), str(a.dtype)] for n, a in params.items()}
    if packed != {n: [list(shape), dtype] for n, shape, dtype in meta["params"]}:  # e.g. an entry of an older layout
        raise BuildError(f"{entry}: its parameters' names or layouts differ from this compiler's packing; rebuild it")
    return params


def _dlight(mod, tgt):
    """Schedule the kernels without a CUDA template (attention, norms, RoPE, LM head...) with dlight's GPU rules,
    per kernel, the first rule that applies (a rule whose analysis rejects a kernel is skipped)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from schedules.cuda import rows

    rules = [dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    for gv, f in list(mod.functions_items()):
        if not isinstance(f, tvm.tirx.PrimFunc) or f.attrs.get("tirx.is_scheduled", False):
            continue
        try:  # our row-reduction schedule first: dlight's rules reject these kernels or run reductions serially
            with tgt:
                mod[gv] = rows(f).with_attr("op_pattern", 8).without_attr("global_symbol")
            log.info("  cuda.rows %-37s", gv.name_hint)
            continue
        except Exception as exc:
            log.debug("rows schedule does not apply to %s: %s", gv.name_hint, exc)
        for rule in rules:
            try:
                with tgt:
                    one = dl.ApplyDefaultSchedule(rule)(tvm.IRModule({"main": f}))["main"].without_attr("global_symbol")
            except Exception:
                continue
            if one.attrs.get("tirx.is_scheduled", False):
                log.info("  dlight %-40s %s", gv.name_hint, type(rule).__name__)
                mod[gv] = one
                break
        else:
            raise BuildError(f"no dlight rule schedules kernel {gv.name_hint} for CUDA")
    return mod


def _static_inputs(mod):
    """Mark every parameter of every Relax function static (``num_input = 0``), so ``relax.backend.use_cuda_graph``
    captures each function's whole body as one CUDA graph, replayed on later calls: a decode step is one graph
    launch, with no kernel launched by the host and no allocation (the results are written into tensors the caller
    passes, :func:`compiler.lower.output_specs`). The symbolic ``n_blocks`` of the paged cache and ``n_states`` of
    the DeltaNet states are captured too (a graph per value; the runtime fixes them once).
    Contract: the caller passes the same tensors on every call of a function, inputs included, and changes only
    their contents (``runtime.engine.Engine`` does: the weights, the cache and the results are allocated once and the
    per-call inputs refilled in place, ``Engine._in``); a captured graph keeps the device addresses it saw first."""
    from tvm import relax

    for gv, f in list(mod.functions_items()):
        if isinstance(f, relax.Function):
            mod[gv] = f.with_attr("num_input", 0)
    return mod


def _mark_scheduled(mod):
    """Tag the kernels that already carry thread bindings (our CUDA templates) so dlight leaves them alone, and all
    of ours opaque to Relax's operator fusion."""
    import tvm

    for gv, f in list(mod.functions_items()):
        if isinstance(f, tvm.tirx.PrimFunc):
            f = f.with_attr("op_pattern", 8)  # opaque: Relax fuses none of our kernels with its own ops
            if "thread_binding" in f.script():
                f = f.with_attr("tirx.is_scheduled", True)
            mod[gv] = f
    return mod


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a .gguf: bitnet-mhc, or llama.cpp's bitnet / ternary llama")
    ap.add_argument("--target", default="auto", choices=["auto", "avx512", "avx2", "cuda"])
    ap.add_argument("--cache-dir", default=None, help=f"default {cache.default_cache_dir()}")
    ap.add_argument("--dump-ir", default=None, help="write each phase's IR here")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached entry exists")
    ap.add_argument("--repack-into", metavar="ENTRY", help="only write ENTRY's params.npz from --model (same config)")
    ap.add_argument(
        "--weights",
        default="tile8",
        choices=["tile8", "tl"],
        help="CPU ternary layout: tile8 (2-bit, default) or tl (1.67-bit table lookup, AVX-512 VBMI)",
    )
    ap.add_argument(
        "--cores",
        type=int,
        default=None,
        help="build the CPU kernels for this many threads (default: "
        "TVM_NUM_THREADS, else this machine's cores); to build for a machine with more cores",
    )
    ap.add_argument("--head", default="auto", choices=["auto", "int8"],
                    help="the LM head as the GGUF stores it (auto) or int8 rows with a scale each (half an F16 "
                    "head's bytes; docs/foreign_models.md)")  # fmt: skip
    ap.add_argument("--amx", default="auto", choices=["auto", "on", "off"],
                    help="prefill and decode-batch GEMMs on Intel AMX where it pays (auto: if this CPU has "
                    "AMX-INT8; compiler.ops.ternary_gemm_amx)")  # fmt: skip
    a = ap.parse_args(argv)
    if a.cores is not None and not 1 <= a.cores <= 1024:
        ap.error(f"--cores {a.cores}: expected 1..1024")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:  # every failure a user can cause is one line on stderr and exit status 1 (argparse's are status 2)
        if a.repack_into:
            print(repack_into(a.repack_into, a.model))
            return
        r = build(
            a.model, a.target, a.cache_dir, a.dump_ir, a.force, weights=a.weights, cores=a.cores, head=a.head, amx=a.amx
        )
    except BuildError as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:  # e.g. the disk filled up while exporting
        raise SystemExit(f"error: {exc.filename or ''}: {exc.strerror or exc}") from None
    print(r.dir)


if __name__ == "__main__":
    main()
