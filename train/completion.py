"""A generated function body: where it ends, whether it parses, and the stop strings that end its generation.

Shared by the validity rate (``train.eval``), the execution tasks (``train.exec_tasks``) and their evaluation and RL
(``train.exec_eval``, ``train.rl``): a prompt is a function's signature and docstring ending at the closing quotes,
the completion is what the model writes after it.
"""

from __future__ import annotations

import ast


def cut_body(completion: str, hit_limit: bool) -> str:
    """The generated body: lines up to the first non-empty one at column 0; drop a partial last line at the limit.

    The prompt ends at the closing quotes of the docstring (no newline: with byte-level BPE a newline and the next
    line's indentation are one token, so a prompt ending in a bare newline is a token sequence training never shows),
    so the completion's first line is the rest of that line and is kept as is.
    """
    first, _, rest = completion.partition("\n")
    lines = rest.split("\n") if rest else []
    if hit_limit and lines:
        lines = lines[:-1]
    body = []
    for line in lines:
        if line.strip() and not line[0].isspace():
            break
        body.append(line)
    return first + "\n" + "\n".join(body)


def is_valid_function(prompt: str, body: str) -> bool:
    """``prompt + body`` parses as one function whose body holds a statement besides the docstring."""
    try:
        tree = ast.parse(prompt + body)
    except (SyntaxError, ValueError):
        return False
    fn = tree.body[0] if len(tree.body) == 1 else None
    return isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and len(fn.body) >= 2


def trim_to_statement(prompt: str, body: str) -> str:
    """For a body cut by the token limit: its longest prefix of whole lines that parses (the last complete statement).

    Only applied to generations the limit stopped, and reported beside the strict rate, never instead of it.
    """
    lines = body.split("\n")
    for end in range(len(lines), 1, -1):
        candidate = "\n".join(lines[:end])
        if is_valid_function(prompt, candidate):
            return candidate
    return body


STOP_STRINGS = ("\ndef ", "\nclass ", "\n@", "\nif __name__")
