"""A training tool's command line from its config dataclass: one ``--flag`` per field (``int``, ``float`` or ``str``,
defaulting to the field's default; ``list[int]`` / ``list[str]`` fields take one or more values), then the config's
own ``problems()`` (where it has one) as one argparse error.

    cfg = parse_config(SFTConfig, "python -m train.sft", __doc__, argv)
"""

from __future__ import annotations

import argparse
from dataclasses import fields


def parse_config(cls, prog: str, doc: str | None, argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = {"int": int, "float": float, "str": str}
    for f in fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        if str(f.type).startswith("list["):
            default = f.default_factory()
            ap.add_argument(flag, nargs="+", type=kinds[str(f.type)[5:-1]], default=default, help=f"default {default}")
        else:
            ap.add_argument(flag, type=kinds[str(f.type)], default=f.default, help=f"default {f.default!r}")
    cfg = cls(**vars(ap.parse_args(argv)))
    if problems := getattr(cfg, "problems", list)():
        ap.error("; ".join(problems))
    return cfg
