"""Whole-model build: GGUF → one Relax module (``prefill`` + ``decode`` over a KV cache) → ``model.so`` + packed params.

    python -m compiler.build --model models/small.gguf --target auto [--cache-dir DIR] [--dump-ir DIR] [--force]

Phases (each logged with its time): ``read`` (parse + validate the GGUF), ``key`` (cache lookup: a complete entry with
the same key is reused and nothing is compiled), ``pack`` (repack ternaries to the kernels' layout, mHC coefficients,
RoPE tables), ``lower`` (the Relax IRModule; every tuned-operator kernel says whether it is tuned, and an untuned one
warns loudly), ``compile`` (``tvm.compile``), ``export`` (``model.so``, ``params.npz``, ``meta.json``, written into a
temporary directory and renamed into place). ``--dump-ir DIR`` writes the Relax module after ``lower``
(``lower.relax.py``) and after the Relax pipeline (``compile.relax.py``), and every kernel's scheduled TIR
(``tir/<name>.py``).
The cache layout and key are in :mod:`compiler.cache`; the graph in :mod:`compiler.lower`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler import cache
from schedules import targets

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


def build(
    model: Path | str,
    target: str = "auto",
    cache_dir: Path | str | None = None,
    dump_ir: Path | str | None = None,
    force: bool = False,
    tuning_logs: Path | str | None = None,
) -> BuildResult:
    """Compile ``model`` for ``target`` into the cache (or reuse the cached entry); see the module docstring."""
    model = Path(model)
    target = targets.resolve(target)
    if not model.exists():
        raise BuildError(f"{model}: no such file")
    with phase("key"):
        key = cache.cache_key(model, target, tuning_logs)
        d = cache.entry_dir(cache_dir, key)
        ok, why = cache.check_entry(d, key)
        log.info("cache entry %s: %s", d, why)
    if ok and not force:
        log.info("reusing %s (nothing to compile)", d)
        return BuildResult(d, key, False, cache.read_meta(d))
    with phase("read"):
        g = read_model(model)
        cfg = g.config
        log.info("model %s: d=%d layers=%d heads=%d/%d ffn=%d streams=%d vocab=%d ctx=%d", cfg.name, cfg.d_model,
                 cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.n_streams, cfg.vocab_size,
                 cfg.max_seq_len)  # fmt: skip
    from compiler import lower

    with phase("pack"):
        params = lower.pack_params(g)
        log.info("%d parameter arrays, %.1f MiB", len(params), sum(a.nbytes for a in params.values()) / 2**20)
    import tvm
    from tvm import relax

    with phase("lower"):
        lw = lower.Lowering(cfg, target, logs_root=tuning_logs, embed_dtype=str(params["token_embd.weight"].dtype),
                            head_dtype=str(params["lm_head.T"].dtype))  # fmt: skip
        mod = lw.module()
        untuned = sorted(k for k, s in lw.kernels.items() if s != "tuned")
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
    tgt = targets.get_target(target)
    with phase("compile"):
        if dump_ir:
            with tgt:
                opt = relax.get_pipeline("default")(mod)
            (Path(dump_ir) / "compile.relax.py").write_text(opt.script())
        ex = tvm.compile(mod, target=tgt)
    with phase("export"):
        root = Path(cache_dir or cache.default_cache_dir())
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            ex.export_library(str(tmp / "model.so"))
            np.savez(tmp / "params.npz", **params)
            meta = {
                "key": key, "target": target, "compiler_version": cache.COMPILER_VERSION, "model": str(model),
                "config": cfg.to_dict(), "prefill_chunk": lw.chunk,
                "params": [[s.name, list(s.shape), s.dtype] for s in lower.param_specs(cfg, lw.embed_dtype,
                                                                                       lw.head_dtype)],
                "kernels": lw.kernels, "sha256": {n: cache.sha256_file(tmp / n) for n in cache.FILES},
            }  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if d.exists():
                shutil.rmtree(d)
            tmp.rename(d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("wrote %s", d)
    return BuildResult(d, key, True, meta)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a bitnet-mhc .gguf")
    ap.add_argument("--target", default="auto", choices=["auto", "avx512", "avx2"])
    ap.add_argument("--cache-dir", default=None, help=f"default {cache.default_cache_dir()}")
    ap.add_argument("--dump-ir", default=None, help="write each phase's IR here")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached entry exists")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        r = build(a.model, a.target, a.cache_dir, a.dump_ir, a.force)
    except BuildError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(r.dir)


if __name__ == "__main__":
    main()
