"""File helpers shared by every room (standard library only): a file's sha256 and a directory written atomically.

* :func:`sha256_file`: the sha256 of a file, read in 1 MiB blocks (into a running hash, or as a hex digest).
* :func:`atomic_dir`: write a directory's files into a temporary sibling and rename it into place only if the block
  completes (a crash or an exception leaves no partial directory under the final name). Used by the build cache
  (``compiler.build``) and the training checkpoints (``train.checkpoint``).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path | str, h=None) -> str:
    """The sha256 hex digest of ``path``'s bytes; with ``h`` (a ``hashlib`` object), feeds the bytes into it instead
    and returns its digest so far."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(final: Path | str, prefix: str = ".tmp-") -> Iterator[Path]:
    """Yields an empty temporary directory next to ``final`` (named ``prefix…``); when the block ends without an
    exception, a directory already at ``final`` is removed and the temporary one renamed to ``final``; otherwise the
    temporary one is removed and the exception propagates."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
