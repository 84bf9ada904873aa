"""Training checkpoints: safetensors for every tensor, a JSON state for the rest, written atomically, verified on load.

A checkpoint is a folder ``ckpt-<step>/`` holding

* ``model.safetensors``  — the model's state dict (float master weights);
* ``optim.safetensors``  — every optimizer state tensor (momenta, Adam moments, step counters) and the torch RNG
  states, keyed ``<optimizer>.<param index>.<name>``;
* ``state.json``         — step, data position, configs, the optimizers' non-tensor state (param groups, lr, ...),
  and the sha256 of both safetensors files.

It is written into a temporary folder and renamed into place, then ``latest`` (a one-line text file) is replaced
atomically, so a run killed at any instant leaves either the old or the new checkpoint, never half of one. Loading
re-hashes the files: a truncated or bit-flipped checkpoint is refused with :class:`CheckpointError`, not loaded.
Nothing is unpickled.

A run resumes from :func:`resumable`: the newest checkpoint that verifies, with a warning for every newer one that
does not (a disk error, a hand-edited file). :func:`remove_stale` removes what a kill during :func:`save` leaves
(``.tmp-ckpt-*`` folders, ``latest.tmp``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.files import atomic_dir, sha256_file

LATEST = "latest"
TMP_PREFIX = ".tmp-ckpt-"

log = logging.getLogger("train.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt."""


def _split_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        plain[str(idx)] = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                plain[str(idx)][name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": plain}


def _join_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["scalars"].items()}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save(folder: Path, step: int, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
         extra: dict, keep: int = 3) -> Path:  # fmt: skip
    """Write ``folder/ckpt-<step>`` atomically, point ``latest`` at it, and keep the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{step:08d}"
    with atomic_dir(final, prefix=TMP_PREFIX) as tmp:
        model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_sd, str(tmp / "model.safetensors"))
        optim_tensors, optim_meta = rng_state(), {}
        for name, opt in optimizers.items():
            t, m = _split_optimizer(opt, name)
            optim_tensors |= t
            optim_meta[name] = m
        save_file(optim_tensors, str(tmp / "optim.safetensors"))
        state = {"step": step, "optimizers": optim_meta, "extra": extra,
                 "sha256": {f: sha256_file(tmp / f) for f in ("model.safetensors", "optim.safetensors")}}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    pointer = folder / (LATEST + ".tmp")
    pointer.write_text(final.name + "\n")
    pointer.replace(folder / LATEST)
    for old in sorted(folder.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the folder has none."""
    pointer = Path(folder) / LATEST
    if not pointer.exists():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path.name}, which does not exist")
    return path


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporary files a run killed during :func:`save` left in ``folder``; returns what was removed.
    Call it only while no other process writes checkpoints there."""
    folder = Path(folder)
    stale = sorted(folder.glob(TMP_PREFIX + "*")) + sorted(folder.glob(LATEST + ".tmp"))
    for path in stale:
        log.warning("removing %s: a checkpoint write that was killed before it finished", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def resumable(folder: Path) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint in ``folder`` that verifies and its state, or ``(None, None)`` when there is none.

    Every newer checkpoint that does not verify (or a ``latest`` naming a missing one) is skipped with a warning.
    Raises :class:`CheckpointError` when checkpoints exist but none verifies: starting over would discard them.
    """
    folder = Path(folder)
    pointer = folder / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    steps = {p: p.name.removeprefix("ckpt-") for p in folder.glob("ckpt-*") if p.is_dir()}
    candidates = sorted((p for p, s in steps.items() if s.isdigit()), key=lambda p: int(steps[p]), reverse=True)
    if named and not (folder / named).is_dir():
        log.warning("%s names %s, which does not exist; looking for an older checkpoint", pointer, named)
    errors = []
    for path in candidates:
        try:
            state = read_state(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s; falling back to the previous one", path.name, exc)
            errors.append(str(exc))
            continue
        if errors or (named and named != path.name):
            log.warning("resuming from %s (step %d), not from %s", path.name, state["step"], named or "latest")
        return path, state
    if errors:
        raise CheckpointError(f"no valid checkpoint in {folder}: " + "; ".join(errors))
    return None, None


def read_state(path: Path) -> dict:
    """Verified ``state.json`` of a checkpoint (hashes of both tensor files checked)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        expected = state["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable state.json ({exc})") from exc
    for name, digest in expected.items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} is missing or does not match its sha256 (partial or corrupt)")
    return state


def load(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer] | None = None,
         restore_rng: bool = True) -> dict:  # fmt: skip
    """Restore model (and optimizers, RNG) from a checkpoint; returns its state dict (step, extra)."""
    state = read_state(path)
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors"), device=str(device)))
    tensors = load_file(str(Path(path) / "optim.safetensors"))
    for name, opt in (optimizers or {}).items():
        if name not in state["optimizers"]:
            raise CheckpointError(f"{path}: no state for optimizer {name!r}")
        _join_optimizer(opt, tensors, state["optimizers"][name], name)
    if restore_rng:
        set_rng_state(tensors)
    return state


def changed_settings(saved: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """The settings a checkpoint was written with (``saved``, JSON) that differ from ``now`` (a dataclass's ``asdict``),
    except those a resumed run may change; ``[]`` when the run can resume."""
    now = json.loads(json.dumps(now))
    return [k for k in saved if k not in may_change and saved[k] != now.get(k)]
