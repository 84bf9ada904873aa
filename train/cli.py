"""A training tool's command line from its config dataclass: one ``--flag`` per field (``int``, ``float`` or ``str``,
defaulting to the field's default), then the config's own ``problems()`` as one argparse error.

    cfg = parse_config(SFTConfig, "python -m train.sft", __doc__, argv)
"""

from __future__ import annotations

import argparse
from dataclasses import fields


def parse_config(cls, prog: str, doc: str | None, argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    cfg = cls(**vars(ap.parse_args(argv)))
    if problems := cfg.problems():
        ap.error("; ".join(problems))
    return cfg
